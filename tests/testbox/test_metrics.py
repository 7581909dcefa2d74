"""Guest metrics and the typed agent operations (issue 11), with the real qemu-ga (Debian's
package) in the guest, through `vmm ctl` over the REST API and the real `qemu.qmp` library.

One guest (1 vCPU, a 128 MiB ext4 disk mounted at /mnt, the built-in agent, samples every second)
serves every check: an idle guest reads cpuUsage near 0 and a busy loop near 100; a 64 MiB write
raises diskWriteRate and diskWriteRequest as it should and the disk's counters by 64 MiB (also in
`query-blockstats` and `info blockstats`); 64 MiB put in a tmpfs raise memUsage by about 64;
diskUsage and diskPartition match the guest's `df`; `/metrics` parses with prometheus_client's
parser; with qemu-ga stopped, the guest's figures are null with a reason and the request still
answers within a second. Then the agent's typed operations: addresses, filesystems, OS, freeze and
thaw, the guest clock set to a given time and back to the host's, and a shutdown through the agent
that ends the VMM with 0.
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

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="our vmm's metrics")

API = "/tmp/vmm-metrics-api.sock"
IMG = "/tmp/metrics-fs.img"
MIB = 1 << 20


def ctl(box: tb.Box, *args: str, timeout: float = 60) -> str:
    return box.check(f"vmm ctl --api-socket {API} " + " ".join(args), timeout=timeout)


def metrics(box: tb.Box) -> tuple[dict, float]:
    """GET /vm/metrics through `vmm ctl`, and the seconds it took as L1 measures them."""
    out = box.check(f"read a _ < /proc/uptime; vmm ctl --api-socket {API} metrics --json "
                    f"> /tmp/m.json; rc=$?; read b _ < /proc/uptime; echo ELAPSED $a $b $rc; "
                    f"cat /tmp/m.json")
    m = re.search(r"ELAPSED (\S+) (\S+) (\d+)", out)
    assert m and m.group(3) == "0", out
    return json.loads(out[m.end():]), float(m.group(2)) - float(m.group(1))


def fresh_metrics(box: tb.Box) -> dict:
    """Metrics once the agent's figures are newer than everything done before (the poller asks
    every second while someone reads)."""
    metrics(box)
    time.sleep(2.5)
    return metrics(box)[0]


def partition(m: dict, mountpoint: str) -> dict:
    parts = [p for p in (m["diskPartition"] or []) if p["mountpoint"] == mountpoint]
    assert parts, m
    return parts[0]


@tb.retry_on_flake
def test_guest_metrics_and_agent_operations(box, vms, up_regex):
    box.check(f"rm -f {IMG}; truncate -s 128M {IMG} && /usr/bin/mke2fs -q -t ext4 -F {IMG}")
    cfg = tb.default_config(vcpus=1, memory_mib=256)
    cfg["disks"] = [{"id": "data", "path": IMG}]
    cfg["agent"] = True
    cfg["metrics"] = {"interval_s": 1}
    vm = vms.start(cfg, ["--api-socket", API, "--qmp", "tcp:0.0.0.0:4444"])
    boot_to_shell(vm, up_regex)
    assert "GUEST-AGENT-UP" in vm.log(), vm.log()[-2000:]
    vm.guest_cmd("mkdir -p /mnt && mount /dev/vda /mnt && dd if=/dev/zero of=/mnt/f bs=1M "
                 "count=8 2>/dev/null && sync && echo OK")

    # Idle, then a busy loop on the one vCPU: the host's view of the vCPU thread.
    idle = fresh_metrics(box)
    assert idle["cpuUsage"] is not None and idle["cpuUsage"] < 30, idle
    assert 0.5 <= idle["interval_s"] <= 2.0, idle
    vm.guest_cmd("(while :; do :; done) >/dev/null 2>&1 & echo $! > /tmp/busy; echo STARTED")
    time.sleep(3)
    busy, _ = metrics(box)
    vm.guest_cmd("kill $(cat /tmp/busy); echo KILLED")
    assert busy["cpuUsage"] > 80, busy

    # A 64 MiB write: the disk's counters grow by 64 MiB; the rates seen while it runs match it.
    before = metrics(box)[0]["disks"][0]["counters"]
    vm.send("(read a _ < /proc/uptime; dd if=/dev/zero of=/mnt/big bs=1M count=64 oflag=direct "
            "2>/dev/null; read b _ < /proc/uptime; echo DD-TIME $a $b) &")
    peak_rate = peak_req = 0.0
    deadline = time.monotonic() + 300
    done = None
    while done is None and time.monotonic() < deadline:
        m, _ = metrics(box)
        peak_rate = max(peak_rate, m["diskWriteRate"] or 0)
        peak_req = max(peak_req, m["diskWriteRequest"] or 0)
        done = re.search(r"DD-TIME ([\d.]+) ([\d.]+)", vm.log())
    assert done, "the guest's dd did not finish"
    took = float(done.group(2)) - float(done.group(1))
    m, _ = metrics(box)
    peak_rate = max(peak_rate, m["diskWriteRate"] or 0)
    peak_req = max(peak_req, m["diskWriteRequest"] or 0)
    after = m["disks"][0]["counters"]
    assert after["wr_bytes"] - before["wr_bytes"] >= 64 * MIB, (before, after)
    assert after["wr_operations"] - before["wr_operations"] >= 64, (before, after)
    # The rates cover 0.5 to 1.5 s windows, polled back to back while dd ran.
    expect_kb_s = 64 * 1024 / max(took, 1.5)
    assert peak_rate >= 0.3 * expect_kb_s, (peak_rate, took)
    assert peak_req >= 0.3 * 64 / max(took, 1.5), (peak_req, took)
    assert m["diskWriteDelay"] is None or m["diskWriteDelay"] > 0, m

    # 64 MiB in a tmpfs: memUsage grows by about 64 MB.
    vm.guest_cmd("sync; echo 3 > /proc/sys/vm/drop_caches; echo DROPPED")
    m0 = fresh_metrics(box)
    vm.guest_cmd("mkdir -p /fill && mount -t tmpfs -o size=100m fill /fill && "
                 "dd if=/dev/zero of=/fill/blob bs=1M count=64 2>/dev/null && echo FILLED")
    m1 = fresh_metrics(box)
    grew = m1["memUsage"] - m0["memUsage"]
    assert 44 <= grew <= 84, (m0["memUsage"], m1["memUsage"])
    assert 0 < m1["memUsageRate"] < 100 and m1["loadavg_5"] is not None, m1

    # diskUsage / diskPartition against the guest's df.
    df = vm.guest_cmd("df -k /mnt | tail -n 1").split()
    used_kb = int(df[2])
    p = partition(m1, "/mnt")
    assert abs(p["used_mb"] * 1024 - used_kb) <= 1024, (p, df)
    assert p["type"] == "ext4" and p["device"] == "vda", p
    assert m1["diskUsage"] >= p["used_mb"] - 0.01, m1

    # Prometheus' text format, read by the reference parser.
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(ctl(box, "metrics", "--prometheus") + "\n")}
    assert families["vmm_cpu_usage_percent"].type == "gauge"
    written = [s for s in families["vmm_disk_written_bytes"].samples if s.labels == {"disk": "data"}]
    assert written and written[0].value >= 72 * MIB, families["vmm_disk_written_bytes"]
    assert any(s.labels["mountpoint"] == "/mnt"
               for s in families["vmm_partition_used_megabytes"].samples)

    # The same counters through QMP, as QEMU shapes them.
    async def qmp_checks() -> tuple[list, str]:
        qmp = await connect(box.host_port("qmp"))
        stats = await qmp.execute("query-blockstats")
        text = await qmp.execute("human-monitor-command", {"command-line": "info blockstats"})
        await qmp.disconnect()
        return stats, text

    stats, text = asyncio.run(qmp_checks())
    assert stats[0]["device"] == "data" and stats[0]["stats"]["wr_bytes"] >= 72 * MIB, stats
    assert stats[0]["stats"]["wr_operations"] >= after["wr_operations"], stats
    assert re.match(r"data: rd_bytes=\d+ wr_bytes=\d+ rd_operations=\d+ wr_operations=\d+ ", text), text

    # qemu-ga stopped: the guest's figures are null with the reason, and the answer is quick.
    vm.guest_cmd("killall -STOP qemu-ga; echo STOPPED")
    time.sleep(2.5)
    for _ in range(2):
        m, took = metrics(box)
        assert took < 1.0, took
        assert m["memUsage"] is None and m["diskUsage"] is None, m
        assert "did not answer" in m["unavailable"]["memUsage"], m
        assert m["cpuUsage"] is not None, m
    vm.guest_cmd("killall -CONT qemu-ga; echo CONTINUED")

    # The typed agent operations.
    out = ctl(box, "domifaddr")
    assert re.search(r"lo\s+00:00:00:00:00:00\s+ipv4\s+127\.0\.0\.1/8", out), out
    out = ctl(box, "fsinfo")
    assert re.search(r"/mnt\s+vda\s+ext4", out), out
    out = ctl(box, "osinfo")
    assert "os.kernel_release" in out, out
    assert "Froze 1 filesystem(s)" in ctl(box, "fsfreeze")
    assert "Thawed 1 filesystem(s)" in ctl(box, "fsthaw")
    assert "Guest clock set to 2000000000000000000 ns" in ctl(box, "set-time", "--time-ns",
                                                           "2000000000000000000")
    guest_now = int(vm.guest_cmd("date +%s").strip())
    assert abs(guest_now - 2_000_000_000) < 30, guest_now
    ctl(box, "set-time")
    guest_now = int(vm.guest_cmd("date +%s").strip())
    host_now = int(box.check("date +%s").strip())
    assert abs(guest_now - host_now) < 30, (guest_now, host_now)
    ctl(box, "guest-shutdown")
    assert vm.wait_exit(120) == 0
