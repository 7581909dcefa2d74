"""virtio-net on a tap (issue 10), with Linux's virtio_net driver in the guest and L1's own
network stack on the other side: the tap joins a bridge in L1 through a QEMU-style ifup script;
ping both ways; 64 MiB each way over TCP (busybox httpd + wget) with matching checksums; the
offloads are live (the guest sends and receives GSO frames: the NIC's counters show frames far
larger than the MTU); the link goes down through QMP (`set_link`, driven by the real qemu.qmp
library) and comes back through `vmm ctl set-link`, and the guest sees NO-CARRIER in between; two
NICs on two bridges; the network works again after a guest reboot; two queue pairs on a
multiqueue tap both carry traffic; and a NIC survives a snapshot and a restore into a new VMM
process, which opens the tap again and runs the script, the guest's addresses intact (with
vhost-net too: its rings stop for the save, run again on the source, and start at the saved
positions in the new process); and a guest downloading over its NIC migrates live to another
process on its own tap, every download intact (vhost-net's dirty log in use).
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

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="our vmm's NICs")

IFUP = "/payload/tb/qemu-ifup.sh"
IFDOWN = "/payload/tb/qemu-ifdown.sh"
API = "/tmp/vmm-net-api.sock"
DATA_MIB = 64


def bridges(box: tb.Box) -> None:
    """br0 (10.0.3.1/24) and br1 (10.0.4.1/24) in L1, made once."""
    for br, ip in (("br0", "10.0.3.1"), ("br1", "10.0.4.1")):
        box.check(f"[ -e /sys/class/net/{br} ] || {{ brctl addbr {br} && ip addr add {ip}/24 dev {br} "
                  f"&& ip link set {br} up; }}")


def nic(nid: str, tap: str, **kw) -> dict:
    return {"id": nid, "tap": tap, "script": IFUP, "downscript": IFDOWN, **kw}


def start(vms, nics: list[dict], vcpus: int = 2, flags: list[str] | None = None,
          on_reboot: str = "exit", memory_mib: int = 512) -> tb.L2:
    cfg = tb.default_config(vcpus=vcpus, memory_mib=memory_mib, on_reboot=on_reboot)
    cfg["net"] = nics
    return vms.start(cfg, ["--api-socket", API] + (flags or []))


def guest_ip(vm: tb.L2, dev: str, ip: str) -> None:
    out = vm.guest_cmd(f"ip addr add {ip}/24 dev {dev} && ip link set {dev} up && echo IF-OK")
    assert "IF-OK" in out, out


def wait_carrier(vm: tb.L2, dev: str, want: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while True:
        got = vm.guest_cmd(f"cat /sys/class/net/{dev}/carrier 2>&1").strip()
        if got == want:
            return
        if time.monotonic() > end:
            raise AssertionError(f"{dev} carrier is {got!r}, expected {want!r}")
        time.sleep(1)


def ping_ok(out: str) -> bool:
    m = re.search(r"(\d+) packets transmitted, (\d+) (packets )?received", out)
    return bool(m) and int(m.group(2)) > 0


def guest_ping(vm: tb.L2, ip: str) -> str:
    return vm.guest_cmd(f"ping -c 3 -W 5 {ip} 2>&1", timeout=60)


def l1_ping(box: tb.Box, ip: str) -> str:
    return box.run(f"ping -c 3 -W 5 {ip} 2>&1", timeout=60)[1]


def nics(box: tb.Box) -> dict:
    status, out = box.run(f"vmm ctl --api-socket {API} info", timeout=60)
    assert status == 0, out
    return {n["id"]: n for n in json.loads(out[out.index("{"):])["nics"]}


def md5(text: str) -> str:
    m = re.search(r"\b([0-9a-f]{32})\b", text)
    assert m, f"no md5 in {text!r}"
    return m.group(1)


def tap_stats(box: tb.Box, tap: str) -> dict[str, int]:
    """The tap's own counters in L1 (its rx is what the guest sent): they see vhost-net's
    traffic too, which never passes through our process."""
    out = box.check(f"cd /sys/class/net/{tap}/statistics && for f in rx_bytes rx_packets tx_bytes "
                    f"tx_packets; do echo $f $(cat $f); done")
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


@pytest.mark.parametrize("vhost", [False, True], ids=["userspace", "vhost"])
@tb.retry_on_flake
def test_bridge_ping_transfer_offloads_and_link(box, vms, up_regex, vhost):
    bridges(box)
    vm = start(vms, [nic("net0", "tapn0", mac="52:54:00:12:34:56", vhost=vhost)],
               flags=["--qmp", "tcp:0.0.0.0:4444"])
    boot_to_shell(vm, up_regex)
    # The script put the tap on the bridge; the guest sees the MAC we gave.
    assert "tapn0" in box.check("ls /sys/class/net/br0/brif")
    assert vm.guest_cmd("cat /sys/class/net/eth0/address").strip() == "52:54:00:12:34:56"
    guest_ip(vm, "eth0", "10.0.3.2")
    wait_carrier(vm, "eth0", "1")
    out = guest_ping(vm, "10.0.3.1")
    assert ping_ok(out), out
    out = l1_ping(box, "10.0.3.2")
    assert ping_ok(out), out

    # 64 MiB host -> guest, then the same bytes guest -> host; checksums match at each end.
    want = md5(box.check(f"mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/data bs=1M "
                         f"count={DATA_MIB} 2>/dev/null && md5sum /tmp/www/data", timeout=300))
    box.check("(httpd -p 8080 -h /tmp/www &) ; sleep 1")
    before = nics(box)["net0"]["counters"]
    tap_before = tap_stats(box, "tapn0")
    out = vm.guest_cmd("wget -q -O /tmp/data http://10.0.3.1:8080/data && md5sum /tmp/data",
                       timeout=600)
    assert md5(out) == want, out
    out = vm.guest_cmd("mkdir -p /tmp/www && mv /tmp/data /tmp/www/back && "
                       "(httpd -p 8080 -h /tmp/www &) ; sleep 1; echo SERVING")
    assert "SERVING" in out, out
    out = box.check("wget -q -O /tmp/back http://10.0.3.2:8080/back && md5sum /tmp/back && "
                    "rm -f /tmp/back", timeout=600)
    assert md5(out) == want, out
    after = nics(box)["net0"]["counters"]
    tap_after = tap_stats(box, "tapn0")

    # Offloads: 64 MiB went each way through the tap in frames far larger than the 1514-byte
    # wire frames (the tap counts what vhost-net moves as well as what we move).
    for way in ("rx", "tx"):
        nbytes = tap_after[f"{way}_bytes"] - tap_before[f"{way}_bytes"]
        frames = tap_after[f"{way}_packets"] - tap_before[f"{way}_packets"]
        assert nbytes >= DATA_MIB << 20, (way, tap_before, tap_after)
        assert nbytes / frames > 3000, f"tap {way}: {frames} frames for {nbytes} bytes: no GSO"
    if vhost:
        # Not one frame passed through our process.
        moved = {k: after[k] - before[k] for k in ("rx_packets", "tx_packets")}
        assert moved == {"rx_packets": 0, "tx_packets": 0}, moved
        assert nics(box)["net0"]["vhost"] is True
    else:
        for way in ("rx", "tx"):
            nbytes = after[f"{way}_bytes"] - before[f"{way}_bytes"]
            frames = after[f"{way}_packets"] - before[f"{way}_packets"]
            assert nbytes >= DATA_MIB << 20, (way, before, after)
            assert nbytes / frames > 3000, f"{way}: {frames} frames for {nbytes} bytes: no GSO"
    assert after["rx_errors"] == 0 and after["tx_errors"] == 0, after

    # Link down through QMP (qemu.qmp), up again through vmm ctl.
    async def link_down() -> None:
        qmp = await connect(box.host_port("qmp"))
        try:
            await qmp.execute("set_link", {"name": "net0", "up": False})
            with pytest.raises(Exception, match="Device 'nope' not found"):
                await qmp.execute("set_link", {"name": "nope", "up": False})
            hmp = await qmp.execute("human-monitor-command", {"command-line": "info network"})
            assert "net0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56" in hmp, hmp
            assert "link=down" in hmp and "ifname=tapn0" in hmp, hmp
        finally:
            await qmp.disconnect()

    asyncio.run(link_down())
    wait_carrier(vm, "eth0", "0")
    assert "NO-CARRIER" in vm.guest_cmd("ip link show eth0")
    assert not ping_ok(guest_ping(vm, "10.0.3.1"))
    assert nics(box)["net0"]["link_up"] is False
    status, out = box.run(f"vmm ctl --api-socket {API} set-link net0 on")
    assert status == 0, out
    wait_carrier(vm, "eth0", "1")
    out = guest_ping(vm, "10.0.3.1")
    assert ping_ok(out), out
    status, out = box.run(f"vmm ctl --api-socket {API} set-link nope on")
    assert status != 0 and "not found" in out, out

    vm.send("poweroff")
    assert vm.wait_exit(60) == 0
    # The downscript took the tap off the bridge; the tap we created is gone.
    assert "tapn0" not in box.check("ls /sys/class/net/br0/brif")
    assert box.run("[ -e /sys/class/net/tapn0 ]")[0] != 0
    box.run("killall httpd; rm -rf /tmp/www")


def vmm_fds_and_vhost_threads(box: tb.Box, vm: tb.L2) -> tuple[int, int]:
    """The VMM's open fds, and the vhost worker threads in L1 (named vhost-TID after the thread
    that set the owner: one of the VMM's; no other process in L1 uses vhost here)."""
    pid = box.check(f"cat {vm.dir}/pid").strip()
    fds = int(box.check(f"ls /proc/{pid}/fd | wc -l").strip())
    threads = int(box.check("ps | grep -c '[v]host-' || true").strip() or 0)
    return fds, threads


