#!/bin/sh
# After the files are gone (dpkg: remove, purge; rpm: 0): systemd forgets
# the unit.
set -e
case $1 in
remove | purge | 0)
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload || :
	fi
	;;
esac
exit 0
