#!/usr/bin/env bash
# Run every svmgpu test: set-up if needed, the host suite (cargo test for the workspace),
# the guest KTAP suite with 1, 2 and 4 vGPUs, then the fault-injection suite (one guest per
# injected fault kind, started with run-vm.sh --inject SPEC). Each guest run's console must
# be free of kernel warnings, BUGs, lockdep and DMA-API reports, and the device's audit must
# count no stale access. Prints a summary; exits 1 on failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/test.sh [--host-only | --guest-only | --inject-only] [--gpus "1 2 4"]
                       [--no-inject] [--inject "NAME..."] [--out DIR]

  --host-only     only cargo test
  --guest-only    only the guest suites (KTAP suite and fault-injection suite)
  --inject-only   only the fault-injection suite
  --no-inject     skip the fault-injection suite
  --inject LIST   only these entries of the fault-injection suite (names below)
  --gpus LIST     vGPU counts to run the guest suite with (default "1 2 4")
  --out DIR       keep the logs of every guest run in DIR (default: a temp folder, kept on failure)

Fault-injection suite: one guest with 2 vGPUs per entry, its device started with the
entry's spec, running the guest test inject_NAME (tests/guest/src/inject.rs):
$(printf '  %s\n' "${INJECT_SUITE[@]}" | sed 's/|/  /')
EOF
}

# NAME|SPEC: the guest test inject_NAME runs against a device started with --inject SPEC.
# The tests rely on the filters (device, asid, ctx, after): keep both sides in step.
INJECT_SUITE=(
    "tlb_inval_delay|tlb-inval-delay:delay_us=3000"
    "tlb_inval_drop|tlb-inval-drop:count=1,device=0"
    "tlb_inval_error|tlb-inval-error:count=1,device=0,status=internal"
    "preempt_delay|preempt-delay:delay_us=3000"
    "preempt_drop|preempt-drop:count=1,device=0"
    "preempt_error|preempt-error:count=1,device=0"
    "engine_hang|engine-hang:asid=1,count=3,device=0"
    "event_overflow|engine-hang:asid=1,count=1,device=0;event-overflow:device=0"
    "fault_spurious|fault-spurious:p=0.05,count=100"
    "fault_duplicate|fault-duplicate:p=1"
    "fault_phantom|fault-phantom:p=0.05,count=40"
    "completion_corrupt|completion-corrupt:rec=job,ctx=1,count=1,device=0;completion-corrupt:rec=job,field=kind,ctx=2,count=1,device=0;completion-corrupt:rec=job,field=status,ctx=3,count=1,device=0;completion-corrupt:rec=command,count=1,device=1"
    "completion_duplicate|completion-duplicate:p=1"
    "completion_reorder|completion-reorder:p=0.5"
    "device_reset|device-reset:after=6,count=1,device=0"
    "reset_timeout|device-reset:after=3,count=1,delay_us=8000000,device=1"
    "walk_read_error|walk-read-error:p=0.05,count=60"
)

HOST=1 GUEST=1 INJECT=1 GPU_COUNTS="1 2 4" OUT="" INJECT_ONLY=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --host-only) GUEST=0; INJECT=0; shift ;;
        --guest-only) HOST=0; shift ;;
        --inject-only) HOST=0; GUEST=0; INJECT=1; shift ;;
        --no-inject) INJECT=0; shift ;;
        --inject) INJECT_ONLY=$2; shift 2 ;;
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

if [[ $INJECT -eq 1 ]]; then
    ip=0 if=0
    for entry in "${INJECT_SUITE[@]}"; do
        kind=${entry%%|*} spec=${entry#*|}
        if [[ -n $INJECT_ONLY && " $INJECT_ONLY " != *" $kind "* ]]; then continue; fi
        dir="$OUT/inject-$kind"
        inject_run() {
            "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus 2 --out "$dir" --timeout 300 --inject "$spec" \
                -- /bin/svmgpu-ktap --only "inject_$kind" --out /dev/ttyS1 >"$OUT/inject-$kind.out" 2>&1
        }
        rc=0
        step "fault injection: $kind ($spec)" inject_run || rc=$?
        summary=$("$SVMGPU_ROOT/scripts/lib/ktap-check.sh" "$dir/channel.log" "inject-$kind" 2>&1) || rc=1
        echo "$summary"
        if ! "$SVMGPU_ROOT/scripts/lib/console-check.sh" "$dir/console.log" 2>>"$OUT/inject-$kind.out"; then
            rc=1; echo "inject-$kind: kernel console shows a warning/BUG/lockdep/DMA-API report"
        fi
        # The device's own view (its statistics, written when it exits): no stale access.
        if grep -q '"stale_accesses":[1-9]' "$dir/device-stats.json" 2>/dev/null; then
            rc=1; echo "inject-$kind: the device's audit counted stale accesses"
        fi
        if [[ $rc -eq 0 ]]; then
            ip=$((ip + 1))
        else
            if=$((if + 1)); failed=1
            tail -n 40 "$OUT/inject-$kind.out" >&2 || true
        fi
    done
    results+=("inject: $ip passed, $if failed, 0 skipped (one guest per fault kind)")
    total_p=$((total_p + ip)); total_f=$((total_f + if))
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