@pytest.mark.parametrize("vhost", [False, True], ids=["userspace", "vhost"])
@tb.retry_on_flake
def test_two_nics_and_a_reboot(box, vms, up_regex, vhost):
    bridges(box)
    vm = start(vms, [nic("lan", "tapr0", vhost=vhost), nic("wan", "taprb1", vhost=vhost)],
               on_reboot="restart")
    boot_to_shell(vm, up_regex)
    macs = {}
    resources = []
    for boot in (1, 2):
        guest_ip(vm, "eth0", "10.0.3.2")
        guest_ip(vm, "eth1", "10.0.4.2")
        for ip in ("10.0.3.1", "10.0.4.1"):
            out = guest_ping(vm, ip)
            assert ping_ok(out), (boot, ip, out)
        for ip in ("10.0.3.2", "10.0.4.2"):
            assert ping_ok(l1_ping(box, ip)), (boot, ip)
        # Generated MACs: under 52:54:00, distinct, the same after the reboot.
        now = {d: vm.guest_cmd(f"cat /sys/class/net/{d}/address").strip() for d in ("eth0", "eth1")}
        assert all(m.startswith("52:54:00:") for m in now.values()) and len(set(now.values())) == 2, now
        resources.append(vmm_fds_and_vhost_threads(box, vm))
        if boot == 1:
            macs = now
            listed = nics(box)
            assert [listed[i]["tap"] for i in ("lan", "wan")] == ["tapr0", "taprb1"], listed
            assert [listed[i]["mac"] for i in ("lan", "wan")] == [now["eth0"], now["eth1"]], listed
            vm.send("reboot")
            boot_to_shell(vm, up_regex, count=2)
        else:
            assert now == macs
    # The reboot left nothing behind: the same fds, and with vhost as many workers as before.
    assert resources[0] == resources[1], resources
    assert (resources[0][1] > 0) == vhost, resources
    # Both taps stayed on their bridges across the reboot (opened once per VMM).
    assert "tapr0" in box.check("ls /sys/class/net/br0/brif") and "taprb1" in box.check("ls /sys/class/net/br1/brif")
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0


