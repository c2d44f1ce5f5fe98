#!/usr/bin/env bash
# Randomized soak: random workloads on 4 vGPUs (the guest's svmgpu-ktap --soak) while this
# script injects random faults at run time through the device's control socket
# (svmgpu-ctl), both seeded, checking the invariants continuously. Prints a summary of
# what ran, what was injected (per kind, from the device's statistics) and what was
# verified; exits 1 on any violation.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/soak.sh [--minutes M] [--seed S] [--gpus N] [--out DIR]

Boots the guest with N vGPUs (default 4) and runs for M minutes (default 10):
  guest  svmgpu-ktap --soak: one thread per device doing random work (FILL + CHECKSUM jobs
         in non-fault and fault-mode VMs, userptr invalidations by mprotect and
         madvise(DONTNEED), long-running jobs preempted by invalidations, unbind/rebind),
         replacing queues and files that recovery lost or banned;
  host   every 2-6 s one random injection rule (every kind of spec 6.16.1, bounded by a
         count) on a random device via svmgpu-ctl, until 20 s before the end.
Invariants, checked continuously: no kernel warning/BUG/lockdep/DMA-API report on the
console (host, every injection), zero stale accesses in the device's audit (host via
svmgpu-ctl stats, guest via GET_STATS), ioctls and fences fail only with the documented
recovery errors, every successful job wrote exactly its data (CPU pattern, GPU checksum =
CPU checksum), the data written at the start never changes (CPU and GPU checksums), every
device completes a job in every 60 s window and serves new work at the end.
The same seed gives the same guest workload choices and the same injection schedule
(timing under TCG still varies, so what each rule hits may differ).

Options:
  --minutes M   soak duration in minutes (default 10)
  --seed S      seed of the workload and of the injections (default 1)
  --gpus N      number of vGPUs: 1, 2, 4 or 8 (default 4)
  --out DIR     keep the logs (console, channel, device, injections) in DIR
  -h, --help    this text
EOF
}

MINUTES=10 SEED=1 GPUS=4 OUT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --minutes) MINUTES=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --gpus) GPUS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
[[ $MINUTES =~ ^[0-9]+$ && $MINUTES -ge 1 ]] || die "--minutes must be a whole number >= 1"
[[ $SEED =~ ^[0-9]+$ ]] || die "--seed must be a number"
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-soak.XXXXXX")}
mkdir -p "$OUT"
SECS=$((MINUTES * 60))
CTL="$SVMGPU_ROOT/target/release/svmgpu-ctl"

log "soak: $GPUS vGPUs, $MINUTES min of random work with random fault injections, seed $SEED"
log "takes about $((MINUTES + 1))-$((MINUTES + 3)) min (set-up if needed, boot, final checks); logs in $OUT"

"$SVMGPU_ROOT/scripts/setup.sh" --quiet
[[ -x $CTL ]] || die "missing $CTL (scripts/setup.sh builds it)"

"$SVMGPU_ROOT/scripts/run-vm.sh" --gpus "$GPUS" --timeout $((SECS + 300)) --out "$OUT/vm" \
    -- /bin/svmgpu-ktap --soak "$SECS" --seed "$SEED" --out /dev/ttyS1 >"$OUT/run-vm.log" 2>&1 &
VM_PID=$!
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if kill -0 "$VM_PID" 2>/dev/null; then
        kill -TERM "$VM_PID" 2>/dev/null || true
        wait "$VM_PID" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The run directory (sockets, live logs) from run-vm.sh's output.
SOCK=""
for _ in $(seq 600); do
    SOCK=$(sed -n 's/.*control socket: \([^ ]*\) .*/\1/p' "$OUT/run-vm.log" | head -n1)
    [[ -n $SOCK ]] && break
    kill -0 "$VM_PID" 2>/dev/null || break
    sleep 0.5
done
[[ -n $SOCK ]] || { cat "$OUT/run-vm.log" >&2; die "the VM did not start"; }
RUN=$(dirname "$SOCK")
CHANNEL="$RUN/channel.log" CONSOLE="$RUN/console.log"
for _ in $(seq 600); do
    grep -q '^soak-start' "$CHANNEL" 2>/dev/null && break
    kill -0 "$VM_PID" 2>/dev/null || break
    sleep 0.5
