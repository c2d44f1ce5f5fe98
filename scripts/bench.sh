#!/usr/bin/env bash
# SVM benchmark: invalidation time of one SVM range mirrored on N = 1, 2, 4, 8 vGPUs in each
# svm_mode, GPU fault service time against a bare command round trip, and fault throughput
# with many contexts. Prints a table and writes an SVG plot of invalidation time against N.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/bench.sh [options]

Boots one guest per vGPU count (scripts/run-vm.sh --gpus N) with a large device TLB
invalidation latency (so that it, not emulation noise, dominates), and in each guest, for
every svm_mode (single, per_device, shared; module reloaded with svm_mode=MODE) runs
  svmgpu bench-svm-invalidate   CPU invalidation (mprotect) of one 64 KiB SVM range that
                                every vGPU mirrors (fault-mode VMs, no bind): median time
then, in svm_mode=shared,
  svmgpu bench-fault            GPU fault service time (PAGE_FAULT event to FAULT_REPLY
                                done) against a bare command round trip (GET_INFO), and
                                fault throughput with many contexts
Prints a table, writes the plot (SVG) and keeps the raw results.

Options:
  --gpus LIST          vGPU counts (default "1 2 4 8")
  --tlb-latency-us US  device TLB invalidation latency (default 10000)
  --iters N            invalidations timed per mode and N (default 30)
  --fault-iters N      faults timed for the service time (default 100)
  --contexts N         contexts of the throughput run (default 8)
  --svg PATH           the plot (default docs/bench-invalidation.svg in the checkout)
  --out DIR            keep the guest logs and results.txt in DIR (default: a temp folder)
  -h, --help           this text

Takes about 1.5 to 3 minutes per vGPU count on a 2-core host (TCG guests), after the
one-time set-up (scripts/setup.sh).
EOF
}

GPUS="1 2 4 8" LAT_US=10000 ITERS=30 FAULT_ITERS=100 CONTEXTS=8 OUT="" SVG=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --gpus) GPUS=$2; shift 2 ;;
        --tlb-latency-us) LAT_US=$2; shift 2 ;;
        --iters) ITERS=$2; shift 2 ;;
        --fault-iters) FAULT_ITERS=$2; shift 2 ;;
        --contexts) CONTEXTS=$2; shift 2 ;;
        --svg) SVG=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
SVG=${SVG:-$SVMGPU_ROOT/docs/bench-invalidation.svg}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-bench.XXXXXX")}
mkdir -p "$OUT" "$(dirname "$SVG")"
DEVICE_ARGS="--tlb-inval-latency-ns $((LAT_US * 1000))"
RESULTS=$OUT/results.txt
: >"$RESULTS"

log "benchmark: vGPU counts [$GPUS], device args \"$DEVICE_ARGS\", $ITERS invalidations per" \
    "mode, $FAULT_ITERS faults, $CONTEXTS contexts; logs in $OUT"
log "expect about $(( $(wc -w <<<"$GPUS") * 2 )) minutes"

step "set-up (cached after the first run)" "$SVMGPU_ROOT/scripts/setup.sh" --quiet

# The guest side: one line of key=value pairs per measurement, on the channel port.
guest_script="for m in single per_device shared; do
  rmmod svmgpu && insmod /lib/modules/svmgpu.ko svm_mode=\$m || exit 1
  /bin/svmgpu bench-svm-invalidate --iters $ITERS --size 65536 >/dev/ttyS1 || exit 1
done
/bin/svmgpu bench-fault --iters $FAULT_ITERS --contexts $CONTEXTS >/dev/ttyS1 || exit 1"

for n in $GPUS; do
    dir=$OUT/gpus-$n
    run_guest() {
        "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus "$n" --device-args "$DEVICE_ARGS" \
            --timeout 900 --out "$dir" -- sh -c "$guest_script" >"$OUT/gpus-$n.out" 2>&1
    }
    step "guest with $n vGPU(s)" run_guest || { tail -n 30 "$OUT/gpus-$n.out" >&2; die "the guest run with $n vGPU(s) failed"; }
    grep -a '^bench=' "$dir/channel.log" | tr -d '\r' >>"$RESULTS"
done

# key=value lookup in a result line.
kv() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

echo
echo "==== svmgpu SVM benchmark ($(elapsed) s; device: $DEVICE_ARGS; raw results: $RESULTS) ===="
echo
echo "Invalidation of one 64 KiB SVM range mirrored on N vGPUs (mprotect, guest wall time, median of $ITERS; µs):"
echo
printf '| N | single | per_device | shared | single/N=1 | per_device/N=1 | shared/N=1 |\n'
printf '| --- | --- | --- | --- | --- | --- | --- |\n'
declare -A T
for n in $GPUS; do
    for m in single per_device shared; do
        line=$(grep "bench=svm_invalidate svm_mode=$m devices=$n " "$RESULTS" | head -n1 || true)
        T[$m,$n]=$(kv "$line" median_ns)
    done
