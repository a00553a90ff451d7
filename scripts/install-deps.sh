#!/usr/bin/env bash
# Installs, from Debian's packages, the tools the lab and the tests use and
# that this machine lacks: iproute2 (ip), wireguard-tools (wg), iperf3,
# procps (sysctl), iputils-ping, nftables (nft), for the Xen hook's test
# Xen's hotplug scripts (xen-utils-common) and the ifconfig vif-route calls
# (net-tools), rsvg-convert (librsvg2-bin), which renders the migration
# timeline picture in its test, and for the systemd unit's test systemd-analyze
# (systemd; a Debian container has none), setpriv (util-linux), promtool
# and prometheus (prometheus), which check the alerting rules and evaluate the
# dashboard's queries over a lab run, for the QEMU guest (lab/qemu.go,
# scripts/make-guest.sh) qemu-system-x86, cpio and dpkg-deb, and for the
# package's test rpm and rpm2cpio (with cpio: to look into the .rpm) and groff
# (groff-base, to render the man page). Each entry is
# package:what-it-provides, a command or,
# starting with /, a file. Does nothing when all are there.
set -euo pipefail
need=()
for pkg_what in iproute2:ip wireguard-tools:wg iperf3:iperf3 procps:sysctl iputils-ping:ping nftables:nft \
	xen-utils-common:/etc/xen/scripts/vif-route net-tools:ifconfig librsvg2-bin:rsvg-convert systemd:systemd-analyze util-linux:setpriv \
	prometheus:promtool qemu-system-x86:qemu-system-x86_64 cpio:cpio dpkg:dpkg-deb \
	rpm:rpm rpm2cpio:rpm2cpio groff-base:groff; do
	what=${pkg_what#*:}
	case $what in
	/*) [ -e "$what" ] ;;
	*) command -v "$what" >/dev/null 2>&1 ;;
	esac || need+=("${pkg_what%%:*}")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "missing tools; install these packages: ${need[*]}" >&2
	exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
