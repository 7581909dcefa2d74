#!/bin/bash
# Builds the artifacts of the test box's L1 machine (a nested-KVM host booted under QEMU/TCG).
#
#   build_l1.sh base OUT
#       OUT/vmlinuz-l1 (Debian cloud kernel; its kvm-amd needs no ccp) and OUT/l1-initramfs.cpio.gz:
#       busybox, the kvm/kvm-amd/vhost/tun/virtio modules and the L1 /init. Cached (stamp).
#   build_l1.sh payload IMG [--vmm BIN] [--guest DIR] [--qemu] [--bin PATH]...
#       IMG (e.g. build/testbox/payload-PID.img, one per box: several boxes may run at once): an ext4
#       image that L1 mounts read-only at /payload, holding
#         /payload/sysroot/   files L1 links into its own root (`cp -as`): our vmm as
#                             /usr/local/bin/vmm, qemu-system-x86_64 and its firmware (--qemu), other
#                             binaries (--bin), each with its shared libraries
#         /payload/guest/     the L2 guest artifacts (vmlinuz, initramfs.cpio.gz, guest.env)
#         /payload/tb/        helper scripts run inside L1 (l2start.sh)
#
# L1 boot: /init loads the modules, mounts /dev/vda at /payload, links the sysroot in, brings up
# eth0 (10.0.2.15 on QEMU's user network), prints "L1-UP", then busybox init runs a root shell on
# ttyS0 (with job control, so Ctrl-C reaches the foreground job). The harness drives that shell.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../../resources/lib/debian.sh
. "$ROOT/resources/lib/debian.sh"
DEB_CACHE=${DEB_CACHE:-$ROOT/build/debs}
# Parameters of kvm_amd in L1 (see the pitfalls in README.md: QEMU/TCG's emulation of vGIF crashes L1).
KVM_AMD_PARAMS=${TESTBOX_KVM_AMD_PARAMS-vgif=0}
L1_MODULES="irqbypass kvm kvm-amd vhost_iotlb vhost tap tun vhost_net llc stp bridge virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net virtio_blk"

base() {
  local out=$1 kdeb st T R kver
  mkdir -p "$out"
  need busybox-static cpio xz-utils
  kdeb=$(kernel_deb "$DEB_CACHE" linux-image-cloud-amd64)
  st=$(stamp_of l1 "$0" "$ROOT/resources/lib/debian.sh" "$kdeb" /bin/busybox "$L1_MODULES" "$KVM_AMD_PARAMS")
  if [ "$(cat "$out/.stamp-base" 2>/dev/null)" = "$st" ] && [ -f "$out/vmlinuz-l1" ] && [ -f "$out/l1-initramfs.cpio.gz" ]; then
    return 0
  fi
  echo "building L1 base in $out ($(basename "$kdeb"))" >&2
  T=$(mktemp -d "${TMPDIR:-/tmp}/l1-build.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$T'" RETURN
  dpkg-deb -x "$kdeb" "$T/k"
  kver=$(ls "$T/k/lib/modules")
  R=$T/root
  mkdir -p "$R"/{proc,sys,dev,tmp,run,payload,etc,root,var/log}
  busybox_root "$R"
  mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true
  # shellcheck disable=SC2086
  kmods "$T/k" "$R/lib/modules/$kver" $L1_MODULES
  echo "$L1_MODULES" | tr ' ' '\n' | sed "s/^kvm-amd\$/kvm-amd $KVM_AMD_PARAMS/" > "$R/etc/modules"
  cat > "$R/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run; mkdir -p /dev/pts; mount -t devpts devpts /dev/pts
dmesg -n 1   # keep kernel messages off the console the harness parses (dmesg still has them)
while read -r m args; do insmod "/lib/modules/$(uname -r)/$m.ko" $args || echo "L1: insmod $m failed"; done < /etc/modules
if mount -o ro /dev/vda /payload 2>/dev/null; then
  [ -d /payload/sysroot ] && cp -as /payload/sysroot/. /
else
  echo "L1: no payload disk"
fi
hostname box; ip link set lo up; ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
echo "L1-UP $(cut -d' ' -f1 /proc/uptime) $(ls /dev/kvm /dev/vhost-net /dev/net/tun 2>&1 | tr '\n' ' ')"
exec /sbin/init
EOF
  cat > "$R/etc/inittab" <<'EOF'
::respawn:/bin/cttyhack /bin/sh -l
EOF
  cat > "$R/etc/profile" <<'EOF'
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root
PS1=''; PS2=''
stty -echo 2>/dev/null
EOF
  echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"; echo 'root:x:0:' > "$R/etc/group"
  echo box > "$R/etc/hostname"
  chmod +x "$R/init"
  cp "$T"/k/boot/vmlinuz-* "$out/vmlinuz-l1.tmp.$$"; mv "$out/vmlinuz-l1.tmp.$$" "$out/vmlinuz-l1"
  make_cpio "$R" "$out/l1-initramfs.cpio.gz"
  echo "$st" > "$out/.stamp-base"
}

payload() {
  local img=$1; shift
  local vmm="" guest="" qemu="" bins=() P
  while [ $# -gt 0 ]; do
    case $1 in
      --vmm) vmm=$2; shift 2 ;;
      --guest) guest=$2; shift 2 ;;
      --qemu) qemu=1; shift ;;
      --bin) bins+=("$2"); shift 2 ;;
      *) echo "payload: unknown option $1" >&2; exit 2 ;;
    esac
  done
  need e2fsprogs
  [ -z "$qemu" ] || need qemu-system-x86
  P=$img.d; rm -rf "$P"; mkdir -p "$P/sysroot" "$P/guest" "$P/tb"
  if [ -n "$vmm" ]; then copy_bin "$P/sysroot" "$vmm" /usr/local/bin/vmm; fi
  if [ -n "$qemu" ]; then
    copy_bin "$P/sysroot" "$(command -v qemu-system-x86_64)" /usr/bin/qemu-system-x86_64
    mkdir -p "$P/sysroot/usr/share"
    cp -rL /usr/share/qemu /usr/share/seabios "$P/sysroot/usr/share/" 2>/dev/null || true
  fi
  local b
  for b in ${bins[@]+"${bins[@]}"}; do copy_bin "$P/sysroot" "$b" "/usr/bin/$(basename "$b")"; done
  [ -z "$guest" ] || cp -L "$guest"/* "$P/guest/"
  cp "$HERE"/l1/*.sh "$P/tb/"; chmod +x "$P/tb/"*.sh
  local mb; mb=$(( $(du -sm "$P" | cut -f1) * 5 / 4 + 32 ))
  rm -f "$img"; truncate -s "${mb}M" "$img"
  mkfs.ext4 -q -F -L payload -d "$P" "$img"
  rm -rf "$P"
}

case "${1:-}" in
  base) base "$2" ;;
  payload) shift; payload "$@" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
