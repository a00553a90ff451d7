#!/bin/sh
# version.sh VERSION prints the package version (Debian and RPM alike) of
# VERSION, a `git describe --always --dirty` (the Makefile's VERSION):
#   v1.2.3                      1.2.3
#   v1.2.3-rc1                  1.2.3~rc1      (before 1.2.3)
#   v1.2.3-4-gabc1234[-dirty]   1.2.3+4.gabc1234[.dirty]  (after 1.2.3)
#   abc1234[-dirty] (no tag)    0.0.0+abc1234[.dirty]
# Both formats want a leading digit, no '-' (it separates the release),
# and only letters, digits, '.', '+' and '~'.
set -eu
[ $# -eq 1 ] && [ -n "$1" ] || { echo "usage: version.sh VERSION" >&2; exit 2; }
v=${1#v}
meta=
case $v in *-dirty) v=${v%-dirty} dirty=dirty ;; *) dirty= ;; esac
# Commits since the tag: -N-gHASH.
since=$(printf '%s' "$v" | sed -nE 's/^.*-([0-9]+)-(g[0-9a-f]+)$/\1.\2/p')
[ -z "$since" ] || v=$(printf '%s' "$v" | sed -E 's/-[0-9]+-g[0-9a-f]+$//')
# A tag has a dot (a bare hash never does), a prerelease follows a '-'.
base=$(printf '%s' "$v" | sed -nE 's/^([0-9]+(\.[0-9]+)+).*$/\1/p')
if [ -n "$base" ]; then
	pre=${v#"$base"}
	pre=${pre#-}
else
	base=0.0.0 pre= since=${since:-$v}
fi
clean() { printf '%s' "$1" | tr -c 'A-Za-z0-9.' '.'; }
for part in "$since" "$dirty"; do
	[ -z "$part" ] || meta=${meta:+$meta.}$(clean "$part")
done
out=$base
[ -z "$pre" ] || out=$out~$(clean "$pre")
[ -z "$meta" ] || out=$out+$meta
printf '%s\n' "$out"