def queue_interrupts(vm: tb.L2) -> dict[str, int]:
    """Interrupts per virtio-net queue vector in the guest (virtioN-input.Q / -output.Q), summed
    over the CPUs."""
    out = vm.guest_cmd("grep -E 'virtio[0-9]+-(input|output)' /proc/interrupts")
    counts = {}
    for line in out.splitlines():
        m = re.search(r"virtio\d+-((input|output)\.\d+)", line)
        if m:
            fields = line.split()
            counts[m.group(1)] = sum(int(f) for f in fields[1:] if f.isdigit())
    return counts


@pytest.mark.parametrize("vhost", [False, True], ids=["userspace", "vhost"])
@tb.retry_on_flake
def test_two_queue_pairs_both_carry_traffic(box, vms, up_regex, vhost):
    bridges(box)
    vm = start(vms, [nic("mq", "tapq0", queues=2, vhost=vhost)], vcpus=2)
    boot_to_shell(vm, up_regex)
    guest_ip(vm, "eth0", "10.0.3.2")
    wait_carrier(vm, "eth0", "1")
    assert ping_ok(guest_ping(vm, "10.0.3.1"))
    # The guest's driver asked for both pairs (VQ_PAIRS_SET): the tap has two queues attached.
    assert box.check("ls /sys/class/net/tapq0/queues | sort | tr '\\n' ' '").split() == \
        ["rx-0", "rx-1", "tx-0", "tx-1"]
    before = queue_interrupts(vm)
    assert set(before) >= {"input.0", "input.1", "output.0", "output.1"}, before
    box.check("mkdir -p /tmp/wwwq && dd if=/dev/urandom of=/tmp/wwwq/d bs=1M count=4 2>/dev/null && "
              "(httpd -p 8081 -h /tmp/wwwq &); sleep 1", timeout=120)
    # Many flows, from both guest CPUs: the tap spreads them by flow hash, and each CPU sends
    # on its own queue.
    out = vm.guest_cmd("for i in 1 2 3 4 5 6 7 8; do (taskset -c $((i % 2)) wget -q -O /dev/null "
                       "http://10.0.3.1:8081/d || echo WGET-FAIL) & done; wait; echo FLOWS-DONE",
                       timeout=600)
    assert "FLOWS-DONE" in out and "WGET-FAIL" not in out, out
    after = queue_interrupts(vm)
    moved = {q: after[q] - before.get(q, 0) for q in after}
    assert moved["input.0"] > 0 and moved["input.1"] > 0, moved
    box.run("killall httpd; rm -rf /tmp/wwwq")
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0


