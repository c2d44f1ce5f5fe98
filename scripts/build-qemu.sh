#!/usr/bin/env bash
# Build qemu-system-x86_64 10.0.2 from Debian's upstream source tarball with the project's
# patches (scripts/qemu/*.patch: the vhost-user-svmgpu-pci device), plus the firmware it
# needs (Debian's seabios and qemu-system-data). Cached under $SVMGPU_CACHE/qemu/<key>,
# keyed by a hash of every input; $SVMGPU_CACHE/current/qemu points at the entry in use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

SELF="$SVMGPU_ROOT/scripts/build-qemu.sh"
PATCH_DIR="$SVMGPU_ROOT/scripts/qemu"

# What QEMU is configured with. --without-default-features turns off every optional
# library; what the project needs is built anyway on Linux hosts: the memfd memory
# backend, -readconfig, PCI/virtio-pci and the x86 machines (default device config),
# vhost-user (enabled below; it does not need --enable-vhost-kernel).
CONFIGURE_ARGS=(--target-list=x86_64-softmmu --without-default-features
    --enable-kvm --enable-tcg --enable-vhost-user --enable-fdt=system
    --disable-docs --disable-werror --disable-download --disable-install-blobs)
MESON_VER="1.8.2"          # the +ds tarball has no bundled wheels: pip-installed into a venv
PYCOTAP_VER="1.3.1"
SEABIOS_VER="1.16.3-2~bpo12+1"   # bookworm-backports: the SeaBIOS release QEMU 10.0 ships
QEMU_DATA_VER="$QEMU_SRC_VER"    # qemu-system-data of the same QEMU version
DEB_PACKAGES=(ninja-build pkg-config gcc make patch xz-utils python3 python3-venv
    libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev)

