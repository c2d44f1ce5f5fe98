#!/usr/bin/env bash
# Build what runs inside the guest: the svmgpu.ko module (against the cached kernel),
# the static Rust test programs, and the initramfs (busybox + module + programs + init).
# Each is cached under $SVMGPU_CACHE keyed by a hash of its inputs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/build-guest.sh [--help]

Builds (or reuses) and prints nothing but progress; afterwards
  \$SVMGPU_CACHE/current/initramfs.cpio.gz   the guest's initramfs
  \$SVMGPU_CACHE/current/svmgpu.ko           the module inside it
Requires the kernel (scripts/build-kernel.sh).
EOF
}

[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
[[ $# -eq 0 ]] || { usage >&2; exit 2; }

KBUILD=$("$SVMGPU_ROOT/scripts/build-kernel.sh" --print-dir) || die "kernel not built; run scripts/build-kernel.sh"
KEY_KERNEL=$(cat "$SVMGPU_CACHE/kernel/work/.key")
KMOD="$SVMGPU_ROOT/guest-driver/kmod"
WIRE="$SVMGPU_ROOT/spec/src/wire.rs"
# Static guest programs: the KTAP test runner and the svmgpu CLI.
GUEST_BINS=(svmgpu-ktap svmgpu)
mkdir -p "$SVMGPU_CACHE/current"

build_module() {
    local key dir
    key=$(hash_inputs "$KEY_KERNEL" "$KMOD" "$WIRE")
    dir=$(cache_dir module "$key")
    if ! cache_ready "$dir"; then
        kernel_toolchain_env
        # Build in the checkout (the module includes ../../spec/src/wire.rs), then keep
        # only the .ko in the cache.
        run_logged "$SVMGPU_CACHE/logs/module-build.log" \
            make -C "$KBUILD" M="$KMOD" LLVM="$LLVM_SUFFIX" modules
        mkdir -p "$dir"; cp "$KMOD/svmgpu.ko" "$dir/"; cache_seal "$dir"; cache_prune module 3
        grep -E 'warning|error' "$SVMGPU_CACHE/logs/module-build.log" >&2 || true
    else
        log "module cached ($key)"
    fi
    ln -sfn "$dir/svmgpu.ko" "$SVMGPU_CACHE/current/svmgpu.ko"
}

build_userspace() {
    # Static binaries for the guest; a target dir of their own so the host build's cache
    # is not invalidated by the different RUSTFLAGS.
    local tdir="$SVMGPU_ROOT/target/guest-static"
    RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$tdir" \
        run_logged "$SVMGPU_CACHE/logs/guest-userspace.log" \
        cargo build --release --target x86_64-unknown-linux-gnu -p svmgpu-guest-tests -p svmgpu
    GUEST_BIN_DIR="$tdir/x86_64-unknown-linux-gnu/release"
    local b
    for b in "${GUEST_BINS[@]}"; do
        ldd "$GUEST_BIN_DIR/$b" 2>&1 | grep -q 'not a dynamic\|statically linked' \
            || die "$b is not statically linked"
    done
}

build_initramfs() {
    ensure_packages busybox-static cpio
    local init="$SVMGPU_ROOT/tests/guest/initramfs/init" bins=() b key dir
    for b in "${GUEST_BINS[@]}"; do bins+=("$GUEST_BIN_DIR/$b"); done
    key=$(hash_inputs /bin/busybox "$init" "$SVMGPU_CACHE/current/svmgpu.ko" "${bins[@]}")
    dir=$(cache_dir initramfs "$key")
    if ! cache_ready "$dir"; then
        local root; root=$(mktemp -d)
        mkdir -p "$root"/{bin,sbin,usr/bin,etc,proc,sys,dev,tmp,lib/modules,root}
        cp /bin/busybox "$root/bin/busybox"
        cp "$init" "$root/init"
        cp "$SVMGPU_CACHE/current/svmgpu.ko" "$root/lib/modules/"
        cp "${bins[@]}" "$root/bin/"
        mkdir -p "$dir"
        (cd "$root" && find . -print0 | LC_ALL=C sort -z \
            | cpio --null -o -H newc --quiet -R 0:0 | gzip -1 >"$dir/initramfs.cpio.gz")
        rm -rf "$root"
        cache_seal "$dir"; cache_prune initramfs 3
        log "initramfs: $(du -h "$dir/initramfs.cpio.gz" | cut -f1)"
    else
        log "initramfs cached ($key)"
    fi
    ln -sfn "$dir/initramfs.cpio.gz" "$SVMGPU_CACHE/current/initramfs.cpio.gz"
}

step "svmgpu.ko" build_module
step "guest programs (static)" build_userspace
step "initramfs" build_initramfs
