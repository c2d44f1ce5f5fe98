#!/usr/bin/env bash
# Run every svmgpu test: set-up if needed, a self-test of the host-side checkers, the host
# suite (cargo test for the workspace), the guest KTAP suite with 1, 2 and 4 vGPUs, the C
# client run (from a temporary folder, through a symlink, with --share and --add), the
# fault-injection suite (one guest per injected fault kind, started with run-vm.sh --inject
# SPEC), then the 2-vGPU guest suite and four injection kinds on the debug kernel (KASAN,
# KFENCE, kmemleak, ...). Every guest run is checked the same way: its KTAP, its console
# (no kernel warning, BUG, lockdep, DMA-API, KASAN, RCU stall, OOM or kmemleak report), the
# device's statistics file (present, no stale access), the device log (no panic) and the
# KUnit results on the console (no failure; every suite the module declares ran).
# Prints a summary; exits 1 on failure.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

# NAME|SPEC: the guest test inject_NAME runs against a device started with --inject SPEC.
# The tests rely on the filters (device, asid, ctx, after): keep both sides in step.
INJECT_SUITE=(
    "tlb_inval_delay|tlb-inval-delay:delay_us=3000"
    "tlb_inval_drop|tlb-inval-drop:count=1,device=0"
    "tlb_inval_error|tlb-inval-error:count=1,device=0,status=internal"
    "preempt_delay|preempt-delay:delay_us=100000"
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
# The injection kinds the default run also runs on the debug kernel (one per family:
# TLB invalidation, preemption, hang, reset).
DEBUG_INJECT="tlb_inval_drop preempt_delay engine_hang device_reset"
# QMP stop/cont rounds of the pause guest (pause_run below).
PAUSE_ROUNDS=5
# The guest tests that use SVM (fault-mode VMs). With --svm-impl gpusvm (the default runs
# both) they run again against the driver's second SVM implementation, on the kernel's
# drm_gpusvm (svmgpu-ktap --module-args svm_impl=gpusvm: every reload of the module by a
# test keeps it): once per vGPU count, and with them the large-latency tests, the
# swiotlb=force guest and the fault-injection suite. The first three check that the
# reload took and audit every device before the SVM cases check the audits.
GPUSVM_TESTS="driver_binds_all_devices,kunit_suites_pass,devices_share_one_buffer"
GPUSVM_TESTS+=",fault_mode_populates_on_gpu_fault,fault_mode_unmapped_userptr_is_efault"
GPUSVM_TESTS+=",userptr_invalidate_race_fault_mode,svm_bind_inside_mirrored_range"
GPUSVM_TESTS+=",svm_next_to_binding,revalidation_races_invalidation,svm_mode_single"
GPUSVM_TESTS+=",svm_mode_per_device,svm_mode_shared,module_unload_reload"
GPUSVM_ARGS="--module-args svm_impl=gpusvm"

usage() {
    cat <<EOF
Usage: scripts/test.sh [--host-only | --guest-only | --inject-only] [--gpus "1 2 4"]
                       [--no-inject] [--inject "NAME..."] [--debug-kernel | --debug-subset | --no-debug]
                       [--no-client] [--mutants quick|all|none] [--runs "suite ..."]
                       [--svm-impl "native gpusvm"] [--out DIR]

  --host-only     only the checker self-test and cargo test
  --guest-only    only the guest runs (KTAP suites, C client, fault injection, debug kernel)
  --inject-only   only the fault-injection suite
  --no-inject     skip the fault-injection suite
  --inject LIST   only these entries of the fault-injection suite (names below; an unknown
                  name is an error)
  --gpus LIST     vGPU counts to run the guest suite with (default "1 2 4")
  --debug-kernel  run every guest suite (KTAP suites, C client, fault injection) on the debug
                  kernel instead of the default one (KASAN, KFENCE, DEBUG_VM, DEBUG_LIST,
                  DEBUG_OBJECTS, hung task, soft lockup, kmemleak; built on first use, ~15 min)
  --debug-subset  (default) also run the 2-vGPU suite and the injections
                  $DEBUG_INJECT on the debug kernel
  --no-debug      skip the debug-kernel runs
  --no-client     skip the C client run (tests/c/svmgpu-client.c on 2 vGPUs, started from a
                  temporary folder through a symlink, the client run from a --share folder)
  --mutants M     mutation testing after the guest suites (scripts/mutants.sh): quick (the
                  default: four seeded driver bugs, one of them in the gpusvm
                  implementation), all (every patch of tests/mutants/, ~55 min) or none
  --runs LIST     only these guest runs of --guest-only/the default (default "$ALL_RUNS"):
                  suite (the KTAP suite per --gpus count), latency, swiotlb, pause, regions
                  (described below); e.g. --guest-only --runs "pause regions" --no-client
                  --no-inject --no-debug --mutants none
  --svm-impl LIST the SVM implementations (module parameter svm_impl) the SVM suites run
                  against (default "native gpusvm"): native runs the whole guest suite;
                  gpusvm runs the SVM tests below again on drm_gpusvm (the suite runs), with
                  the large-latency tests, the swiotlb=force guest, the fault-injection suite
                  and the debug subset, and the gpusvm mutants
  --out DIR       keep the logs of every guest run in DIR (default: a temp folder)

Besides the KTAP suite per vGPU count, every guest run of --gpus also runs the tests that
need large device latencies (one guest per count, device latencies 20 ms), one 2-vGPU
guest booted with swiotlb=force (the address model), one 2-vGPU guest whose jobs run while
the host pauses and continues the VM $PAUSE_ROUNDS times through QMP (run-vm.sh --qmp-hook
scripts/lib/qmp-pause.sh), and one booted with qemu-configs/svmgpu-2-numa.cfg (guest RAM
in two regions: bulk instructions across the boundary, and the SVM suite).

SVM tests run against svm_impl=gpusvm:
$(tr , '\n' <<<"$GPUSVM_TESTS" | sed 's/^/  /')

Fault-injection suite: one guest with 2 vGPUs per entry, its device started with the
entry's spec, running the guest test inject_NAME (tests/guest/src/inject.rs):
$(printf '  %s\n' "${INJECT_SUITE[@]}" | sed 's/|/  /')
EOF
}

ALL_RUNS="suite latency swiotlb pause regions"
HOST=1 GUEST=1 INJECT=1 CLIENT=1 DEBUG=subset GPU_COUNTS="1 2 4" OUT="" INJECT_ONLY="" MUTANTS=quick
RUNS=$ALL_RUNS
SVM_IMPLS="native gpusvm"
need() { [[ $# -ge 2 ]] || { usage >&2; die "$1 needs a value"; }; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --host-only) GUEST=0; INJECT=0; CLIENT=0; shift ;;
        --guest-only) HOST=0; shift ;;
        --inject-only) HOST=0; GUEST=0; CLIENT=0; INJECT=1; shift ;;
        --no-inject) INJECT=0; shift ;;
        --inject) need "$@"; INJECT_ONLY=$2; shift 2 ;;
        --gpus) need "$@"; GPU_COUNTS=$2; shift 2 ;;
        --debug-kernel) DEBUG=all; shift ;;
        --no-debug) DEBUG=none; shift ;;
        --debug-subset) DEBUG=subset; shift ;;
        --no-client) CLIENT=0; shift ;;
        --mutants) need "$@"; MUTANTS=$2; shift 2 ;;
        --svm-impl) need "$@"; SVM_IMPLS=$2; shift 2 ;;
        --out) need "$@"; OUT=$2; shift 2 ;;
        --runs) need "$@"; RUNS=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