done
grep -q '^soak-start' "$CHANNEL" 2>/dev/null || { tail -n 30 "$CONSOLE" >&2 || true; die "the guest soak did not start"; }
log "guest: $(grep -m1 '^soak-start' "$CHANNEL")"

# Injection rules: every kind of spec 6.16.1, each bounded (count) so that it ends.
# $RANDOM seeded once and only read in this shell (never in a $(...) subshell, which would
# not advance it), so the schedule follows from the seed.
RANDOM=$SEED
rand() { R=$((RANDOM % $1)); }
pick_rule() {
    local a b
    rand 16; a=$R; rand 4000; b=$R
    case $a in
        0) rand 20; RULE="tlb-inval-delay:delay_us=$((500 + b)),count=$((1 + R))" ;;
        1) RULE="tlb-inval-drop:count=1" ;;
        2) rand 2; RULE="tlb-inval-error:count=1,status=$([[ $R == 1 ]] && echo internal || echo timeout)" ;;
        3) rand 10; RULE="preempt-delay:delay_us=$((500 + b)),count=$((1 + R))" ;;
        4) RULE="preempt-drop:count=1" ;;
        5) RULE="preempt-error:count=1" ;;
        6) RULE="engine-hang:count=1" ;;
        7) rand 20; RULE="fault-spurious:p=0.05,count=$((1 + R))" ;;
        8) rand 20; RULE="fault-duplicate:p=0.5,count=$((1 + R))" ;;
        9) rand 10; RULE="fault-phantom:p=0.02,count=$((1 + R))" ;;
        10) rand 3; local f=(seqno kind status); RULE="completion-corrupt:count=1,field=${f[$R]}" ;;
        11) rand 30; RULE="completion-duplicate:p=0.3,count=$((1 + R))" ;;
        12) rand 30; RULE="completion-reorder:p=0.3,count=$((1 + R))" ;;
        13) RULE="device-reset:count=1,delay_us=$((100 + b % 3000))" ;;
        14) rand 20; RULE="walk-read-error:p=0.02,count=$((1 + R))" ;;
        *) rand 3; RULE="event-overflow:count=$((1 + R))" ;;
    esac
}

violations=()
declare -A requested=() rules_on=()
n=0
T0=$(date +%s)
STOP_AT=$((T0 + SECS - 20))
while kill -0 "$VM_PID" 2>/dev/null && ! grep -q '^svmgpu-soak-result' "$CHANNEL" 2>/dev/null; do
    rand 5; sleep $((2 + R))
    # The VM may have ended while we slept (its run directory is then gone).
    kill -0 "$VM_PID" 2>/dev/null || break
    grep -q '^svmgpu-soak-result' "$CHANNEL" 2>/dev/null && break
    if ! "$SVMGPU_ROOT/scripts/lib/console-check.sh" "$CONSOLE" >"$OUT/console-check.out" 2>&1; then
        violations+=("kernel console: $(head -n 3 "$OUT/console-check.out" | tr '\n' ' ')")
        break
    fi
    if stats=$("$CTL" --socket "$SOCK" stats --json 2>/dev/null); then
        if grep -q '"stale_accesses":[1-9]' <<<"$stats"; then
            violations+=("the device's audit counted stale accesses: $(grep -o '"stale_accesses":[0-9]*' <<<"$stats" | tr '\n' ' ')")
            break
        fi
    fi
    [[ $(date +%s) -lt $STOP_AT ]] || continue
    rand "$GPUS"; dev=$R; pick_rule; r=$RULE; n=$((n + 1))
    # At most 64 rules per device: clear the exhausted ones now and then.
    if [[ ${rules_on[$dev]:-0} -ge 40 ]]; then
        "$CTL" --socket "$SOCK" -d "$dev" clear >/dev/null 2>&1 || true
        rules_on[$dev]=0
    fi
    if "$CTL" --socket "$SOCK" -d "$dev" inject "seed=$((SEED * 100000 + n));$r" >>"$OUT/injections.log" 2>&1; then
        rules_on[$dev]=$((${rules_on[$dev]:-0} + 1))
        kind=${r%%:*}
        requested[$kind]=$((${requested[$kind]:-0} + 1))
        echo "$(( $(date +%s) - T0 ))s device $dev: $r" >>"$OUT/injections.log"
    else
        violations+=("svmgpu-ctl inject '$r' on device $dev failed (see $OUT/injections.log)")
    fi