@pytest.mark.parametrize("vhost", [False, True], ids=["userspace", "vhost"])
@tb.retry_on_flake
def test_network_survives_snapshot_and_restore(box, vms, up_regex, vhost):
    bridges(box)
    state = "/tmp/net-snap.state"
    box.check(f"rm -f {state}")
    vm = start(vms, [nic("net0", "taps0", vhost=vhost)], memory_mib=256)
    boot_to_shell(vm, up_regex)
    guest_ip(vm, "eth0", "10.0.3.2")
    wait_carrier(vm, "eth0", "1")
    assert ping_ok(guest_ping(vm, "10.0.3.1"))
    mac = vm.guest_cmd("cat /sys/class/net/eth0/address").strip()
    status, out = box.run(f"vmm ctl --api-socket {API} snapshot {state}", timeout=600)
    assert status == 0, out
    if vhost:
        # vhost-net stopped its rings for the save and runs them again: the source goes on
        # (the snapshot leaves the VM paused, as QEMU's migrate does) with no frame through us.
        status, out = box.run(f"vmm ctl --api-socket {API} resume", timeout=60)
        assert status == 0, out
        before = nics(box)["net0"]["counters"]
        assert ping_ok(guest_ping(vm, "10.0.3.1"))
        assert nics(box)["net0"]["counters"]["rx_packets"] == before["rx_packets"]
    status, out = box.run(f"vmm ctl --api-socket {API} shutdown", timeout=60)
    assert status == 0, out
    assert vm.wait_exit(60) == 0
    assert box.run("[ -e /sys/class/net/taps0 ]")[0] != 0, "the source's tap outlived it"

    # A new process: the tap is made again, the script puts it on the bridge, and the guest
    # goes on with its address (and announces itself: GUEST_ANNOUNCE).
    r = vms.start(argv=["vmm", "--incoming", f"file:{state}", "--api-socket", API])
    end = time.monotonic() + 300
    while box.run("ls /sys/class/net/br0/brif 2>/dev/null | grep -q taps0")[0] != 0:
        assert r.exited() is None, r.stderr()
        assert time.monotonic() < end, "the restored VMM did not bring its tap up"
        time.sleep(1)
    r.wait_shell(300)
    assert r.guest_cmd("cat /sys/class/net/eth0/address").strip() == mac
    assert "10.0.3.2" in r.guest_cmd("ip addr show eth0")
    assert ping_ok(l1_ping(box, "10.0.3.2"))
    assert ping_ok(guest_ping(r, "10.0.3.1"))
    assert nics(box)["net0"]["vhost"] is vhost
    r.send("poweroff")
    assert r.wait_exit(60) == 0
    box.run(f"rm -f {state}")