# Selections that name nothing must fail, not run nothing.
known=" $(for e in "${INJECT_SUITE[@]}"; do printf '%s ' "${e%%|*}"; done)"
for k in $INJECT_ONLY; do
    [[ $known == *" $k "* ]] || die "--inject: no fault-injection entry '$k' (scripts/test.sh --help lists them)"
done
[[ -z $INJECT_ONLY || -n ${INJECT_ONLY// /} ]] || die "--inject: empty list"
for r in $RUNS; do
    [[ " $ALL_RUNS " == *" $r "* ]] || die "--runs: no guest run '$r' (one of: $ALL_RUNS)"
done
[[ -n ${RUNS// /} ]] || die "--runs: empty list"
wanted() { [[ " $RUNS " == *" $1 "* ]]; }
for n in $GPU_COUNTS; do
    [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 64 ]] || die "--gpus: '$n' is not a vGPU count from 1 to 64"
done
[[ $GUEST -eq 0 || -n ${GPU_COUNTS// /} ]] || die "--gpus: empty list"
for i in $SVM_IMPLS; do
    [[ $i == native || $i == gpusvm ]] || die "--svm-impl: '$i' is not native or gpusvm"
done
[[ -n ${SVM_IMPLS// /} ]] || die "--svm-impl: empty list"
GPUSVM=0
[[ " $SVM_IMPLS " == *" gpusvm "* ]] && GPUSVM=1
NATIVE=0
[[ " $SVM_IMPLS " == *" native "* ]] && NATIVE=1
case $MUTANTS in
    quick) MUTANTS_ARGS=--quick ;;
    all) MUTANTS_ARGS=--all ;;
    none) MUTANTS_ARGS="" ;;
    *) die "--mutants: '$MUTANTS' is not quick, all or none" ;;
esac
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-test.XXXXXX")}
mkdir -p "$OUT"
OUT=$(readlink -f "$OUT")

# Which kernels the guest runs use: "default" and/or "debug".
if [[ $DEBUG == all ]]; then MAIN_KERNEL=debug; else MAIN_KERNEL=default; fi
DEBUG_SUBSET=0
[[ $DEBUG == subset && ( $GUEST -eq 1 || $INJECT -eq 1 ) ]] && DEBUG_SUBSET=1
setup_args=(--quiet)
[[ $MAIN_KERNEL == debug || $DEBUG_SUBSET -eq 1 ]] && setup_args+=(--debug-kernel)
[[ $GUEST -eq 1 || $INJECT -eq 1 || $CLIENT -eq 1 ]] \
    || setup_args=()   # host only: nothing to build beyond what cargo does
if [[ ${#setup_args[@]} -gt 0 ]]; then
    step "set-up (cached after the first run)" "$SVMGPU_ROOT/scripts/setup.sh" "${setup_args[@]}"
    # Every guest below uses what this set-up built: run-vm.sh need not check it again.
    export SVMGPU_SETUP_DONE=1
fi

results=()
failed=0
total_p=0 total_f=0 total_s=0
count() {   # count SUMMARY_LINE: add "LABEL: N passed, N failed, N skipped" to the totals
    local p f s
    read -r p f s < <(awk '{print $2, $4, $6}' <<<"$1")
    total_p=$((total_p + ${p:-0})); total_f=$((total_f + ${f:-0})); total_s=$((total_s + ${s:-0}))
}

# check_run LABEL DIR GPUS KERNEL KTAP_FILE RUNVM_OUTPUT: every check of one guest run.
# Prints the KTAP summary; returns 1 if any check failed.
check_run() {
    local label=$1 dir=$2 gpus=$3 kernel=$4 ktap=$5 runout=$6 rc=0 summary accel cc=()
    summary=$("$SVMGPU_ROOT/scripts/lib/ktap-check.sh" "$ktap" "$label" 2>&1) || rc=1
    accel=$(sed -n 's/.*booting guest: \([a-z]*\) .*/\1/p' "$runout" 2>/dev/null | tail -n1)
    cc=(--accel "${accel:-tcg}")
    [[ $kernel == debug ]] && cc+=(--debug-kernel)
    if ! "$SVMGPU_ROOT/scripts/lib/console-check.sh" "${cc[@]}" "$dir/console.log" 2>>"$runout"; then
        rc=1; summary+=$'\n'"$label: the kernel console shows a report (see $runout)"
    fi
    if ! "$SVMGPU_ROOT/scripts/lib/kunit-check.sh" "$dir/console.log" 2>>"$runout"; then
        rc=1; summary+=$'\n'"$label: KUnit: a failure, or a suite of the module that did not run (see $runout)"
    fi
    if ! "$SVMGPU_ROOT/scripts/lib/device-check.sh" "$dir" "$gpus" 2>>"$runout"; then
        rc=1; summary+=$'\n'"$label: device statistics missing, stale accesses or a device panic (see $runout)"
    fi
    local first
    first=$(sed -n 's/^# guest uptime at first test: //p' "$ktap" 2>/dev/null | head -n1)
    [[ -n $first ]] && log "$label: boot to first test: $first of guest uptime (${accel:-?})"
    echo "$summary"
    return "$rc"
}

# record LABEL RC SUMMARY [NOTE]: prints a guest run's summary (check_run) and adds its KTAP
# totals and outcome to the results (NOTE in brackets after the totals).
record() {
    local label=$1 rc=$2 summary=$3 note=${4:+ ($4)} line
    echo "$summary"
    line=$(grep -E '^[a-z0-9-]+: [0-9]+ passed' <<<"$summary" | tail -n1 || true)
    results+=("${line:-$label: no KTAP summary}$note")
    count "$line"
    if [[ $rc -ne 0 ]]; then
        failed=1; results+=("$label: FAILED (see $OUT/$label.out)")
        tail -n 40 "$OUT/$label.out" >&2 || true
    fi
}

selftest() { "$SVMGPU_ROOT/scripts/lib/selftest-checks.sh"; }
if step "self-test of the host-side checkers (each must fail on a broken input)" selftest \
        >"$OUT/selftest.log" 2>&1; then
    results+=("checkers: self-test passed")
else
    failed=1; results+=("checkers: self-test FAILED (see $OUT/selftest.log)")
    tail -n 20 "$OUT/selftest.log" >&2
fi

if [[ $HOST -eq 1 ]]; then
    # Formatting and lints: the workspace (rustfmt, clippy with the workspace's lints as
    # errors) and the module (rustfmt with the kernel's configuration; its clippy run is
    # part of every module build, scripts/build-guest.sh).
    # (Chained: errexit does not apply inside an `if` condition.)
    lint() {
        (cd "$SVMGPU_ROOT" && cargo fmt --all --check \
            && cargo clippy --workspace --all-targets -- -D warnings \
            && cd guest-driver/kmod && rustfmt --check svmgpu.rs)
    }
    if step "lint: cargo fmt, cargo clippy -D warnings, rustfmt of the module" lint \
            >"$OUT/lint.log" 2>&1; then
        results+=("lint: clean")
    else
        failed=1; results+=("lint: FAILED (see $OUT/lint.log)")
        tail -n 30 "$OUT/lint.log" >&2
    fi

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

kargs() { [[ $1 == debug ]] && echo --debug-kernel || true; }

# guest_suite N KERNEL [TIMEOUT]: the whole KTAP suite on N vGPUs.
guest_suite() {
    local n=$1 kernel=$2 timeout=${3:-600} label="guest-$n" rc=0 summary
    [[ $kernel == debug ]] && label="debug-guest-$n"
    local dir="$OUT/$label"
    run() {
        # shellcheck disable=SC2046
        "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus "$n" --out "$dir" --timeout "$timeout" $(kargs "$kernel") \
            -- /bin/svmgpu-ktap --out /dev/ttyS1 >"$OUT/$label.out" 2>&1
    }
    step "guest suite, $n vGPU(s), $kernel kernel" run || rc=$?
    summary=$(check_run "$label" "$dir" "$n" "$kernel" "$dir/channel.log" "$OUT/$label.out") || rc=1
    record "$label" "$rc" "$summary"
}

# gpusvm_suite N KERNEL [TIMEOUT]: the SVM tests (GPUSVM_TESTS) on N vGPUs against
# svm_impl=gpusvm.
gpusvm_suite() {
    local n=$1 kernel=$2 timeout=${3:-600} label="gpusvm-guest-$n" rc=0 summary
    [[ $kernel == debug ]] && label="debug-gpusvm-guest-$n"
    local dir="$OUT/$label"
    run() {
        # shellcheck disable=SC2046
        "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus "$n" --out "$dir" --timeout "$timeout" $(kargs "$kernel") \
            -- /bin/svmgpu-ktap $GPUSVM_ARGS --only "$GPUSVM_TESTS" --out /dev/ttyS1 >"$OUT/$label.out" 2>&1
    }
    step "SVM tests against svm_impl=gpusvm, $n vGPU(s), $kernel kernel" run || rc=$?
    summary=$(check_run "$label" "$dir" "$n" "$kernel" "$dir/channel.log" "$OUT/$label.out") || rc=1
    if ! grep -q 'svm_impl=gpusvm' "$dir/console.log" 2>/dev/null; then
        rc=1; summary+=$'\n'"$label: the module was not loaded with svm_impl=gpusvm"
    fi
    record "$label" "$rc" "$summary" "svm_impl=gpusvm"
}

# inject_suite KERNEL TIMEOUT [--gpusvm] NAME...: one 2-vGPU guest per injection entry
# (with --gpusvm: against svm_impl=gpusvm).
inject_suite() {
    local kernel=$1 timeout=$2; shift 2
    local ip=0 if=0 entry kind spec prefix=inject margs=""
    if [[ ${1:-} == --gpusvm ]]; then prefix=inject-gpusvm margs=$GPUSVM_ARGS; shift; fi
    [[ $kernel == debug ]] && prefix=debug-$prefix
    for entry in "${INJECT_SUITE[@]}"; do
        kind=${entry%%|*} spec=${entry#*|}
        [[ " $* " == *" $kind "* ]] || continue
        local label="$prefix-$kind" dir="$OUT/$prefix-$kind" rc=0
        run() {
            # shellcheck disable=SC2046
            "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus 2 --out "$dir" --timeout "$timeout" --inject "$spec" \
                $(kargs "$kernel") -- /bin/svmgpu-ktap $margs --only "inject_$kind" --out /dev/ttyS1 \
                >"$OUT/$label.out" 2>&1
        }
        step "fault injection, $kernel kernel: $kind ($spec)" run || rc=$?
        check_run "$label" "$dir" 2 "$kernel" "$dir/channel.log" "$OUT/$label.out" || rc=1
        if [[ $rc -eq 0 ]]; then
            ip=$((ip + 1))
        else
            if=$((if + 1)); failed=1
            results+=("$label: FAILED (see $OUT/$label.out)")
            tail -n 40 "$OUT/$label.out" >&2 || true
        fi
    done
    results+=("$prefix: $ip passed, $if failed, 0 skipped (one guest per fault kind${margs:+, svm_impl=gpusvm})")
    total_p=$((total_p + ip)); total_f=$((total_f + if))
}

# The C client, and the usability path: run-vm.sh called through a symlink from a temporary
# folder (not the checkout), that folder shared read-write with the guest (--share .), the
# client copied there (a host-built static program) and run from it, a file added with
# --add; the results are written into the shared folder and checked here.
client_run() {
    local kernel=$1 label=client rc=0 tmp token
    [[ $kernel == debug ]] && label=debug-client
    local dir="$OUT/$label"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-client.XXXXXX")
    cp "$(readlink -f "$SVMGPU_CACHE/current/svmgpu-client")" "$tmp/svmgpu-client"
    ln -s "$SVMGPU_ROOT/scripts/run-vm.sh" "$tmp/run-vm"
    token="added-$RANDOM$RANDOM"
    echo "$token" >"$OUT/$label-added.txt"
    run() {
        # shellcheck disable=SC2046
        (cd "$tmp" && ./run-vm --gpus 2 --share . --add "$OUT/$label-added.txt" --out "$dir" \
            --timeout 300 $(kargs "$kernel") -- sh -c \
            "pwd >pwd.txt; cp /root/$label-added.txt added.txt; ./svmgpu-client --gpus 2 --out client.ktap") \
            >"$OUT/$label.out" 2>&1
    }
    step "C client on 2 vGPUs ($kernel kernel), run-vm.sh via a symlink from $tmp, --share, --add" run || rc=$?
    local summary
    summary=$(check_run "$label" "$dir" 2 "$kernel" "$tmp/client.ktap" "$OUT/$label.out") || rc=1
    if [[ $(cat "$tmp/pwd.txt" 2>/dev/null) != "$tmp" ]]; then
        rc=1; summary+=$'\n'"$label: the command did not run in the shared folder (pwd: '$(cat "$tmp/pwd.txt" 2>/dev/null)')"
    fi
    if [[ $(cat "$tmp/added.txt" 2>/dev/null) != "$token" ]]; then
        rc=1; summary+=$'\n'"$label: the --add file did not reach /root in the guest"
    fi
    cp "$tmp"/*.ktap "$tmp"/*.txt "$dir"/ 2>/dev/null || true
    rm -rf "$tmp"
    record "$label" "$rc" "$summary" "C client, run from a --share folder"
}

# Guest tests that need large device latencies, as the runner lists them (svmgpu-ktap
# --help, section "tests needing large device latencies": the end-to-end coherence
# observations and the unbind window): all of them in one guest per vGPU count, whose
# device is started with 20 ms TLB invalidations and preemptions, so that a driver that
# returns from a notifier early is caught every time, and with --tlb-no-evict, so that a
# translation the driver forgot to invalidate stays in the TLB until the GPU uses it again
# instead of depending on LRU luck, in a TLB of 256 entries that holds every page a test
# touches (coherence_many_bindings writes 80; mutant 10 survived a loaded machine with the
# default 64 entries, which evict or bypass the pages whose invalidation it forgets).
LATENCY_DEVICE_ARGS="--tlb-inval-latency-ns 20000000 --preempt-latency-ns 20000000 --tlb-no-evict --tlb-entries 256"
# runner_section HEADING: the test names the runner lists under the section of its --help
# that starts with HEADING.
runner_section() {
    local bin="$SVMGPU_ROOT/target/guest-static/x86_64-unknown-linux-gnu/release/svmgpu-ktap"
    [[ -x $bin ]] || return 0
    "$bin" --help 2>/dev/null | awk -v h="$1" 'index($0, h) == 1 {on = 1; next}
        on && /^  [a-z0-9_]+$/ {print $1; next} on {on = 0}'
}
latency_tests() { runner_section "tests needing large device latencies"; }
latency_suite() {
    local kernel=$1 timeout=$2 n list prefix=latency margs=""
    if [[ ${3:-} == --gpusvm ]]; then prefix=gpusvm-latency margs=$GPUSVM_ARGS; fi
    [[ $kernel == debug ]] && prefix=debug-$prefix
    list=$(latency_tests | paste -sd, -)
    [[ -n $list ]] || { failed=1; results+=("$prefix: the runner lists no large-latency test"); return; }
    for n in $GPU_COUNTS; do
        local label="$prefix-$n" dir="$OUT/$prefix-$n" rc=0
        run() {
            # shellcheck disable=SC2046
            "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus "$n" --out "$dir" --timeout "$timeout" \
                --device-args "$LATENCY_DEVICE_ARGS" $(kargs "$kernel") \
                -- /bin/svmgpu-ktap $margs --only "$list" --out /dev/ttyS1 >"$OUT/$label.out" 2>&1
        }
        step "large-latency tests, $n vGPU(s), $kernel kernel ($LATENCY_DEVICE_ARGS)${margs:+, svm_impl=gpusvm}" run || rc=$?
        local summary
        summary=$(check_run "$label" "$dir" "$n" "$kernel" "$dir/channel.log" "$OUT/$label.out") || rc=1
        record "$label" "$rc" "$summary"
    done
}

# The address model (spec, "Addresses"): with bounce buffering forced (swiotlb=force), the
# device must still see the CPU's pages, so the driver must give it guest-physical
# addresses, not streaming DMA addresses (which would name bounce buffers).
SWIOTLB_TESTS="exec_fill_checksum,devices_share_one_buffer,userptr_invalidate_fork_cow,svm_mode_shared"
swiotlb_run() {
    local kernel=$1 timeout=$2 label=swiotlb rc=0 margs=""
    if [[ ${3:-} == --gpusvm ]]; then label=gpusvm-swiotlb margs=$GPUSVM_ARGS; fi
    [[ $kernel == debug ]] && label=debug-$label
    local dir="$OUT/$label"
    run() {
        # shellcheck disable=SC2046
        "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus 2 --out "$dir" --timeout "$timeout" \
            --kernel-args swiotlb=force $(kargs "$kernel") \
            -- /bin/svmgpu-ktap $margs --only "$SWIOTLB_TESTS" --out /dev/ttyS1 >"$OUT/$label.out" 2>&1
    }
    step "address model: 2 vGPUs, swiotlb=force, $kernel kernel${margs:+, svm_impl=gpusvm}" run || rc=$?
    local summary
    summary=$(check_run "$label" "$dir" 2 "$kernel" "$dir/channel.log" "$OUT/$label.out") || rc=1
    if ! grep -q 'swiotlb=force' "$dir/console.log" 2>/dev/null; then
        rc=1; summary+=$'\n'"$label: the guest did not boot with swiotlb=force"
    fi
    record "$label" "$rc" "$summary" "swiotlb=force"
}

# Pause is not reset (issue 14, section 2): jobs of every kind on 2 vGPUs while the host
# stops and continues the VM through QMP (QEMU's `stop`/`cont`, the device's rings stopped
# with GET_VRING_BASE) PAUSE_ROUNDS times. The hook waits for the guest test's start marker
# and fails if a stop comes after its end marker: every pause falls inside the test. The
# device must have paused (and resumed) once per round and device.
pause_run() {
    local kernel=$1 timeout=$2 label=pause rc=0 list
    [[ $kernel == debug ]] && label=debug-pause
    local dir="$OUT/$label"
    list=$(runner_section "tests needing the host to pause the VM" | paste -sd, -)
    [[ -n $list ]] || { failed=1; results+=("$label: the runner lists no pause test"); return; }
    local hook
    hook="$(printf '%q' "$SVMGPU_ROOT/scripts/lib/qmp-pause.sh") --wait-for 'pause-test: jobs running'"
    hook+=" --until 'pause-test: jobs done' '' $PAUSE_ROUNDS 500 1000 1000"
    run() {
        # shellcheck disable=SC2046
        "$SVMGPU_ROOT/scripts/run-vm.sh" --gpus 2 --out "$dir" --timeout "$timeout" \
            --qmp-hook "$hook" $(kargs "$kernel") \
            -- /bin/svmgpu-ktap --only "$list" --out /dev/ttyS1 >"$OUT/$label.out" 2>&1
    }
    step "pause and continue: 2 vGPUs, $PAUSE_ROUNDS QMP stop/cont rounds during the jobs, $kernel kernel" run || rc=$?
    local summary stops pauses
    summary=$(check_run "$label" "$dir" 2 "$kernel" "$dir/channel.log" "$OUT/$label.out") || rc=1
    stops=$(grep -c 'stopped while the test ran' "$dir/qmp-hook.log" 2>/dev/null || true)
    if [[ ${stops:-0} -ne $PAUSE_ROUNDS ]] || ! grep -q "$PAUSE_ROUNDS rounds done" "$dir/qmp-hook.log"; then
        rc=1; summary+=$'\n'"$label: ${stops:-0} of $PAUSE_ROUNDS QMP stops fell inside the test (see $dir/qmp-hook.log)"
    fi
    pauses=$(grep -c 'paused (rings stopped)' "$dir/device.log" 2>/dev/null || true)
    if [[ ${pauses:-0} -lt $((2 * PAUSE_ROUNDS)) ]]; then
        rc=1; summary+=$'\n'"$label: the devices paused ${pauses:-0} times, want at least $((2 * PAUSE_ROUNDS)) (see $dir/device.log)"
    fi
    record "$label" "$rc" "$summary" "QMP stop/cont: ${stops:-0} stops in the test, ${pauses:-0} device pauses"
}

# Guest RAM of two regions (issue 14, section 3): qemu-configs/svmgpu-2-numa.cfg (2 vGPUs,
# two memory backends meeting at guest-physical 512 MiB) and the runner's test for it,
# which places pages of both regions next to each other (and, when it owns them, the two
# frames on either side of the boundary) and has every device run bulk instructions over
# them; the SVM suite in the default mode runs there too.
regions_run() {
    local kernel=$1 timeout=$2 label=two-regions rc=0 list
    [[ $kernel == debug ]] && label=debug-two-regions
    local dir="$OUT/$label"
    list=$(runner_section "tests needing guest RAM in two regions" | paste -sd, -)
    [[ -n $list ]] || { failed=1; results+=("$label: the runner lists no two-region test"); return; }
    run() {
        # shellcheck disable=SC2046
        "$SVMGPU_ROOT/scripts/run-vm.sh" --config "$SVMGPU_ROOT/qemu-configs/svmgpu-2-numa.cfg" \
            --out "$dir" --timeout "$timeout" $(kargs "$kernel") \
            -- /bin/svmgpu-ktap --only "$list,svm_mode_shared" --out /dev/ttyS1 >"$OUT/$label.out" 2>&1
    }
    step "guest RAM in two regions (qemu-configs/svmgpu-2-numa.cfg), 2 vGPUs, $kernel kernel" run || rc=$?
    local summary
    summary=$(check_run "$label" "$dir" 2 "$kernel" "$dir/channel.log" "$OUT/$label.out") || rc=1
    record "$label" "$rc" "$summary" "two RAM regions"
}

# Mutation testing (scripts/mutants.sh): --quick kills four seeded driver bugs (one in the gpusvm implementation).
mutants_run() {
    local rc=0
    step "mutation testing: scripts/mutants.sh ${MUTANTS_ARGS}" \
        "$SVMGPU_ROOT/scripts/mutants.sh" $MUTANTS_ARGS --out "$OUT/mutants" >"$OUT/mutants.out" 2>&1 || rc=$?
    local line
    line=$(grep -E '^killed [0-9]+ of [0-9]+' "$OUT/mutants.out" | tail -n1 || true)
    sed -n '/^| mutant/,/^killed/p' "$OUT/mutants.out"
    if [[ $rc -eq 0 && -n $line ]]; then
        results+=("mutants: $line")
    else
        failed=1; results+=("mutants: FAILED: ${line:-no result} (see $OUT/mutants.out)")
        tail -n 40 "$OUT/mutants.out" >&2 || true
    fi
}

all_kinds() { for e in "${INJECT_SUITE[@]}"; do printf '%s ' "${e%%|*}"; done; }
INJECT_KINDS=${INJECT_ONLY:-$(all_kinds)}
# Debug-kernel guests are ~8x slower to boot and slower to run: longer timeouts.
if [[ $MAIN_KERNEL == debug ]]; then T_SUITE=1500 T_INJECT=600; else T_SUITE=600 T_INJECT=300; fi

if [[ $GUEST -eq 1 ]]; then
    if [[ $NATIVE -eq 1 ]]; then
        if wanted suite; then for n in $GPU_COUNTS; do guest_suite "$n" "$MAIN_KERNEL" "$T_SUITE"; done; fi
        wanted latency && latency_suite "$MAIN_KERNEL" "$T_SUITE"
        wanted swiotlb && swiotlb_run "$MAIN_KERNEL" "$T_SUITE"
        wanted pause && pause_run "$MAIN_KERNEL" "$T_SUITE"
        wanted regions && regions_run "$MAIN_KERNEL" "$T_SUITE"
    fi
    if [[ $GPUSVM -eq 1 ]]; then
        if wanted suite; then for n in $GPU_COUNTS; do gpusvm_suite "$n" "$MAIN_KERNEL" "$T_SUITE"; done; fi
        wanted latency && latency_suite "$MAIN_KERNEL" "$T_SUITE" --gpusvm
        wanted swiotlb && swiotlb_run "$MAIN_KERNEL" "$T_SUITE" --gpusvm
    fi
    [[ -n $MUTANTS_ARGS ]] && mutants_run
fi
[[ $CLIENT -eq 1 ]] && client_run "$MAIN_KERNEL"
if [[ $INJECT -eq 1 ]]; then
    [[ $NATIVE -eq 1 ]] && inject_suite "$MAIN_KERNEL" "$T_INJECT" $INJECT_KINDS
    [[ $GPUSVM -eq 1 ]] && inject_suite "$MAIN_KERNEL" "$T_INJECT" --gpusvm $INJECT_KINDS
fi
if [[ $DEBUG_SUBSET -eq 1 ]]; then
    if [[ $GUEST -eq 1 ]]; then
        [[ $NATIVE -eq 1 ]] && guest_suite 2 debug 1500
        [[ $GPUSVM -eq 1 ]] && gpusvm_suite 2 debug 1500
    fi
    if [[ $INJECT -eq 1 ]]; then
        kinds=""
        for k in $DEBUG_INJECT; do [[ " $INJECT_KINDS " == *" $k "* ]] && kinds+="$k "; done
        if [[ -n $kinds ]]; then
            [[ $NATIVE -eq 1 ]] && inject_suite debug 600 $kinds
            [[ $GPUSVM -eq 1 ]] && inject_suite debug 600 --gpusvm $kinds
        fi
    fi
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
