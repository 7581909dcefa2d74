"""virtio-balloon (issue 12) with Linux's virtio_balloon driver in a 512 MiB guest, driven the
QEMU way (the real `qemu.qmp` library: `balloon`, `query-balloon`, BALLOON_CHANGE, QOM
`guest-stats` as libvirt reads it, HMP through `human-monitor-command`) and the REST way (`vmm
ctl balloon`).

One guest with deflate-on-oom: after it has touched all its memory, a 256 MiB target makes it
give the pages up, and the VMM's resident memory in L1 falls by at least 200 MiB; back at 512 MiB
it can use 400 MiB again; its statistics match its /proc/meminfo and refresh at the interval set;
with the target at 256 MiB it still gets 400 MiB when it needs them. Another guest with free
page reporting gives back what it freed without any target.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import box as tb
from test_boot import boot_to_shell
from test_control import connect

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="our vmm's balloon")

API = "/tmp/vmm-balloon-api.sock"
MIB = 1 << 20
PATH = "/machine/peripheral/balloon0"


def rss_mib(box: tb.Box, vm: tb.L2) -> float:
    out = box.check(f"grep VmRSS /proc/{vm.pid()}/status")
    return int(out.split()[1]) / 1024


def meminfo_kib(vm: tb.L2, field: str) -> int:
    out = vm.guest_cmd(f"grep '^{field}:' /proc/meminfo")
    m = re.search(rf"{field}:\s+(\d+)", out)
    assert m, out
    return int(m.group(1))


def touch(vm: tb.L2, mib: int, keep: bool = False) -> str:
    """Fills `mib` MiB of a tmpfs in the guest (then frees it unless `keep`); dd's status and its
    last line ("N+0 records out")."""
    rm = "" if keep else "; rm -f /fill/x"
    return vm.guest_cmd(f"mkdir -p /fill; grep -q ' /fill ' /proc/mounts || "
                        f"mount -t tmpfs -o size=480m f /fill; "
                        f"dd if=/dev/zero of=/fill/x bs=1M count={mib} 2>/tmp/dd.err; echo RC=$?; "
                        f"tail -n 1 /tmp/dd.err{rm}", timeout=600)


def balloon_json(box: tb.Box) -> dict:
    """GET /vm/balloon through `vmm ctl`."""
    return json.loads(box.check(f"vmm ctl --api-socket {API} balloon --json"))


def wait_for(pred, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@tb.retry_on_flake
def test_balloon_inflate_deflate_stats_and_oom(box, vms, up_regex):
    cfg = tb.default_config(vcpus=1, memory_mib=512)
    cfg["balloon"] = {"deflate_on_oom": True, "stats_interval_s": 0}
    vm = vms.start(cfg, ["--api-socket", API, "--qmp", "tcp:0.0.0.0:4444"])
    boot_to_shell(vm, up_regex)
    assert "virtio_balloon" in vm.guest_cmd("cat /proc/modules"), "the guest has no balloon driver"
    touch(vm, 400)   # every page of the guest has been used once
    before = rss_mib(box, vm)
    assert before > 400, before

    async def scenario() -> dict:
        qmp = await connect(box.host_port("qmp"))
        out: dict = {}
        with qmp.listener(("BALLOON_CHANGE",)) as listener:
            events: list[dict] = []

            async def collect():
                async for ev in listener:
                    events.append(ev["data"])
            collector = asyncio.create_task(collect())
            assert (await qmp.execute("query-balloon"))["actual"] == 512 * MIB
            await qmp.execute("balloon", {"value": 256 * MIB})
            deadline = time.monotonic() + 300
            while (await qmp.execute("query-balloon"))["actual"] > 260 * MIB:
                assert time.monotonic() < deadline, "the guest did not shrink to 256 MiB"
                await asyncio.sleep(1)
            await asyncio.sleep(1.5)   # the last BALLOON_CHANGE of a burst comes a second late
            out["events"] = list(events)
            out["rss_small"] = await asyncio.to_thread(rss_mib, box, vm)
            out["memtotal_small"] = await asyncio.to_thread(meminfo_kib, vm, "MemTotal")
            out["hmp_info"] = await qmp.execute("human-monitor-command",
                                                {"command-line": "info balloon"})
            # Back to all of it, through HMP (MiB).
            assert await qmp.execute("human-monitor-command",
                                     {"command-line": "balloon 512"}) == ""
            while (await qmp.execute("query-balloon"))["actual"] < 512 * MIB:
                assert time.monotonic() < deadline + 300, "the guest did not grow back"
                await asyncio.sleep(1)
            # Statistics the way libvirt reads them.
            peripherals = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
            assert {"name": "balloon0", "type": "child<virtio-balloon-pci>"} in peripherals
            props = [p["name"] for p in await qmp.execute("qom-list", {"path": PATH})]
            assert "guest-stats-polling-interval" in props and "guest-stats" in props
            await qmp.execute("qom-set", {"path": PATH, "property": "guest-stats-polling-interval",
                                          "value": 2})
            first = await qmp.execute("qom-get", {"path": PATH, "property": "guest-stats"})
            while first["last-update"] == 0:
                await asyncio.sleep(0.5)
                first = await qmp.execute("qom-get", {"path": PATH, "property": "guest-stats"})
            await asyncio.sleep(5)
            out["stats"] = await qmp.execute("qom-get", {"path": PATH, "property": "guest-stats"})
            out["stats_first"] = first
            collector.cancel()
        await qmp.disconnect()
        return out

    out = asyncio.run(scenario())
    assert out["events"] and out["events"][-1]["actual"] <= 260 * MIB, out["events"]
    assert before - out["rss_small"] >= 200, (before, out["rss_small"])
    # Without deflate-on-oom accounting the driver would lower MemTotal; with it, it does not.
    assert re.match(r"balloon: actual=25\d\r\n", out["hmp_info"]), out["hmp_info"]
    out_dd = touch(vm, 400)
    assert "RC=0" in out_dd and "400+0 records out" in out_dd, out_dd

    stats, first = out["stats"], out["stats_first"]
    assert stats["last-update"] > first["last-update"], (first, stats)
    memtotal = meminfo_kib(vm, "MemTotal") * 1024
    memfree = meminfo_kib(vm, "MemFree") * 1024
    assert abs(stats["stats"]["stat-total-memory"] - memtotal) <= 4 * MIB, (stats, memtotal)
    assert abs(stats["stats"]["stat-free-memory"] - memfree) <= 16 * MIB, (stats, memfree)
    # The same through REST.
    rest = balloon_json(box)
    assert rest["stats_interval_s"] == 2 and rest["actual_bytes"] == 512 * MIB, rest
    assert abs(rest["stats"]["stat-total-memory"] - memtotal) <= 4 * MIB, rest
    table = box.check(f"vmm ctl --api-socket {API} balloon")
    assert re.search(r"Actual\s+512 MiB", table), table
    # Without an agent, the metrics take the guest's memory from the balloon's statistics.
    metrics = json.loads(box.check(f"vmm ctl --api-socket {API} metrics --json"))
    used = (memtotal - meminfo_kib(vm, "MemAvailable") * 1024) / MIB
    assert metrics["memUsage"] is not None and abs(metrics["memUsage"] - used) <= 24, (metrics, used)
    assert "loadavg_5" in metrics["unavailable"], metrics

    # Deflate on OOM: at 256 MiB the guest still gets 400 MiB when it needs them.
    status, text = box.run(f"vmm ctl --api-socket {API} balloon 256")
    assert status == 0, text
    wait_for(lambda: balloon_json(box)["actual_bytes"] <= 260 * MIB, 300,
             "the guest to shrink again")
    out_dd = touch(vm, 400, keep=True)
    assert "RC=0" in out_dd and "400+0 records out" in out_dd, out_dd
    assert "oom-kill" not in vm.log()
    status, text = box.run(f"vmm ctl --api-socket {API} balloon 1000")
    assert status != 0 and "more than the VM's memory" in text, text
    vm.send("poweroff")
    assert vm.wait_exit(120) == 0


@tb.retry_on_flake
def test_free_page_reporting_gives_memory_back(box, vms, up_regex):
    cfg = tb.default_config(vcpus=1, memory_mib=512)
    cfg["balloon"] = {"free_page_reporting": True}
    vm = vms.start(cfg, ["--api-socket", API])
    boot_to_shell(vm, up_regex)
    assert "Free page reporting enabled" in vm.guest_cmd("dmesg | grep -i 'page reporting' ; echo"), \
        vm.guest_cmd("dmesg | grep -i balloon; echo")
    touch(vm, 300, keep=True)
    full = rss_mib(box, vm)
    vm.guest_cmd("rm -f /fill/x; echo FREED")
    t0 = time.monotonic()
    low = wait_for(lambda: (r := rss_mib(box, vm)) <= full - 200 and r, 60,
                   "the freed memory to come back to the host")
    took = time.monotonic() - t0
    info = balloon_json(box)
    assert info["counters"]["reported_bytes"] >= 200 * MIB, info
    assert info["actual_bytes"] == 512 * MIB, info
    print(f"free page reporting: RSS {full:.0f} -> {low:.0f} MiB in {took:.1f} s")
    vm.send("poweroff")
    assert vm.wait_exit(120) == 0
