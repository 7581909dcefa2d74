"""virtio-net on a tap (issue 10), with Linux's virtio_net driver in the guest and L1's own
network stack on the other side: the tap joins a bridge in L1 through a QEMU-style ifup script;
ping both ways; 64 MiB each way over TCP (busybox httpd + wget) with matching checksums; the
offloads are live (the guest sends and receives GSO frames: the NIC's counters show frames far
larger than the MTU); the link goes down through QMP (`set_link`, driven by the real qemu.qmp
library) and comes back through `vmm ctl set-link`, and the guest sees NO-CARRIER in between; two
NICs on two bridges; the network works again after a guest reboot.
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
          on_reboot: str = "exit") -> tb.L2:
    cfg = tb.default_config(vcpus=vcpus, memory_mib=512, on_reboot=on_reboot)
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


@tb.retry_on_flake
def test_bridge_ping_transfer_offloads_and_link(box, vms, up_regex):
    bridges(box)
    vm = start(vms, [nic("net0", "tapn0", mac="52:54:00:12:34:56")],
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

    # Offloads: 64 MiB went each way in frames far larger than the 1514-byte wire frames.
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


@tb.retry_on_flake
def test_two_nics_and_a_reboot(box, vms, up_regex):
    bridges(box)
    vm = start(vms, [nic("lan", "tapr0"), nic("wan", "taprb1")], on_reboot="restart")
    boot_to_shell(vm, up_regex)
    macs = {}
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
        if boot == 1:
            macs = now
            listed = nics(box)
            assert [listed[i]["tap"] for i in ("lan", "wan")] == ["tapr0", "taprb1"], listed
            assert [listed[i]["mac"] for i in ("lan", "wan")] == [now["eth0"], now["eth1"]], listed
            vm.send("reboot")
            boot_to_shell(vm, up_regex, count=2)
        else:
            assert now == macs
    # Both taps stayed on their bridges across the reboot (opened once per VMM).
    assert "tapr0" in box.check("ls /sys/class/net/br0/brif") and "taprb1" in box.check("ls /sys/class/net/br1/brif")
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0
