#!/bin/sh
# After install or upgrade (dpkg: configure; rpm: 1 or 2): systemd learns
# of the unit. Nothing is enabled or started: the operator does that once
# /etc/vmroam/vmroam.toml is set. An upgrade does not restart a running
# agent either: a restart tears down its tunnels, the operator chooses when.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || :
fi
exit 0
