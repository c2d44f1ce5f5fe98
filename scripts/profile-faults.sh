#!/usr/bin/env bash
# Where the time of GPU fault throughput goes (issue 12): runs the fault throughput part of
# the SVM benchmark in one guest and reports, over exactly that window, the guest's CPU
# time by kind (guest /proc/stat: user, system, irq, softirq, idle) and the host CPU time
# of every thread of the run (QEMU's vCPU and other threads, the svmgpu-device threads).
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/profile-faults.sh [options]

Boots one guest (scripts/run-vm.sh --gpus N, device started with --tlb-inval-latency-ns),
loads the module with svm_mode=shared and --svm-impl, and runs
  svmgpu bench-fault --iters 0 --contexts C
--rounds times (the fault throughput of scripts/bench.sh: C threads with their own
fault-mode VM and queue, on the devices in turn; one round takes about a second). Between two markers the guest prints around it, it
samples the guest's /proc/stat and the host's per-thread CPU time (/proc/PID/task/*/stat)
of the QEMU and device processes of this run, and prints both as tables: which CPU the
faults wait for.

Options:
  --gpus N              vGPUs (default 1)
  --contexts C          contexts (default 8)
  --tlb-latency-us L    device TLB invalidation latency, µs (default 100, as bench.sh's first)
  --svm-impl IMPL       native or gpusvm (default native)
  --rounds R            throughput runs in the window (default 10)
  --out DIR             keep the guest logs in DIR (default: a temp folder)
  -h, --help            this text

A profile, not a test: it measures one run on a shared host.
EOF
}

GPUS=1 CONTEXTS=8 LAT=100 IMPL=native ROUNDS=10 OUT=""
need() { [[ $# -ge 2 ]] || { usage >&2; die "$1 needs a value"; }; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --gpus) need "$@"; GPUS=$2; shift 2 ;;
        --contexts) need "$@"; CONTEXTS=$2; shift 2 ;;
        --tlb-latency-us) need "$@"; LAT=$2; shift 2 ;;
        --svm-impl) need "$@"; IMPL=$2; shift 2 ;;
        --rounds) need "$@"; ROUNDS=$2; shift 2 ;;
        --out) need "$@"; OUT=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, not '$GPUS'"
[[ $CONTEXTS =~ ^[1-9][0-9]*$ ]] || die "--contexts must be a positive integer, not '$CONTEXTS'"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, not '$ROUNDS'"
[[ $LAT =~ ^[0-9]+$ ]] || die "--tlb-latency-us must be a number of µs, not '$LAT'"
[[ $IMPL == native || $IMPL == gpusvm ]] || die "--svm-impl must be native or gpusvm, not '$IMPL'"
if [[ -z $OUT ]]; then
    OUT=$(mktemp -d /tmp/svmgpu-profile.XXXXXX)
fi
mkdir -p "$OUT"

# The guest: markers on the channel port around the throughput run, with /proc/stat.
script="rmmod svmgpu && insmod /lib/modules/svmgpu.ko svm_mode=shared svm_impl=$IMPL || exit 1
{ echo profile-begin; cat /proc/stat; } >/dev/ttyS1
r=0; while [ \$r -lt $ROUNDS ]; do
  /bin/svmgpu bench-fault --iters 0 --contexts $CONTEXTS >>/tmp/b || exit 1; r=\$((r + 1))
done
{ echo profile-end; cat /proc/stat; cat /tmp/b; } >/dev/ttyS1
# Stay up while the host takes its second sample.
sleep 5"

log "guest with $GPUS vGPU(s), $CONTEXTS contexts, TLB latency $LAT µs, svm_impl=$IMPL"
# run-vm.sh keeps its logs in \$TMPDIR/svmgpu-run.* while it runs (--out gets copies at
# the end): a TMPDIR of our own is where the markers can be watched live.
mkdir -p "$OUT/tmp"
TMPDIR="$OUT/tmp" "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus "$GPUS" --device-args "--tlb-inval-latency-ns $((LAT * 1000))" \
    --timeout 900 --out "$OUT" -- sh -c "$script" >"$OUT/run.out" 2>&1 &
runner=$!

# Every process started by the run (QEMU, the devices, virtiofsd...), found by ancestry.
descendants() {
    local kids p
    kids=$(ps -o pid= --ppid "$1" 2>/dev/null || true)
    for p in $kids; do
        echo "$p"
        descendants "$p"
    done
}
# One line per thread: pid tid comm utime+stime (clock ticks).
sample_threads() {
    local p t
    for p in $(descendants "$runner"); do
        for t in /proc/"$p"/task/*; do
            [[ -r $t/stat ]] || continue
            # comm may hold spaces: it is between the first '(' and the last ')'.
            sed -E 's/^([0-9]+) \((.*)\) [A-Za-z] (.*)$/\1\t\2\t\3/' "$t/stat" 2>/dev/null \
                | awk -F'\t' -v p="$p" -v exe="$(cat /proc/"$p"/comm 2>/dev/null)" \
                    '{ split($3, f, " "); print p "\t" exe "\t" $1 "\t" $2 "\t" f[11] + f[12] }'
        done
    done
}
wait_marker() {
    while ! cat "$OUT"/tmp/svmgpu-run.*/channel.log 2>/dev/null | grep -qa "^$1"; do
        kill -0 "$runner" 2>/dev/null || return 1
        sleep 0.2
    done
}
wait_marker profile-begin || { tail -n 30 "$OUT/run.out" >&2; die "the guest ended before the profile began"; }
sample_threads >"$OUT/threads-begin.tsv"
t0=$(date +%s.%N)
wait_marker profile-end || { tail -n 30 "$OUT/run.out" >&2; die "the guest ended before the profile ended"; }
sample_threads >"$OUT/threads-end.tsv"
t1=$(date +%s.%N)
wait "$runner" || { tail -n 30 "$OUT/run.out" >&2; die "the guest run failed"; }