done
first=${GPUS%% *}
for n in $GPUS; do
    row="| $n"
    for m in single per_device shared; do
        row+=" | $(awk -v t="${T[$m,$n]:-0}" 'BEGIN {printf "%.0f", t / 1000}')"
    done
    for m in single per_device shared; do
        row+=" | $(awk -v t="${T[$m,$n]:-0}" -v b="${T[$m,$first]:-0}" 'BEGIN {if (b > 0) printf "%.2f", t / b; else print "-"}')"
    done
    echo "$row |"
done
echo
echo "GPU faults (svm_mode=shared):"
echo
printf '| N | fault service, median (µs) | bare round trip, median (µs) | service / round trip | job with fault / without (µs) | contexts | faults/s |\n'
printf '| --- | --- | --- | --- | --- | --- | --- |\n'
for n in $GPUS; do
    line=$(grep "bench=fault .* devices=$n " "$RESULTS" | head -n1 || true)
    [[ -n $line ]] || continue
    printf '| %s | %s | %s | %s | %s / %s | %s | %s |\n' "$n" \
        "$(awk -v t="$(kv "$line" fault_service_median_ns)" 'BEGIN {printf "%.0f", t / 1000}')" \
        "$(awk -v t="$(kv "$line" bare_round_trip_median_ns)" 'BEGIN {printf "%.0f", t / 1000}')" \
        "$(kv "$line" service_over_round_trip)" \
        "$(awk -v t="$(kv "$line" job_with_fault_median_ns)" 'BEGIN {printf "%.0f", t / 1000}')" \
        "$(awk -v t="$(kv "$line" job_without_fault_median_ns)" 'BEGIN {printf "%.0f", t / 1000}')" \
        "$(kv "$line" contexts)" "$(kv "$line" faults_per_s)"
done

# The plot: invalidation time (ms) against N, one polyline per mode, log2 x axis.
{
    for n in $GPUS; do
        for m in single per_device shared; do
            echo "$m $n ${T[$m,$n]:-0}"
        done
    done
} | awk -v lat="$LAT_US" -v iters="$ITERS" '
{ t[$1, $2] = $3 / 1e6; ns[$2] = 1; if ($3 / 1e6 > ymax) ymax = $3 / 1e6 }
END {
    W = 640; H = 420; L = 70; R = 150; T = 40; B = 60
    pw = W - L - R; ph = H - T - B
    nmax = 0; for (n in ns) if (n + 0 > nmax) nmax = n + 0
    xmax = log(nmax) / log(2); if (xmax < 1) xmax = 1
    step = 1; while (ymax / step > 8) step *= 2
    ytop = step * (int(ymax / step) + 1)
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H
    printf "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
    printf "<text x=\"%d\" y=\"20\" font-size=\"14\">SVM range invalidation mirrored on N vGPUs (TLB latency %d us, median of %d)</text>\n", L - 40, lat, iters
    for (y = 0; y <= ytop + 1e-9; y += step) {
        py = T + ph - y / ytop * ph
        printf "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", L, py, L + pw, py
        printf "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", L - 6, py + 4, y
    }
    for (n in ns) {
        px = L + (log(n) / log(2)) / xmax * pw
        printf "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#ddd\"/>\n", px, T, px, T + ph
        printf "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", px, T + ph + 18, n
    }
    printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, T + ph, L + pw, T + ph
    printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, T, L, T + ph
    printf "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">N (vGPUs mirroring the range)</text>\n", L + pw / 2, H - 15
    printf "<text x=\"18\" y=\"%d\" transform=\"rotate(-90 18 %d)\" text-anchor=\"middle\">invalidation time (ms)</text>\n", T + ph / 2, T + ph / 2
    split("single per_device shared", modes, " ")
    split("#d62728 #1f77b4 #2ca02c", colors, " ")
    for (i = 1; i <= 3; i++) {
        m = modes[i]; pts = ""
        for (k = 0; k <= 3; k++) {
            n = 2 ^ k
            if (!((m, n) in t)) continue
            px = L + k / xmax * pw; py = T + ph - t[m, n] / ytop * ph
            pts = pts sprintf("%.1f,%.1f ", px, py)
            printf "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n", px, py, colors[i]
        }
        printf "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"/>\n", pts, colors[i]
        ly = T + 20 + (i - 1) * 20
        printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"/>\n", L + pw + 15, ly, L + pw + 40, ly, colors[i]
        printf "<text x=\"%d\" y=\"%d\">%s</text>\n", L + pw + 45, ly + 4, m
    }
    printf "</svg>\n"
}' >"$SVG"
echo
log "plot: $SVG"
log "command: scripts/bench.sh --gpus \"$GPUS\" --tlb-latency-us $LAT_US --iters $ITERS --fault-iters $FAULT_ITERS --contexts $CONTEXTS"
