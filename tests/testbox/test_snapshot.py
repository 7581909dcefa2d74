"""Snapshot and restore: a running guest is saved to a file (QMP `migrate "file:..."`, HMP
`migrate`, REST `PUT /vm/snapshot` through `vmm ctl snapshot`) and brought back in a NEW vmm
process (`vmm --incoming file:...`, or `--incoming defer` + QMP `migrate-incoming`). The guest
must not notice: a counter it prints goes on where it was, its uptime does not restart, both vCPUs
run, its disk holds everything it wrote and fsync'd before and after, and a snapshot of a restored
VM restores again. Bad state files (truncated, a flipped byte, a newer format version, a machine
that does not match, a missing disk) end the new process with status 2 and one clear
`vmm: error:` line, and never hang.

The QMP door is driven by the real `qemu.qmp` library (through the box's port forward), the REST
door by the project's `vmm ctl`. Snapshots of 256 MiB under TCG take a while: timeouts are wide.
Scenarios are skipped with TESTBOX_L2=qemu (QEMU has no `--incoming file:` for our state files).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import time
import zlib

import pytest

import box as tb
from test_control import connect, next_event  # the shared qemu.qmp helpers

BOOT_TIMEOUT = 180
STALL = 60
SHELL_TIMEOUT = 120
SAVE_TIMEOUT = 300        # one `migrate` of a 256 MiB guest under nested TCG
RESTORE_TIMEOUT = 180     # new process start -> the guest's next console line
MEM_MIB = 256
QMP = ["--qmp", "tcp:0.0.0.0:4444"]
EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}
# Output lines of the guest's background loops. Not anchored at the line start: a loop's line may
# follow the shell's prompt, or a character the tty echoed, on the same console line.
COUNT_RE = r"COUNT (\d+)\r?\n"
WROTE_RE = r"WROTE (\d+)\r?\n"

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="restores our vmm's own state files")


# ---- helpers ------------------------------------------------------------------------------------
def boot_to_shell(vm: tb.L2, up_regex: str) -> None:
    vm.wait_for(up_regex, BOOT_TIMEOUT, stall=STALL)
    vm.wait_shell(SHELL_TIMEOUT)


def disk_config(img: str, **kw) -> dict:
    cfg = tb.default_config(**kw)
    cfg["disks"] = [{"id": "data", "path": img}]
    return cfg


def numbers(vm: tb.L2, rx: str = COUNT_RE) -> list[int]:
    """Every complete `COUNT n` (or WROTE n) line of the VMM's console log so far."""
    return [int(n) for n in re.findall(rx, vm.log(), re.M)]


