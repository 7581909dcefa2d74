#!/bin/bash
# Builds the default test guest: a CirrOS-like Linux made of Debian's cloud kernel and a busybox
# initramfs. Output (default build/guest/ under the repo root, override with GUEST_OUT or $1):
#   vmlinuz              the kernel (bzImage)
#   vmlinuz-generic      Debian's generic kernel (linux-image-amd64, GUEST_GENERIC_KPKG): a second,
#                        much larger bzImage the fast-boot scenario boots with the same initramfs
#                        (its modules are the cloud kernel's, so only built-in drivers load)
#   initramfs.cpio.gz    busybox, virtio/ACPI modules, the real qemu-ga with its libraries, /init
#   guest.env            facts about the guest for harnesses (UP_REGEX, KERNEL_VERSION, KIND)
#   iobench              the static O_DIRECT disk benchmark (iobench.c), also in the initramfs as
#                        /bin/iobench (tests/testbox/bench_disk.py runs it in the guest and in L1)
# Cached: rebuilt only when an input changes (this script, iobench.c, the kernel/agent .debs, busybox).
#
# Guest behaviour: /init mounts proc/sys/devtmpfs, prints "GUEST-USERSPACE-UP <uptime>" (the first
# userspace line; boot benchmarks key on it), loads the modules in dependency order, then execs
# busybox init: /etc/init.d/rcS prints the /etc/issue banner, links the named virtio ports under
# /dev/virtio-ports/ (as udev does) and starts qemu-ga on org.qemu.guest_agent.0 when it exists
# (/sbin/shutdown maps its guest-shutdown to busybox poweroff/halt/reboot); acpid runs in the foreground (power button -> poweroff); a root shell
# runs on the console (cttyhack: the real tty, with job control). Typed `poweroff` / `reboot` go
# through busybox init and the kernel as on any distro (ACPI S5 / reset).
#
# A real CirrOS (or any other guest) instead: GUEST_KERNEL=/path GUEST_INITRD=/path [GUEST_DISK=/path]
# [GUEST_UP_REGEX='regex of its first userspace line'] build.sh — the files are copied as they are.
# Other knobs: GUEST_KPKG (kernel metapackage, default linux-image-cloud-amd64), DEB_CACHE (.deb cache,
# default build/debs).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../lib/debian.sh
. "$ROOT/resources/lib/debian.sh"

OUT=${1:-${GUEST_OUT:-$ROOT/build/guest}}
DEB_CACHE=${DEB_CACHE:-$ROOT/build/debs}
KPKG=${GUEST_KPKG:-linux-image-cloud-amd64}
GENERIC_KPKG=${GUEST_GENERIC_KPKG:-linux-image-amd64}
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net virtio_console virtio_balloon button evdev"
mkdir -p "$OUT"

