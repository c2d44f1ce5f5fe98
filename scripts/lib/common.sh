#!/usr/bin/env bash
# Shared helpers for svmgpu's scripts: logging with timings, the artifact cache
# keyed by input hashes, and the Debian mirror read from the machine's apt config.
#
# Source it from a script that already did `set -euo pipefail`.

# Errors inside $(...) must stop the script too.
shopt -s inherit_errexit

SVMGPU_ROOT="${SVMGPU_ROOT:-$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)}"
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
# virtiofsd (run-vm.sh --share): Debian has it only in trixie, built against glibc 2.39
# (bookworm has 2.36), so it is built from its crate with cargo, once, into the cache.
VIRTIOFSD_VER="1.13.2"

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
    local f files=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f && $f != */svmgpu-extra.sources ]] && files+=("$f")
    done
    uri=$({ grep -hE '^(URIs:|deb )' "${files[@]}" 2>/dev/null || true; } \
          | grep -E '/debian/?([[:space:]]|$)' | grep -v security \
          | sed -E 's/^URIs:[[:space:]]*//; s/^deb (\[[^]]*\] )?//; s/[[:space:]].*$//' | head -n1)
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

# run_logged LOG CMD...: run CMD with its output in LOG, printing a heartbeat
# (elapsed time and the log's last line) every 30 s; on failure, show the log's tail.
run_logged() {
    local logf=$1; shift
    local t0 pid rc=0
    t0=$(date +%s)
    mkdir -p "$(dirname "$logf")"
    "$@" >"$logf" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$pid" 2>/dev/null || break
        log "    ... $(( $(date +%s) - t0 )) s: $(tail -n1 "$logf" | cut -c1-100)"
    done
    wait "$pid" || rc=$?
    if [[ $rc -ne 0 ]]; then
        tail -n 60 "$logf" >&2
        die "failed (exit $rc): $* (full log: $logf)"
    fi
}

# ensure_packages PKG...: apt-get install whichever of PKG are not installed yet.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "${p%%=*}" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

# fetch_deb PKG=VER DESTDIR: download a .deb from the configured mirror into the
# download cache (once) and print its path.
fetch_deb() {
    local spec=$1 dl="$SVMGPU_CACHE/dl" name ver f
    name=${spec%%=*}; ver=${spec#*=}
    mkdir -p "$dl"
    # apt-get download writes an epoch "E:" as "E%3a" in the file name.
    find_it() { ls "$dl/${name}_${ver/:/%3a}"_*.deb "$dl/${name}_${ver#*:}"_*.deb 2>/dev/null | head -n1 || true; }
    f=$(find_it)
    if [[ -z $f ]]; then
        (cd "$dl" && apt-get download "$spec" >/dev/null 2>&1) \
            || { as_root apt-get update -qq; (cd "$dl" && apt-get download "$spec" >/dev/null); }
        f=$(find_it)
        [[ -n $f ]] || die "apt-get download $spec left no .deb in $dl"
    fi
    echo "$f"
}

# ensure_apt_suites: make the mirror's bookworm-backports, trixie and
# trixie-backports suites (deb and deb-src) known to apt, pinned low so that
# nothing installed is upgraded from them unless asked for by version.
ensure_apt_suites() {
    local src=/etc/apt/sources.list.d/svmgpu-extra.sources pin=/etc/apt/preferences.d/svmgpu-extra
    local mirror want
    mirror=$(debian_mirror)
    want="Types: deb deb-src
URIs: $mirror
Suites: bookworm-backports trixie trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    if [[ ! -f $src || "$(cat "$src")" != "$want" || ! -f $pin ]]; then
        log "adding Debian suites bookworm-backports, trixie, trixie-backports (pinned low)"
        printf '%s\n' "$want" | as_root tee "$src" >/dev/null
        printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n\nPackage: *\nPin: release n=trixie-backports\nPin-Priority: 100\n\nPackage: *\nPin: release n=bookworm-backports\nPin-Priority: 100\n' \
            | as_root tee "$pin" >/dev/null
        as_root apt-get update -qq
    fi
}

# ensure_virtiofsd: build virtiofsd $VIRTIOFSD_VER into the cache (once, ~2 min) and print
# its path.
ensure_virtiofsd() {
    local root="$SVMGPU_CACHE/toolchain/virtiofsd-$VIRTIOFSD_VER"
    if [[ ! -x $root/bin/virtiofsd ]]; then
        ensure_packages libseccomp-dev libcap-ng-dev pkg-config
        log "cargo install virtiofsd $VIRTIOFSD_VER (once, ~2 min; log: $SVMGPU_CACHE/logs/virtiofsd.log)"
        rm -rf "$root.tmp"
        run_logged "$SVMGPU_CACHE/logs/virtiofsd.log" \
            cargo install virtiofsd --version "$VIRTIOFSD_VER" --locked --root "$root.tmp"
        rm -rf "$root"; mv "$root.tmp" "$root"
    fi
    echo "$root/bin/virtiofsd"
}
