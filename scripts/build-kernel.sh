#!/usr/bin/env bash
# Build the svmgpu guest kernel: Debian's linux-source-7.3 + the project's patches
# (guest-driver/kernel/patches) + config fragment (guest-driver/kernel/svmgpu.config).
#
# The build tree lives in $SVMGPU_CACHE/kernel/work and carries the hash of its
# inputs in work/.key: when the key matches, nothing is done; when it does not,
# only files whose content changed are replaced, so kbuild rebuilds incrementally.
# The debug variant (--variant debug: svmgpu.config + svmgpu-debug.config, with KASAN,
# KFENCE, kmemleak, ...) has a work tree of its own, kernel/work-debug, so that building
# one variant never makes the other's tree flip between configurations.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/build-kernel.sh [--variant default|debug] [--print-dir] [--help]

Builds (or reuses) the guest kernel. Afterwards (work-debug for the debug variant):
  \$SVMGPU_CACHE/kernel/work/build/arch/x86/boot/bzImage   the kernel
  \$SVMGPU_CACHE/kernel/work/build/vmlinux                 with DWARF, for gdb (run-vm.sh --gdb)
  \$SVMGPU_CACHE/kernel/work/build                         KBUILD_OUTPUT for modules
  --variant V   default: guest-driver/kernel/svmgpu.config; debug: that plus
                guest-driver/kernel/svmgpu-debug.config (KASAN, KFENCE, DEBUG_VM, DEBUG_LIST,
                DEBUG_OBJECTS, hung-task and soft-lockup detection, kmemleak), ~15 min cold
  --print-dir   only print the build directory if it is up to date (exit 1 if not)
Environment: SVMGPU_CACHE (default ~/.cache/svmgpu), SVMGPU_JOBS (default nproc).
EOF
}

PATCHES="$SVMGPU_ROOT/guest-driver/kernel/patches"
# Set by --variant (main): the work tree and the config fragments merged, in order.
KDIR="" FRAGMENTS=()
# The driver's DRM uAPI header: one source of truth in guest-driver/uapi, copied into the
# tree as include/uapi/drm/svmgpu_drm.h for the kernel's Rust `uapi` crate (the patches
# add it to rust/uapi/uapi_helper.h).
UAPI_HEADER="$SVMGPU_ROOT/guest-driver/uapi/svmgpu_drm.h"

kernel_key() {
    hash_inputs "$LINUX_SOURCE_PKG=$LINUX_SOURCE_VER" "rust-src=$RUST_SRC_VER" \
        "bindgen=$BINDGEN_VER" "llvm=$LLVM_SUFFIX" "$(rustc --version)" \
        "$PATCHES" "${FRAGMENTS[@]}" "$UAPI_HEADER" "$(readlink -f "${BASH_SOURCE[0]}")"
}

ensure_toolchain() {
    ensure_apt_suites
    ensure_packages "clang$LLVM_SUFFIX" "lld$LLVM_SUFFIX" "llvm$LLVM_SUFFIX" "libclang$LLVM_SUFFIX-dev" \
        flex bison bc libelf-dev libssl-dev cpio xz-utils rsync make
    local rs="$SVMGPU_CACHE/toolchain/rust-src-$RUST_SRC_VER"
    if [[ ! -d $rs/usr/src ]]; then
        log "unpacking Debian rust-src $RUST_SRC_VER (the kernel needs the library sources of rustc's own version)"
        local deb; deb=$(fetch_deb "rust-src=$RUST_SRC_VER")
        rm -rf "$rs.tmp"; mkdir -p "$rs.tmp"; dpkg-deb -x "$deb" "$rs.tmp"; mv "$rs.tmp" "$rs"
    fi
    local bg="$SVMGPU_CACHE/toolchain/bindgen-$BINDGEN_VER"
    if [[ ! -x $bg/bin/bindgen ]]; then
        log "cargo install bindgen-cli $BINDGEN_VER"
        run_logged "$SVMGPU_CACHE/logs/bindgen.log" \
            cargo install bindgen-cli --version "$BINDGEN_VER" --locked --root "$bg"
    fi
    kernel_toolchain_env
}

pristine_source() {
    local src="$SVMGPU_CACHE/src/linux-$LINUX_SOURCE_VER"
    if [[ ! -f $src/Makefile ]]; then
        local deb tmp; deb=$(fetch_deb "$LINUX_SOURCE_PKG=$LINUX_SOURCE_VER")
        mkdir -p "$SVMGPU_CACHE/src"
        tmp=$(mktemp -d "$SVMGPU_CACHE/src/.x.XXXX")
        log "unpacking $LINUX_SOURCE_PKG $LINUX_SOURCE_VER"
        dpkg-deb -x "$deb" "$tmp/deb"
        tar -C "$tmp" -xf "$tmp/deb/usr/src/$LINUX_SOURCE_PKG.tar.xz"
        rm -rf "$src"; mv "$tmp/$LINUX_SOURCE_PKG" "$src"; rm -rf "$tmp"
    fi
    echo "$src"
}

