#!/usr/bin/env bash
# ktap-check.sh FILE [LABEL]: parse a KTAP v1 document (lines that are not KTAP are
# ignored), print each top-level result and a summary line "N passed, N failed, N skipped",
# and exit 1 on any `not ok` (top-level or nested: a nested failure under an `ok` parent
# still fails), a missing version line or plan, a plan of 0 tests (`1..0`: nothing ran), or
# a count that does not match the plan (a guest that died half-way).
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help || $# -lt 1 ]]; then
    echo "Usage: ktap-check.sh KTAP_FILE [LABEL]"
    [[ $# -ge 1 ]] && exit 0
    exit 2
fi
file=$1 label=${2:-$(basename "$1")}
[[ -f $file ]] || { echo "ktap-check: $file missing" >&2; exit 1; }

awk -v label="$label" '
function indent_of(s) { match(s, /^ */); return RLENGTH }
{
    sub(/\r$/, "")
    line = $0
    ind = indent_of(line)
    body = substr(line, ind + 1)
    if (body ~ /^KTAP version 1$/) { if (ind == 0) version = 1; next }
    if (body ~ /^1\.\.[0-9]+$/) { if (ind == 0) plan = substr(body, 4) + 0; next }
    if (body ~ /^(not )?ok [0-9]+ /) {
        if (ind == 0) {
            ran++
            # An `ok` parent over a nested `not ok` counts as a failure too.
            if (body ~ /^not ok/ || ndiag > 0) { failed++; status = "FAIL" }
            else if (body ~ /# SKIP/) { skipped++; status = "SKIP" }
            else { passed++; status = "PASS" }
            name = body; sub(/^(not )?ok [0-9]+ /, "", name)
            printf "  %-4s %s: %s\n", status, label, name
            if (status == "FAIL") for (i = 1; i <= ndiag; i++) printf "         %s\n", diag[i]
            ndiag = 0
        } else if (body ~ /^not ok/) {
            sub_failed++
            name = body; sub(/^not ok [0-9]+ /, "", name)
            diag[++ndiag] = "case " name ": " lastdiag
            subfail[sub_failed] = name
        }
        next
    }
    if (body ~ /^# / && body !~ /^# Subtest:/) lastdiag = substr(body, 3)
}
END {
    bad = 0
    if (!version) { print "ktap-check: " label ": no \"KTAP version 1\" line"; bad = 1 }
    if (plan == "") { print "ktap-check: " label ": no plan"; bad = 1 }
    else if (plan == 0) { print "ktap-check: " label ": plan 1..0: no test ran"; bad = 1 }
    else if (ran != plan) { printf "ktap-check: %s: plan says %d tests, %d reported\n", label, plan, ran; bad = 1 }
    if (sub_failed > 0) {
        printf "ktap-check: %s: %d nested test(s) not ok:", label, sub_failed
        for (i = 1; i <= sub_failed && i <= 10; i++) printf " %s;", subfail[i]
        printf "\n"
        bad = 1
    }
    printf "%s: %d passed, %d failed, %d skipped\n", label, passed, failed, skipped
    exit (bad || failed > 0) ? 1 : 0
}' "$file"
