#!/usr/bin/env bash
# Run every svmgpu test: set-up if needed, the host suite (cargo test for the workspace),
# then the guest KTAP suite with 1 and 2 vGPUs. Each guest run's console must be free of
# kernel warnings, BUGs, lockdep and DMA-API reports. Prints a summary; exits 1 on failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/test.sh [--host-only | --guest-only] [--gpus "1 2"] [--out DIR]

  --host-only     only cargo test
  --guest-only    only the guest suites
  --gpus LIST     vGPU counts to run the guest suite with (default "1 2")
  --out DIR       keep the logs of every guest run in DIR (default: a temp folder, kept on failure)
EOF
}

HOST=1 GUEST=1 GPU_COUNTS="1 2" OUT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --host-only) GUEST=0; shift ;;
        --guest-only) HOST=0; shift ;;
        --gpus) GPU_COUNTS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-test.XXXXXX")}
mkdir -p "$OUT"

step "set-up (cached after the first run)" "$SVMGPU_ROOT/scripts/setup.sh" --quiet

results=()
failed=0
total_p=0 total_f=0 total_s=0
if [[ $HOST -eq 1 ]]; then
    host_suite() {
        (cd "$SVMGPU_ROOT" && cargo test --workspace 2>&1 | tee "$OUT/cargo-test.log")
    }
    if step "host suite: cargo test --workspace" host_suite; then
        host=$(grep -E '^test result:' "$OUT/cargo-test.log" | awk '{p+=$4; f+=$6} END {print p+0, f+0}')
        total_p=$((total_p + ${host% *})); total_f=$((total_f + ${host#* }))
        results+=("host: ${host% *} passed, ${host#* } failed")
    else
        failed=1; results+=("host: cargo test FAILED (see $OUT/cargo-test.log)")
    fi
fi

if [[ $GUEST -eq 1 ]]; then
    for n in $GPU_COUNTS; do
        dir="$OUT/guest-$n"
        guest_suite() {
            "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus "$n" --out "$dir" --timeout 600 \
                -- /bin/svmgpu-ktap --out /dev/ttyS1 >"$OUT/guest-$n.out" 2>&1
        }
        rc=0
        step "guest suite, $n vGPU(s)" guest_suite || rc=$?
        summary=$("$SVMGPU_ROOT/scripts/lib/ktap-check.sh" "$dir/channel.log" "guest-$n" 2>&1) || rc=1
        echo "$summary"
        if ! "$SVMGPU_ROOT/scripts/lib/console-check.sh" "$dir/console.log" 2>>"$OUT/guest-$n.out"; then
            rc=1; summary+=$'\n'"guest-$n: kernel console shows a warning/BUG/lockdep/DMA-API report"
        fi
        first=$(sed -n 's/^# guest uptime at first test: //p' "$dir/channel.log" 2>/dev/null | head -n1)
        [[ -n $first ]] && log "guest-$n: boot to first test: $first of guest uptime"
        if [[ $rc -ne 0 ]]; then
            failed=1
            tail -n 40 "$OUT/guest-$n.out" >&2 || true
        fi
        results+=("$(echo "$summary" | tail -n1)")
        read -r p f s < <(echo "$summary" | tail -n1 | awk '{print $2, $4, $6}')
        total_p=$((total_p + ${p:-0})); total_f=$((total_f + ${f:-0})); total_s=$((total_s + ${s:-0}))
    done
fi

echo
echo "==== svmgpu test summary ($(elapsed) s; logs in $OUT) ===="
printf '%s\n' "${results[@]}"
echo "total: $total_p passed, $total_f failed, $total_s skipped"
if [[ $failed -ne 0 ]]; then
    echo "RESULT: FAILED"
    exit 1
fi
echo "RESULT: PASSED"
