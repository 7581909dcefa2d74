"""virtio-blk scenarios: Linux's own virtio_blk driver against our virtio-pci transport and block
device, with raw images in the box. Every byte the guest wrote and flushed must be in the image
afterwards, read-only disks must stay untouched, discards must free host blocks, and disks must
keep working across a guest reboot.
"""

from __future__ import annotations

import re

import box as tb

BOOT_TIMEOUT = 180
SHELL_TIMEOUT = 120
PATTERN = "vmm-virtio-blk-known-data-0123456789abcdefghijklmnopqrstuvwxyz"
DATA_BYTES = 64 << 20


def boot_to_shell(vm: tb.L2, up_regex: str, count: int = 1) -> None:
    vm.wait_for(up_regex, BOOT_TIMEOUT, count=count)
    vm.wait_shell(SHELL_TIMEOUT)


def make_image(box, path: str, mib: int) -> None:
    box.check(f"rm -f {path}; truncate -s {mib}M {path}")


def disk_config(*disks: dict, **kw) -> dict:
    cfg = tb.default_config(**kw)
    cfg["disks"] = list(disks)
    return cfg


@tb.retry_on_flake
def test_guest_filesystem_data_reaches_the_image(box, vms, up_regex):
    img = "/tmp/fs.img"
    make_image(box, img, 128)
    # One vCPU: with two, this write-heavy workload makes the nested box's SVM emulation give the
    # L2 guest a double fault (QEMU as L2 too: tests/testbox/README.md, Pitfalls); the data
    # path under test is the same.
    vm = vms.start(disk_config({"id": "data", "path": img}, vcpus=1))
    boot_to_shell(vm, up_regex)
    vm.guest_cmd("mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && echo MOUNTED",
                 timeout=120)
    assert "MOUNTED" in vm.log()
    vm.guest_cmd(f"yes {PATTERN} | head -c {DATA_BYTES} > /mnt/data && sync && echo WROTE",
                 timeout=600)
    assert re.search(r"^WROTE", vm.log(), re.M), "guest could not write its 64 MiB"
    want = vm.guest_cmd("sha256sum /mnt/data", timeout=300).split()[0]
    vm.guest_cmd("umount /mnt && sync && echo UNMOUNTED", timeout=120)
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0
    rc, out = box.run(f"e2fsck -fn {img}", timeout=300)
    assert rc == 0, f"e2fsck -fn found problems (rc {rc}):\n{out}"
    got = box.check(f"debugfs -R 'cat /data' {img} 2>/dev/null | sha256sum", timeout=300).split()[0]
    ref = box.check(f"yes {PATTERN} | head -c {DATA_BYTES} | sha256sum", timeout=300).split()[0]
    assert want == ref, "the guest read back something else than it wrote"
    assert got == ref, "the image holds other data than the guest wrote"


@tb.retry_on_flake
def test_read_only_disk_refuses_writes(box, vms, up_regex):
    img = "/tmp/ro.img"
    box.check(f"yes read-only-{PATTERN} | head -c {8 << 20} > {img}")
    before = box.check(f"sha256sum {img}").split()[0]
    vm = vms.start(disk_config({"path": img, "read_only": True}))
    boot_to_shell(vm, up_regex)
    assert vm.guest_cmd("cat /sys/block/vda/ro").strip() == "1"
    out = vm.guest_cmd("dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>&1; "
                       "echo RC=$?")
    assert "RC=0" not in out, f"write to a read-only disk succeeded: {out}"
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0
    assert box.check(f"sha256sum {img}").split()[0] == before, "read-only image changed"


@tb.retry_on_flake
def test_discard_frees_host_blocks(box, vms, up_regex):
    img = "/tmp/discard.img"
    make_image(box, img, 64)
    vm = vms.start(disk_config({"path": img}))
    boot_to_shell(vm, up_regex)
    vm.guest_cmd(f"yes {PATTERN} | dd of=/dev/vda bs=1M count=32 iflag=fullblock conv=fsync "
                 "2>/dev/null; echo FILLED", timeout=300)
    full = int(box.check(f"stat -c %b {img}").strip())
    assert full * 512 >= 30 << 20, f"image only has {full} blocks allocated after 32 MiB written"
    out = vm.guest_cmd("blkdiscard /dev/vda && sync && echo DISCARDED", timeout=120)
    assert "DISCARDED" in out, out
    after = int(box.check(f"stat -c %b {img}").strip())
    assert after * 2 < full, f"discard did not free host blocks: {full} -> {after} blocks"
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0


@tb.retry_on_flake
def test_two_disks_with_serials(box, vms, up_regex):
    make_image(box, "/tmp/a.img", 16)
    make_image(box, "/tmp/b.img", 32)
    vm = vms.start(disk_config({"id": "a", "path": "/tmp/a.img", "serial": "SERIAL-A"},
                               {"id": "b", "path": "/tmp/b.img", "serial": "SERIAL-B"}))
    boot_to_shell(vm, up_regex)
    out = vm.guest_cmd("for d in vda vdb; do echo $d $(cat /sys/block/$d/serial) "
                       "$(cat /sys/block/$d/size); done")
    assert "vda SERIAL-A 32768" in out, out
    assert "vdb SERIAL-B 65536" in out, out
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0


@tb.retry_on_flake
def test_disks_survive_a_guest_reboot(box, vms, up_regex):
    img = "/tmp/reboot.img"
    make_image(box, img, 16)
    vm = vms.start(disk_config({"path": img, "serial": "REBOOT"}, on_reboot="restart"))
    boot_to_shell(vm, up_regex)
    vm.guest_cmd("echo before-reboot | dd of=/dev/vda conv=fsync 2>/dev/null; echo OK")
    vm.send("reboot")
    boot_to_shell(vm, up_regex, count=2)
    out = vm.guest_cmd("cat /sys/block/vda/serial; echo; head -c 13 /dev/vda; echo; "
                       "echo after-reboot | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null; "
                       "echo OK")
    assert "REBOOT" in out and "before-reboot" in out, out
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0
    assert box.check(f"dd if={img} bs=512 skip=8 count=1 2>/dev/null | head -c 12") == "after-reboot"


@tb.retry_on_flake
def test_bad_disk_configs_are_refused(box):
    box.check("truncate -s 1M /tmp/plain.img && chmod 444 /tmp/plain.img")
    rc, out = box.run("vmm --kernel /payload/guest/vmlinuz --disk path=/tmp/nonexistent.img")
    assert rc == 2 and "disks.path" in out, out
    rc, out = box.run("vmm --kernel /payload/guest/vmlinuz --disk path=/tmp/plain.img")
    assert rc != 0 and "read-only" in out, out
    rc, out = box.run("vmm --kernel /payload/guest/vmlinuz --disk path=/tmp/plain.img,cache=none,"
                      "readonly=on")
    assert rc != 0 and "O_DIRECT" in out, out