done
"$CTL" --socket "$SOCK" list >"$OUT/rules-at-end.txt" 2>&1 || true
vm_rc=0
wait "$VM_PID" || vm_rc=$?
trap - EXIT INT TERM

# Checks after the run.
CHANNEL="$OUT/vm/channel.log" CONSOLE="$OUT/vm/console.log" STATS="$OUT/vm/device-stats.json"
if ! "$SVMGPU_ROOT/scripts/lib/console-check.sh" "$CONSOLE" >"$OUT/console-check.out" 2>&1; then
    violations+=("kernel console: $(head -n 3 "$OUT/console-check.out" | tr '\n' ' ')")
fi
grep '^soak-violation' "$CHANNEL" 2>/dev/null | while read -r l; do echo "guest: $l"; done >"$OUT/guest-violations.txt" || true
while read -r l; do violations+=("$l"); done <"$OUT/guest-violations.txt"
result=$(grep -m1 '^svmgpu-soak-result' "$CHANNEL" 2>/dev/null || true)
[[ $result == "svmgpu-soak-result PASS" ]] || violations+=("guest result: ${result:-none (crash, panic or timeout; vm exit $vm_rc)}")
[[ $vm_rc -eq 0 ]] || violations+=("the guest exited with status $vm_rc")

# Injected per kind, summed over the devices, from the device's statistics at exit.
injected=$(python3 - "$STATS" <<'PY' 2>/dev/null || echo "(no device statistics)"
import json, sys
devs = json.load(open(sys.argv[1]))
tot, stale = {}, 0
for d in devs:
    stale += d.get("stale_accesses", 0)
    for k, v in d.get("injected", {}).items():
        tot[k] = tot.get(k, 0) + v
print("  " + "\n  ".join(f"{k:22} {v}" for k, v in tot.items()))
print(f"  {'total':22} {sum(tot.values())}   (device injected_faults: {sum(d.get('injected_faults', 0) for d in devs)}; stale accesses: {stale})")
PY
)
if grep -q '"stale_accesses":[1-9]' "$STATS" 2>/dev/null; then
    violations+=("the device's audit counted stale accesses")
fi

summary=$(sed -n 's/^soak-summary //p' "$CHANNEL" | head -n1)
{
    echo "==== svmgpu soak summary ===="
    echo "command:   scripts/soak.sh --minutes $MINUTES --seed $SEED --gpus $GPUS"
    echo "duration:  $(elapsed) s in all ($SECS s of guest work), $GPUS vGPUs, seed $SEED"
    echo "ran (guest, all devices):"
    sed 's/ | /\n/g' <<<"$summary" | sed 's/^/  /'
    echo "injection rules added: $n ($(for k in "${!requested[@]}"; do printf '%s %s, ' "$k" "${requested[$k]}"; done | sed 's/, $//'))"
    echo "injected (device statistics, per kind):"
    echo "$injected"
    echo "verified continuously: kernel console clean (host, every injection); zero stale accesses (host svmgpu-ctl stats, guest GET_STATS every 3 s); ioctl/fence errors only the documented recovery ones; every successful job's data (CPU pattern + GPU checksum); initial data unchanged (CPU every 3 s, GPU every 30 s); a job succeeds on every device in every 60 s; new work served at the end"
    if [[ ${#violations[@]} -eq 0 ]]; then
        echo "violations: none"
        echo "RESULT: PASSED"
    else
        echo "violations: ${#violations[@]}"
        printf '  %s\n' "${violations[@]}"
        echo "RESULT: FAILED"
    fi
} | tee "$OUT/summary.txt"
[[ ${#violations[@]} -eq 0 ]]
