"""Control-plane scenarios: the real `qemu.qmp` Python library drives our QMP monitor over TCP
(forwarded from the host into the box), and the project's `vmm ctl` drives the REST API socket,
through a running guest's whole lifecycle: query, pause (console output stops), resume (it goes
on), ACPI power button (the guest shuts down cleanly, the VMM exits 0).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import box as tb
from qemu.qmp import QMPClient

BOOT_TIMEOUT = 180
SHELL_TIMEOUT = 120
EVENT_TIMEOUT = 30
TICKER = "(while true; do echo TICK; sleep 0.3; done) &"


def boot_to_shell(vm: tb.L2, up_regex: str) -> None:
    vm.wait_for(up_regex, BOOT_TIMEOUT)
    vm.wait_shell(SHELL_TIMEOUT)


def ticks(vm: tb.L2) -> int:
    return len(re.findall(r"^TICK", vm.log(), re.M))


def assert_console_stalls(vm: tb.L2, seconds: float = 3.0) -> None:
    """While paused, the guest's console output must not advance (one line may be in flight)."""
    before = ticks(vm)
    time.sleep(seconds)
    after = ticks(vm)
    assert after - before <= 1, f"console went on while paused: {before} -> {after} ticks"


def assert_console_flows(vm: tb.L2, timeout: float = 30.0) -> None:
    before = ticks(vm)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ticks(vm) >= before + 3:
            return
        time.sleep(0.3)
    raise AssertionError(f"console output did not resume ({before} -> {ticks(vm)} ticks)")


async def connect(port: int, timeout: float = 60) -> QMPClient:
    """Connects through the box's port forward; retries while the VMM is still starting."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        qmp = QMPClient("vmm-under-test")
        try:
            await asyncio.wait_for(qmp.connect(("127.0.0.1", port)), 10)
            return qmp
        except Exception as e:  # noqa: BLE001 - any failure means "not up yet"
            last = e
            await asyncio.sleep(1)
    raise AssertionError(f"cannot connect to QMP on port {port}: {last!r}")


async def next_event(listener, name: str, timeout: float = EVENT_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {name} event within {timeout}s")
        ev = await asyncio.wait_for(listener.get(), left)
        if ev["event"] == name:
            return ev


@tb.retry_on_flake
def test_qmp_lifecycle_with_qemu_qmp(box, vms, up_regex):
    vm = vms.start(tb.default_config(), ["--qmp", "tcp:0.0.0.0:4444"])
    boot_to_shell(vm, up_regex)
    vm.send(TICKER)
    assert_console_flows(vm)

    async def scenario() -> None:
        qmp = await connect(box.host_port("qmp"))
        shutdown = None
        try:
            status = await qmp.execute("query-status")
            assert status["running"] is True and status["status"] == "running", status
            version = await qmp.execute("query-version")
            assert {"qemu", "package"} <= version.keys(), version
            cpus = await qmp.execute("query-cpus-fast")
            assert [c["cpu-index"] for c in cpus] == [0, 1], cpus
            assert all(c["thread-id"] > 0 for c in cpus), cpus
            assert (await qmp.execute("query-kvm")) == {"enabled": True, "present": True}

            with qmp.listener() as listener:
                await qmp.execute("stop")
                ev = await next_event(listener, "STOP")
                assert {"seconds", "microseconds"} <= ev["timestamp"].keys(), ev
                status = await qmp.execute("query-status")
                assert status["running"] is False and status["status"] == "paused", status
                hmp = await qmp.execute("human-monitor-command", {"command-line": "info status"})
                assert hmp.strip() == "VM status: paused", hmp
                await asyncio.get_running_loop().run_in_executor(None, assert_console_stalls, vm)

                await qmp.execute("cont")
                await next_event(listener, "RESUME")
                await asyncio.get_running_loop().run_in_executor(None, assert_console_flows, vm)

                # An early press can be lost before the guest's button driver is up, as on
                # real hardware: press until the guest goes down.
                deadline = time.monotonic() + 120
                await qmp.execute("system_powerdown")
                await next_event(listener, "POWERDOWN")
                while shutdown is None and time.monotonic() < deadline:
                    try:
                        shutdown = await next_event(listener, "SHUTDOWN", timeout=10)
                    except (AssertionError, asyncio.TimeoutError):
                        await qmp.execute("system_powerdown")
                assert shutdown is not None, "guest did not shut down on the power button"
                assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}, shutdown
        finally:
            try:
                await qmp.disconnect()
            except EOFError:
                # After SHUTDOWN the VMM exits, as QEMU does: the socket may close before we
                # disconnect. Before it, a closed socket is a failure.
                if shutdown is None:
                    raise

    asyncio.run(scenario())
    assert vm.wait_exit(60) == 0


def ctl(box, sock: str, cmd: str) -> tuple[int, str]:
    return box.run(f"vmm ctl --api-socket {sock} {cmd}", timeout=60)


@tb.retry_on_flake
def test_api_socket_lifecycle_with_vmm_ctl(box, vms, up_regex):
    sock = "/tmp/vmm-api.sock"
    vm = vms.start(tb.default_config(), ["--api-socket", sock])
    boot_to_shell(vm, up_regex)
    vm.send(TICKER)
    assert_console_flows(vm)

    rc, out = ctl(box, sock, "info")
    assert rc == 0, out
    info = json.loads(out[out.index("{"):])
    assert info["state"] == "running", info
    assert info["config"]["machine"]["vcpus"] == 2, info
    rc, mode = box.run(f"stat -c %a {sock}")
    assert mode.strip() == "600", f"API socket mode is {mode.strip()}"

    rc, out = ctl(box, sock, "pause")
    assert rc == 0, out
    assert_console_stalls(vm)
    rc, out = ctl(box, sock, "pause")
    assert rc != 0 and "paused" in out, f"second pause must be refused: {rc} {out}"
    rc, out = ctl(box, sock, "info")
    assert json.loads(out[out.index("{"):])["state"] == "paused", out

    rc, out = ctl(box, sock, "resume")
    assert rc == 0, out
    assert_console_flows(vm)

    deadline = time.monotonic() + 120
    while vm.exited() is None and time.monotonic() < deadline:
        ctl(box, sock, "power-button")
        try:
            rc = vm.wait_exit(10)
        except AssertionError:
            continue
    assert vm.exited() == 0, f"vmm exit status {vm.exited()} after the power button"
    rc, _ = box.run(f"test -e {sock}")
    assert rc != 0, "API socket file left behind"


@tb.retry_on_flake
def test_api_shutdown_and_state_refusal(box, vms, up_regex):
    """`PUT /vm/shutdown` stops the VM at once (exit 0); the state machine refuses a resume
    of a running VM with a clear error and changes nothing."""
    sock = "/tmp/vmm-api2.sock"
    vm = vms.start(tb.default_config(vcpus=1), ["--api-socket", sock])
    vm.wait_for(up_regex, BOOT_TIMEOUT)
    rc, out = ctl(box, sock, "resume")
    assert rc != 0 and "running" in out, out
    rc, out = ctl(box, sock, "shutdown")
    assert rc == 0, out
    assert vm.wait_exit(30) == 0
