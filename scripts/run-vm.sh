#!/usr/bin/env bash
# Boot the svmgpu guest with N vGPUs: start the device backends, start QEMU, load the
# driver, then run a command in the guest (exit with its status) or open a shell.
# Every backend and QEMU started here is stopped on exit, failure or Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/run-vm.sh [options] [-- CMD [ARGS...]]

Runs set-up if needed (scripts/setup.sh), starts one svmgpu-device process serving N
sockets, boots the guest kernel under QEMU with N vhost-user-svmgpu-pci devices and loads
svmgpu.ko. With CMD, runs it in the guest (busybox sh) and exits with its status; without,
opens a guest shell on this terminal (Ctrl-A X quits QEMU).

Options:
  --gpus N            number of vGPUs: 1, 2, 4 or 8 (qemu-configs/svmgpu-N.cfg; default 2)
  --device-args ARGS  extra arguments for svmgpu-device (e.g. "--engines 4 --tlb-entries 128")
  --inject SPEC       fault injection, passed to svmgpu-device --inject (repeatable; grammar in
                      device/README.md). The device always serves its control socket at
                      svmgpu-ctl.sock in the run directory (the path is printed at start):
                      target/release/svmgpu-ctl --socket PATH inject|clear|list|stats
  --timeout SECS      kill the guest after SECS (default 900 with CMD, none without)
  --out DIR           keep console.log, channel.log and device.log in DIR
  --check-console     fail if the console log shows a kernel warning, BUG, lockdep or
                      DMA-API debug report
  --kvm               try KVM (falls back to TCG if the guest does not boot in 60 s)
  --memory SIZE       guest memory, must match the config's backend (default 1G)
  -h, --help          this text
EOF
}

GPUS=2 DEVICE_ARGS="" TIMEOUT="" OUT="" CHECK_CONSOLE=0 KVM=0
CMD=() INJECT=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --gpus) GPUS=$2; shift 2 ;;
        --device-args) DEVICE_ARGS=$2; shift 2 ;;
        --inject) INJECT+=(--inject "$2"); shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --check-console) CHECK_CONSOLE=1; shift ;;
        --kvm) KVM=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; CMD=("$@"); break ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
