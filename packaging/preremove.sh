#!/bin/sh
# Before the package goes (dpkg: remove; rpm: 0), not before an upgrade
# (dpkg: upgrade; rpm: 1): a running agent is stopped, since its binary is
# about to go. Its enablement, if the operator made one, stays theirs.
set -e
case $1 in
remove | 0)
	if [ -d /run/systemd/system ]; then
		systemctl stop vmroam.service || :
	fi
	;;
esac
exit 0
