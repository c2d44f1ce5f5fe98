#!/usr/bin/env bash
# Boot the svmgpu guest with N vGPUs: start the device backends, start QEMU, load the
# driver, then run a command in the guest (exit with its status) or open a shell.
# Every backend and QEMU started here is stopped on exit, failure or Ctrl-C.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"
SELF=$(readlink -f "${BASH_SOURCE[0]}")

usage() {
    cat <<EOF
Usage: scripts/run-vm.sh [options] [-- CMD [ARGS...]]

Runs set-up if needed (scripts/setup.sh), starts one svmgpu-device process serving N
sockets, boots the guest kernel under QEMU with N vhost-user-svmgpu-pci devices and loads
svmgpu.ko. With CMD, runs it in the guest (busybox sh) and exits with its status; without,
opens a guest shell on this terminal (Ctrl-A X quits QEMU, exit or Ctrl-D powers off).

Options:
  --gpus N            number of vGPUs, 1..64 (the device's socket limit; default 2). The QEMU
                      configuration is generated (qemu-configs/generate.sh --gpus N)
  --share DIR         mount host folder DIR in the guest, read-write (virtiofs), at the same
                      absolute path (or /mnt/host if that path is a guest system folder);
                      CMD (or the shell) runs there: --share . -- ./my-static-program
  --add FILE...       copy files or folders into the per-run initramfs, in /root (the
                      working directory of CMD without --share); takes arguments up to the
                      next option
  --accel A           kvm, tcg or auto (default): auto uses KVM when /dev/kvm is usable and a
                      probe boot under KVM succeeds (the result is cached per host kernel in
                      \$SVMGPU_CACHE/accel/; delete it to probe again), TCG otherwise; kvm
                      fails if the guest does not boot under KVM within 60 s
  --kvm               the same as --accel auto (older name)
  --debug-kernel      boot the debug variant of the guest kernel (KASAN, KFENCE, DEBUG_VM,
                      DEBUG_LIST, DEBUG_OBJECTS, hung-task and soft-lockup detectors, kmemleak;
                      built on first use, ~15 min) with a module built against it
  --gdb               start QEMU's gdbstub (guest paused until gdb continues; kaslr off) and
                      print the gdb command line; no timeout
  --gdb-port PORT     TCP port of the gdbstub (default 1234)
  --console           the guest console on this terminal, interactive, also with CMD (CMD then
                      runs on it: stdin works); without CMD this is the default
  --device-args ARGS  extra arguments for svmgpu-device (e.g. "--engines 4 --tlb-entries 128")
  --inject SPEC       fault injection, passed to svmgpu-device --inject (repeatable; grammar in
                      device/README.md). The device always serves its control socket at
                      svmgpu-ctl.sock in the run directory (the path is printed at start):
                      target/release/svmgpu-ctl --socket PATH inject|clear|list|stats
  --timeout SECS      kill the guest after SECS (default 900 with CMD, none without)
  --out DIR           keep console.log, channel.log, device.log and device-stats.json in DIR
  --check-console     fail if the console log shows a kernel warning, BUG, lockdep, DMA-API,
                      KASAN/KFENCE, RCU stall, OOM or kmemleak report (scripts/lib/console-check.sh)
  --memory SIZE       guest memory (default 1G)
  --qmp-hook CMD      run CMD (bash -c) on the host while the guest runs, once QEMU has
                      started, with SVMGPU_QMP set to QEMU's QMP socket (every run has one:
                      qmp.sock in the run directory); its output goes to qmp-hook.log, and
                      it is stopped when the guest ends. E.g. scripts/lib/qmp-pause.sh
  --module FILE       load this svmgpu.ko instead of the one built from the checkout (it
                      replaces /lib/modules/svmgpu.ko in the per-run initramfs; it must be
                      built against the same kernel: scripts/mutants.sh does that)
  --kernel-args ARGS  more guest kernel command-line arguments (e.g. "swiotlb=force")
  --config FILE       use this QEMU -readconfig file instead of a generated one (e.g.
                      qemu-configs/svmgpu-2-numa.cfg); --gpus is taken from its number of
                      vhost-user-svmgpu-pci devices, --memory from the file
  -h, --help          this text

Examples:
  scripts/run-vm.sh --gpus 4 --share . -- ./my-test        your own static program, 4 vGPUs
  scripts/run-vm.sh --gpus 2 -- svmgpu-client --gpus 2     the C client (tests/c/)
  scripts/run-vm.sh --gpus 1 --gdb                         then the printed gdb command
EOF
}