CFG="$SVMGPU_ROOT/qemu-configs/svmgpu-$GPUS.cfg"
[[ -f $CFG ]] || die "no QEMU config for --gpus $GPUS (have: 1, 2, 4, 8)"
[[ ${#CMD[@]} -gt 0 && -z $TIMEOUT ]] && TIMEOUT=900

"$SVMGPU_ROOT/scripts/setup.sh" --quiet

QEMU_DIR=$(readlink -f "$SVMGPU_CACHE/current/qemu")
QEMU="$QEMU_DIR/bin/qemu-system-x86_64"
KERNEL="$SVMGPU_CACHE/kernel/work/build/arch/x86/boot/bzImage"
INITRD_BASE=$(readlink -f "$SVMGPU_CACHE/current/initramfs.cpio.gz")
DEVICE="$SVMGPU_ROOT/target/release/svmgpu-device"
for f in "$QEMU" "$KERNEL" "$INITRD_BASE" "$DEVICE"; do [[ -e $f ]] || die "missing $f"; done

RUN=$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-run.XXXXXX")
DEV_PID="" QEMU_PID="" TAIL_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $QEMU_PID ]] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    [[ -n $TAIL_PID ]] && kill "$TAIL_PID" 2>/dev/null
    if [[ -n $DEV_PID ]]; then
        kill -TERM "$DEV_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$DEV_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DEV_PID" 2>/dev/null || true
        wait "$DEV_PID" 2>/dev/null || true
    fi
    if [[ -n $OUT ]]; then
        mkdir -p "$OUT"
        cp "$RUN"/*.log "$RUN"/*.json "$OUT"/ 2>/dev/null || true
    fi
    rm -rf "$RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The device: one process, one socket per vGPU (svmgpu.sock0 ...). The expected config
# values are derived from its own --help defaults plus DEVICE_ARGS, and handed to the
# guest tests through /etc/svmgpu-expect.
log "starting svmgpu-device with $GPUS sockets ${DEVICE_ARGS:+($DEVICE_ARGS)}"
# shellcheck disable=SC2086
RUST_LOG=${RUST_LOG:-info} "$DEVICE" --socket-path "$RUN/svmgpu.sock" --socket-count "$GPUS" \
    --stats-json "$RUN/device-stats.json" --control-socket "$RUN/svmgpu-ctl.sock" \
    ${INJECT[@]+"${INJECT[@]}"} $DEVICE_ARGS >"$RUN/device.log" 2>&1 &
DEV_PID=$!
for _ in $(seq 100); do
    ready=1
    for ((i = 0; i < GPUS; i++)); do [[ -S $RUN/svmgpu.sock$i ]] || ready=0; done
    [[ $ready -eq 1 ]] && break
    kill -0 "$DEV_PID" 2>/dev/null || { cat "$RUN/device.log" >&2; die "svmgpu-device exited"; }
    sleep 0.1
done
[[ $ready -eq 1 ]] || { cat "$RUN/device.log" >&2; die "svmgpu-device sockets did not appear"; }
log "control socket: $RUN/svmgpu-ctl.sock (target/release/svmgpu-ctl --socket $RUN/svmgpu-ctl.sock list)"

# Per-run initramfs part: the command and the expectations (concatenated cpio archives).
mkdir -p "$RUN/extra/etc"
"$DEVICE" --print-config $DEVICE_ARGS >"$RUN/extra/etc/svmgpu-expect"
echo "gpus=$GPUS" >>"$RUN/extra/etc/svmgpu-expect"
if [[ ${#CMD[@]} -gt 0 ]]; then
    printf '%q ' "${CMD[@]}" >"$RUN/extra/etc/svmgpu-cmd"
    echo >>"$RUN/extra/etc/svmgpu-cmd"
fi
(cd "$RUN/extra" && find . | cpio -o -H newc --quiet -R 0:0 | gzip -1 >"$RUN/extra.cpio.gz")
cat "$INITRD_BASE" "$RUN/extra.cpio.gz" >"$RUN/initrd.cpio.gz"

ACCEL=(-accel tcg -cpu max)
if [[ $KVM -eq 1 && -w /dev/kvm ]]; then ACCEL=(-accel kvm -cpu host); fi
APPEND="console=ttyS0 panic=-1 oops=panic loglevel=7 printk.time=1"
QEMU_ARGS=(-readconfig "$CFG" -L "$QEMU_DIR/share" "${ACCEL[@]}" -smp 2 -no-reboot
           -nodefaults -kernel "$KERNEL" -initrd "$RUN/initrd.cpio.gz" -append "$APPEND")

start_qemu() {
    : >"$RUN/console.log"; : >"$RUN/channel.log"
    if [[ ${#CMD[@]} -gt 0 ]]; then
        (cd "$RUN" && exec "$QEMU" "${QEMU_ARGS[@]}" -display none \
            -serial file:"$RUN/console.log" -serial file:"$RUN/channel.log" \
            </dev/null >"$RUN/qemu.log" 2>&1) &
        QEMU_PID=$!
        tail -n +1 -F "$RUN/console.log" 2>/dev/null &
        TAIL_PID=$!
    else
        (cd "$RUN" && exec "$QEMU" "${QEMU_ARGS[@]}" -nographic -serial mon:stdio \
            -serial file:"$RUN/channel.log")
    fi
}

T0=$(date +%s)
log "booting guest (${ACCEL[*]}, $GPUS vGPUs)"
start_qemu
if [[ ${#CMD[@]} -gt 0 ]]; then
    booted=0
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        now=$(( $(date +%s) - T0 ))
        if [[ $booted -eq 0 ]] && grep -q 'svmgpu-guest: booted' "$RUN/console.log"; then booted=1; fi
        if [[ $KVM -eq 1 && $booted -eq 0 && $now -ge 60 && ${ACCEL[1]} == kvm ]]; then
            log "guest did not boot under KVM in 60 s; retrying with TCG"
            kill "$QEMU_PID"; wait "$QEMU_PID" 2>/dev/null || true; kill "$TAIL_PID" 2>/dev/null || true
            ACCEL=(-accel tcg -cpu max)
            QEMU_ARGS=(-readconfig "$CFG" -L "$QEMU_DIR/share" "${ACCEL[@]}" -smp 2 -no-reboot
                       -nodefaults -kernel "$KERNEL" -initrd "$RUN/initrd.cpio.gz" -append "$APPEND")
            T0=$(date +%s); start_qemu; continue
        fi
        if [[ $now -ge $TIMEOUT ]]; then
            log "guest timed out after $TIMEOUT s"
            kill "$QEMU_PID" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=""
    sleep 0.3; kill "$TAIL_PID" 2>/dev/null || true; TAIL_PID=""
    [[ -s $RUN/qemu.log ]] && cat "$RUN/qemu.log" >&2
fi
log "guest ran for $(( $(date +%s) - T0 )) s"

status=$(sed -n 's/.*svmgpu-exit-status \([0-9]*\).*/\1/p' "$RUN/channel.log" | tail -n1)
rc=${status:-125}
[[ -z $status && ${#CMD[@]} -gt 0 ]] && log "the guest did not report an exit status (crash, panic or timeout)"
if [[ $CHECK_CONSOLE -eq 1 ]]; then
    "$SVMGPU_ROOT/scripts/lib/console-check.sh" "$RUN/console.log" || rc=${rc/#0/1}
fi
[[ ${#CMD[@]} -gt 0 ]] || rc=0
exit "$rc"