# --- a guest supplied by the user: copy it --------------------------------------------------------
if [ -n "${GUEST_KERNEL:-}" ] || [ -n "${GUEST_INITRD:-}" ]; then
  [ -f "${GUEST_KERNEL:-}" ] || { echo "error: GUEST_KERNEL must name a kernel file" >&2; exit 1; }
  [ -z "${GUEST_INITRD:-}" ] || [ -f "$GUEST_INITRD" ] || { echo "error: no file GUEST_INITRD=$GUEST_INITRD" >&2; exit 1; }
  [ -z "${GUEST_DISK:-}" ] || [ -f "$GUEST_DISK" ] || { echo "error: no file GUEST_DISK=$GUEST_DISK" >&2; exit 1; }
  st=$(stamp_of custom "$GUEST_KERNEL" "${GUEST_INITRD:-}" "${GUEST_DISK:-}" "${GUEST_UP_REGEX:-}")
  if [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$st" ]; then echo "guest up to date in $OUT (custom)"; exit 0; fi
  rm -f "$OUT/vmlinuz" "$OUT/vmlinuz-generic" "$OUT/initramfs.cpio.gz" "$OUT/disk.img" "$OUT/guest.env" "$OUT/iobench" "$OUT/.stamp"
  cp "$GUEST_KERNEL" "$OUT/vmlinuz"
  [ -z "${GUEST_INITRD:-}" ] || cp "$GUEST_INITRD" "$OUT/initramfs.cpio.gz"
  [ -z "${GUEST_DISK:-}" ] || cp "$GUEST_DISK" "$OUT/disk.img"
  {
    echo "KIND=custom"
    echo "UP_REGEX='${GUEST_UP_REGEX:-login:|\\\$ $|# $}'"
    echo "KERNEL_VERSION=unknown"
  } > "$OUT/guest.env"
  echo "$st" > "$OUT/.stamp"
  echo "guest (custom) copied into $OUT"
  exit 0
fi

# --- the default guest ----------------------------------------------------------------------------
need busybox-static cpio xz-utils gcc libc6-dev
kdeb=$(kernel_deb "$DEB_CACHE" "$KPKG")
gdeb=$(kernel_deb "$DEB_CACHE" "$GENERIC_KPKG")
qdeb=$(deb_fetch "$DEB_CACHE" qemu-guest-agent)
st=$(stamp_of default "$0" "$ROOT/resources/lib/debian.sh" "$HERE/iobench.c" "$kdeb" "$gdeb" "$qdeb" /bin/busybox "$MODULES")
if [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$st" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] \
   && [ -f "$OUT/iobench" ] && [ -f "$OUT/vmlinuz-generic" ]; then
  echo "guest up to date in $OUT"; exit 0
fi
echo "building guest in $OUT (kernel $(basename "$kdeb"))" >&2
# qemu-ga's shared libraries come from this machine: install them if missing
# shellcheck disable=SC2046
need $(deb_depends "$qdeb")

T=$(mktemp -d "${TMPDIR:-/tmp}/guest-build.XXXXXX"); trap 'rm -rf "$T"' EXIT
dpkg-deb -x "$kdeb" "$T/k"; dpkg-deb -x "$qdeb" "$T/qga"
kver=$(ls "$T/k/lib/modules")
# the generic kernel: only its bzImage is used (its 400 MB of modules are not unpacked)
mkdir -p "$T/g"; dpkg-deb --fsys-tarfile "$gdeb" | tar -x -C "$T/g" --wildcards './boot/vmlinuz-*'
gver=$(basename "$(ls "$T"/g/boot/vmlinuz-*)"); gver=${gver#vmlinuz-}
R=$T/root
mkdir -p "$R"/{proc,sys,dev,tmp,run,var/run,var/log,etc/init.d,etc/acpi/PWRF,mnt,root}
busybox_root "$R"
# qemu-ga's guest-set-time refuses to run without /sbin/hwclock (it syncs the RTC after setting
# the system clock), as on any distro.
ln -sf ../bin/busybox "$R/sbin/hwclock"
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true
kmods "$T/k" "$R/lib/modules/$kver" $MODULES
echo "$MODULES" | tr ' ' '\n' > "$R/etc/modules"
copy_bin "$R" "$T/qga/usr/sbin/qemu-ga" /usr/sbin/qemu-ga
# the disk benchmark (static: runs in the guest and in the test box's L1 alike)
gcc -O2 -static -s -Wall -o "$T/iobench" "$HERE/iobench.c"
cp "$T/iobench" "$R/bin/iobench"

cat > "$R/init" <<'EOF'
#!/bin/sh
# PID 1 of the test guest: minimal setup, the userspace marker, modules, then busybox init.
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo "GUEST-USERSPACE-UP $(cut -d' ' -f1 /proc/uptime)"
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mkdir -p /run/lock
for m in $(cat /etc/modules); do insmod "/lib/modules/$(uname -r)/$m.ko" 2>/dev/null; done
exec /sbin/init
EOF
cat > "$R/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /bin/sh -l
::respawn:/bin/acpid -f -c /etc/acpi -l /dev/null
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
EOF
cat > "$R/etc/init.d/rcS" <<'EOF'
#!/bin/sh
hostname -F /etc/hostname
ip link set lo up 2>/dev/null
# named virtio-console ports as udev names them: /dev/virtio-ports/NAME -> /dev/vportNpM. The
# driver learns its ports from the device after probing (control messages, handled by a
# workqueue): when a virtio console is there, wait (up to 5 s) until its ports stop changing.
if ls -d /sys/bus/virtio/drivers/virtio_console/virtio* >/dev/null 2>&1; then
  last=x; i=0
  while [ $i -lt 25 ]; do
    now=$(cat /sys/class/virtio-ports/*/name 2>/dev/null | tr '\n' ' ')
    now="$(ls /sys/class/virtio-ports 2>/dev/null | tr '\n' ' ')|$now"
    [ "$now" = "$last" ] && [ "$now" != "|" ] && break
    last=$now; i=$((i+1)); sleep 0.2
  done
fi
mkdir -p /dev/virtio-ports
for n in /sys/class/virtio-ports/*/name; do
  [ -f "$n" ] && [ -s "$n" ] || continue
  ln -sf "../$(basename "$(dirname "$n")")" "/dev/virtio-ports/$(cat "$n")"
done
# the QEMU guest agent, on its port when the VMM offers one
p=/dev/virtio-ports/org.qemu.guest_agent.0
if [ -e "$p" ]; then
  qemu-ga -m virtio-serial -p "$p" -d -l /var/log/qemu-ga.log && echo "GUEST-AGENT-UP $p"
fi
cat /etc/issue
EOF
# qemu-ga's guest-shutdown runs `/sbin/shutdown -P|-H|-r +0 MESSAGE`; busybox has the verbs
rm -f "$R/sbin/shutdown"
cat > "$R/sbin/shutdown" <<'EOF'
#!/bin/sh
case " $* " in
  *" -r "*) exec reboot ;;
  *" -H "*) exec halt ;;
  *) exec poweroff ;;
esac
EOF
cat > "$R/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
poweroff
EOF
cat > "$R/etc/issue" <<'EOF'

  ______________________________
  test guest (CirrOS-like): busybox + Debian cloud kernel
  root shell on the console; `poweroff` or `reboot` to leave
  ______________________________

EOF
cat > "$R/etc/profile" <<'EOF'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
PS1='guest# '
EOF
echo guest > "$R/etc/hostname"
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"
chmod +x "$R/init" "$R/etc/init.d/rcS" "$R/etc/acpi/PWRF/00000080" "$R/sbin/shutdown"

cp "$T"/k/boot/vmlinuz-* "$OUT/vmlinuz.tmp.$$"; mv "$OUT/vmlinuz.tmp.$$" "$OUT/vmlinuz"
cp "$T"/g/boot/vmlinuz-* "$OUT/vmlinuz-generic.tmp.$$"; mv "$OUT/vmlinuz-generic.tmp.$$" "$OUT/vmlinuz-generic"
make_cpio "$R" "$OUT/initramfs.cpio.gz"
cp "$T/iobench" "$OUT/iobench.tmp.$$"; mv "$OUT/iobench.tmp.$$" "$OUT/iobench"
rm -f "$OUT/disk.img"
{
  echo "KIND=default"
  echo "UP_REGEX='GUEST-USERSPACE-UP'"
  echo "KERNEL_VERSION=$kver"
  echo "GENERIC_KERNEL_VERSION=$gver"
} > "$OUT/guest.env"
echo "$st" > "$OUT/.stamp"
echo "guest built in $OUT: vmlinuz ($kver), initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