usage() {
    cat <<EOF
Usage: scripts/build-qemu.sh [--check] [--force] [--help]

Builds qemu-system-x86_64 $QEMU_SRC_VER with the svmgpu patches (scripts/qemu/*.patch),
unless a cached build of the same inputs exists (then it only re-points the symlink).
Takes about 4 min cold on 2 cores; a cached run takes well under a second.

Result:
  \$SVMGPU_CACHE/current/qemu/bin/qemu-system-x86_64
  \$SVMGPU_CACHE/current/qemu/share/     firmware, for -L
  (\$SVMGPU_CACHE is $SVMGPU_CACHE)

Options:
  --check   exit 0 if the cached build is current, 1 otherwise; build nothing
  --force   rebuild even if the cached build is current
  --help    this text

Environment: SVMGPU_CACHE (cache root), SVMGPU_JOBS (ninja -j, default: all cores).
Logs: \$SVMGPU_CACHE/logs/qemu-{configure,build}.log
EOF
}

qemu_key() {
    hash_inputs "qemu=$QEMU_SRC_VER" "tarball=$QEMU_TARBALL" "$PATCH_DIR"/*.patch \
        "configure=${CONFIGURE_ARGS[*]}" "meson=$MESON_VER" "pycotap=$PYCOTAP_VER" \
        "seabios=$SEABIOS_VER" "qemu-system-data=$QEMU_DATA_VER" "$SELF"
}

do_packages() {
    ensure_apt_suites
    ensure_packages "${DEB_PACKAGES[@]}"
}

# The upstream tarball, from the deb-src of bookworm-backports. The .dsc and the Debian
# packaging of this version are no longer served, the orig tarball is: apt-get reports the
# missing parts and fails, which is ignored; the tarball itself is checked.
do_tarball() {
    TARBALL="$SVMGPU_CACHE/dl/$QEMU_TARBALL"
    if [[ -f $TARBALL ]]; then
        log "have $QEMU_TARBALL"
        return 0
    fi
    mkdir -p "$SVMGPU_CACHE/dl"
    (cd "$SVMGPU_CACHE/dl" && apt-get source --download-only "qemu=$QEMU_SRC_VER") \
        >"$SVMGPU_CACHE/dl/qemu-source.log" 2>&1 || true
    if [[ ! -f $TARBALL ]]; then         # stale package lists? refresh them once
        as_root apt-get update -qq
        (cd "$SVMGPU_CACHE/dl" && apt-get source --download-only "qemu=$QEMU_SRC_VER") \
            >"$SVMGPU_CACHE/dl/qemu-source.log" 2>&1 || true
    fi
    [[ -f $TARBALL ]] || { tail -n 20 "$SVMGPU_CACHE/dl/qemu-source.log" >&2
        die "could not download $QEMU_TARBALL (is deb-src for bookworm-backports configured? run scripts/setup.sh)"; }
    xz -t "$TARBALL" || { rm -f "$TARBALL"; die "$QEMU_TARBALL is corrupt; deleted it, run again"; }
    rm -f "$SVMGPU_CACHE"/dl/qemu_*.dsc "$SVMGPU_CACHE"/dl/qemu_*.debian.tar.*
}

# meson and pycotap for QEMU's configure, in a venv of their own (shared by builds with the
# same versions). configure is given the venv's python (--python): its mkvenv then builds
# the build tree's pyvenv on top of this venv's site-packages and finds meson there.
do_venv() {
    VENV="$SVMGPU_CACHE/toolchain/qemu-venv-meson$MESON_VER-pycotap$PYCOTAP_VER"
    if [[ -f $VENV/.complete && -x $VENV/bin/meson ]]; then
        log "have $(basename "$VENV")"
        return 0
    fi
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "meson==$MESON_VER" "pycotap==$PYCOTAP_VER"
    [[ $("$VENV/bin/meson" --version) == "$MESON_VER" ]] || die "meson $MESON_VER not in $VENV"
    touch "$VENV/.complete"
}

do_unpack() {
    # Leftovers of an interrupted or failed build (kept until now for debugging).
    rm -rf "$SVMGPU_CACHE"/qemu/.build-* "$SVMGPU_CACHE"/qemu/.build.*
    WORK="$SVMGPU_CACHE/qemu/.build-$KEY"
    mkdir -p "$WORK"
    tar -C "$WORK" -xf "$TARBALL"
    TREE=$(echo "$WORK"/qemu-*/)
    TREE=${TREE%/}
    [[ -f $TREE/configure ]] || die "no QEMU tree in $WORK"
    local p
    for p in "$PATCH_DIR"/*.patch; do
        log "applying $(basename "$p")"
        patch -d "$TREE" -p1 --forward --batch --quiet <"$p" || die "patch $(basename "$p") failed"
    done
    # The +ds tarball has no edk2 blobs (they are not needed for x86 with SeaBIOS):
    # do not try to unpack them.
    grep -q '^if unpack_edk2_blobs$' "$TREE/pc-bios/meson.build" \
        || die "pc-bios/meson.build changed: cannot disable edk2 blob unpacking"
    sed -i 's/^if unpack_edk2_blobs$/if false # svmgpu: no edk2 blobs in the +ds tarball/' \
        "$TREE/pc-bios/meson.build"
}

do_configure() {
    log "configure ${CONFIGURE_ARGS[*]}"
    mkdir -p "$TREE/build"
    (cd "$TREE/build" && PATH="$VENV/bin:$PATH" run_logged "$SVMGPU_CACHE/logs/qemu-configure.log" \
        ../configure --python="$VENV/bin/python3" "${CONFIGURE_ARGS[@]}")
    grep -q '^Version: '"$MESON_VER"'$' "$SVMGPU_CACHE/logs/qemu-configure.log" \
        || die "configure did not use meson $MESON_VER (see $SVMGPU_CACHE/logs/qemu-configure.log)"
    grep -q '^#define CONFIG_VHOST_USER_SVMGPU 1' "$TREE/build/x86_64-softmmu-config-devices.h" \
        || die "CONFIG_VHOST_USER_SVMGPU is not enabled for x86_64-softmmu"
}

do_ninja() {
    log "ninja -j$SVMGPU_JOBS qemu-system-x86_64 (~1600 steps, ~4 min on 2 cores;" \
        "progress every 30 s, full log: $SVMGPU_CACHE/logs/qemu-build.log)"
    (cd "$TREE/build" && run_logged "$SVMGPU_CACHE/logs/qemu-build.log" \
        ninja -j"$SVMGPU_JOBS" qemu-system-x86_64)
}

do_install() {
    rm -rf "$ENTRY"
    mkdir -p "$ENTRY/bin"
    # Keep the symbols (backtraces), drop the debug info (~70 MB -> ~20 MB).
    strip --strip-debug -o "$ENTRY/bin/qemu-system-x86_64" "$TREE/build/qemu-system-x86_64"
    chmod 755 "$ENTRY/bin/qemu-system-x86_64"
}

# Firmware for -L: SeaBIOS (bios-256k.bin is what pc and q35 load), its VGA BIOSes (only
# used without -nodefaults), and QEMU's option ROMs for -kernel (linuxboot_dma.bin),
# kvmvapic, multiboot and PVH. No NIC ROMs (efi-*.rom, from ipxe): start QEMU with
# -nodefaults (or -nic none).
do_firmware() {
    local tmp deb f n=0
    tmp=$(mktemp -d "$SVMGPU_CACHE/qemu/.build-fw-XXXXXX")
    deb=$(fetch_deb "seabios=$SEABIOS_VER");                dpkg-deb -x "$deb" "$tmp"
    deb=$(fetch_deb "qemu-system-data=$QEMU_DATA_VER");     dpkg-deb -x "$deb" "$tmp"
    mkdir -p "$ENTRY/share"
    for f in "$tmp"/usr/share/seabios/{bios-256k.bin,bios.bin,vgabios-*.bin} \
             "$tmp"/usr/share/qemu/{kvmvapic.bin,linuxboot.bin,linuxboot_dma.bin,multiboot.bin,multiboot_dma.bin,pvh.bin}; do
        [[ -e $f ]] || { rm -rf "$tmp"; die "firmware file $(basename "$f") missing from the packages"; }
        cp -L "$f" "$ENTRY/share/"
        n=$((n + 1))
    done
    rm -rf "$tmp"
    log "$n firmware files in $ENTRY/share"
}

do_smoke_test() {
    local q="$ENTRY/bin/qemu-system-x86_64"
    "$q" --version | head -n1 >&2
    "$q" -device help 2>&1 | grep -q '"vhost-user-svmgpu-pci"' \
        || die "the built QEMU has no vhost-user-svmgpu-pci device"
    "$q" -object help 2>&1 | grep -q memory-backend-memfd \
        || die "the built QEMU has no memory-backend-memfd"
    log "vhost-user-svmgpu-pci and memory-backend-memfd present"
}

do_cleanup() {
    rm -rf "$WORK"          # ~1 GB of build tree; the entry keeps only bin/ and share/
}

do_seal() {
    cache_seal "$ENTRY"
    cache_prune qemu 2      # keep the two most recently used builds
}

point_current() {
    mkdir -p "$SVMGPU_CACHE/current"
    ln -sfn "$ENTRY" "$SVMGPU_CACHE/current/qemu"
}

main() {
    local check=0 force=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --check) check=1 ;;
            --force) force=1 ;;
            *) usage >&2; exit 2 ;;
        esac
        shift
    done
    KEY=$(qemu_key)
    ENTRY=$(cache_dir qemu "$KEY")
    if [[ $force -eq 0 ]] && cache_ready "$ENTRY"; then
        [[ $check -eq 1 ]] && exit 0
        touch "$ENTRY"          # most recently used: cache_prune keeps it
        point_current
        log "QEMU: using cached build $KEY ($ENTRY)"
        return 0
    fi
    [[ $check -eq 1 ]] && { log "QEMU: no cached build for key $KEY"; exit 1; }

    mkdir -p "$SVMGPU_CACHE/qemu" "$SVMGPU_CACHE/logs"
    # One build at a time; a build that finished while we waited is used as is.
    exec 9>"$SVMGPU_CACHE/qemu/.lock"
    flock -n 9 || { log "another QEMU build is running; waiting"; flock 9; }
    if [[ $force -eq 0 ]] && cache_ready "$ENTRY"; then
        point_current
        log "QEMU: using cached build $KEY ($ENTRY)"
        return 0
    fi

    log "QEMU: building $QEMU_SRC_VER with $(cd "$PATCH_DIR" && echo *.patch) (key $KEY)"
    step "packages" do_packages
    step "source tarball" do_tarball
    step "python venv (meson $MESON_VER)" do_venv
    step "unpack and patch" do_unpack
    step "configure" do_configure
    step "ninja" do_ninja
    step "install binary" do_install
    step "firmware" do_firmware
    step "smoke test" do_smoke_test
    step "delete build tree" do_cleanup
    step "seal cache entry" do_seal
    point_current
    log "QEMU ready in $(elapsed) s: $SVMGPU_CACHE/current/qemu/bin/qemu-system-x86_64 (-L $SVMGPU_CACHE/current/qemu/share)"
}

main "$@"
