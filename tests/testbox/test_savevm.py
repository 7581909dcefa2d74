"""Whole-VM snapshots inside the VM's qcow2 disk, driven as QEMU users drive them: HMP `savevm`,
`loadvm`, `delvm`, `info snapshots` (through QMP's human-monitor-command, with the real
`qemu.qmp`), and the QMP job `snapshot-save` with its JOB_STATUS_CHANGE events and `query-jobs`.

`savevm s1`, then the guest changes a file on its disk and one in RAM; `loadvm s1`: both changes
are gone and the guest's counter goes on from where it was at `savevm`. After the VMM exits,
`qemu-img snapshot -l` lists the snapshot with a VM SIZE and `qemu-img check` is clean; `delvm`
removed the other one. A disk-only snapshot (made with qemu-img) is refused by `loadvm` in QEMU's
words.

Skipped with TESTBOX_L2=qemu (QEMU's own savevm is not what is under test).
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

import box as tb
from test_control import connect
from test_snapshot import (COUNT_RE, boot_to_shell, disconnect, numbers, qmp_run,
                           wait_number_at_least)

QMP = ["--qmp", "tcp:0.0.0.0:4444"]
COUNTER = ("(n=0; while [ ! -e /tmp/stop ]; do n=$((n+1)); echo COUNT $n; sleep 0.3; done; "
           "echo COUNT-END $n) &")

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="our vmm's savevm")


async def hmp(qmp, line: str) -> str:
    return await qmp.execute("human-monitor-command", {"command-line": line})


@tb.retry_on_flake
def test_savevm_loadvm_delvm(box, vms, up_regex):
    img = "/tmp/savevm.qcow2"
    box.check(f"rm -f {img}; qemu-img create -q -f qcow2 {img} 64M")
    cfg = tb.default_config()
    cfg["disks"] = [{"id": "data", "path": img, "format": "qcow2"}]
    a = vms.start(cfg, QMP)
    boot_to_shell(a, up_regex)
    out = a.guest_cmd("mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && "
                      "echo before > /mnt/keep && sync && echo MOUNTED", timeout=120)
    assert "MOUNTED" in out, out
    a.send(COUNTER)
    wait_number_at_least(a, 5)
    port = box.host_port("qmp")

    async def save(qmp):
        with qmp.listener() as listener:
            assert await hmp(qmp, "savevm s1") == ""
            at_save = max(numbers(a))
            info = await hmp(qmp, "info snapshots")
            assert re.search(r"\bs1\b", info), info
            status = await qmp.execute("query-status")
            assert status["status"] == "running", status
            names = []
            while True:   # STOP then RESUME, as QEMU's savevm
                try:
                    ev = await asyncio.wait_for(listener.get(), 0.5)
                except asyncio.TimeoutError:
                    break
                names.append(ev["event"])
            assert names[:2] == ["STOP", "RESUME"], names
            return at_save, info
    at_save, info = qmp_run(connect_and(port, save), 300)
    tb.log(f"savevm s1 at COUNT {at_save}:\n{info}")

    # The guest changes its disk and its RAM after the snapshot.
    out = a.guest_cmd("echo after > /mnt/new && sync && echo ram > /tmp/ramfile && echo CHANGED")
    assert "CHANGED" in out, out
    wait_number_at_least(a, at_save + 8)
    mark = len(a.log())

    async def load(qmp):
        assert await hmp(qmp, "loadvm s1") == ""
        status = await qmp.execute("query-status")
        assert status["status"] == "running", status
    qmp_run(connect_and(port, load), 300)
    deadline = time.monotonic() + 120
    while True:
        after = [int(n) for n in re.findall(COUNT_RE, a.log()[mark:])]
        if len(after) >= 3:
            break
        assert time.monotonic() < deadline, f"no counter after loadvm: {a.log()[mark:][-500:]}"
        time.sleep(0.5)
    assert at_save - 1 <= after[0] <= at_save + 2, (
        f"after loadvm the counter goes on from {after[0]}, it was {at_save} at savevm")
    out = a.guest_cmd("ls /mnt; cat /mnt/keep; ls /tmp/ramfile 2>&1; echo LISTED", timeout=120)
    assert "before" in out and "new" not in out.split("before")[0], out
    assert "No such file" in out, f"the RAM change survived loadvm: {out}"

    # A QMP job: snapshot-save s2, with its events and query-jobs; then delvm s1.
    async def job(qmp):
        with qmp.listener() as listener:
            assert (await qmp.execute("snapshot-save", {
                "job-id": "save-s2", "tag": "s2", "vmstate": "data", "devices": ["data"]})) == {}
            statuses = []
            while "concluded" not in statuses:
                ev = await asyncio.wait_for(listener.get(), 300)
                if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == "save-s2":
                    statuses.append(ev["data"]["status"])
        jobs = await qmp.execute("query-jobs")
        mine = [j for j in jobs if j["id"] == "save-s2"]
        assert mine and mine[0]["status"] == "concluded" and "error" not in mine[0], jobs
        assert (await qmp.execute("job-dismiss", {"id": "save-s2"})) == {}
        assert await hmp(qmp, "delvm s1") == ""
        return statuses, await hmp(qmp, "info snapshots")
    statuses, info = qmp_run(connect_and(port, job), 400)
    assert statuses[:2] == ["created", "running"] and statuses[-1] == "concluded", statuses
    assert re.search(r"\bs2\b", info) and not re.search(r"\bs1\b", info), info

    a.send("touch /tmp/stop")
    a.wait_for(r"COUNT-END \d+", 60)
    out = a.guest_cmd("umount /mnt && echo UNMOUNTED", timeout=120)
    assert "UNMOUNTED" in out, out
    a.send("poweroff")
    assert a.wait_exit(120) == 0

    listing = box.check(f"qemu-img snapshot -l {img}")
    row = [ln for ln in listing.splitlines() if re.search(r"\bs2\b", ln)]
    assert row and not re.search(r"\bs1\b", listing), listing
    size = re.search(r"\bs2\s+(\S+ \S+|\S+)", row[0])
    assert size and not size.group(1).startswith("0 B"), f"VM SIZE of s2: {row[0]!r}"
    rc, out = box.run(f"qemu-img check {img}")
    assert rc == 0 and "No errors" in out, out

    # A disk-only snapshot: loadvm refuses it in QEMU's words, and the VM goes on.
    box.check(f"qemu-img snapshot -c disk-only {img}")
    b = vms.start(cfg, QMP)
    boot_to_shell(b, up_regex)
    b.send(COUNTER.replace("/tmp/stop", "/tmp/stop2"))
    wait_number_at_least(b, 2)

    async def disk_only(qmp):
        return await hmp(qmp, "loadvm disk-only")
    out = qmp_run(connect_and(port, disk_only), 120)
    assert "disk-only snapshot" in out, out
    wait_number_at_least(b, max(numbers(b)) + 2)
    b.kill()
    box.run(f"rm -f {img}")


async def connect_and(port: int, fn):
    qmp = await connect(port)
    try:
        return await fn(qmp)
    finally:
        await disconnect(qmp)
