#!/usr/bin/env bash
# kunit-check.sh CONSOLE_LOG [KMOD_DIR]: the KUnit results the guest kernel printed on its
# console (KUnit runs a module's suites when it is loaded, and the kernel's built-in ones at
# boot). Fails (exit 1) on any `not ok` in them, at any level, and when a suite the module
# declares (#[kunit_tests(NAME)] in KMOD_DIR, default guest-driver/kmod) never reported
# `ok`: the suites are enumerated from what the kernel ran, checked against the source.
set -euo pipefail
usage() { echo "Usage: kunit-check.sh CONSOLE_LOG [KMOD_DIR]"; }
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
[[ $# -ge 1 && $# -le 2 ]] || { usage >&2; exit 2; }
log=$1
kmod=${2:-$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)/guest-driver/kmod}
[[ -f $log ]] || { echo "kunit-check: $log missing" >&2; exit 1; }
declared=$(grep -rho --include='*.rs' '#\[kunit_tests([A-Za-z0-9_]*)\]' "$kmod" | sed 's/.*(\(.*\))]/\1/' | sort -u)
[[ -n $declared ]] || { echo "kunit-check: no #[kunit_tests(...)] in $kmod" >&2; exit 1; }
# KTAP result lines of the kernel log: "[ time] <indent>ok|not ok N name".
results=$(sed -n -E 's/^\[ *[0-9]+\.[0-9]+\] ( *)((not )?ok [0-9]+ .*)$/\1\2/p' "$log")
bad=0
if notok=$(grep -E '^ *not ok ' <<<"$results"); then
    echo "kunit-check: KUnit failures in $log:" >&2
    head -n 5 <<<"$notok" >&2
    bad=1
fi
ran=$(sed -n -E 's/^ok [0-9]+ ([A-Za-z0-9_]+).*/\1/p' <<<"$results" | sort -u)
for s in $declared; do
    grep -qx "$s" <<<"$ran" || { echo "kunit-check: suite $s (declared in $kmod) did not report ok in $log" >&2; bad=1; }
done
[[ $bad -eq 0 ]] && echo "kunit-check: $(wc -w <<<"$declared") module suite(s) ok ($(tr '\n' ' ' <<<"$declared")); $(wc -l <<<"$ran") suite(s) ran in all" >&2
exit "$bad"
