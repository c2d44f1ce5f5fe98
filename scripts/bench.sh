#!/usr/bin/env bash
# SVM benchmark (issue 12, section 1): per-extra-GPU cost of invalidating one SVM range
# mirrored on N vGPUs in each svm_mode at several device TLB latencies, GPU fault service
# time end to end (device-timed) against a bare command round trip, and fault throughput
# against contexts and N, for each SVM implementation (svm_impl=native|gpusvm, issue 13).
# Prints the tables and writes the plots into docs/.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/bench.sh [options]

Boots one guest per (TLB latency, vGPU count) (scripts/run-vm.sh --gpus N, device started
with --tlb-inval-latency-ns), and in each, for every SVM implementation of --svm-impl and
every svm_mode (single, per_device, shared; module reloaded with svm_impl=IMPL
svm_mode=MODE) runs --reps times
  svmgpu bench-svm-invalidate   CPU invalidation (mprotect) of one 64 KiB SVM range that
                                every vGPU mirrors (fault-mode VMs, no bind): median over
                                --iters, with the no-mirror baseline (the same call with
                                nothing mirrored) and the devices' own invalidation count;
                                in a guest of N > 1, each repetition is paired with the
                                same run mirrored on one device only (--devices 1), so the
                                per-extra-GPU cost compares runs made at the same time
then, in the guests of the first latency, per implementation, in svm_mode=shared,
  svmgpu bench-fault            GPU fault service: end to end on the device's clock
                                (GET_STATS fault_retry_ns), the driver's split, the bare
                                command round trip, user-visible cost; fault throughput for
                                each --contexts count
Prints Markdown tables (scripts/lib/bench-report.py) per implementation, then a table of
both side by side; writes docs/bench-invalidation.svg and docs/bench-fault-throughput.svg
(of the first implementation; the others' plots go to the --out folder), keeps the raw
results. Fails if any repetition's
device invalidation count is not iterations x N (a mode that skipped a device).

Options:
  --gpus LIST            vGPU counts (default "1 2 4 8"; the per-extra-GPU cost needs 1)
  --tlb-latency-us LIST  device TLB invalidation latencies, µs (default "100 1000 10000")
  --reps N               repetitions per point, median and spread reported (default 5)
  --iters N              invalidations timed per repetition (default 30)
  --fault-iters N        faults timed for the service time (default 100; 0: none)
  --contexts LIST        context counts of the fault throughput (default "1 8 64"; "" none)
  --svm-impl LIST        SVM implementations (default "native gpusvm": the driver's own,
                         and the one on the kernel's drm_gpusvm)
  --docs DIR             where the plots go (default docs/ in the checkout)
  --out DIR              keep the guest logs and results.txt in DIR (default: a temp folder)
  -h, --help             this text

A benchmark, not a test: timings under TCG on a shared host vary by tens of percent from
run to run. Takes about 1 to 3 minutes per guest on a 2-core host (TCG), after the
one-time set-up (scripts/setup.sh).
EOF
}

GPUS="1 2 4 8" LATS="100 1000 10000" REPS=5 ITERS=30 FAULT_ITERS=100 CONTEXTS="1 8 64" OUT="" DOCS=""
IMPLS="native gpusvm"
need() { [[ $# -ge 2 ]] || { usage >&2; die "$1 needs a value"; }; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --gpus) need "$@"; GPUS=$2; shift 2 ;;
        --tlb-latency-us) need "$@"; LATS=$2; shift 2 ;;
        --reps) need "$@"; REPS=$2; shift 2 ;;
        --iters) need "$@"; ITERS=$2; shift 2 ;;
        --fault-iters) need "$@"; FAULT_ITERS=$2; shift 2 ;;
        --contexts) need "$@"; CONTEXTS=$2; shift 2 ;;
        --svm-impl) need "$@"; IMPLS=$2; shift 2 ;;
        --docs) need "$@"; DOCS=$2; shift 2 ;;
        --out) need "$@"; OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
