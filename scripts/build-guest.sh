#!/usr/bin/env bash
# Build what runs inside the guest: the svmgpu.ko module (against the cached kernel),
# the static Rust test programs, the static C client (tests/c), and the initramfs (busybox
# + module + programs + init). Each is cached under $SVMGPU_CACHE keyed by a hash of its
# inputs.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/build-guest.sh [--variant default|debug] [--help]

Builds (or reuses) and prints nothing but progress; afterwards
  \$SVMGPU_CACHE/current/initramfs.cpio.gz   the guest's initramfs
  \$SVMGPU_CACHE/current/svmgpu.ko           the module (with debug info; the initramfs
                                            holds a copy without it)
  \$SVMGPU_CACHE/current/svmgpu-client       the static C client (tests/c)
(current/debug/ for the debug variant). Requires that variant's kernel
(scripts/build-kernel.sh [--variant debug]).
EOF
}

VARIANT=default
while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --variant) VARIANT=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        *) usage >&2; exit 2 ;;
    esac
done
[[ $VARIANT == default || $VARIANT == debug ]] || die "--variant must be default or debug"

KBUILD=$("$SVMGPU_ROOT/scripts/build-kernel.sh" --print-dir --variant "$VARIANT") \
    || die "$VARIANT kernel not built; run scripts/build-kernel.sh --variant $VARIANT"
KEY_KERNEL=$(cat "$(dirname "$KBUILD")/.key")
KMOD="$SVMGPU_ROOT/guest-driver/kmod"
WIRE="$SVMGPU_ROOT/spec/src/wire.rs"
CLIENT_SRC="$SVMGPU_ROOT/tests/c/svmgpu-client.c"
UAPI_HEADER="$SVMGPU_ROOT/guest-driver/uapi/svmgpu_drm.h"
# Static guest programs: the KTAP test runner and the svmgpu CLI.
GUEST_BINS=(svmgpu-ktap svmgpu)
CUR="$SVMGPU_CACHE/current"
[[ $VARIANT == default ]] || CUR+="/$VARIANT"
mkdir -p "$CUR"

build_module() {
    local key dir src="$KMOD"
    key=$(hash_inputs "$KEY_KERNEL" "$KMOD" "$WIRE")
    dir=$(cache_dir module "$key")
    if ! cache_ready "$dir"; then
        kernel_toolchain_env
        # The default variant builds in the checkout; another kernel's in a copy (same
        # layout: the module includes ../../spec/src/wire.rs), so that the checkout's
        # objects stay those of the default kernel.
        if [[ $VARIANT != default ]]; then
            local copy="$SVMGPU_CACHE/module-build/$VARIANT"
            mkdir -p "$copy/guest-driver/kmod" "$copy/spec/src"
            rsync -a --delete --exclude '*.o' --exclude '*.ko' --exclude '.*.cmd' \
                "$KMOD/" "$copy/guest-driver/kmod/"
            cp "$WIRE" "$copy/spec/src/wire.rs"
            src="$copy/guest-driver/kmod"
        fi
        # Built through clippy (CLIPPY=1: the same objects, linted as they compile) with the
        # kernel's lint set plus clippy::all; any warning fails the build.
        local logf="$SVMGPU_CACHE/logs/module-build-$VARIANT.log"
        run_logged "$logf" make -C "$KBUILD" M="$src" LLVM="$LLVM_SUFFIX" CLIPPY=1 modules
        if grep -qE '^(warning|error)(\[|:)' "$logf"; then
            grep -E -A8 '^(warning|error)(\[|:)' "$logf" >&2
            die "svmgpu.ko: the build has warnings (rustc or clippy; log: $logf)"
        fi
        # Keep only the .ko in the cache.
        mkdir -p "$dir"; cp "$src/svmgpu.ko" "$dir/"
        # The initramfs gets a copy without DWARF (smaller, faster to unpack); gdb
        # (run-vm.sh --gdb, lx-symbols) uses the full one.
        "llvm-strip$LLVM_SUFFIX" --strip-debug -o "$dir/svmgpu-nodebug.ko" "$dir/svmgpu.ko"
        cache_seal "$dir"; cache_prune module 4
    else
        log "module cached ($key)"
        [[ -f $dir/svmgpu-nodebug.ko ]] \
            || "llvm-strip$LLVM_SUFFIX" --strip-debug -o "$dir/svmgpu-nodebug.ko" "$dir/svmgpu.ko"
    fi
    ln -sfn "$dir/svmgpu.ko" "$CUR/svmgpu.ko"
    MODULE_NODEBUG="$dir/svmgpu-nodebug.ko"
}

