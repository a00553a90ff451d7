#!/usr/bin/env bash
# Builds the lab's QEMU guest from Debian packages: a kernel (vmlinuz) and an
# initramfs (initrd.img) with busybox, iperf3 and the virtio and wireguard
# modules, into CACHE/<key>/, and prints that directory. The key hashes this
# script, the versions of the packages and those of this host's packages
# whose libraries iperf3 links with (copied in from here), so a build is
# reused until one of them changes. Needs apt-get (with its lists fetched),
# dpkg-deb, dpkg-query, cpio, gzip, and xz or zstd when the kernel's modules
# are compressed.
#
# The guest's /init reads from the kernel command line:
#   vmroam.ip=A      its IPv4 address (a /32 on eth0)
#   vmroam.gw=G      its gateway, reached on-link (default 169.254.0.1)
#   vmroam.rmem=N    net.core.rmem_default and rmem_max (default 4194304)
# and serves, on port 80, /cgi-bin/counters: boot id, uptime,
# /proc/net/snmp and /proc/net/dev; and an iperf3 server on port 5201.
set -euo pipefail

usage() {
	echo "usage: $0 [--cache DIR]   (default DIR: /var/cache/vmroam-lab/guest)" >&2
	exit 2
}
cache=/var/cache/vmroam-lab/guest
while [ $# -gt 0 ]; do
	case $1 in
	--cache) [ $# -ge 2 ] || usage; cache=$2; shift 2 ;;
	-h | --help) usage ;;
	*) usage ;;
	esac
done
for c in apt-get apt-cache dpkg-deb dpkg-query cpio gzip sha256sum; do
	command -v "$c" >/dev/null 2>&1 || { echo "make-guest: $c not found" >&2; exit 1; }
done