# Patched source in work/src, touching only files whose content changed.
prepare_source() {
    local pristine=$1 staging="$KDIR.staging" p
    rm -rf "$staging"; mkdir -p "$staging"
    cp -a "$pristine/." "$staging/"
    for p in "$PATCHES"/*.patch; do
        [[ -e $p ]] || continue
        log "applying $(basename "$p")"
        patch -d "$staging" -p1 --quiet --forward <"$p"
    done
    cp "$UAPI_HEADER" "$staging/include/uapi/drm/svmgpu_drm.h"
    mkdir -p "$KDIR/src"
    rsync -rl --checksum --delete "$staging/" "$KDIR/src/"
    rm -rf "$staging"
}

configure() {
    local b="$KDIR/build" line missing=0 f sym
    make -s -C "$KDIR/src" O="$b" LLVM="$LLVM_SUFFIX" tinyconfig >/dev/null
    (cd "$b" && "$KDIR/src/scripts/kconfig/merge_config.sh" -m .config "${FRAGMENTS[@]}" >/dev/null)
    make -s -C "$KDIR/src" O="$b" LLVM="$LLVM_SUFFIX" olddefconfig >/dev/null
    for f in "${FRAGMENTS[@]}"; do
        while read -r line; do
            if [[ $line =~ ^CONFIG_ ]]; then
                grep -qx "$line" "$b/.config" || { log "config: '$line' ($(basename "$f")) did not survive Kconfig"; missing=1; }
            elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
                sym=${BASH_REMATCH[1]}
                ! grep -q "^$sym=" "$b/.config" || { log "config: '$line' ($(basename "$f")): Kconfig set it"; missing=1; }
            fi
        done <"$f"
    done
    [[ $missing -eq 0 ]] || die "config fragments not satisfied (see above); fix ${FRAGMENTS[*]}"
    make -s -C "$KDIR/src" O="$b" LLVM="$LLVM_SUFFIX" rustavailable >/dev/null \
        || die "Rust is not available to the kernel build (make rustavailable)"
}

main() {
    local print_only=0 variant=default
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --print-dir) print_only=1; shift ;;
            --variant) variant=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    FRAGMENTS=("$SVMGPU_ROOT/guest-driver/kernel/svmgpu.config")
    case $variant in
        default) KDIR="$SVMGPU_CACHE/kernel/work" ;;
        debug) KDIR="$SVMGPU_CACHE/kernel/work-debug"
               FRAGMENTS+=("$SVMGPU_ROOT/guest-driver/kernel/svmgpu-debug.config") ;;
        *) die "--variant must be default or debug, not '$variant'" ;;
    esac
    local key; key=$(kernel_key)
    if [[ $print_only -eq 0 ]]; then
        # One work tree per variant serves every checkout on this machine: builds of a
        # variant take turns.
        mkdir -p "$SVMGPU_CACHE/kernel"
        local lock="$SVMGPU_CACHE/kernel/.lock"
        [[ $variant == default ]] || lock+="-$variant"
        exec 9>"$lock"
        flock -n 9 || { log "another kernel build is running; waiting"; flock 9; }
    fi
    if [[ -f $KDIR/.key && $(cat "$KDIR/.key") == "$key" && -f $KDIR/build/arch/x86/boot/bzImage ]]; then
        [[ $print_only -eq 1 ]] && { echo "$KDIR/build"; exit 0; }
        log "kernel up to date (key $key): $KDIR/build/arch/x86/boot/bzImage"
        return 0
    fi
    [[ $print_only -eq 1 ]] && exit 1
    step "kernel toolchain (clang/lld $LLVM_SUFFIX, rust-src, bindgen)" ensure_toolchain
    local pristine; pristine=$(pristine_source) || die "cannot unpack the kernel source"
    rm -f "$KDIR/.key"
    step "patched kernel source" prepare_source "$pristine"
    step "kernel config (tinyconfig + $(cd "$SVMGPU_ROOT/guest-driver/kernel" && echo "${FRAGMENTS[@]##*/}"))" configure
    local logname=kernel-build.log
    [[ $variant == default ]] || logname=kernel-$variant-build.log
    # scripts_gdb: vmlinux-gdb.py (lx-symbols, lx-dmesg) next to vmlinux, for run-vm.sh --gdb.
    step "kernel build, $variant variant (-j$SVMGPU_JOBS; a cold build takes ~10 min, debug ~15)" \
        run_logged "$SVMGPU_CACHE/logs/$logname" \
        make -C "$KDIR/src" O="$KDIR/build" LLVM="$LLVM_SUFFIX" -j"$SVMGPU_JOBS" bzImage modules scripts_gdb
    echo "$key" >"$KDIR/.key"
    log "kernel ($variant) built in $(elapsed) s (key $key)"
}

main "$@"
