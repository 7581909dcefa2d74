"""pytest wiring for the test box: one L1 per session, shared by all scenarios.

Fixtures:
  box            the booted L1 (session-wide; killed at the end, even on failure)
  vms            start L2 VMMs for one test; all are killed at its end, and their log tails are
                 attached to the report when the test fails
  qemu_reference facts about the default guest under QEMU (-m 256 -smp 2) in the same box, measured
                 once per session
  up_regex       the regex of the guest's first userspace line
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402


@pytest.fixture(scope="session")
def box():
    # e2fsck and debugfs let disk scenarios check, from L1, what the guest left in its images;
    # mke2fs makes them; socat joins a channel's unix socket in L1 to a forwarded TCP port;
    # qemu-img lists and checks what savevm left in a qcow2 image.
    b = tb.Box(with_qemu=True, extra_bins=["/usr/sbin/e2fsck", "/usr/sbin/debugfs",
                                           "/usr/sbin/mke2fs", "/usr/bin/socat",
                                           "/usr/bin/qemu-img"])
    b.start()
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _box_alive(request):
    """Before each test that uses the box: boot L1 again if it died or stopped answering (see
    box.retry_on_flake)."""
    if "box" in request.fixturenames or "vms" in request.fixturenames:
        b = request.getfixturevalue("box")
        if not b.healthy():
            b.restart()
    yield


@pytest.fixture(scope="session")
def up_regex() -> str:
    return tb.guest_env().get("UP_REGEX", "GUEST-USERSPACE-UP")


class VmStarter:
    """Starts L2 VMMs for one test with unique names; used through the `vms` fixture."""

    def __init__(self, box: tb.Box, test_name: str):
        self.box = box
        self.prefix = re.sub(r"[^A-Za-z0-9]+", "-", test_name)[-40:].strip("-")
        self.started: list[tb.L2] = []

    def start(self, config: dict | None = None, flags: list[str] | None = None,
              argv: list[str] | None = None, ts: bool = False) -> tb.L2:
        """Start our vmm with `config` and `flags` (or a raw `argv`)."""
        name = f"{self.prefix}-{len(self.started)}"
        if argv is None:
            argv = self.box.vmm_argv(config, flags, name=name)
        vm = self.box.start_l2(name, argv, ts=ts)
        self.started.append(vm)
        return vm

    def diagnostics(self) -> str:
        return "\n\n".join(vm.diagnostics() for vm in self.started)

    def cleanup(self) -> None:
        for vm in self.started:
            try:
                vm.kill()
            except Exception as e:  # keep cleaning the others
                print(f"cleanup of {vm.name} failed: {e}", file=sys.stderr)


@pytest.fixture
def vms(box, request):
    s = VmStarter(box, request.node.name)
    request.node._vm_starter = s
    yield s
    s.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    s = getattr(item, "_vm_starter", None)
    if rep.when == "call" and rep.failed and s and s.started:
        rep.sections.append(("L2 logs (tail)", s.diagnostics()))


@pytest.fixture(scope="session")
def qemu_reference(box, up_regex):
    """The default guest under QEMU with -m 256 -smp 2 (the reference for our vmm's numbers)."""
    argv = ["qemu-system-x86_64", *tb.L1_QEMU_FW, "-enable-kvm", "-cpu", "host", "-m", "256",
            "-smp", "2", "-kernel", tb.L1_KERNEL, "-initrd", tb.L1_INITRD,
            "-append", "console=ttyS0", "-nographic", "-no-reboot", "-nic", "none"]
    for attempt in (1, 2):
        vm = box.start_l2(f"qemu-reference-{attempt}", argv)
        result = None
        try:
            vm.wait_for(up_regex, 180, stall=60)
            vm.wait_shell(120)
            out = vm.guest_cmd("grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo")
            cpus, memtotal = tb.parse_cpus_memtotal(out)
            result = {"cpus": cpus, "memtotal_kib": memtotal}
            vm.send("poweroff")
            vm.wait_exit(60)
        except Exception as e:   # a flake of the box: retry once (see box.retry_on_flake)
            if result is None and (attempt == 2 or (box.healthy() and
                                                    not isinstance(e, tb.BootStall))):
                raise
        finally:
            # The reference is measured once the guest answered; a box flake on the way out
            # (L1 soft-locked by the nested guest's exit) only means L1 must boot again.
            if not box.healthy():
                box.restart()
            else:
                vm.kill()
        if result is not None:
            return result

