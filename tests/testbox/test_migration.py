"""Live migration between two vmm processes in the same L1 (over 127.0.0.1 and a unix socket),
driven the way QEMU users drive it: the destination started with `--incoming tcp:...`, QMP
`migrate` on the source through the real `qemu.qmp` library.

1. A guest under load (2 vCPUs, 256 MiB, a disk): a counter, a loop that rewrites a 64 MiB
   buffer with a pattern that changes every pass, and a loop that re-reads a file from its disk
   with the page cache dropped (so the VMM writes guest memory behind KVM's back all along).
   After the migration the counter goes on, the buffer holds exactly the last pass's pattern,
   no read ever saw a bad checksum, the disk passes e2fsck after the destination's poweroff
   (status 0), and the source says `completed` and ends on `quit`.
2. Faults, then an idle guest: a destination that is not listening, a cancel during the active
   phase (the bandwidth limit held), a destination killed during the active phase (a migration
   started through the REST door, `vmm ctl migrate`), and a guest that dirties memory faster
   than a too-small downtime limit allows. Each time the source keeps running and says why;
   then an idle migration over a unix socket to a destination started with `--incoming defer`
   and given its address by QMP `migrate-incoming` completes and reports its downtime.

Scenarios are skipped with TESTBOX_L2=qemu (the stream is our own).
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

import box as tb
from test_control import connect
from test_snapshot import (COUNT_RE, boot_to_shell, ctl, disconnect, disk_config,
                           first_number, numbers, qmp_run, wait_number_at_least)

MIGRATE_TIMEOUT = 600      # a 256 MiB guest under load, nested TCG
QMP_SRC = ["--qmp", "tcp:0.0.0.0:4444"]
QMP_DST = ["--qmp", "tcp:0.0.0.0:4447"]
EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}
DEST = "tcp:127.0.0.1:5555"
FINAL = ("completed", "failed", "cancelled")

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="migrates between our own vmm processes")

COUNTER = ("(n=0; while [ ! -e /tmp/stop ]; do n=$((n+1)); echo COUNT $n; sleep 0.3; done; "
           "echo COUNT-END $n) &")
# (Markers are typed as READ-''OK so that the echoed command line never matches them.)
# Two 1 MiB random patterns; pass g writes pattern g%2 into all 64 slots of a 64 MiB buffer in
# RAM (the initramfs root), so a page that arrives stale holds the other pattern.
WRITER_SETUP = ("dd if=/dev/urandom of=/tmp/p0 bs=1M count=1 2>/dev/null; "
                "dd if=/dev/urandom of=/tmp/p1 bs=1M count=1 2>/dev/null; echo PATTERNS")
WRITER = ("(g=0; while [ ! -e /tmp/stop ]; do g=$((g+1)); i=0; while [ $i -lt 64 ]; do "
          "dd if=/tmp/p$((g%2)) of=/tmp/buf bs=1M seek=$i count=1 conv=notrunc 2>/dev/null; "
          "i=$((i+1)); done; echo PA''SS $g; done; echo WRITER-''END $g) &")
READER = ("(while [ ! -e /tmp/stop ]; do echo 3 > /proc/sys/vm/drop_caches; "
          "m=$(md5sum /mnt/data 2>&1); if [ \"$m\" = \"$(cat /tmp/data.md5)\" ]; then echo READ-''OK; "
          "else echo READ-''BAD $m; fi; done; echo READER-''END) &")


async def wait_status(qmp, want: tuple[str, ...], timeout: float = MIGRATE_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        if info.get("status") in want:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"query-migrate never reached {want}: {info}")
        await asyncio.sleep(0.5)


async def wait_incoming(port: int) -> None:
    """The destination is up and waiting (`inmigrate`)."""
    qmp = await connect(port)
    try:
        status = await qmp.execute("query-status")
        assert status["status"] == "inmigrate", status
    finally:
        await disconnect(qmp)


def start_dest(box, vms, uri: str = DEST) -> tb.L2:
    b = vms.start(argv=["vmm", "--incoming", uri, *QMP_DST])
    qmp_run(wait_incoming(box.host_port("chan")), 120)
    return b


def counter_goes_on(vm: tb.L2, what: str) -> None:
    last = max(numbers(vm))
    wait_number_at_least(vm, last + 3, timeout=60)
    tb.log(f"{what}: the source's counter went on past {last}")


# ---- 1. under load ------------------------------------------------------------------------------
@tb.retry_on_flake
def test_live_migration_under_load(box, vms, up_regex):
    img = "/tmp/mig-load.img"
    box.check(f"rm -f {img}; truncate -s 64M {img}")
    a = vms.start(disk_config(img), QMP_SRC)
    boot_to_shell(a, up_regex)
    out = a.guest_cmd("mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && "
                      "dd if=/dev/urandom of=/mnt/data bs=1M count=16 2>/dev/null && sync && "
                      "md5sum /mnt/data > /tmp/data.md5 && echo DISK-READY", timeout=240)
    assert "DISK-READY" in out, out
    assert "PATTERNS" in a.guest_cmd(WRITER_SETUP, timeout=120)
    a.send(COUNTER)
    a.send(WRITER)
    a.send(READER)
    a.wait_for(r"PASS 2\r?\n", 300)
    a.wait_for(r"READ-OK", 300)
    b = start_dest(box, vms)

    async def migrate():
        qmp = await connect(box.host_port("qmp"))
        try:
            assert (await qmp.execute("migrate-set-capabilities", EVENTS_ON)) == {}
            with qmp.listener() as listener:
                t0 = time.monotonic()
                assert (await qmp.execute("migrate", {"uri": DEST})) == {}
                events = []
                while True:
                    ev = await asyncio.wait_for(listener.get(), MIGRATE_TIMEOUT)
                    events.append(ev)
                    if ev["event"] == "MIGRATION" and ev["data"]["status"] in FINAL:
                        break
                secs = time.monotonic() - t0
            statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
            passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
            info = await qmp.execute("query-migrate")
            assert statuses[-1] == "completed", f"{statuses}: {info}"
            assert statuses[:2] == ["setup", "active"], statuses
            assert passes and passes == list(range(1, len(passes) + 1)), passes
            assert "STOP" in [e["event"] for e in events], events
            status = await qmp.execute("query-status")
            assert status["status"] == "postmigrate", status
            return info, secs, len(passes)
        finally:
            await disconnect(qmp)

    info, secs, passes = qmp_run(migrate(), MIGRATE_TIMEOUT + 60)
    tb.log(f"migration under load: {secs:.1f}s, {passes} passes, query-migrate {info}")
    ram = info["ram"]
    assert ram["total"] == 256 << 20, info
    assert ram["transferred"] >= ram["normal-bytes"] > 0, info
    assert ram["dirty-sync-count"] >= 2, info
    assert isinstance(info.get("downtime"), int), info
    before = numbers(a)
    assert_no_more_output = len(a.log())

    # The destination runs the guest on: counter, writer and reader all go on.
    first = first_number(b, timeout=120)
    assert max(before) < first <= max(before) + 3, (max(before), first)
    b.wait_for(r"PASS \d+\r?\n", 300)
    b.wait_for(r"READ-OK", 300)
    b.send("touch /tmp/stop")
    g = int(b.wait_for(r"WRITER-END (\d+)\r?\n", 300).group(1))
    b.wait_for(r"READER-END", 300)
    want = b.guest_cmd(f"i=0; while [ $i -lt 64 ]; do cat /tmp/p{g % 2}; i=$((i+1)); done "
                       "| md5sum", timeout=120).split()[0]
    got = b.guest_cmd("md5sum /tmp/buf", timeout=120).split()[0]
    assert got == want, "the 64 MiB buffer does not hold the last pass's pattern after migrating"
    for vm, side in ((a, "source"), (b, "destination")):
        bad = [m.start() for m in re.finditer("READ-BAD", vm.log())]
        if bad:
            ctx = vm.log()[max(0, bad[0] - 600):bad[0] + 300]
            raise AssertionError(f"a read from the disk saw corrupted data on the {side} "
                                 f"({len(bad)} times, {vm.log().count('READ-OK')} good reads):"
                                 f"\n{ctx}")
    assert len(a.log()) - assert_no_more_output < 200, "the source guest ran after completion"
    out = b.guest_cmd("umount /mnt && echo UNMOUNTED", timeout=120)
    assert "UNMOUNTED" in out, out
    b.send("poweroff")
    assert b.wait_exit(120) == 0, "the destination must exit 0 on the guest's poweroff"

    async def quit_source():
        qmp = await connect(box.host_port("qmp"))
        try:
            hmp = await qmp.execute("human-monitor-command", {"command-line": "info migrate"})
            assert re.search(r"Status:\s+completed", hmp), hmp
            await qmp.execute("quit")
        finally:
            await disconnect(qmp)
    qmp_run(quit_source(), 60)
    assert a.wait_exit(60) == 0
    rc, out = box.run(f"e2fsck -fn {img}", timeout=300)
    assert rc == 0, f"e2fsck -fn after the migrated guest's poweroff (rc {rc}):\n{out}"
    box.run(f"rm -f {img}")


# ---- 2. faults, then an idle migration over a unix socket ----------------------------------------
@tb.retry_on_flake
def test_migration_faults_then_idle(box, vms, up_regex):
    img, api = "/tmp/mig-faults.img", "/tmp/mig-src-api.sock"
    box.check(f"rm -f {img} {api}; truncate -s 16M {img}")
    a = vms.start(disk_config(img), QMP_SRC + ["--api-socket", api])
    boot_to_shell(a, up_regex)
    a.send(COUNTER)
    wait_number_at_least(a, 3)
    src = box.host_port("qmp")

    async def run(coro_fn, timeout=MIGRATE_TIMEOUT):
        qmp = await connect(src)
        try:
            return await asyncio.wait_for(coro_fn(qmp), timeout)
        finally:
            await disconnect(qmp)

    # (a) nobody listens
    async def not_listening(qmp):
        assert (await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:5556"})) == {}
        return await wait_status(qmp, FINAL, 60)
    info = qmp_run(run(not_listening))
    assert info["status"] == "failed" and "connect" in info.get("error-desc", "").lower(), info
    counter_goes_on(a, "destination not listening")

    # (b) cancel during the active phase (slowed to 4 MiB/s so that it stays active)
    b = start_dest(box, vms)

    async def cancel(qmp):
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
        params = await qmp.execute("query-migrate-parameters")
        assert params["max-bandwidth"] == 4 << 20 and params["downtime-limit"] == 300, params
        assert (await qmp.execute("migrate", {"uri": DEST})) == {}
        await wait_status(qmp, ("active",), 60)
        try:
            await qmp.execute("migrate", {"uri": DEST})
            raise AssertionError("a second migrate while one runs was accepted")
        except Exception as e:  # noqa: BLE001 - qemu.qmp's ExecuteError
            assert "in progress" in str(e), e
        await asyncio.sleep(3)
        held = await qmp.execute("query-migrate")
        assert (await qmp.execute("migrate_cancel")) == {}
        return held, await wait_status(qmp, FINAL, 60)
    held, info = qmp_run(run(cancel))
    assert info["status"] == "cancelled", info
    # 4 MiB/s held: what was sent fits the time it ran (plus one 100 ms window and a chunk).
    sent, ms = held["ram"]["transferred"], held["total-time"]
    assert sent <= (4 << 20) * (ms / 1000 + 0.2) + (2 << 20), f"max-bandwidth not held: {held}"
    counter_goes_on(a, "cancel")
    assert b.wait_exit(60) != 0, "a destination whose source went away must exit non-zero"
    assert "incoming migration failed" in b.stderr(), b.stderr()

    # (c) the destination dies during the active phase
    c = start_dest(box, vms)

    rc, out = ctl(box, api, f"migrate {DEST}")
    assert rc == 0, f"vmm ctl migrate: {rc} {out}"

    async def until_active(qmp):
        return await wait_status(qmp, ("active",), 60)
    qmp_run(run(until_active))
    box.check(f"kill -9 {c.pid()}")

    async def failed(qmp):
        return await wait_status(qmp, FINAL, 120)
    info = qmp_run(run(failed))
    assert info["status"] == "failed" and info.get("error-desc"), info
    counter_goes_on(a, "destination killed")

    # (d) a guest dirtying memory faster than a 1 ms downtime limit allows: it never switches
    # over, keeps reporting, the monitor answers, and it cancels cleanly.
    assert "PATTERNS" in a.guest_cmd(WRITER_SETUP, timeout=120)
    a.send(WRITER.replace("/tmp/stop", "/tmp/stopw"))
    a.wait_for(r"PASS 1\r?\n", 300)
    d = start_dest(box, vms)

    async def no_convergence(qmp):
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 1})
        assert (await qmp.execute("migrate-set-capabilities", EVENTS_ON)) == {}
        with qmp.listener() as listener:
            assert (await qmp.execute("migrate", {"uri": DEST})) == {}
            passes = 0
            while passes < 4:
                ev = await asyncio.wait_for(listener.get(), MIGRATE_TIMEOUT)
                if ev["event"] == "MIGRATION_PASS":
                    passes = ev["data"]["pass"]
                assert not (ev["event"] == "MIGRATION" and ev["data"]["status"] in FINAL), ev
        t0 = time.monotonic()
        info = await qmp.execute("query-migrate")
        await qmp.execute("query-status")
        answered = time.monotonic() - t0
        assert info["status"] == "active", info
        assert info["ram"]["dirty-pages-rate"] > 0 and info["ram"]["dirty-sync-count"] >= 4, info
        assert answered < 5, f"the monitor took {answered:.1f}s to answer during the migration"
        assert (await qmp.execute("migrate-cancel")) == {}
        done = await wait_status(qmp, FINAL, 60)
        await qmp.execute("migrate-set-parameters",
                          {"max-bandwidth": 128 << 20, "downtime-limit": 300})
        return info, done
    info, done = qmp_run(run(no_convergence))
    tb.log(f"no convergence at 1 ms: {info}")
    assert done["status"] == "cancelled", done
    a.send("touch /tmp/stopw")
    a.wait_for(r"WRITER-END \d+\r?\n", 300)
    assert d.wait_exit(60) != 0
    counter_goes_on(a, "no convergence")

    # (e) an idle guest over a unix socket, to a destination started with `--incoming defer`
    # and told where to listen by QMP migrate-incoming: completes, reports the downtime
    sock = "/tmp/mig-idle.sock"
    e = start_dest(box, vms, "defer")

    async def listen(qmp):
        assert (await qmp.execute("migrate-incoming", {"uri": f"unix:{sock}"})) == {}
        try:
            await qmp.execute("migrate-incoming", {"uri": f"unix:{sock}"})
            raise AssertionError("a second migrate-incoming was accepted")
        except Exception as err:  # noqa: BLE001 - qemu.qmp's ExecuteError
            assert "already been started" in str(err), err

    async def dest_qmp(fn):
        qmp = await connect(box.host_port("chan"))
        try:
            return await fn(qmp)
        finally:
            await disconnect(qmp)
    qmp_run(dest_qmp(listen), 60)

    async def idle(qmp):
        assert (await qmp.execute("migrate", {"uri": f"unix:{sock}"})) == {}
        return await wait_status(qmp, FINAL)
    info = qmp_run(run(idle))
    tb.log(f"idle migration: {info}")

    async def dest_view(qmp):
        return await qmp.execute("query-status"), await qmp.execute("query-migrate")
    status, dinfo = qmp_run(dest_qmp(dest_view), 60)
    assert status["status"] == "running" and dinfo["status"] == "completed", (status, dinfo)
    assert info["status"] == "completed", info
    assert isinstance(info.get("downtime"), int) and info["downtime"] >= 0, info
    assert info["total-time"] >= info["downtime"], info
    before = numbers(a)
    first = first_number(e, COUNT_RE, 120)
    assert max(before) < first <= max(before) + 3, (max(before), first)
    assert box.run(f"[ -e {sock} ]")[0] != 0, "the destination left its socket file behind"
    e.send("poweroff")
    assert e.wait_exit(120) == 0

    async def quit_src(qmp):
        await qmp.execute("quit")
    qmp_run(run(quit_src))
    assert a.wait_exit(60) == 0
    assert box.run(f"[ -e {api} ]")[0] != 0, "the source left its API socket behind"
    box.run(f"rm -f {img}")
