#!/usr/bin/env bash
# Shared helpers for svmgpu's scripts: logging with timings, the artifact cache
# keyed by input hashes, and the Debian mirror read from the machine's apt config.
#
# Source it from a script that already did `set -euo pipefail`.

SVMGPU_ROOT="${SVMGPU_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
SVMGPU_CACHE="${SVMGPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/svmgpu}"
SVMGPU_JOBS="${SVMGPU_JOBS:-$(nproc)}"
export SVMGPU_ROOT SVMGPU_CACHE SVMGPU_JOBS

# Pinned versions of everything fetched from the Debian mirror.
LINUX_SOURCE_PKG="linux-source-7.3"
LINUX_SOURCE_VER="7.3.4-1~bpo13+1"
RUST_SRC_VER="1.95.0+dfsg1-2~bpo13+1"
QEMU_SRC_VER="1:10.0.2+ds-2+deb13u1~bpo12+1"
QEMU_TARBALL="qemu_10.0.2+ds.orig.tar.xz"
BINDGEN_VER="0.72.1"
LLVM_SUFFIX="-19"

_svmgpu_t0=$(date +%s)

log() { printf '[svmgpu %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[svmgpu] error: %s\n' "$*" >&2; exit 1; }

# step NAME CMD...: run CMD, print what it does and how long it took.
step() {
    local name=$1; shift
    local t0; t0=$(date +%s)
    log "==> $name"
    "$@"
    log "<== $name ($(( $(date +%s) - t0 )) s)"
}

# elapsed: seconds since this script sourced common.sh.
elapsed() { echo $(( $(date +%s) - _svmgpu_t0 )); }

# hash_inputs PATH|STRING...: a short, stable hash of files (by content, sorted
# recursively for directories) and literal strings. The key of a cache entry.
hash_inputs() {
    local item
    {
        for item in "$@"; do
            if [[ -d $item ]]; then
                (cd "$item" && find . -type f ! -path '*/target/*' -print0 | LC_ALL=C sort -z \
                    | xargs -0 -r sha256sum)
            elif [[ -f $item ]]; then
                printf '%s ' "$(basename "$item")"; sha256sum <"$item"
            else
                printf 'str:%s\n' "$item"
            fi
        done
    } | sha256sum | cut -c1-16
}

# cache_dir KIND KEY: the folder of a cache entry (not created).
cache_dir() { echo "$SVMGPU_CACHE/$1/$2"; }

# cache_ready DIR: true when DIR holds a completed build (stamp written last).
cache_ready() { [[ -f $1/.complete ]]; }
cache_seal() { date -u +%FT%TZ >"$1/.complete"; }

# Keep the newest N entries of a cache kind, delete older ones.
cache_prune() {
    local kind=$1 keep=${2:-2}
    [[ -d $SVMGPU_CACHE/$kind ]] || return 0
    ls -1dt "$SVMGPU_CACHE/$kind"/*/ 2>/dev/null | tail -n +$((keep + 1)) | xargs -r rm -rf
}

# The Debian mirror this machine's apt uses (never written in the repo).
debian_mirror() {
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
              /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | grep -E '/debian/?( |$)' | grep -v security | head -n1 \
          | sed -E 's/^URIs:[[:space:]]*//; s/^deb (\[[^]]*\] )?//; s/[[:space:]].*$//')
    [[ -n $uri ]] || die "no Debian mirror found in /etc/apt sources"
    echo "${uri%/}"
}

# Run as root or through sudo.
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# Environment for building the kernel and out-of-tree Rust modules.
kernel_toolchain_env() {
    export LIBCLANG_PATH="/usr/lib/llvm${LLVM_SUFFIX}/lib"
    export RUST_LIB_SRC="$SVMGPU_CACHE/toolchain/rust-src-$RUST_SRC_VER/usr/src/rustc-1.95.0/library"
    export PATH="$SVMGPU_CACHE/toolchain/bindgen-$BINDGEN_VER/bin:$PATH"
}
