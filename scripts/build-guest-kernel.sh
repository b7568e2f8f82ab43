#!/usr/bin/env bash
# Builds Sluice's micro-VM guest kernel from Debian's `linux-source-6.1` package with the minimal
# configuration in workers/vmm/guest/kernel.fragment (on top of `tinyconfig`) and the patch(es) in
# workers/vmm/guest/*.patch, and caches it under $SLUICE_KERNEL_CACHE (default
# /var/cache/sluice/guest-kernel/<key>/), where <key> hashes the source package version, the
# fragment and the patches. A cached build is reused; nothing is downloaded but Debian packages.
#
# Prints the path of the cached `vmlinux` (ELF, booted through its PVH entry) on stdout.
# About 10 minutes with -j2 on this project's machines, once.
#
# Usage: scripts/build-guest-kernel.sh [--print-path]   (--print-path: only print where the
#        kernel would be cached and exit 0 if it is there, 1 if not; builds nothing)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST="$ROOT/workers/vmm/guest"
CACHE="${SLUICE_KERNEL_CACHE:-/var/cache/sluice/guest-kernel}"
PACKAGE=linux-source-6.1
JOBS="${SLUICE_KERNEL_JOBS:-$(nproc)}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# The key covers everything that changes the output: the fragment, the patches, this script's
# build steps (by version tag below) and the Debian package version once known.
BUILD_STEPS_VERSION=1
key_inputs() {
  echo "steps=$BUILD_STEPS_VERSION package=$PACKAGE"
  cat "$GUEST/kernel.fragment"
  cat "$GUEST"/*.patch
}
KEY="$(key_inputs | sha256sum | cut -c1-16)"
OUT="$CACHE/$KEY"

if [[ "${1:-}" == "--print-path" ]]; then
  echo "$OUT/vmlinux"
  [[ -f "$OUT/vmlinux" ]]
  exit
fi

if [[ -f "$OUT/vmlinux" ]]; then
  log "guest kernel cached at $OUT"
  echo "$OUT/vmlinux"
  exit 0
fi

need=()
for tool in gcc make bc flex bison cpio xz; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
[[ -e /usr/include/libelf.h ]] || need+=(libelf-dev)
[[ -e /usr/include/openssl/ssl.h ]] || need+=(libssl-dev)
if ((${#need[@]})); then
  log "installing build dependencies (apt-get): ${need[*]}"
  pkgs=()
  for n in "${need[@]}"; do
    case "$n" in
      xz) pkgs+=(xz-utils) ;;
      *) pkgs+=("$n") ;;
    esac
  done
  apt-get update >/dev/null
  apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sluice-kernel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
log "fetching $PACKAGE (Debian)"
if ! apt-get download "$PACKAGE" >/dev/null 2>&1; then
  apt-get update >/dev/null
  apt-get download "$PACKAGE" >/dev/null
fi
dpkg -x "$PACKAGE"_*_all.deb pkg
tar -xf pkg/usr/src/"$PACKAGE".tar.xz
SRC="$WORK/$PACKAGE"
for p in "$GUEST"/*.patch; do
  log "applying $(basename "$p")"
  patch -d "$SRC" -p1 --forward --silent <"$p"
done

B="$WORK/build"
mkdir -p "$B"
log "configuring (tinyconfig + kernel.fragment)"
make -C "$SRC" O="$B" ARCH=x86_64 tinyconfig >/dev/null
args=()
while read -r line; do
  line="${line%%#*}"
  [[ -z "${line// /}" ]] && continue
  # shellcheck disable=SC2206 # one option and its value(s) per line, split on spaces
  args+=($line)
done <"$GUEST/kernel.fragment"
"$SRC/scripts/config" --file "$B/.config" "${args[@]}"
make -C "$SRC" O="$B" ARCH=x86_64 olddefconfig >/dev/null

log "building vmlinux with -j$JOBS (about 10 minutes on 2 cores)"
start=$(date +%s)
make -C "$SRC" O="$B" ARCH=x86_64 -j"$JOBS" vmlinux >"$WORK/build.log" 2>&1 || {
  tail -50 "$WORK/build.log" >&2
  exit 1
}
log "built in $(($(date +%s) - start)) s"

mkdir -p "$CACHE"
STAGE="$(mktemp -d "$CACHE/.stage.XXXXXX")"
chmod 755 "$STAGE"
cp "$B/vmlinux" "$STAGE/vmlinux"
cp "$B/.config" "$STAGE/config"
dpkg-deb -f "$PACKAGE"_*_all.deb Version >"$STAGE/source-version" 2>/dev/null || true
echo "$(($(date +%s) - start))" >"$STAGE/build-seconds"
rm -rf "$OUT"
mv "$STAGE" "$OUT"
log "guest kernel cached at $OUT"
echo "$OUT/vmlinux"
