#!/usr/bin/env bash
# Checks that `make fuzz` runs every fuzz target of the module and that each
# keeps a corpus in testdata: for each `func FuzzX(` in a *_test.go file of
# package directory D, the Makefile's fuzz target must have a line running
# -fuzz '^FuzzX$$' on ./D/, and D/testdata/fuzz/FuzzX/ must hold at least
# one input. It also refuses Makefile lines for targets that no longer
# exist. Run from the repository root (make lint does).
set -euo pipefail
status=0
declare -A want=()
while IFS= read -r hit; do
	file=${hit%%:*}
	name=${hit#*:func }
	name=${name%%(*}
	dir=$(dirname "${file#./}")
	want["$dir $name"]=1
	if ! grep -qE -- "-fuzz '\^${name}\\\$\\\$' .*\./${dir}/\$" Makefile; then
		echo "Makefile: the fuzz target does not run $name in ./$dir/" >&2
		status=1
	fi
	if [ -z "$(ls -A "$dir/testdata/fuzz/$name" 2>/dev/null)" ]; then
		echo "$dir/testdata/fuzz/$name: no corpus (run make fuzz and commit what it finds, or add seeds)" >&2
		status=1
	fi
done < <(grep -rE --include='*_test.go' -e '^func Fuzz[A-Za-z0-9_]*\(' . | grep -v '^\./\.git/' | sed -E 's/^([^:]*):[0-9]*:/\1:/' || true)
if [ ${#want[@]} -eq 0 ]; then
	echo "no fuzz targets found: is this the repository root?" >&2
	exit 1
fi
while IFS= read -r line; do
	name=$(sed -E "s/.*-fuzz '\^([A-Za-z0-9_]*)\\\$\\\$'.*/\1/" <<<"$line")
	dir=$(sed -E 's#.* \./(.*)/$#\1#' <<<"$line")
	if [ -z "${want["$dir $name"]:-}" ]; then
		echo "Makefile: fuzz line for $name in ./$dir/, which has no such target" >&2
		status=1
	fi
done < <(grep -E -- "-fuzz '" Makefile)
exit $status
