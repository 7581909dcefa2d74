"""Boot scenarios: our vmm boots an unmodified Linux guest (the default CirrOS-like guest) inside the
test box, with its serial console on stdio (driven through a FIFO) or in a file.

With TESTBOX_L2=qemu, QEMU plays our vmm's part: the scenarios must pass then too (that is how the
harness and the scenarios themselves are validated).
"""

from __future__ import annotations

import re
import time

import box as tb

BOOT_TIMEOUT = 180       # VMM start -> first userspace line (QEMU needs 10-30 s in the box)
STALL = 60               # console silent that long during boot: BootStall (see box.BootStall)
SHELL_TIMEOUT = 120
POWEROFF_LIMIT = 10.0    # seconds from a typed `poweroff` to the VMM's exit (QEMU: ~2.5 s)


def boot_to_shell(vm: tb.L2, up_regex: str, count: int = 1) -> None:
    vm.wait_for(up_regex, BOOT_TIMEOUT, count=count, stall=STALL)
    vm.wait_shell(SHELL_TIMEOUT)


def test_l1_has_kvm(box):
    """The box itself works: L1 has a hardware-style KVM (kvm-amd on the emulated SVM) and vhost."""
    status, out = box.run("ls -l /dev/kvm /dev/vhost-net /dev/net/tun && grep -qw svm /proc/cpuinfo "
                          "&& grep -w kvm_amd /proc/modules")
    assert status == 0, out
    assert "kvm_amd" in out


@tb.retry_on_flake
def test_boot_2_vcpus_256_mib(box, vms, up_regex, qemu_reference):
    """vmm --config vm.json: 2 vCPUs, 256 MiB; the guest sees 2 CPUs and ~QEMU's MemTotal."""
    vm = vms.start(tb.default_config(vcpus=2, memory_mib=256))
    boot_to_shell(vm, up_regex)
    cpus, memtotal = tb.parse_cpus_memtotal(
        vm.guest_cmd("grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo"))
    assert cpus == 2, f"guest sees {cpus} processors, expected 2"
    ref = qemu_reference["memtotal_kib"]
    assert abs(memtotal - ref) <= 0.03 * ref, (
        f"guest MemTotal {memtotal} KiB differs by more than 3% from QEMU's {ref} KiB for -m 256")
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0


@tb.retry_on_flake
def test_console_roundtrip(vms, up_regex):
    """A command typed on the serial console runs and its output comes back."""
    vm = vms.start(tb.default_config(vcpus=1))
    boot_to_shell(vm, up_regex)
    assert vm.guest_cmd("echo $((6*7))").strip() == "42"
    assert vm.guest_cmd("uname -s").strip() == "Linux"


@tb.retry_on_flake
def test_poweroff_exits_0(vms, up_regex):
    """`poweroff` typed in the guest ends the VMM with exit status 0 within a few seconds."""
    vm = vms.start(tb.default_config())
    boot_to_shell(vm, up_regex)
    t0 = time.monotonic()
    vm.send("poweroff")
    rc = vm.wait_exit(60)
    took = time.monotonic() - t0
    if rc != 0:
        # With the VMM's stderr: a nested-SVM triple fault is the box's (see retry_on_flake).
        raise tb.L2Error(vm, f"vmm exited with {rc} after guest poweroff")
    assert took <= POWEROFF_LIMIT, f"vmm took {took:.1f}s to exit after poweroff (limit {POWEROFF_LIMIT}s)"


@tb.retry_on_flake
def test_reboot_restart(vms, up_regex):
    """on_reboot=restart: `reboot` boots the guest a second time; then `poweroff` exits 0."""
    vm = vms.start(tb.default_config(on_reboot="restart"))
    boot_to_shell(vm, up_regex)
    vm.send("reboot")
    boot_to_shell(vm, up_regex, count=2)
    assert vm.exited() is None, "vmm exited on reboot although on_reboot=restart"
    assert vm.guest_cmd("echo $((6*7))").strip() == "42"
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0


@tb.retry_on_flake
def test_reboot_exit(vms, up_regex):
    """on_reboot=exit: `reboot` in the guest ends the VMM with exit status 0."""
    vm = vms.start(tb.default_config(on_reboot="exit"))
    boot_to_shell(vm, up_regex)
    vm.send("reboot")
    assert vm.wait_exit(60) == 0
    assert len(re.findall(up_regex, vm.log())) == 1, "guest booted twice with on_reboot=exit"


@tb.retry_on_flake
def test_serial_file_via_config(vms, up_regex):
    """serial mode file (config): the guest console goes to that file, not to stdout."""
    path = "/tmp/serial-config.log"
    vm = vms.start(tb.default_config(serial={"mode": "file", "path": path}))
    vm.wait_for(up_regex, BOOT_TIMEOUT, source=path, stall=STALL)
    vm.wait_for(r"Linux version", 10, source=path)
    assert not re.search(up_regex, vm.log()), "console also written to stdout"


@tb.retry_on_flake
def test_serial_file_via_flags(vms, up_regex):
    """Flags alone (no --config): --serial file:PATH writes the console to PATH."""
    path = "/tmp/serial-flags.log"
    vm = vms.start(None, ["--kernel", tb.L1_KERNEL, "--initrd", tb.L1_INITRD, "--cmdline", "console=ttyS0",
                          "--cpus", "1", "--memory", "256", "--serial", f"file:{path}"])
    vm.wait_for(up_regex, BOOT_TIMEOUT, source=path, stall=STALL)
    assert not re.search(up_regex, vm.log()), "console also written to stdout"
