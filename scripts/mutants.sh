#!/usr/bin/env bash
# Mutation testing of the guest driver: how good is the oracle? Every patch in
# tests/mutants/ seeds one realistic coherence bug into guest-driver/kmod; this script
# builds the module with it and runs the guest suites the patch names (its "Kills:"
# lines, tried in order) until one of them fails. A mutant is killed when a guest test
# fails, a kernel report appears on the console, the device's audit counts a violation,
# or the guest dies; it survives when every run passes. Prints a table (mutant, killed or
# survived, by what, time) and exits 1 unless every mutant was killed.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

MUTANTS_DIR="$SVMGPU_ROOT/tests/mutants"
# --quick: four mutants from different layers (a two-pass notifier that does not wait,
# hole 1, hole 5, and the second pass of the drm_gpusvm implementation not waiting), a few
# minutes in all; CI runs them on every change.
QUICK=(01-userptr-second-pass-no-wait 12-hole1-narrow-flush 16-hole5-chunk-over-binding
       20-gpusvm-second-pass-no-wait)

usage() {
    cat <<EOF
Usage: scripts/mutants.sh [--all | --quick | --only "NAME..."] [--list] [--out DIR] [--help]

Builds svmgpu.ko once per patch of tests/mutants/ and runs the guest tests its "Kills:"
lines name (scripts/run-vm.sh --module), stopping at the first run that fails.
  --all         every mutant (the default)
  --quick       only ${QUICK[*]}
  --only LIST   only these mutants (file names without .patch, or their number prefix)
  --list        list the mutants and what should kill them, and exit
  --out DIR     keep every run's logs in DIR (default: a temp folder)

A patch starts with a header ahead of its diff:
  Mutant: TITLE            one line, then a free description
  Kills: gpus=N [device-args=A,B] [kernel-args=A,B] [module-args=A,B] [inject=SPEC] only=TEST
                           one guest run: N vGPUs, svmgpu-device arguments, guest kernel
                           arguments and svmgpu.ko parameters (svmgpu-ktap --module-args,
                           e.g. svm_impl=gpusvm) (commas become spaces), a fault injection
                           (run-vm.sh --inject SPEC, commas kept), the guest test to run
Exit status: 0 if every mutant was killed, 1 if one survived, 2 on a usage or build error.
EOF
}

ONLY="" LIST=0 OUT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --all) ONLY=""; shift ;;
        --quick) ONLY="${QUICK[*]}"; shift ;;
        --only) ONLY=$2; shift 2 ;;
        --list) LIST=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; echo "mutants.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

