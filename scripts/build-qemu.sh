#!/usr/bin/env bash
# Build qemu-system-x86_64 10.0.2 from Debian's source tarball with the project's patches
# (scripts/qemu/*.patch: the vhost-user-svmgpu-pci device), plus the firmware it needs
# from Debian's seabios and qemu-system-data packages. Cached under
# $SVMGPU_CACHE/qemu/<key>, keyed by a hash of every input; $SVMGPU_CACHE/current/qemu
# points at the entry in use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: scripts/build-qemu.sh [--check] [--help]

Builds (or reuses) QEMU with the svmgpu device. Afterwards:
  \$SVMGPU_CACHE/current/qemu/bin/qemu-system-x86_64
  \$SVMGPU_CACHE/current/qemu/share/      firmware, for -L
  --check   exit 0 if the cached build is current, 1 otherwise; build nothing
EOF
}

PATCHES="$SVMGPU_ROOT/scripts/qemu"
CONFIGURE_ARGS=(--target-list=x86_64-softmmu --without-default-features --enable-kvm
    --enable-vhost-user --enable-tcg --enable-fdt=system --disable-docs --disable-werror
    --disable-download --disable-install-blobs)
SEABIOS_VER="1.16.2-1"
QEMU_DATA_VER="$QEMU_SRC_VER"
MESON_VER="1.8.2"
PYCOTAP_VER="1.3.1"

qemu_key() {
    hash_inputs "qemu=$QEMU_SRC_VER" "$PATCHES" "${CONFIGURE_ARGS[*]}" "seabios=$SEABIOS_VER" \
        "meson=$MESON_VER" "${BASH_SOURCE[0]}"
}

tarball() {
    local f="$SVMGPU_CACHE/dl/$QEMU_TARBALL"
    if [[ ! -f $f ]]; then
        mkdir -p "$SVMGPU_CACHE/dl"
        # The .dsc and the Debian packaging of this version are no longer served; the
        # upstream tarball is. apt-get reports the missing parts: ignore that, check the file.
        (cd "$SVMGPU_CACHE/dl" && apt-get source --download-only "qemu=$QEMU_SRC_VER" >/dev/null 2>&1) || true
        [[ -f $f ]] || die "could not download $QEMU_TARBALL (is deb-src for bookworm-backports configured?)"
    fi
    echo "$f"
}

python_env() {
    # The +ds tarball carries no Python wheels; configure needs a meson of this version.
    local venv="$SVMGPU_CACHE/toolchain/qemu-venv-$MESON_VER"
    if [[ ! -x $venv/bin/meson ]]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet "meson==$MESON_VER" "pycotap==$PYCOTAP_VER"
    fi
    echo "$venv"
}

firmware() {
    local dest=$1 tmp deb
    tmp=$(mktemp -d)
    deb=$(fetch_deb "seabios=$SEABIOS_VER"); dpkg-deb -x "$deb" "$tmp"
    deb=$(fetch_deb "qemu-system-data=$QEMU_DATA_VER"); dpkg-deb -x "$deb" "$tmp"
    mkdir -p "$dest"
    # Follow the packages' symlinks (qemu-system-data links into seabios).
    cp -L "$tmp"/usr/share/seabios/bios-256k.bin "$tmp"/usr/share/seabios/bios.bin "$dest/"
    local f
    for f in kvmvapic.bin linuxboot.bin linuxboot_dma.bin multiboot.bin multiboot_dma.bin pvh.bin; do
        [[ -e $tmp/usr/share/qemu/$f ]] && cp -L "$tmp/usr/share/qemu/$f" "$dest/"
    done
    rm -rf "$tmp"
}

build() {
    local entry=$1 src venv work
    ensure_apt_suites
    ensure_packages ninja-build pkg-config libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev \
        python3-venv xz-utils gcc make
    src=$(tarball)
    venv=$(python_env)
    rm -rf "$SVMGPU_CACHE"/qemu/.build.*   # leftovers of a failed build
    work=$(mktemp -d "$SVMGPU_CACHE/qemu/.build.XXXXXX")
    log "unpacking $(basename "$src")"
    tar -C "$work" -xf "$src"
    local tree; tree=$(ls -d "$work"/qemu-*/)
    local p
    for p in "$PATCHES"/*.patch; do
        log "applying $(basename "$p")"
        patch -d "$tree" -p1 --quiet --forward <"$p"
    done
    # The +ds tarball has no edk2 blobs; do not try to unpack them.
    sed -i "s/^if unpack_edk2_blobs\$/if false/" "$tree/pc-bios/meson.build"
    log "configure ${CONFIGURE_ARGS[*]}"
    (cd "$tree" && mkdir -p build && cd build \
        && PATH="$venv/bin:$PATH" run_logged "$SVMGPU_CACHE/logs/qemu-configure.log" \
            ../configure --python="$venv/bin/python3" "${CONFIGURE_ARGS[@]}")
    log "ninja qemu-system-x86_64 (-j$SVMGPU_JOBS; about 4 min cold)"
    (cd "$tree/build" && PATH="$venv/bin:$PATH" \
        run_logged "$SVMGPU_CACHE/logs/qemu-build.log" ninja -j"$SVMGPU_JOBS" qemu-system-x86_64)
    mkdir -p "$entry/bin"
    cp "$tree/build/qemu-system-x86_64" "$entry/bin/"
    firmware "$entry/share"
    rm -rf "$work"
}

main() {
    local check=0
    case "${1:-}" in
        -h|--help) usage; exit 0 ;;
        --check) check=1 ;;
        "") ;;
        *) usage >&2; exit 2 ;;
    esac
    local key entry
    key=$(qemu_key)
    entry=$(cache_dir qemu "$key")
    if cache_ready "$entry"; then
        [[ $check -eq 1 ]] && exit 0
        log "QEMU cached ($key)"
    else
        [[ $check -eq 1 ]] && exit 1
        mkdir -p "$SVMGPU_CACHE/qemu"
        rm -rf "$entry"
        step "QEMU build" build "$entry"
        "$entry/bin/qemu-system-x86_64" -device help 2>/dev/null | grep -q vhost-user-svmgpu-pci \
            || die "the built QEMU has no vhost-user-svmgpu-pci device"
        cache_seal "$entry"
        cache_prune qemu 2
    fi
    mkdir -p "$SVMGPU_CACHE/current"
    ln -sfn "$entry" "$SVMGPU_CACHE/current/qemu"
}

main "$@"