build_userspace() {
    # Static binaries for the guest; a target dir of their own so the host build's cache
    # is not invalidated by the different RUSTFLAGS.
    local tdir="$SVMGPU_ROOT/target/guest-static"
    RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$tdir" \
        run_logged "$SVMGPU_CACHE/logs/guest-userspace.log" \
        cargo build --release --manifest-path "$SVMGPU_ROOT/Cargo.toml" \
        --target x86_64-unknown-linux-gnu -p svmgpu-guest-tests -p svmgpu
    GUEST_BIN_DIR="$tdir/x86_64-unknown-linux-gnu/release"
    local b
    for b in "${GUEST_BINS[@]}"; do
        ldd "$GUEST_BIN_DIR/$b" 2>&1 | grep -q 'not a dynamic\|statically linked' \
            || die "$b is not statically linked"
    done
}

# The C client, against the uAPI header and libdrm's drm.h (Debian's libdrm-dev).
build_c_client() {
    ensure_packages libdrm-dev gcc libc6-dev
    local key dir drm_ver
    drm_ver=$(dpkg-query -W -f='${Version}' libdrm-dev)
    key=$(hash_inputs "$CLIENT_SRC" "$UAPI_HEADER" "libdrm-dev=$drm_ver" "$(gcc --version | head -n1)")
    dir=$(cache_dir c-client "$key")
    if ! cache_ready "$dir"; then
        mkdir -p "$dir"
        gcc -static -O2 -g -Wall -Wextra -Werror -I/usr/include/libdrm \
            -I"$SVMGPU_ROOT/guest-driver/uapi" -o "$dir/svmgpu-client" "$CLIENT_SRC"
        # (ldd exits 1 on a static non-PIE binary: only its words count)
        { ldd "$dir/svmgpu-client" 2>&1 || true; } | grep -q 'not a dynamic\|statically linked' \
            || die "svmgpu-client is not statically linked"
        cache_seal "$dir"; cache_prune c-client 3
    else
        log "C client cached ($key)"
    fi
    ln -sfn "$dir/svmgpu-client" "$SVMGPU_CACHE/current/svmgpu-client"
    C_CLIENT="$dir/svmgpu-client"
}

build_initramfs() {
    ensure_packages busybox-static cpio
    local init="$SVMGPU_ROOT/tests/guest/initramfs/init" bins=() b key dir
    for b in "${GUEST_BINS[@]}"; do bins+=("$GUEST_BIN_DIR/$b"); done
    bins+=("$C_CLIENT")
    key=$(hash_inputs /bin/busybox "$init" "$MODULE_NODEBUG" "${bins[@]}")
    dir=$(cache_dir initramfs "$key")
    if ! cache_ready "$dir"; then
        local root; root=$(mktemp -d)
        mkdir -p "$root"/{bin,sbin,usr/bin,etc,proc,sys,dev,tmp,lib/modules,root,mnt}
        cp /bin/busybox "$root/bin/busybox"
        cp "$init" "$root/init"
        cp "$MODULE_NODEBUG" "$root/lib/modules/svmgpu.ko"
        cp "${bins[@]}" "$root/bin/"
        mkdir -p "$dir"
        (cd "$root" && find . -print0 | LC_ALL=C sort -z \
            | cpio --null -o -H newc --quiet -R 0:0 | gzip -1 >"$dir/initramfs.cpio.gz")
        rm -rf "$root"
        cache_seal "$dir"; cache_prune initramfs 4
        log "initramfs: $(du -h "$dir/initramfs.cpio.gz" | cut -f1)"
    else
        log "initramfs cached ($key)"
    fi
    ln -sfn "$dir/initramfs.cpio.gz" "$CUR/initramfs.cpio.gz"
}

step "svmgpu.ko ($VARIANT kernel)" build_module
step "guest programs (static)" build_userspace
step "C client (static)" build_c_client
step "initramfs ($VARIANT kernel)" build_initramfs