NETLOOP = ("(i=0; while [ ! -e /tmp/stopnet ]; do wget -q -O /tmp/b http://10.0.3.1:8081/blob "
           "&& md5sum /tmp/b | sed 's/^/GOT /'; rm -f /tmp/b; i=$((i+1)); done; "
           "echo NETLOOP-END $i) &")


@pytest.mark.parametrize("vhost", [False, True], ids=["userspace", "vhost"])
@tb.retry_on_flake
def test_network_survives_live_migration(box, vms, up_regex, vhost):
    """A guest downloading over its NIC, again and again, moves to another vmm process in the
    same L1. The destination takes its own tap on the same bridge (`--net`, as QEMU's
    destination takes its own -netdev), and every download, before, across and after the
    switchover, has the right checksum: the frames our device (userspace) or the kernel
    (vhost-net, through its dirty log) wrote into guest memory while it was being sent all
    arrived."""
    bridges(box)
    sock, api2 = "/tmp/mig-net.sock", "/tmp/vmm-net-api2.sock"
    want = md5(box.check(f"rm -f {sock} {api2}; mkdir -p /tmp/www && dd if=/dev/urandom "
                         f"of=/tmp/www/blob bs=1M count=16 2>/dev/null && md5sum /tmp/www/blob"))
    # Started once per L1 (the next run finds it serving the new blob).
    box.check("busybox httpd -p 8081 -h /tmp/www 2>/dev/null; echo SERVING")
    a = start(vms, [nic("net0", "tapm0", vhost=vhost)], memory_mib=256)
    boot_to_shell(a, up_regex)
    guest_ip(a, "eth0", "10.0.3.2")
    wait_carrier(a, "eth0", "1")
    a.send(NETLOOP)
    a.wait_for(r"^GOT [0-9a-f]{32}", 120, count=2)

    backend = f"id=net0,tap=tapm1,vhost={'on' if vhost else 'off'},script={IFUP},downscript={IFDOWN}"
    b = vms.start(argv=["vmm", "--incoming", f"unix:{sock}", "--api-socket", api2,
                        "--net", backend])
    box.check(f"i=0; while [ ! -S {sock} ] && [ $i -lt 600 ]; do usleep 100000; i=$((i+1)); done; "
              f"[ -S {sock} ]")
    status, out = box.run(f"vmm ctl --api-socket {API} migrate unix:{sock} --wait", timeout=600)
    assert status == 0, out
    # The source is done (postmigrate) and goes on `quit`; its tap goes with it.
    status, out = box.run(f"vmm ctl --api-socket {API} shutdown", timeout=60)
    assert status == 0, out
    assert a.wait_exit(60) == 0
    assert box.run("[ -e /sys/class/net/tapm0 ]")[0] != 0, "the source's tap outlived it"
    assert "tapm1" in box.check("ls /sys/class/net/br0/brif")

    # Downloads go on at the destination; then the loop stops and every checksum is compared.
    got_before = len(re.findall(r"^GOT ", b.log(), re.M))
    b.wait_for(r"^GOT [0-9a-f]{32}", 180, count=got_before + 2)
    b.send("touch /tmp/stopnet")
    b.wait_for(r"NETLOOP-END \d+", 180)
    sums = re.findall(r"^GOT ([0-9a-f]{32})", a.log() + b.log(), re.M)
    tb.log(f"live migration with a {'vhost' if vhost else 'userspace'} NIC: {len(sums)} downloads")
    assert sums and all(x == want for x in sums), (want, sums)
    status, out = box.run(f"vmm ctl --api-socket {api2} info", timeout=60)
    assert status == 0, out
    info = json.loads(out[out.index("{"):])["nics"][0]
    assert (info["id"], info["tap"], info["vhost"]) == ("net0", "tapm1", vhost), info
    assert ping_ok(l1_ping(box, "10.0.3.2"))
    b.send("poweroff")
    assert b.wait_exit(60) == 0
    box.run(f"rm -f /tmp/www/blob {sock}")


