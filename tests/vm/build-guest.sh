#!/bin/bash
# Fetches a Debian kernel package (unpacked into the cache, never installed on this machine) and
# builds the tiny initramfs of the cgroup-v2 guest. run-in-guest.sh calls it when the cache lacks
# the kernel, or when guest/init or guest/stage2 changed since the initramfs was built.
# Needs: apt-get/apt-cache/dpkg (Debian or Ubuntu), qemu-system-x86, busybox-static. No kmod or
# cpio (busybox has both applets).
# Env: BERTH_VM_CACHE (default ~/.cache/berth-v2-guest), outside the repository: it holds a
#      70 MB kernel tree. KPKG: exact kernel package (default: what linux-image-amd64 depends on
#      now; Debian drops superseded ABI packages from the archive, so CI should cache the dir).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${BERTH_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth-v2-guest}
mkdir -p "$CACHE" && cd "$CACHE"
if [ ! -d kpkg/boot ]; then
  kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
  if [ -z "${KPKG:-}" ]; then
    KPKG=$(kpkg)
    # A fresh machine may have no package lists yet.
    if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then apt-get update -qq && KPKG=$(kpkg); fi
  fi
  [ -n "$KPKG" ] || { echo "build-guest: no kernel package found (apt-get update?)" >&2; exit 1; }
  rm -f ./*.deb
  apt-get download "$KPKG" 2>&1 | { grep -v unsandboxed || true; }
  rm -rf kpkg.new; mkdir kpkg.new; dpkg -x "${KPKG}"_*.deb kpkg.new && rm -f "${KPKG}"_*.deb
  rm -rf kpkg && mv kpkg.new kpkg
fi
KVER=$(ls kpkg/lib/modules | head -1)
MD=kpkg/lib/modules/$KVER
[ -f "$MD/modules.dep" ] || busybox depmod -b kpkg "$KVER"
ln -sfn "boot/vmlinuz-$KVER" kpkg/vmlinuz
# initramfs: static busybox + the modules needed to reach the 9p root + the two init stages
BB=$(command -v busybox) || { echo "build-guest: busybox missing (apt-get install busybox-static)" >&2; exit 1; }
if ldd "$BB" >/dev/null 2>&1; then
  echo "build-guest: $BB is dynamically linked; install busybox-static" >&2; exit 1
fi
rm -rf initramfs; mkdir -p initramfs/{bin,proc,sys,dev,lib/modules/$KVER}
cp "$BB" initramfs/bin/busybox
cp "$HERE/guest/init" initramfs/init; cp "$HERE/guest/stage2" initramfs/stage2; chmod +x initramfs/init
need="virtio_pci 9pnet_virtio 9p overlay"
mods=$(for m in $need; do grep -E "/$m\.ko:" "$MD/modules.dep" | tr -d ':' | tr ' ' '\n'; done | sort -u)
for f in $mods; do
  mkdir -p "initramfs/lib/modules/$KVER/$(dirname "$f")"; cp "$MD/$f" "initramfs/lib/modules/$KVER/$f"
done
busybox depmod -b initramfs "$KVER"
(cd initramfs && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > initramfs.cpio.gz.new
mv initramfs.cpio.gz.new initramfs.cpio.gz
cat "$HERE/guest/init" "$HERE/guest/stage2" | cksum > initramfs.stamp
rm -rf initramfs
echo "build-guest: cache $CACHE  kernel $KVER  initramfs $(du -h initramfs.cpio.gz | cut -f1)" >&2
