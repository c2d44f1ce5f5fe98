#!/usr/bin/env bash
# console-check.sh LOG: fail (exit 1) if a guest console log shows a kernel warning,
# BUG, oops, panic, lockdep report, sleeping-in-atomic report or DMA-API debug report;
# print each offending line with a little context.
set -euo pipefail
[[ ${1:-} == -h || ${1:-} == --help || $# -ne 1 ]] && {
    echo "Usage: console-check.sh CONSOLE_LOG"; [[ $# -eq 1 ]] && exit 0; exit 2; }
log=$1
[[ -f $log ]] || { echo "console-check: $log missing (the guest did not run)" >&2; exit 1; }
patterns=(
    'WARNING: '                               # WARN_ON and friends
    'BUG: '                                   # BUG(), sleeping in atomic, bad page state
    'kernel BUG at'
    'Oops: '
    'Kernel panic'
    'general protection fault'
    'possible recursive locking detected'     # lockdep
    'possible circular locking dependency'
    'inconsistent lock state'
    'INFO: possible irq lock inversion'
    'suspicious RCU usage'
    'lockdep: '
    'DEBUG_LOCKS_WARN_ON'
    'DMA-API: '                               # CONFIG_DMA_API_DEBUG
    'Call Trace:'
    'UBSAN: '
    'rust_panic'
    'hung_task'
)
# Informational lines that contain a pattern but report nothing wrong.
benign='DMA-API: (preallocated [0-9]+ debug entries|debugging enabled by kernel config)'
found=0
for p in "${patterns[@]}"; do
    hits=$(grep -n -F -- "$p" "$log" | grep -v -E -- "$benign" || true)
    if [[ -n $hits ]]; then
        found=1
        echo "console-check: '$p' in $log:" >&2
        head -n 3 <<<"$hits" >&2
    fi
done
if [[ $found -eq 1 ]]; then
    exit 1
fi
echo "console-check: clean ($(wc -l <"$log") lines)" >&2
