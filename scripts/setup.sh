#!/usr/bin/env bash
# Set up everything svmgpu needs on this machine, idempotently: Debian packages (extra
# suites from the machine's own mirror, pinned low), the kernel's Rust toolchain pieces,
# QEMU with the svmgpu device, the guest kernel, the device backend, the module, the guest
# programs and the initramfs. Every built artifact is cached under $SVMGPU_CACHE, keyed by
# the hash of its inputs, and rebuilt only when those change.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/setup.sh [--quiet] [--debug-kernel] [--help]

  --quiet          print little when everything is cached
  --debug-kernel   also build the debug variant of the guest kernel (KASAN, KFENCE, kmemleak,
                   ...; ~15 min cold) and its module and initramfs (scripts/test.sh and
                   run-vm.sh --debug-kernel ask for it)
Environment: SVMGPU_CACHE (default ~/.cache/svmgpu), SVMGPU_JOBS (default nproc).
EOF
}
QUIET=0 DEBUG_KERNEL=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --quiet) QUIET=1 ;;
        --debug-kernel) DEBUG_KERNEL=1 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done

host_packages() {
    ensure_apt_suites
    ensure_packages build-essential pkg-config git rsync cpio xz-utils gzip busybox-static \
        python3 python3-venv "clang$LLVM_SUFFIX" "lld$LLVM_SUFFIX" "llvm$LLVM_SUFFIX" \
        "libclang$LLVM_SUFFIX-dev" flex bison bc libelf-dev libssl-dev \
        ninja-build libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev \
        "${EXTRA_PACKAGES[@]}"
}

# Packages added after the first machines were set up: checked on the fast path too.
# libdrm-dev: drm.h for the C client; libseccomp-dev, libcap-ng-dev: virtiofsd's build.
EXTRA_PACKAGES=(libdrm-dev libseccomp-dev libcap-ng-dev)

# The debug kernel variant, its module and initramfs (only when asked).
debug_kernel() {
    "$SVMGPU_ROOT/scripts/build-kernel.sh" --variant debug
    "$SVMGPU_ROOT/scripts/build-guest.sh" --variant debug
}

device_build() {
    run_logged "$SVMGPU_CACHE/logs/device-build.log" \
        cargo build --release --manifest-path "$SVMGPU_ROOT/Cargo.toml" -p svmgpu-device
}

mkdir -p "$SVMGPU_CACHE/logs"
if [[ $QUIET -eq 1 ]] && "$SVMGPU_ROOT/scripts/build-kernel.sh" --print-dir >/dev/null 2>&1 \
    && "$SVMGPU_ROOT/scripts/build-qemu.sh" --check >/dev/null 2>&1; then
    # Fast path: kernel and QEMU cached; the rest is incremental and quick. build-qemu.sh
    # without --check points current/qemu at the cached entry (a new SVMGPU_CACHE sharing
    # the entries of another has no such link yet).
    "$SVMGPU_ROOT/scripts/build-qemu.sh" >/dev/null
    ensure_packages "${EXTRA_PACKAGES[@]}"
    ensure_virtiofsd >/dev/null
    device_build
    "$SVMGPU_ROOT/scripts/build-guest.sh"
    [[ $DEBUG_KERNEL -eq 0 ]] || debug_kernel
    exit 0
fi
step "host packages" host_packages
step "QEMU with vhost-user-svmgpu-pci" "$SVMGPU_ROOT/scripts/build-qemu.sh"
step "guest kernel" "$SVMGPU_ROOT/scripts/build-kernel.sh"
step "svmgpu-device (release)" device_build
step "guest module, programs and initramfs" "$SVMGPU_ROOT/scripts/build-guest.sh"
step "virtiofsd $VIRTIOFSD_VER (run-vm.sh --share)" ensure_virtiofsd
[[ $DEBUG_KERNEL -eq 0 ]] || step "debug guest kernel, module and initramfs" debug_kernel
log "set-up complete in $(elapsed) s"