GPUS=2 DEVICE_ARGS="" TIMEOUT="" OUT="" CHECK_CONSOLE=0 ACCEL_REQ=auto MEMORY=1G
SHARE="" GDB=0 GDB_PORT=1234 CONSOLE=0 VARIANT=default CONFIG=""
CMD=() INJECT=() ADD=() MODULE_OVERRIDE="" KERNEL_ARGS="" QMP_HOOK="" HOOK_PID=""
need() { [[ $# -ge 2 ]] || { usage >&2; die "$1 needs a value"; }; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --gpus) need "$@"; GPUS=$2; shift 2 ;;
        --device-args) need "$@"; DEVICE_ARGS=$2; shift 2 ;;
        --inject) need "$@"; INJECT+=(--inject "$2"); shift 2 ;;
        --timeout) need "$@"; TIMEOUT=$2; shift 2 ;;
        --out) need "$@"; OUT=$2; shift 2 ;;
        --check-console) CHECK_CONSOLE=1; shift ;;
        --accel) need "$@"; ACCEL_REQ=$2; shift 2 ;;
        --kvm) ACCEL_REQ=auto; shift ;;
        --memory) need "$@"; MEMORY=$2; shift 2 ;;
        --config) need "$@"; CONFIG=$2; shift 2 ;;
        --module) need "$@"; MODULE_OVERRIDE=$(readlink -f "$2"); shift 2 ;;
        --kernel-args) need "$@"; KERNEL_ARGS=$2; shift 2 ;;
        --share) need "$@"; SHARE=$2; shift 2 ;;
        --add)
            shift
            [[ $# -gt 0 && $1 != -* ]] || die "--add needs at least one file"
            while [[ $# -gt 0 && $1 != -* ]]; do ADD+=("$1"); shift; done ;;
        --debug-kernel) VARIANT=debug; shift ;;
        --gdb) GDB=1; shift ;;
        --gdb-port) need "$@"; GDB_PORT=$2; GDB=1; shift 2 ;;
        --console) CONSOLE=1; shift ;;
        --qmp-hook) need "$@"; QMP_HOOK=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; CMD=("$@"); break ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done
if [[ -n $CONFIG ]]; then
    [[ -f $CONFIG ]] || die "--config $CONFIG: no such file"
    CONFIG=$(readlink -f "$CONFIG")
    GPUS=$(grep -c '^ *driver *= *"vhost-user-svmgpu-pci"' "$CONFIG" || true)
fi
[[ $GPUS =~ ^[0-9]+$ && $GPUS -ge 1 && $GPUS -le 64 ]] \
    || die "--gpus must be a number from 1 to 64 (the device's socket limit), not '$GPUS'"