mapfile -t PATCHES < <(find "$MUTANTS_DIR" -name '*.patch' | LC_ALL=C sort)
[[ ${#PATCHES[@]} -gt 0 ]] || die "no mutant in $MUTANTS_DIR"

selected=()
for p in "${PATCHES[@]}"; do
    name=$(basename "$p" .patch)
    if [[ -n $ONLY ]]; then
        hit=0
        for o in $ONLY; do [[ $name == "$o" || $name == "$o"-* ]] && hit=1; done
        [[ $hit -eq 1 ]] || continue
    fi
    selected+=("$p")
done
if [[ -n $ONLY ]]; then
    for o in $ONLY; do
        found=0
        for p in "${selected[@]}"; do
            n=$(basename "$p" .patch); [[ $n == "$o" || $n == "$o"-* ]] && found=1
        done
        [[ $found -eq 1 ]] || { echo "mutants.sh: no mutant named $o" >&2; exit 2; }
    done
fi

if [[ $LIST -eq 1 ]]; then
    for p in "${selected[@]}"; do
        printf '%s: %s\n' "$(basename "$p" .patch)" "$(sed -n 's/^Mutant: //p' "$p")"
        sed -n 's/^Kills: /    kills: /p' "$p"
    done
    exit 0
fi

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-mutants.XXXXXX")}
mkdir -p "$OUT"
step "set-up (cached after the first run)" "$SVMGPU_ROOT/scripts/setup.sh" --quiet
# Every guest below uses what this set-up built (and the checkout may change meanwhile).
export SVMGPU_SETUP_DONE=1
KBUILD=$("$SVMGPU_ROOT/scripts/build-kernel.sh" --print-dir) || die "kernel not built"
kernel_toolchain_env

# A scratch copy of what the module is built from (its sources include the spec's wire.rs).
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-mutant-src.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
reset_scratch() {
    rm -rf "$SCRATCH/guest-driver" "$SCRATCH/spec"
    mkdir -p "$SCRATCH/guest-driver" "$SCRATCH/spec/src"
    cp -r "$SVMGPU_ROOT/guest-driver/kmod" "$SCRATCH/guest-driver/"
    cp "$SVMGPU_ROOT/spec/src/wire.rs" "$SCRATCH/spec/src/"
    # Build products of an in-place build of the checkout are not sources.
    find "$SCRATCH/guest-driver/kmod" \( -name '*.o' -o -name '*.ko' -o -name '.*.cmd' \
        -o -name '*.mod' -o -name '*.mod.c' -o -name 'modules.order' -o -name 'Module.symvers' \) \
        -delete
}

# One "Kills:" line: run the guest it describes with module $1; prints what failed
# ("" if everything passed).
run_kill() {
    local ko=$1 spec=$2 dir=$3 gpus=2 dargs="" kargs="" margs="" inject="" only="" w
    for w in $spec; do
        case $w in
            gpus=*) gpus=${w#gpus=} ;;
            device-args=*) dargs=${w#device-args=}; dargs=${dargs//,/ } ;;
            kernel-args=*) kargs=${w#kernel-args=}; kargs=${kargs//,/ } ;;
            inject=*) inject=${w#inject=} ;;
            module-args=*) margs=${w#module-args=}; margs=${margs//,/ } ;;
            only=*) only=${w#only=} ;;
            *) echo "bad Kills word: $w"; return 0 ;;
        esac
    done
    [[ -n $only ]] || { echo "Kills line without only=: $spec"; return 0; }
    local args=(--gpus "$gpus" --out "$dir" --timeout 600 --module "$ko")
    [[ -n $dargs ]] && args+=(--device-args "$dargs")
    [[ -n $kargs ]] && args+=(--kernel-args "$kargs")
    [[ -n $inject ]] && args+=(--inject "$inject")
    local rc=0
    local ktap=(/bin/svmgpu-ktap)
    [[ -n $margs ]] && ktap+=(--module-args "$margs")
    "$SVMGPU_ROOT/scripts/run-vm.sh" "${args[@]}" -- "${ktap[@]}" --only "$only" --out /dev/ttyS1 \
        >"$dir.out" 2>&1 || rc=$?
    # What failed: the first failing test (top level) and its first failing case.
    local top inner n
    top=$(grep -m1 -E '^not ok [0-9]+ ' "$dir/channel.log" 2>/dev/null | sed -E 's/^not ok [0-9]+ //; s/ *#.*//' || true)
    inner=$(grep -m1 -E '^ +not ok [0-9]+ ' "$dir/channel.log" 2>/dev/null | sed -E 's/^ *not ok [0-9]+ //; s/ *#.*//' || true)
    n=$(grep -c -E '^ *not ok [0-9]+ ' "$dir/channel.log" 2>/dev/null || true)
    if [[ -n $top ]]; then
        echo "$top${inner:+/$inner}$([[ ${n:-0} -gt 2 ]] && echo " (+$((n - 2)) more not ok)")"
        return 0
    fi
    if ! "$SVMGPU_ROOT/scripts/lib/ktap-check.sh" "$dir/channel.log" "$only" >/dev/null 2>&1; then
        echo "$only: incomplete KTAP (guest died, rc $rc)"; return 0
    fi
    if ! "$SVMGPU_ROOT/scripts/lib/console-check.sh" "$dir/console.log" >/dev/null 2>&1; then
        echo "$only: kernel report on the console"; return 0
    fi
    if [[ $rc -ne 0 ]]; then echo "$only: guest run failed (rc $rc)"; return 0; fi
    echo ""
}

rows=() killed=0 survived=0
for p in "${selected[@]}"; do
    name=$(basename "$p" .patch)
    t0=$(date +%s)
    log "==> mutant $name: $(sed -n 's/^Mutant: //p' "$p")"
    reset_scratch
    if ! (cd "$SCRATCH" && git apply "$p"); then
        die "$name does not apply to guest-driver/kmod (update the patch)"
    fi
    if ! run_logged "$OUT/$name-build.log" make -C "$KBUILD" M="$SCRATCH/guest-driver/kmod" \
        LLVM="$LLVM_SUFFIX" modules; then
        echo "mutants.sh: $name does not build (see $OUT/$name-build.log)" >&2; exit 2
    fi
    cp "$SCRATCH/guest-driver/kmod/svmgpu.ko" "$OUT/$name.ko"
    by="" i=0
    while IFS= read -r spec; do
        i=$((i + 1))
        by=$(run_kill "$OUT/$name.ko" "$spec" "$OUT/$name-run$i")
        [[ -n $by ]] && break
    done < <(sed -n 's/^Kills: //p' "$p")
    dt=$(( $(date +%s) - t0 ))
    if [[ -n $by ]]; then
        killed=$((killed + 1)); rows+=("$name|killed|$by|${dt}s")
        log "<== $name killed by $by (${dt} s)"
    else
        survived=$((survived + 1)); rows+=("$name|SURVIVED|-|${dt}s")
        log "<== $name SURVIVED (${dt} s)"
    fi
done

echo
echo "==== svmgpu mutants ($(elapsed) s; logs in $OUT) ===="
printf '| %s | %s | %s | %s |\n' mutant result "killed by" time
printf '| --- | --- | --- | --- |\n'
for r in "${rows[@]}"; do
    IFS='|' read -r a b c d <<<"$r"
    printf '| %s | %s | %s | %s |\n' "$a" "$b" "$c" "$d"
done
total=$((killed + survived))
echo "killed $killed of $total ($(( total ? 100 * killed / total : 0 )) %)"
[[ $survived -eq 0 ]]