def wait_number_at_least(vm: tb.L2, n: int, rx: str = COUNT_RE, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while True:
        seen = numbers(vm, rx)
        if seen and max(seen) >= n:
            return max(seen)
        rc = vm.exited()
        if rc is not None:
            raise tb.L2Error(vm, f"VMM exited ({rc}) while waiting for {rx!r} >= {n}")
        if time.monotonic() > deadline:
            raise tb.L2Error(vm, f"{rx!r} did not reach {n} within {timeout}s "
                             f"(last {max(seen) if seen else None})")
        time.sleep(0.5)


def first_number(vm: tb.L2, rx: str = COUNT_RE, timeout: float = RESTORE_TIMEOUT) -> int:
    """The first complete counter line a (restored) VMM prints."""
    return int(vm.wait_for(rx, timeout).group(1))


def assert_continues(before: list[int], first_after: int, what: str) -> None:
    """The restored guest's first complete line follows the last one the saved guest printed
    (one line may have been half printed when the VM stopped): a continuation, not a restart."""
    assert before, f"no {what} line before the snapshot"
    last = max(before)
    assert last < first_after <= last + 2, (
        f"{what} after the restore starts at {first_after}, last before the snapshot was {last}: "
        "the guest did not continue where it was saved")


def assert_counter_stalls(vm: tb.L2, seconds: float = 3.0) -> None:
    before = len(numbers(vm))
    time.sleep(seconds)
    after = len(numbers(vm))
    assert after - before <= 1, f"the guest ran while it should be paused: {before} -> {after} lines"


def guest_value(vm: tb.L2, cmd: str, key: str, timeout: float = 60) -> str:
    """Runs `echo KEY=$(cmd)` in the guest and returns the value (robust to interleaved output
    of the guest's background loops)."""
    out = vm.guest_cmd(f"echo {key}=$({cmd})", timeout)
    m = re.search(rf"^{key}=(.*?)\r?$", out, re.M)
    assert m, f"no {key}= in the guest's answer: {out!r}"
    return m.group(1).strip()


def uptime(vm: tb.L2) -> float:
    return float(guest_value(vm, "cut -d' ' -f1 /proc/uptime", "UPTIME"))


def qmp_run(coro, timeout: float = SAVE_TIMEOUT + 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def disconnect(qmp) -> None:
    try:
        await qmp.disconnect()
    except Exception:  # noqa: BLE001 - the VMM may have closed the connection (quit)
        pass


async def collect_migration(listener, timeout: float = SAVE_TIMEOUT) -> list[dict]:
    """Events up to the MIGRATION event that ends a migration (completed or failed)."""
    events = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no final MIGRATION event within {timeout}s: {events}")
        ev = await asyncio.wait_for(listener.get(), left)
        events.append(ev)
        if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "failed"):
            return events


async def qmp_snapshot(port: int, path: str, *, events: bool = False, quit: bool = True) -> dict:
    """QMP `migrate "file:PATH"` of a running VM; checks the VM is left in postmigrate and
    query-migrate says completed; with `events`, checks STOP + MIGRATION setup/active/completed.
    With `quit`, ends the VMM. Returns query-migrate's answer."""
    qmp = await connect(port)
    try:
        status = await qmp.execute("query-status")
        assert status["running"] is True and status["status"] == "running", status
        if events:
            assert (await qmp.execute("migrate-set-capabilities", EVENTS_ON)) == {}
            caps = await qmp.execute("query-migrate-capabilities")
            assert {"capability": "events", "state": True} in caps, caps
        with qmp.listener() as listener:
            r = await asyncio.wait_for(qmp.execute("migrate", {"uri": f"file:{path}"}), SAVE_TIMEOUT)
            assert r == {}, f"migrate answered {r!r}"
            if events:
                evs = await collect_migration(listener)
                names = [e["event"] for e in evs]
                statuses = [e["data"]["status"] for e in evs if e["event"] == "MIGRATION"]
                assert statuses == ["setup", "active", "completed"], f"MIGRATION events: {evs}"
                assert "STOP" in names, f"no STOP event while saving a running VM: {evs}"
                assert names.index("STOP") < len(names) - 1, f"STOP after completed: {names}"
        info = await qmp.execute("query-migrate")
        assert info.get("status") == "completed", info
        status = await qmp.execute("query-status")
        assert status["running"] is False and status["status"] == "postmigrate", status
        if quit:
            await qmp.execute("quit")
        return info
    finally:
        await disconnect(qmp)


def check_migrate_info(info: dict) -> None:
    assert info["status"] == "completed", info
    for k in ("total-time", "downtime", "setup-time"):
        assert isinstance(info.get(k), int) and info[k] >= 0, f"query-migrate {k}: {info}"
    ram = info["ram"]
    assert ram["total"] == MEM_MIB << 20, f"ram.total {ram['total']} != {MEM_MIB} MiB: {info}"
    assert 0 < ram["normal-bytes"] <= ram["total"], info
    assert ram["normal"] * 4096 == ram["normal-bytes"], info
    assert ram["normal"] + ram["duplicate"] == ram["total"] // 4096, info
    assert ram["transferred"] >= ram["normal-bytes"], info


def file_size(box, path: str) -> int:
    return int(box.check(f"stat -c %s {path}").strip())


def restore(vms, path: str, *flags: str) -> tb.L2:
    return vms.start(argv=["vmm", "--incoming", f"file:{path}", *flags])


# ---- 1. the main scenario: QMP save of a running guest, restore in a new process ------------------
COUNTER_ON_DISK = ("(n=0; while [ ! -e /tmp/stop-count ]; do n=$((n+1)); echo COUNT $n; "
                   "echo $n >> /mnt/count; sync; sleep 0.3; done; echo COUNT-END $n) &")


@tb.retry_on_flake
def test_snapshot_qmp_restore_continues(box, vms, up_regex):
    img, snap = "/tmp/snap-main.img", "/tmp/snap-main.snap"
    box.check(f"rm -f {img} {snap}; truncate -s 64M {img}")
    a = vms.start(disk_config(img), QMP)
    boot_to_shell(a, up_regex)
    out = a.guest_cmd("mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && echo MOUNTED",
                      timeout=120)
    assert "MOUNTED" in out, out
    a.send(COUNTER_ON_DISK)
    wait_number_at_least(a, 5)
    up_before = uptime(a)
    assert up_before > 1, up_before
    wait_number_at_least(a, max(numbers(a)) + 2)

    t0 = time.monotonic()
    info = qmp_run(qmp_snapshot(box.host_port("qmp"), snap, events=True, quit=False))
    save_s = time.monotonic() - t0
    check_migrate_info(info)
    assert_counter_stalls(a)         # postmigrate: the source VM does not run on

    async def quit_source():
        qmp = await connect(box.host_port("qmp"))
        try:
            hmp = await qmp.execute("human-monitor-command", {"command-line": "info migrate"})
            assert re.search(r"Status:\s+completed", hmp), hmp
            await qmp.execute("quit")
        finally:
            await disconnect(qmp)
    qmp_run(quit_source(), 60)
    assert a.wait_exit(60) == 0, "quit must end the saving VMM with status 0"
    before = numbers(a)
    size = file_size(box, snap)
    assert size > MEM_MIB << 20, f"state file has {size} bytes for {MEM_MIB} MiB of RAM"
    tb.log(f"snapshot of a running {MEM_MIB} MiB guest: {save_s:.1f}s, query-migrate {info}")

    b = restore(vms, snap, *QMP)
    first = first_number(b)
    assert_continues(before, first, "COUNT")

    async def check_restored():
        qmp = await connect(box.host_port("qmp"))
        try:
            status = await qmp.execute("query-status")
            assert status["running"] is True and status["status"] == "running", status
            cpus = await qmp.execute("query-cpus-fast")
            assert [c["cpu-index"] for c in cpus] == [0, 1], cpus
        finally:
            await disconnect(qmp)
    qmp_run(check_restored(), 90)

    up_after = uptime(b)
    assert up_after >= up_before, f"guest uptime went back: {up_before} s before, {up_after} s after"
    assert guest_value(b, "grep -c ^processor /proc/cpuinfo", "CPUS") == "2"
    assert guest_value(b, "cat /sys/devices/system/cpu/online", "ONLINE") == "0-1"
    for cpu in (0, 1):   # each vCPU really runs guest code after the restore
        assert guest_value(b, f"taskset {1 << cpu} cat /proc/self/stat | cut -d' ' -f39",
                           f"RANON{cpu}") == str(cpu)
    assert guest_value(b, "echo $((6*7))", "ANSWER") == "42"
    wait_number_at_least(b, first + 3)

    b.send("touch /tmp/stop-count")
    end = int(b.wait_for(r"COUNT-END (\d+)\r?\n", 60).group(1))
    assert guest_value(b, "tail -n 1 /mnt/count", "LAST") == str(end)
    out = b.guest_cmd("umount /mnt && echo UNMOUNTED", timeout=120)
    assert "UNMOUNTED" in out, out
    b.send("poweroff")
    assert b.wait_exit(60) == 0, "the restored VMM must exit 0 on guest poweroff"

    rc, out = box.run(f"e2fsck -fn {img}", timeout=300)
    assert rc == 0, f"e2fsck -fn found problems after the restored guest's poweroff (rc {rc}):\n{out}"
    data = box.check(f"debugfs -R 'cat /count' {img} 2>/dev/null", timeout=120).split()
    got = [int(x) for x in data]
    assert got == list(range(1, end + 1)), (
        f"the counter file on the disk is not 1..{end}: {got[:5]}...{got[-5:]} ({len(got)} lines)")
    assert end >= max(before), (end, max(before))
    box.run(f"rm -f {snap} {img}")


# ---- 2. restore, snapshot the restored VM (HMP), restore again (--incoming defer) ------------------
COUNTER = ("(n=0; while [ ! -e /tmp/stop-count ]; do n=$((n+1)); echo COUNT $n; sleep 0.3; done; "
           "echo COUNT-END $n) &")


@tb.retry_on_flake
def test_snapshot_of_a_restored_vm_and_incoming_defer(box, vms, up_regex):
    img, s1, s2 = "/tmp/snap-twice.img", "/tmp/snap-twice-1.snap", "/tmp/snap-twice-2.snap"
    box.check(f"rm -f {img} {s1} {s2}; truncate -s 64M {img}")
    port = box.host_port("qmp")
    a = vms.start(disk_config(img), QMP)
    boot_to_shell(a, up_regex)
    a.send(COUNTER)
    wait_number_at_least(a, 3)
    qmp_run(qmp_snapshot(port, s1))
    assert a.wait_exit(60) == 0
    before_a = numbers(a)
    sum1 = box.check(f"md5sum {s1}", timeout=300).split()[0]

    # B: restored paused (-S): nothing runs until `cont`
    b = restore(vms, s1, *QMP, "--paused")

    async def resume_b():
        qmp = await connect(port)
        try:
            status = await qmp.execute("query-status")
            assert status["running"] is False, f"--paused restore is running: {status}"
            await asyncio.get_running_loop().run_in_executor(None, assert_counter_stalls, b)
            with qmp.listener() as listener:
                await qmp.execute("cont")
                await next_event(listener, "RESUME")
            status = await qmp.execute("query-status")
            assert status["running"] is True and status["status"] == "running", status
        finally:
            await disconnect(qmp)
    qmp_run(resume_b(), RESTORE_TIMEOUT + 60)
    first_b = first_number(b)
    assert_continues(before_a, first_b, "COUNT")
    wait_number_at_least(b, first_b + 3)

    async def hmp_snapshot_b():
        qmp = await connect(port)
        try:
            out = await asyncio.wait_for(qmp.execute("human-monitor-command",
                                                     {"command-line": f"migrate file:{s2}"}),
                                         SAVE_TIMEOUT)
            assert out == "", f"HMP migrate printed {out!r}"
            # HMP migrate may return before the end, as QEMU's does: wait for completed
            deadline = time.monotonic() + SAVE_TIMEOUT
            while True:
                info = await qmp.execute("query-migrate")
                if info.get("status") == "completed" or time.monotonic() > deadline:
                    break
                assert info.get("status") in ("setup", "active"), info
                await asyncio.sleep(0.5)
            check_migrate_info(info)
            hmp = await qmp.execute("human-monitor-command", {"command-line": "info migrate"})
            assert re.search(r"Status:\s+completed", hmp), hmp
            status = await qmp.execute("query-status")
            assert status["running"] is False and status["status"] == "postmigrate", status
            await qmp.execute("quit")
        finally:
            await disconnect(qmp)
    qmp_run(hmp_snapshot_b())
    assert b.wait_exit(60) == 0
    before_b = numbers(b)
    assert box.check(f"md5sum {s1}", timeout=300).split()[0] == sum1, (
        "the state file a VM was restored from changed while that VM ran")

    # C: --incoming defer, then QMP migrate-incoming
    c = vms.start(argv=["vmm", "--incoming", "defer", *QMP])

    async def incoming_c():
        qmp = await connect(port)
        try:
            status = await qmp.execute("query-status")
            assert status["running"] is False and status["status"] == "inmigrate", status
            r = await asyncio.wait_for(qmp.execute("migrate-incoming", {"uri": f"file:{s2}"}),
                                       RESTORE_TIMEOUT)
            assert r == {}, r
            deadline = time.monotonic() + RESTORE_TIMEOUT
            while (status := await qmp.execute("query-status"))["status"] != "running":
                assert time.monotonic() < deadline, f"not running after migrate-incoming: {status}"
                await asyncio.sleep(0.5)
            info = await qmp.execute("query-migrate")
            assert info.get("status") == "completed", info
        finally:
            await disconnect(qmp)
    qmp_run(incoming_c(), RESTORE_TIMEOUT + 120)
    first_c = first_number(c)
    assert_continues(before_b, first_c, "COUNT")
    assert guest_value(c, "echo $((6*7))", "ANSWER") == "42"
    assert guest_value(c, "cat /sys/devices/system/cpu/online", "ONLINE") == "0-1"
    wait_number_at_least(c, first_c + 3)
    c.send("touch /tmp/stop-count")
    c.wait_for(r"COUNT-END \d+\r?$", 60)
    c.send("poweroff")
    assert c.wait_exit(60) == 0
    box.run(f"rm -f {s1} {s2} {img}")


# ---- 3. raw disk writes across a snapshot ----------------------------------------------------------
BLOCK = 4096
WRITER = ("(i=0; while [ ! -e /tmp/stop-write ]; do "
          "yes blk-$i- | head -c 4096 | dd of=/dev/vda bs=4096 seek=$i count=1 iflag=fullblock "
          "conv=notrunc,fsync 2>/dev/null && echo WROTE $i || echo WRITE-FAILED $i; i=$((i+1)); "
          "done; echo WRITER-END $i) &")


@tb.retry_on_flake
def test_disk_writes_across_a_snapshot(box, vms, up_regex):
    img, snap = "/tmp/snap-blk.img", "/tmp/snap-blk.snap"
    box.check(f"rm -f {img} {snap}; truncate -s 64M {img}")
    a = vms.start(disk_config(img), QMP)
    boot_to_shell(a, up_regex)
    a.send(WRITER)
    wait_number_at_least(a, 10, WROTE_RE)
    qmp_run(qmp_snapshot(box.host_port("qmp"), snap))   # mid-loop: requests may be in flight
    assert a.wait_exit(60) == 0
    before = numbers(a, WROTE_RE)

    b = restore(vms, snap, *QMP)
    first = first_number(b, WROTE_RE)
    assert_continues(before, first, "WROTE")
    wait_number_at_least(b, first + 10, WROTE_RE)
    b.send("touch /tmp/stop-write")
    b.wait_for(r"WRITER-END \d+\r?$", 120)
    b.send("poweroff")
    assert b.wait_exit(60) == 0
    for vm in (a, b):
        failed = re.findall(r"WRITE-FAILED \d+", vm.log())
        assert not failed, f"guest writes failed: {failed}\n{vm.log()[-2000:]}"
    after = numbers(b, WROTE_RE)
    last = max(after)
    n = last + 1
    # Every block the guest reported as written (fsync'd) before and after the snapshot, in the
    # image with its content: block i is "blk-i-\n" repeated over 4096 bytes.
    out = box.run(f": > /tmp/expect; i=0; while [ $i -lt {n} ]; do yes blk-$i- | head -c {BLOCK} "
                  f">> /tmp/expect; i=$((i+1)); done; head -c {n * BLOCK} {img} | cmp - /tmp/expect "
                  f"&& echo SAME; rm -f /tmp/expect", timeout=300)[1]
    if "SAME" not in out:
        m = re.search(r"char (\d+)", out)
        blk = (int(m.group(1)) - 1) // BLOCK if m else None
        got = box.check(f"dd if={img} bs={BLOCK} skip={blk or 0} count=1 2>/dev/null | head -c 40")
        raise AssertionError(f"the image differs from what the guest wrote ({n} blocks, last before "
                             f"the snapshot {max(before)}): first bad block {blk}, holds {got!r}; "
                             f"cmp: {out.strip()}")
    box.run(f"rm -f {snap} {img}")


# ---- 4. REST door (vmm ctl snapshot / resume / migration) ------------------------------------------
TICKER = "(while [ ! -e /tmp/stop-count ]; do n=$((n+1)); echo COUNT $n; sleep 0.3; done) &"


def ctl(box, sock: str, cmd: str, timeout: float = 60) -> tuple[int, str]:
    return box.run(f"vmm ctl --api-socket {sock} {cmd}", timeout=timeout)


def ctl_json(box, sock: str, cmd: str) -> dict:
    rc, out = ctl(box, sock, cmd)
    assert rc == 0, f"vmm ctl {cmd}: {rc} {out}"
    return json.loads(out[out.index("{"):])


@tb.retry_on_flake
def test_rest_snapshot_with_vmm_ctl(box, vms, up_regex):
    sa, sb = "/tmp/snap-api-a.sock", "/tmp/snap-api-b.sock"
    s1, s2 = "/tmp/snap-rest-1.snap", "/tmp/snap-rest-2.snap"
    box.check(f"rm -f {s1} {s2}")
    a = vms.start(tb.default_config(), ["--api-socket", sa])
    boot_to_shell(a, up_regex)
    a.send("n=0; " + TICKER)
    wait_number_at_least(a, 3)

    rc, out = ctl(box, sa, f"snapshot {s1}", timeout=SAVE_TIMEOUT)
    assert rc == 0, f"vmm ctl snapshot: {rc} {out}"
    assert ctl_json(box, sa, "info")["state"] == "post_migrate"
    # The REST door speaks its own (snake_case, OpenAPI) names for query-migrate's members.
    rest = ctl_json(box, sa, "migration")
    assert rest["status"] == "completed", rest
    assert rest["total_time_ms"] >= rest["downtime_ms"] > 0, rest
    ram = rest["ram"]
    assert ram["total"] == 256 << 20, rest
    assert ram["normal"] * 4096 == ram["normal_bytes"] > 0, rest
    assert ram["normal"] + ram["duplicate"] == ram["total"] // 4096, rest
    assert_counter_stalls(a)

    rc, out = ctl(box, sa, "resume")
    assert rc == 0, f"vmm ctl resume after a snapshot: {rc} {out}"
    assert ctl_json(box, sa, "info")["state"] == "running"
    n = max(numbers(a))
    wait_number_at_least(a, n + 3, timeout=60)      # the source guest goes on after resume
    assert guest_value(a, "echo $((6*7))", "ANSWER") == "42"

    rc, out = ctl(box, sa, f"snapshot {s2}", timeout=SAVE_TIMEOUT)
    assert rc == 0, f"vmm ctl snapshot (second): {rc} {out}"
    rc, out = ctl(box, sa, "shutdown")
    assert rc == 0, out
    assert a.wait_exit(60) == 0
    before = numbers(a)

    b = restore(vms, s2, "--api-socket", sb)
    first = first_number(b)
    assert_continues(before, first, "COUNT")
    info = ctl_json(box, sb, "info")
    assert info["state"] == "running", info
    machine = info["config"]["machine"]
    assert (machine["vcpus"], machine["memory_mib"]) == (2, MEM_MIB), info
    assert guest_value(b, "echo $((6*7))", "ANSWER") == "42"
    wait_number_at_least(b, first + 3)
    b.send("touch /tmp/stop-count")
    b.send("poweroff")
    assert b.wait_exit(60) == 0
    box.run(f"rm -f {s1} {s2}")


# ---- 5. bad state files ------------------------------------------------------------------------------
def read_bytes(box, path: str, offset: int, n: int) -> bytes:
    out = box.check(f"dd if={path} bs=4096 skip={offset} count={n} iflag=skip_bytes,count_bytes "
                    f"2>/dev/null | base64")
    return base64.b64decode("".join(out.split()))


def write_bytes(box, path: str, offset: int, data: bytes) -> None:
    esc = "".join(f"\\{b:03o}" for b in data)
    box.check(f"printf '{esc}' | dd of={path} bs=1 seek={offset} conv=notrunc 2>/dev/null")


def refused(box, argv: str, *words: str, timeout: int = 30) -> str:
    """Runs a restore that must fail: exit status 2, one `vmm: error:` line naming `words`."""
    rc, out = box.run(f"timeout {timeout} {argv} </dev/null >/tmp/refused.out 2>/tmp/refused.err; "
                      f"echo RC=$?; cat /tmp/refused.err", timeout=timeout + 60)
    m = re.search(r"^RC=(\d+)$", out, re.M)
    assert m, out
    status, err = int(m.group(1)), out[m.end():].strip()
    assert status == 2, f"`{argv}` exited {status} (want 2; 124/143: it hung); stderr:\n{err}"
    lines = [ln for ln in err.splitlines() if "vmm: error:" in ln]
    assert len(lines) == 1, f"`{argv}`: want one `vmm: error:` line, stderr:\n{err}"
    low = lines[0].lower()
    missing = [w for w in words if w.lower() not in low]
    assert not missing, f"`{argv}`: the error does not say {missing}: {lines[0]}"
    tb.log(f"refused as expected: {lines[0]}")
    return lines[0]


@tb.retry_on_flake
def test_bad_state_files_are_refused(box, vms, up_regex):
    img, snap = "/tmp/snap-bad.img", "/tmp/snap-bad.snap"
    box.check(f"rm -f {img} {snap}; truncate -s 16M {img}")
    a = vms.start(disk_config(img, memory_mib=128), QMP)
    a.wait_for(up_regex, BOOT_TIMEOUT, stall=STALL)
    qmp_run(qmp_snapshot(box.host_port("qmp"), snap))
    assert a.wait_exit(60) == 0
    size = file_size(box, snap)
    run = f"vmm --incoming file:{snap} --serial off"

    # The intact file restores (the control for everything below), with agreeing --cpus/--memory.
    out = box.run(f"{run} --cpus 2 --memory 128 --paused </dev/null >/tmp/good.out 2>&1 & p=$!; "
                  f"sleep 5; if kill -0 $p 2>/dev/null; then echo ALIVE; kill $p; fi; wait $p; "
                  f"cat /tmp/good.out", timeout=90)[1]
    assert "ALIVE" in out, f"the intact state file does not restore: {out}"

    # The documented layout: header, then CONF, then STAT.
    head = read_bytes(box, snap, 0, 40)
    assert head[:12] == b"\x89VMSTATE\r\n\x1a\n", head
    version, flags, hcrc = struct.unpack("<III", head[12:24])
    assert (version, flags, hcrc) == (2, 0, zlib.crc32(head[:20])), (version, flags, hcrc)
    assert head[24:28] == b"CONF", head
    conf_len = struct.unpack("<Q", head[28:36])[0]
    stat_hdr = read_bytes(box, snap, 40 + conf_len, 16)
    assert stat_hdr[:4] == b"STAT", stat_hdr
    stat_len = struct.unpack("<Q", stat_hdr[4:12])[0]
    meta_end = 40 + conf_len + 16 + stat_len
    box.check(f"dd if={snap} of=/tmp/snap-bad.head bs={meta_end + 4096} count=1 2>/dev/null")

    def put_back():
        box.check(f"dd if=/tmp/snap-bad.head of={snap} conv=notrunc 2>/dev/null")

    # A newer format version, with a correct header crc: "use a newer vmm".
    newer = head[:12] + struct.pack("<II", 3, 0)
    write_bytes(box, snap, 12, struct.pack("<I", 3) + head[16:20] + struct.pack("<I", zlib.crc32(newer)))
    refused(box, run, "newer", "version 3", snap)
    put_back()

    # One flipped byte: in the header's magic, in its version field, in CONF, in STAT.
    for off, words in ((3, ("magic",)), (13, ("corrupted", "checksum", "header")),
                       (40 + conf_len // 2, ("corrupted", "checksum", "CONF")),
                       (40 + conf_len + 16 + stat_len // 2, ("corrupted", "checksum", "STAT"))):
        b = read_bytes(box, snap, off, 1)
        write_bytes(box, snap, off, bytes([b[0] ^ 0x10]))
        refused(box, run, *words, snap)
        put_back()

    # A machine that does not match what the command line says; a missing disk; no file.
    refused(box, f"{run} --cpus 1", "vCPUs", "2", "1")
    refused(box, f"{run} --memory 64", "memory", "128", "64")
    box.check(f"mv {img} {img}.away")
    refused(box, run, img, "cannot open")
    box.check(f"mv {img}.away {img}")
    refused(box, "vmm --incoming file:/tmp/no-such.snap --serial off", "/tmp/no-such.snap")
    box.check("echo 'not a state file' > /tmp/snap-text.snap")
    refused(box, "vmm --incoming file:/tmp/snap-text.snap --serial off", "magic")

    # Truncated files, cut in the header, in the metadata, in guest memory, in the end marker
    # (largest first: the one copy is cut further each time).
    for cut in sorted({size - 1, size // 2, meta_end - 10, 40 + conf_len // 2, 10}, reverse=True):
        box.check(f"truncate -s {cut} {snap}")
        refused(box, run, "truncated", snap)
    box.run(f"rm -f {snap} {img} /tmp/snap-bad.head /tmp/snap-text.snap")