# The cloud kernel is the smaller one and has virtio_net and wireguard (modules).
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "make-guest: linux-image-cloud-amd64 unknown to apt (run apt-get update)" >&2; exit 1; }
pkgs=("$kpkg" busybox-static iperf3 libiperf0)
versions=$(apt-cache policy "${pkgs[@]}" | awk '/^[^ ]/ {p = $1; sub(/:$/, "", p)} /Candidate:/ {print p "=" $2}')
[ "$(echo "$versions" | grep -c '=[^(]')" -eq ${#pkgs[@]} ] || { echo "make-guest: no candidate for some of ${pkgs[*]}: $versions" >&2; exit 1; }
# iperf3's other libraries come from this host: the library packages that
# iperf3 and libiperf0 depend on, at their installed versions.
hostpkgs=$(apt-cache depends iperf3 libiperf0 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^lib/ && $2 != "libiperf0" {print $2}' | sort -u)
[ -n "$hostpkgs" ] || { echo "make-guest: apt-cache depends iperf3 libiperf0 names no libraries" >&2; exit 1; }
hostversions=$(for p in $hostpkgs; do
	v=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null) || { echo "make-guest: iperf3's $p is not installed here (apt-get install $p)" >&2; exit 1; }
	echo "host:$p=$v"
done)
key=$( (cat "$0"; echo "$versions"; echo "$hostversions") | sha256sum | cut -c1-16)
out=$cache/$key
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
	echo "$out"
	exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "make-guest: downloading ${pkgs[*]}" >&2
apt-get download -q -o APT::Sandbox::User=root "${pkgs[@]}" >&2
mkdir ex root
for d in *.deb; do dpkg-deb -x "$d" ex; done

r=root
mkdir -p $r/bin $r/proc $r/sys $r/dev $r/tmp $r/etc $r/www/cgi-bin $r/lib/modules
cp ex/bin/busybox $r/bin/busybox
cp ex/usr/bin/iperf3 $r/bin/iperf3

# iperf3's libraries: libiperf from its package, the rest as ldd finds them
# here, each from one of the host packages in the key.
deps=$(LD_LIBRARY_PATH=$work/ex/usr/lib/x86_64-linux-gnu ldd ex/usr/bin/iperf3) || {
	echo "make-guest: ldd iperf3 failed: $deps" >&2
	exit 1
}
if missing=$(echo "$deps" | grep 'not found'); then
	echo "make-guest: iperf3 needs libraries this host lacks:" >&2
	echo "$missing" >&2
	exit 1
fi
echo "$deps" |
	awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]*ld-linux/ {print $1}' |
	while read -r lib; do
		if [ "${lib#"$work"/ex/}" = "$lib" ]; then
			owner=$(dpkg-query -S "$lib" 2>/dev/null || dpkg-query -S "$(readlink -f "$lib")" 2>/dev/null) || owner=
			owner=${owner%%:*}
			if [ -z "$owner" ] || ! echo "$hostpkgs" | grep -qx "$owner"; then
				echo "make-guest: $lib (package ${owner:-unknown}) is not from iperf3's dependencies $(echo $hostpkgs): its version is not in the cache key" >&2
				exit 1
			fi
		fi
		dst=$r${lib#"$work"/ex}
		mkdir -p "$(dirname "$dst")"
		cp -L "$lib" "$dst"
	done
[ -e $r/lib64/ld-linux-x86-64.so.2 ] || { echo "make-guest: no dynamic loader found for iperf3" >&2; exit 1; }

# Modules in dependency order, from each module's modinfo "depends=".
kver=${kpkg#linux-image-}
mdir=ex/lib/modules/$kver
[ -d "$mdir" ] || { echo "make-guest: $mdir missing" >&2; exit 1; }
cp ex/boot/vmlinuz-"$kver" vmlinuz
declare -A seen file
order=()
# Module names use '_' where file names may have '-' (poly1305-x86_64.ko).
# Compressed modules (.ko.xz, .ko.zst) are decompressed: busybox's insmod
# takes a plain .ko.
mkdir mods
while read -r f; do
	b=$(basename "$f")
	b=${b%.xz} b=${b%.zst} b=${b%.ko}
	file[${b//-/_}]=$f
done < <(find "$mdir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
# plainmod F: the path of module file F uncompressed.
plainmod() {
	local f=$1 tool
	case $f in
	*.ko) echo "$f"; return 0 ;;
	*.ko.xz) tool=xz ;;
	*.ko.zst) tool=zstd ;;
	esac
	command -v $tool >/dev/null 2>&1 || { echo "make-guest: $f is compressed: $tool not found (apt-get install ${tool/xz/xz-utils})" >&2; exit 1; }
	local out=mods/$(basename "${f%.*}")
	[ -e "$out" ] || $tool -dc "$f" >"$out" || { echo "make-guest: $tool -dc $f failed" >&2; exit 1; }
	echo "$out"
}
addmod() {
	local name=$1 f dep
	[ -n "${seen[$name]:-}" ] && return 0
	seen[$name]=1
	f=${file[$name]:-}
	if [ -z "$f" ]; then
		grep -q "/$name.ko$" "$mdir/modules.builtin" && return 0
		echo "make-guest: module $name not found" >&2
		exit 1
	fi
	f=$(plainmod "$f") || exit 1
	for dep in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | tr ',' ' '); do
		addmod "${dep//-/_}"
	done
	cp "$f" $r/lib/modules/
	order+=("$(basename "$f")")
}
for m in virtio virtio_ring virtio_pci virtio_net wireguard; do addmod $m; done
printf '%s\n' "${order[@]}" >$r/etc/modules

cat >$r/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do
	insmod /lib/modules/$m || echo "vmroam-guest: insmod $m failed"
done
ip= gw=169.254.0.1 rmem=4194304
for a in $(cat /proc/cmdline); do
	case $a in
	vmroam.ip=*) ip=${a#*=} ;;
	vmroam.gw=*) gw=${a#*=} ;;
	vmroam.rmem=*) rmem=${a#*=} ;;
	esac
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
sysctl -q -w net.core.rmem_default=$rmem net.core.rmem_max=$rmem
ip link set lo up
ip link set eth0 up
[ -n "$ip" ] && ip addr add $ip/32 dev eth0
ip route add $gw dev eth0
ip route add default via $gw dev eth0
iperf3 -s -D -p 5201
httpd -p 80 -h /www
[ -n "$ip" ] && arping -q -U -c 1 -I eth0 $ip
echo "vmroam-guest: ready ip=$ip boot_id=$(cat /proc/sys/kernel/random/boot_id)"
while :; do sleep 3600; done
EOF
cat >$r/www/cgi-bin/counters <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "boot_id $(cat /proc/sys/kernel/random/boot_id)"
echo "uptime $(cat /proc/uptime)"
echo "== snmp"
cat /proc/net/snmp
echo "== dev"
cat /proc/net/dev
EOF
chmod 755 $r/init $r/www/cgi-bin/counters

tmp=$(mktemp -d "$cache/.new-XXXXXX")
chmod 755 "$tmp"
mv vmlinuz "$tmp/vmlinuz"
(cd $r && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -1 >"$tmp/initrd.img"
echo "$versions" >"$tmp/versions"
# Another build may have finished first: keep the one that is there.
mv -T "$tmp" "$out" 2>/dev/null || rm -rf "$tmp"
echo "$out"
