#!/usr/bin/env bash
# The main job: builds vmm and the default CirrOS-like guest, then boots it with its serial console
# on this terminal. On a host whose /dev/kvm can run unmodified guests this runs vmm directly; on a
# PVM host (kvm_pvm loaded: unmodified guests hang there) it boots the guest inside the nested test
# box instead. Point GUEST_KERNEL/GUEST_INITRD (and GUEST_DISK) at a real CirrOS to boot that.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=../resources/lib/debian.sh
. resources/lib/debian.sh
need busybox-static cpio e2fsprogs

cargo build --release --locked -p vmm
bash resources/guest/build.sh
GUEST=build/guest

if [ -d /sys/module/kvm_pvm ] || [ ! -w /dev/kvm ] || [ "${FORCE_TESTBOX:-}" = 1 ]; then
  echo "run.sh: this host's KVM cannot run unmodified guests (PVM or none); booting the guest" \
    "inside the nested test box" >&2
  exec env VMM_BIN="$PWD/target/release/vmm" bash scripts/run-in-box.sh "$@"
fi
args=(--kernel "$GUEST/vmlinuz" --cpus 2 --memory 256 --cmdline "console=ttyS0 reboot=acpi panic=-1")
[ -f "$GUEST/initramfs.cpio.gz" ] && args+=(--initrd "$GUEST/initramfs.cpio.gz")
if [ -f "$GUEST/disk.img" ]; then # a user-supplied disk (e.g. CirrOS's qcow2): probe its format
  fmt=$(target/release/vmm img info --output json "$GUEST/disk.img" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["format"])')
  args+=(--disk "path=$GUEST/disk.img,format=$fmt")
fi
exec target/release/vmm "${args[@]}" "$@"