for n in $GPUS; do [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 64 ]] || die "--gpus: '$n' is not 1..64"; done
for l in $LATS; do [[ $l =~ ^[0-9]+$ ]] || die "--tlb-latency-us: '$l' is not a number of µs"; done
for c in $CONTEXTS; do [[ $c =~ ^[0-9]+$ && $c -ge 1 && $c -le 64 ]] || die "--contexts: '$c' is not 1..64"; done
for v in "$REPS" "$ITERS" "$FAULT_ITERS"; do [[ $v =~ ^[0-9]+$ ]] || die "'$v' is not a number"; done
[[ $REPS -ge 1 && $ITERS -ge 1 ]] || die "--reps and --iters must be at least 1"
[[ -n ${GPUS// /} && -n ${LATS// /} ]] || die "--gpus and --tlb-latency-us need at least one value"
for i in $IMPLS; do [[ $i == native || $i == gpusvm ]] || die "--svm-impl: '$i' is not native or gpusvm"; done
[[ -n ${IMPLS// /} ]] || die "--svm-impl: empty list"
DOCS=${DOCS:-$SVMGPU_ROOT/docs}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-bench.XXXXXX")}
mkdir -p "$OUT" "$DOCS"
OUT=$(readlink -f "$OUT")
RESULTS=$OUT/results.txt
: >"$RESULTS"
COMMAND="scripts/bench.sh --gpus \"$GPUS\" --tlb-latency-us \"$LATS\" --reps $REPS --iters $ITERS --fault-iters $FAULT_ITERS --contexts \"$CONTEXTS\" --svm-impl \"$IMPLS\""

guests=$(( $(wc -w <<<"$GPUS") * $(wc -w <<<"$LATS") ))
log "benchmark: vGPU counts [$GPUS], TLB latencies [$LATS] µs, $REPS x $ITERS invalidations per" \
    "point, $FAULT_ITERS faults, contexts [$CONTEXTS], SVM implementations [$IMPLS]; $guests guests;" \
    "logs in $OUT"

step "set-up (cached after the first run)" "$SVMGPU_ROOT/scripts/setup.sh" --quiet
export SVMGPU_SETUP_DONE=1

first_lat=${LATS%% *}
ctx_list=$(tr -s ' ' ',' <<<"$CONTEXTS" | sed 's/^,//; s/,$//')
for lat in $LATS; do
    for n in $GPUS; do
        # The guest side: one line of key=value pairs per measurement, on the channel port,
        # tagged with the implementation (` svm_impl=IMPL` appended by `tag`).
        script="tag() { sed \"s/^bench=.*/& svm_impl=\$1/\" /tmp/b >/dev/ttyS1; }
for i in $IMPLS; do
for m in single per_device shared; do
  rmmod svmgpu && insmod /lib/modules/svmgpu.ko svm_mode=\$m svm_impl=\$i || exit 1
  r=0; while [ \$r -lt $REPS ]; do
    [ $n -gt 1 ] && { /bin/svmgpu bench-svm-invalidate --iters $ITERS --size 65536 --devices 1 >/tmp/b || exit 1; tag \$i; }
    /bin/svmgpu bench-svm-invalidate --iters $ITERS --size 65536 >/tmp/b || exit 1; tag \$i
    r=\$((r + 1))
  done
done"
        if [[ $lat == "$first_lat" ]] && { [[ $FAULT_ITERS -gt 0 ]] || [[ -n $ctx_list ]]; }; then
            fargs="--iters $FAULT_ITERS"
            [[ -n $ctx_list ]] && fargs+=" --contexts $ctx_list"
            script+="
/bin/svmgpu bench-fault $fargs >/tmp/b || exit 1; tag \$i"
        fi
        script+="
done"
        dir=$OUT/lat-$lat-gpus-$n
        run_guest() {
            "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus "$n" --device-args "--tlb-inval-latency-ns $((lat * 1000))" \
                --timeout 1800 --out "$dir" -- sh -c "$script" >"$dir.out" 2>&1
        }
        step "guest with $n vGPU(s), TLB latency $lat µs" run_guest \
            || { tail -n 30 "$dir.out" >&2; die "the guest run with $n vGPU(s) at $lat µs failed"; }
        grep -a '^bench=' "$dir/channel.log" | tr -d '\r' | sed "s/^/lat_us=$lat reps=$REPS guest_gpus=$n /" >>"$RESULTS"
        # The devices' own per-stage timing over the whole guest run (statistics JSON).
        python3 - "$dir/device-stats.json" "$lat" "$n" >>"$RESULTS" <<'PY'
import json, sys
devs = json.load(open(sys.argv[1]))
keys = ["tlb_invalidations", "tlb_inval_device_ns", "tlb_inval_late_ns", "faults_retried",
        "fault_retry_ns", "fault_deliver_ns", "fault_driver_ns", "fault_resume_ns"]
print(f"lat_us={sys.argv[2]} guest_gpus={sys.argv[3]} bench=device "
      + " ".join(f"{k}={sum(d.get(k, 0) for d in devs)}" for k in keys))
PY
    done
done

echo
echo "==== svmgpu SVM benchmark ($(elapsed) s; raw results: $RESULTS) ===="
rc=0 first_impl=${IMPLS%% *}
: >"$OUT/report.md"
for i in $IMPLS; do
    grep " svm_impl=$i\$" "$RESULTS" >"$OUT/results-$i.txt" || true
    docs=$DOCS
    [[ $i == "$first_impl" ]] || { docs=$OUT/plots-$i; mkdir -p "$docs"; }
    { echo; echo "## svm_impl=$i"; echo; } | tee -a "$OUT/report.md"
    python3 "$SVMGPU_ROOT/scripts/lib/bench-report.py" "$OUT/results-$i.txt" "$docs" "$COMMAND" \
        | tee -a "$OUT/report.md" || rc=1
done
if [[ $(wc -w <<<"$IMPLS") -gt 1 ]]; then
    { echo; echo "## The implementations side by side"; echo
      python3 "$SVMGPU_ROOT/scripts/lib/bench-compare.py" "$RESULTS" $IMPLS; } | tee -a "$OUT/report.md" || rc=1
fi
exit "$rc"