python3 - "$OUT" "$t0" "$t1" "$(getconf CLK_TCK)" <<'PY'
import os, sys
out, t0, t1, hz = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
lines = open(os.path.join(out, "channel.log"), errors="replace").read().replace("\r", "").splitlines()

def cpu_block(marker):
    i = lines.index(marker)
    cpus = {}
    for l in lines[i + 1:]:
        if not l.startswith("cpu"):
            if cpus:
                break
            continue
        f = l.split()
        cpus[f[0]] = [int(x) for x in f[1:8]]
    return cpus

b, e = cpu_block("profile-begin"), cpu_block("profile-end")
kinds = ["user", "nice", "system", "idle", "iowait", "irq", "softirq"]
rates = [l for l in lines if l.startswith("bench=")]
print(f"Fault throughput profile: {len(rates)} runs, faults/s "
      + " ".join(l.split("faults_per_s=")[1].split()[0] for l in rates))
print(f"window {t1 - t0:.1f} s (host clock)\n")
print("| guest CPU | " + " | ".join(kinds) + " | busy |")
print("| --- |" + " --- |" * (len(kinds) + 1))
for c in sorted(e):
    d = [y - x for x, y in zip(b[c], e[c])]
    tot = sum(d) or 1
    busy = 100 * (tot - d[3] - d[4]) / tot
    print(f"| {c} | " + " | ".join(f"{100 * x / tot:.1f} %" for x in d) + f" | {busy:.1f} % |")

def threads(name):
    r = {}
    for l in open(os.path.join(out, name)):
        pid, exe, tid, comm, ticks = l.rstrip("\n").split("\t")
        r[(pid, tid)] = (exe, comm, int(ticks))
    return r

tb, te = threads("threads-begin.tsv"), threads("threads-end.tsv")
rows = []
for k, (exe, comm, ticks) in te.items():
    used = ticks - tb.get(k, (exe, comm, 0))[2]
    if used > 0:
        rows.append((used, exe, comm, k[1]))
rows.sort(reverse=True)
wall = t1 - t0
print(f"\n| host process | thread | tid | CPU s | of one core |")
print("| --- | --- | --- | --- | --- |")
for used, exe, comm, tid in rows[:15]:
    print(f"| {exe} | {comm} | {tid} | {used / hz:.1f} | {100 * used / hz / wall:.0f} % |")
total = sum(r[0] for r in rows) / hz
print(f"\nall threads of the run: {total:.1f} CPU s in {wall:.1f} s ({total / wall:.2f} cores); "
      f"host load average now: {open('/proc/loadavg').read().split()[0]}")
PY
log "profile done in $(elapsed) s (logs in $OUT)"