def l1_seconds(box: tb.Box) -> float:
    return float(box.check("cut -d' ' -f1 /proc/uptime").strip())


def timed_pull(box: tb.Box, url: str) -> float:
    """Seconds L1 takes to fetch `url` (from the guest's httpd), measured inside L1."""
    out = box.check(f"a=$(cut -d' ' -f1 /proc/uptime); wget -q -O /dev/null {url} && "
                    f"b=$(cut -d' ' -f1 /proc/uptime); echo PULL $a $b", timeout=600)
    m = re.search(r"PULL ([\d.]+) ([\d.]+)", out)
    assert m, out
    return float(m.group(2)) - float(m.group(1))


@tb.retry_on_flake
def test_rate_limiter_holds_the_rate_and_changes_at_run_time(box, vms, up_regex):
    """tx at 10 MB/s from the config (a 1 s bucket, so the first 10 MB go at once): a 40 MB
    pull from the guest takes (40 - 10) / 10 = 3 s, within 20%; then the limit is lifted at run
    time through the API and the same pull is faster than the limit allowed."""
    rate = 10_000_000
    size_mb = 40
    bridges(box)
    limit = {"bandwidth": {"size": rate, "refill_time": 1000}}
    vm = start(vms, [nic("rl", "tapl0", tx_rate_limiter=limit)], memory_mib=512)
    boot_to_shell(vm, up_regex)
    guest_ip(vm, "eth0", "10.0.3.2")
    wait_carrier(vm, "eth0", "1")
    out = vm.guest_cmd(f"mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/z bs=1M count={size_mb} "
                       f"2>/dev/null && (httpd -p 8080 -h /tmp/www &) ; sleep 1; echo SERVING")
    assert "SERVING" in out
    assert nics(box)["rl"]["tx_rate_limiter"] == {"bandwidth": {"size": rate, "one_time_burst": 0,
                                                                "refill_time": 1000}, "ops": None}
    limited = timed_pull(box, "http://10.0.3.2:8080/z")
    expect = (size_mb * 1_000_000 * 1.048576 - rate) / rate   # MiB of data, 10 MB bucket at once
    tb.log(f"rate limiter: {size_mb} MiB at {rate / 1e6:.0f} MB/s took {limited:.2f}s "
           f"(expected {expect:.2f}s)")
    assert abs(limited - expect) <= 0.2 * expect, (limited, expect)

    status, out = box.run(f"vmm ctl --api-socket {API} rate-limit rl --tx-bps 0")
    assert status == 0, out
    assert nics(box)["rl"]["tx_rate_limiter"] == {"bandwidth": None, "ops": None}
    free = timed_pull(box, "http://10.0.3.2:8080/z")
    tb.log(f"rate limiter lifted: the same pull took {free:.2f}s")
    assert free < 0.7 * limited, (free, limited)
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0