case $ACCEL_REQ in kvm|tcg|auto) ;; *) die "--accel must be kvm, tcg or auto, not '$ACCEL_REQ'" ;; esac
[[ -z $TIMEOUT || $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"
[[ $GDB_PORT =~ ^[0-9]+$ ]] || die "--gdb-port must be a number"
if [[ -n $SHARE ]]; then
    [[ -d $SHARE ]] || die "--share $SHARE: no such folder"
    SHARE=$(readlink -f "$SHARE")
fi
for f in ${ADD[@]+"${ADD[@]}"}; do [[ -e $f ]] || die "--add $f: no such file"; done
if [[ ${#CMD[@]} -gt 0 && -z $TIMEOUT && $GDB -eq 0 ]]; then TIMEOUT=900; fi

# SVMGPU_SETUP_DONE=1: the caller (scripts/test.sh, after its own set-up) vouches that
# everything is built; saves the ~3-6 s of checking it again for every guest.
if [[ ${SVMGPU_SETUP_DONE:-0} != 1 ]]; then
    "$SVMGPU_ROOT/scripts/setup.sh" --quiet
    if [[ $VARIANT == debug ]]; then
        step "debug guest kernel" "$SVMGPU_ROOT/scripts/build-kernel.sh" --variant debug
        "$SVMGPU_ROOT/scripts/build-guest.sh" --variant debug
    fi
fi

QEMU_DIR=$(readlink -f "$SVMGPU_CACHE/current/qemu")
QEMU="$QEMU_DIR/bin/qemu-system-x86_64"
KBUILD=$("$SVMGPU_ROOT/scripts/build-kernel.sh" --print-dir --variant "$VARIANT") \
    || die "the $VARIANT guest kernel is not built"
KERNEL="$KBUILD/arch/x86/boot/bzImage"
CUR="$SVMGPU_CACHE/current"
[[ $VARIANT == default ]] || CUR+="/$VARIANT"
INITRD_BASE=$(readlink -f "$CUR/initramfs.cpio.gz")
MODULE=$(readlink -f "$CUR/svmgpu.ko")
if [[ -n $MODULE_OVERRIDE ]]; then
    [[ -f $MODULE_OVERRIDE ]] || die "--module: no file $MODULE_OVERRIDE"
    MODULE=$MODULE_OVERRIDE
fi
DEVICE="$SVMGPU_ROOT/target/release/svmgpu-device"
for f in "$QEMU" "$KERNEL" "$INITRD_BASE" "$DEVICE"; do [[ -e $f ]] || die "missing $f"; done
VIRTIOFSD=""
[[ -n $SHARE ]] && VIRTIOFSD=$(ensure_virtiofsd)

# The accelerator. auto: a probe boot under KVM, once per host kernel.
kvm_usable() { [[ -c /dev/kvm && -r /dev/kvm && -w /dev/kvm ]]; }
probe_accel() {
    local dir="$SVMGPU_CACHE/accel" stamp host
    host="$(uname -r)-$(uname -v | sha256sum | cut -c1-12)"
    stamp="$dir/$host"
    if [[ -f $stamp ]]; then cat "$stamp"; return 0; fi
    mkdir -p "$dir"
    if ! kvm_usable; then
        echo "tcg /dev/kvm is missing or not usable" | tee "$stamp"; return 0
    fi
    log "probing KVM: one guest boot under KVM (result cached in $stamp)"
    local t0 rc=0 why; t0=$(date +%s)
    "$SELF" --accel kvm --gpus 1 --timeout 90 -- true >"$dir/$host.log" 2>&1 || rc=$?
    if [[ $rc -eq 0 ]]; then
        echo "kvm a probe boot under KVM succeeded in $(( $(date +%s) - t0 )) s" | tee "$stamp"
    else
        why=$(grep -o -m1 'qemu-system-x86_64: error: .*\|did not boot under KVM in [0-9]* s\|did not report an exit status' \
            "$dir/$host.log" || echo "exit $rc")
        echo "tcg the probe boot under KVM failed after $(( $(date +%s) - t0 )) s ($why; $dir/$host.log)" | tee "$stamp"
    fi
}
case $ACCEL_REQ in
    tcg) ACCEL=tcg; ACCEL_WHY="--accel tcg" ;;
    kvm) kvm_usable || die "--accel kvm: /dev/kvm is missing or not usable"
         ACCEL=kvm; ACCEL_WHY="--accel kvm" ;;
    auto) ACCEL_WHY=$(probe_accel); ACCEL=${ACCEL_WHY%% *}
          [[ $ACCEL == kvm || $ACCEL == tcg ]] || die "bad KVM probe result in $SVMGPU_CACHE/accel: $ACCEL_WHY"
          ACCEL_WHY="--accel auto: ${ACCEL_WHY#* }" ;;
esac
# -cpu max: every feature the accelerator can give (under KVM: the host's, like -cpu host).
ACCEL_ARGS=(-accel "$ACCEL" -cpu max)

RUN=$(mktemp -d "${TMPDIR:-/tmp}/svmgpu-run.XXXXXX")
DEV_PID="" QEMU_PID="" TAIL_PID="" FS_PID=""
stop_pid() {    # stop_pid PID: TERM, up to 5 s, then KILL
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $HOOK_PID ]]; then kill "$HOOK_PID" 2>/dev/null || true; fi
    [[ -n $QEMU_PID ]] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    [[ -n $TAIL_PID ]] && kill "$TAIL_PID" 2>/dev/null
    [[ -n $DEV_PID ]] && stop_pid "$DEV_PID"
    [[ -n $FS_PID ]] && stop_pid "$FS_PID"
    if [[ -n $OUT ]]; then
        mkdir -p "$OUT"
        cp "$RUN"/*.log "$RUN"/*.json "$OUT"/ 2>/dev/null || true
    fi
    rm -rf "$RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -n $CONFIG ]]; then
    cp "$CONFIG" "$RUN/svmgpu.cfg"
else
    "$SVMGPU_ROOT/qemu-configs/generate.sh" --gpus "$GPUS" --ram "$MEMORY" >"$RUN/svmgpu.cfg"
fi

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

# The shared folder: virtiofsd on virtiofs.sock, QEMU's vhost-user-fs-pci, tag svmgpu-share.
SHARE_ARGS=() GUEST_SHARE=""
if [[ -n $SHARE ]]; then
    GUEST_SHARE=$SHARE
    case $SHARE in
        /|/bin|/bin/*|/sbin|/sbin/*|/usr|/usr/*|/lib|/lib/*|/etc|/etc/*|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/init)
            GUEST_SHARE=/mnt/host ;;
    esac
    sandbox=namespace
    [[ $(id -u) -eq 0 ]] || sandbox=none
    "$VIRTIOFSD" --socket-path "$RUN/virtiofs.sock" --shared-dir "$SHARE" --sandbox "$sandbox" \
        --cache auto >"$RUN/virtiofsd.log" 2>&1 &
    FS_PID=$!
    for _ in $(seq 50); do [[ -S $RUN/virtiofs.sock ]] && break; sleep 0.1; done
    [[ -S $RUN/virtiofs.sock ]] || { cat "$RUN/virtiofsd.log" >&2; die "virtiofsd did not start"; }
    SHARE_ARGS=(-chardev socket,id=svmgpu-share,path=virtiofs.sock
                -device vhost-user-fs-pci,chardev=svmgpu-share,tag=svmgpu-share)
    log "sharing $SHARE read-write (virtiofs) at $GUEST_SHARE in the guest"
fi

# Per-run initramfs part (a second cpio archive after the cached base): the command, the
# expectations, what runs before it (/etc/svmgpu-pre, sourced by init: mount the share,
# change directory) and the --add files in /root.
mkdir -p "$RUN/extra/etc" "$RUN/extra/root"
"$DEVICE" --print-config $DEVICE_ARGS >"$RUN/extra/etc/svmgpu-expect"
{ echo "gpus=$GPUS"; echo "accel=$ACCEL"; echo "kernel=$VARIANT"; } >>"$RUN/extra/etc/svmgpu-expect"
{
    echo "cd /root"
    if [[ -n $SHARE ]]; then
        printf 'mkdir -p %q && mount -t virtiofs svmgpu-share %q && cd %q || echo "svmgpu-guest: cannot mount the shared folder at %q"\n' \
            "$GUEST_SHARE" "$GUEST_SHARE" "$GUEST_SHARE" "$GUEST_SHARE"
    fi
} >"$RUN/extra/etc/svmgpu-pre"
for f in ${ADD[@]+"${ADD[@]}"}; do cp -a "$f" "$RUN/extra/root/"; done
if [[ -n $MODULE_OVERRIDE ]]; then
    # Later cpio members replace earlier ones: this module is the one init loads.
    mkdir -p "$RUN/extra/lib/modules"
    cp "$MODULE_OVERRIDE" "$RUN/extra/lib/modules/svmgpu.ko"
    log "module: $MODULE_OVERRIDE"
fi
if [[ ${#CMD[@]} -gt 0 ]]; then
    printf '%q ' "${CMD[@]}" >"$RUN/extra/etc/svmgpu-cmd"
    echo >>"$RUN/extra/etc/svmgpu-cmd"
fi
(cd "$RUN/extra" && find . | cpio -o -H newc --quiet -R 0:0 | gzip -1 >"$RUN/extra.cpio.gz")
cat "$INITRD_BASE" "$RUN/extra.cpio.gz" >"$RUN/initrd.cpio.gz"

# no_timer_check: under TCG on a loaded host the kernel's boot-time check of the IO-APIC
# timer can miss its ticks and panic ("IO-APIC + timer doesn't work", seen here at a load
# average of 6 on 2 cores); virtual machines skip that check.
APPEND="console=ttyS0 panic=-1 oops=panic loglevel=7 printk.time=1 no_timer_check"
[[ -n $KERNEL_ARGS ]] && APPEND+=" $KERNEL_ARGS"
GDB_ARGS=()
if [[ $GDB -eq 1 ]]; then
    APPEND+=" nokaslr"
    GDB_ARGS=(-gdb "tcp:127.0.0.1:$GDB_PORT" -S)
fi
QEMU_ARGS=(-readconfig "$RUN/svmgpu.cfg" -L "$QEMU_DIR/share" "${ACCEL_ARGS[@]}" -smp 2 -no-reboot
           -nodefaults -kernel "$KERNEL" -initrd "$RUN/initrd.cpio.gz" -append "$APPEND"
           ${SHARE_ARGS[@]+"${SHARE_ARGS[@]}"} ${GDB_ARGS[@]+"${GDB_ARGS[@]}"}
           -qmp "unix:$RUN/qmp.sock,server=on,wait=off")

INTERACTIVE=0
[[ ${#CMD[@]} -eq 0 || $CONSOLE -eq 1 ]] && INTERACTIVE=1
start_qemu() {
    : >"$RUN/console.log"; : >"$RUN/channel.log"
    if [[ $INTERACTIVE -eq 0 ]]; then
        (cd "$RUN" && exec "$QEMU" "${QEMU_ARGS[@]}" -display none \
            -serial file:"$RUN/console.log" -serial file:"$RUN/channel.log" \
            </dev/null >"$RUN/qemu.log" 2>&1) &
        QEMU_PID=$!
        tail -n +1 -F "$RUN/console.log" 2>/dev/null &
        TAIL_PID=$!
    else
        # The console on this terminal, and a copy in console.log (for --check-console).
        (cd "$RUN" && exec "$QEMU" "${QEMU_ARGS[@]}" -nographic \
            -chardev stdio,id=con,mux=on,signal=off,logfile="$RUN/console.log" \
            -serial chardev:con -mon chardev=con,mode=readline -serial file:"$RUN/channel.log")
    fi
}

if [[ $GDB -eq 1 ]]; then
    ensure_packages gdb
    log "gdbstub on 127.0.0.1:$GDB_PORT; the guest waits for gdb. In another terminal:"
    log "  gdb -iex 'add-auto-load-safe-path $KBUILD' $KBUILD/vmlinux -ex 'target remote :$GDB_PORT'"
    log "  (gdb) hbreak start_kernel / continue; once svmgpu.ko is loaded: lx-symbols $(dirname "$MODULE")"
fi
T0=$(date +%s)
log "booting guest: $ACCEL ($ACCEL_WHY), $GPUS vGPU(s), $VARIANT kernel; QMP socket $RUN/qmp.sock"
if [[ -n $QMP_HOOK ]]; then
    (SVMGPU_QMP="$RUN/qmp.sock" exec bash -c "$QMP_HOOK" >"$RUN/qmp-hook.log" 2>&1) &
    HOOK_PID=$!
fi
start_qemu
if [[ $INTERACTIVE -eq 0 ]]; then
    booted=0
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        now=$(( $(date +%s) - T0 ))
        if [[ $booted -eq 0 ]] && grep -q 'svmgpu-guest: booted' "$RUN/console.log"; then
            booted=1
            log "guest booted after $now s ($ACCEL)"
        fi
        if [[ $ACCEL == kvm && $booted -eq 0 && $now -ge 60 && $GDB -eq 0 ]]; then
            kill "$QEMU_PID" 2>/dev/null || true
            die "the guest did not boot under KVM in 60 s (--accel tcg or auto avoids KVM)"
        fi
        if [[ -n $TIMEOUT && $now -ge $TIMEOUT ]]; then
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
    cc_args=(--accel "$ACCEL")
    [[ $VARIANT == debug ]] && cc_args+=(--debug-kernel)
    "$SVMGPU_ROOT/scripts/lib/console-check.sh" "${cc_args[@]}" "$RUN/console.log" || rc=${rc/#0/1}
fi
[[ ${#CMD[@]} -gt 0 ]] || rc=0
exit "$rc"
