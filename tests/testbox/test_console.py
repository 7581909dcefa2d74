"""virtio-console (issue 11) with Linux's virtio_console driver and the real qemu-ga (Debian's
package) in the guest. A channel `org.qemu.guest_agent.0` on a unix socket in L1 is joined to a
forwarded TCP port by socat, and this file speaks the agent protocol to it the way libvirt does
(0xFF + guest-sync-delimited on every new session): ping, info, interfaces, the filesystems with a
mounted ext4 disk, a file the guest wrote, guest-exec, fsfreeze/thaw, a reconnect, and
guest-shutdown ending the VMM with 0. The same through the VMM's own agent client (`"agent":
true`, `vmm ctl agent` over the REST API), with a stopped agent costing its timeout. A second channel carries 16 MiB each way with matching
checksums while the host reads slowly (backpressure: nothing lost), and the guest opening and
closing it is seen as VSERPORT_CHANGE through the real qemu.qmp library. And a shell on hvc0, with
the guest's console on virtio.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import socket
import threading
import time

import pytest
import box as tb
from test_boot import boot_to_shell
from test_control import connect

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="our vmm's virtio-console")

QGA_SOCK = "/tmp/qga.sock"
DATA_SOCK = "/tmp/data.sock"
DATA_NAME = "org.test.data"
BLOB = 16 << 20


def forward(box: tb.Box, l1_port: int, sock: str) -> None:
    """socat in L1: each TCP connection on l1_port becomes a connection to the unix socket."""
    box.check(f"pkill -f 'TCP-LISTEN:{l1_port}' 2>/dev/null; "
              f"(socat TCP-LISTEN:{l1_port},reuseaddr,fork UNIX-CONNECT:{sock} "
              f"</dev/null >/dev/null 2>&1 &) ; sleep 0.2")


class Agent:
    """A qemu-ga client as libvirt's: one command at a time, resynchronised with the 0xFF
    sentinel and guest-sync-delimited at the start of every session."""

    def __init__(self, port: int, timeout: float = 60):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.sync()

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the agent channel closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def sync(self) -> None:
        token = random.randint(1, 2**31 - 1)
        msg = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        self.sock.sendall(b"\xff" + json.dumps(msg).encode() + b"\n")
        # Everything up to the agent's own 0xFF is stale (a previous session's replies).
        while b"\xff" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the agent channel closed during the sync")
            self.buf += chunk
        self.buf = self.buf[self.buf.index(b"\xff") + 1:]
        while True:
            reply = json.loads(self._line())
            if reply.get("return") == token:
                return

    def cmd(self, name: str, args: dict | None = None):
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        reply = json.loads(self._line())
        assert "return" in reply, f"{name}: {reply}"
        return reply["return"]

    def close(self) -> None:
        self.sock.close()


def port_dev(vm: tb.L2, name: str) -> str:
    path = f"/dev/virtio-ports/{name}"
    out = vm.guest_cmd(f"readlink -f {path}").strip()
    assert out.startswith("/dev/vport"), f"{path} -> {out!r}"
    return path


@tb.retry_on_flake
def test_guest_agent_and_a_data_channel(box, vms, up_regex):
    img = "/tmp/qga-fs.img"
    box.check(f"rm -f {img} {QGA_SOCK} {DATA_SOCK}; truncate -s 64M {img} && "
              f"/usr/bin/mke2fs -q -t ext4 -F {img}")  # e2fsprogs, not busybox
    cfg = tb.default_config(memory_mib=512)
    cfg["disks"] = [{"id": "fs", "path": img}]
    cfg["channels"] = [
        {"id": "qga", "name": "org.qemu.guest_agent.0", "socket": QGA_SOCK},
        {"id": "data", "name": DATA_NAME, "socket": DATA_SOCK},
    ]
    vm = vms.start(cfg, ["--qmp", "tcp:0.0.0.0:4444"])
    boot_to_shell(vm, up_regex)
    assert "GUEST-AGENT-UP /dev/virtio-ports/org.qemu.guest_agent.0" in vm.log(), vm.log()[-2000:]
    assert box.check(f"stat -c %a {QGA_SOCK}").strip() == "600"
    data = port_dev(vm, DATA_NAME)
    vm.guest_cmd("mkdir -p /mnt && mount /dev/vda /mnt && dd if=/dev/zero of=/mnt/f bs=1M count=8 "
                 "2>/dev/null && sync && echo hello-from-the-guest > /tmp/hello && echo OK")
    forward(box, 4445, QGA_SOCK)
    forward(box, 4447, DATA_SOCK)

    async def scenario() -> list[dict]:
        qmp = await connect(box.host_port("qmp"))
        events: list[dict] = []
        with qmp.listener(("VSERPORT_CHANGE",)) as listener:
            async def collect():
                async for ev in listener:
                    events.append(ev["data"])
            collector = asyncio.create_task(collect())
            await asyncio.to_thread(agent_checks, box, vm)
            await asyncio.to_thread(data_checks, box, vm, data)
            deadline = time.monotonic() + 30
            while len(events) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            collector.cancel()
        await qmp.disconnect()
        return events

    events = asyncio.run(scenario())
    # The guest opened and closed the data port twice (one cat each way).
    assert [e for e in events if e["id"] == "data"] == [
        {"id": "data", "open": True}, {"id": "data", "open": False},
        {"id": "data", "open": True}, {"id": "data", "open": False}], events

    # guest-shutdown: the guest powers off and the VMM ends with 0.
    agent = Agent(box.host_port("agent"))
    agent.sock.sendall(b'{"execute": "guest-shutdown"}\n')
    assert vm.wait_exit(120) == 0
    agent.close()


def agent_checks(box: tb.Box, vm: tb.L2) -> None:
    agent = Agent(box.host_port("agent"))
    assert agent.cmd("guest-ping") == {}
    info = agent.cmd("guest-info")
    assert info["version"] and any(c["name"] == "guest-exec" for c in info["supported_commands"])
    ifaces = agent.cmd("guest-network-get-interfaces")
    assert any(i["name"] == "lo" for i in ifaces), ifaces
    fs = agent.cmd("guest-get-fsinfo")
    mnt = [f for f in fs if f["mountpoint"] == "/mnt"]
    assert mnt and mnt[0]["type"] == "ext4", fs
    assert mnt[0]["used-bytes"] >= 8 << 20 and mnt[0]["total-bytes"] >= 50 << 20, mnt
    h = agent.cmd("guest-file-open", {"path": "/tmp/hello", "mode": "r"})
    got = agent.cmd("guest-file-read", {"handle": h, "count": 4096})
    agent.cmd("guest-file-close", {"handle": h})
    assert base64.b64decode(got["buf-b64"]) == b"hello-from-the-guest\n"
    pid = agent.cmd("guest-exec", {"path": "/bin/uname", "arg": ["-a"], "capture-output": True})["pid"]
    deadline = time.monotonic() + 30
    while True:
        st = agent.cmd("guest-exec-status", {"pid": pid})
        if st["exited"]:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    assert st["exitcode"] == 0 and b"Linux guest" in base64.b64decode(st["out-data"]), st
    assert agent.cmd("guest-fsfreeze-freeze") >= 1
    assert agent.cmd("guest-fsfreeze-status") == "frozen"
    assert agent.cmd("guest-fsfreeze-thaw") >= 1
    assert agent.cmd("guest-fsfreeze-status") == "thawed"
    # Disconnect and reconnect: a new session resynchronises and goes on.
    agent.close()
    agent = Agent(box.host_port("agent"))
    assert agent.cmd("guest-ping") == {}
    agent.close()


def data_checks(box: tb.Box, vm: tb.L2, dev: str) -> None:
    # Guest to host: 16 MiB through a host reader slower than the guest writes.
    want = vm.guest_cmd(f"dd if=/dev/urandom of=/tmp/blob bs=1M count={BLOB >> 20} 2>/dev/null; "
                        f"md5sum /tmp/blob").split()[0]
    peer = socket.create_connection(("127.0.0.1", box.host_port("chan")), timeout=120)
    # The markers are split by quotes so that the echoed command line never matches.
    vm.send(f"(cat /tmp/blob > {dev}; echo CAT-OUT''-DONE) &")
    got = hashlib.md5()
    n = 0
    while n < BLOB:
        chunk = peer.recv(min(32 << 10, BLOB - n))
        assert chunk, f"the channel closed after {n} bytes"
        got.update(chunk)
        n += len(chunk)
        time.sleep(0.002)
    vm.wait_for(r"CAT-OUT-DONE", 120)
    assert got.hexdigest() == want, "guest-to-host data differs"
    # Host to guest: 16 MiB the guest checksums as they come.
    blob = os.urandom(BLOB)
    vm.send(f"(head -c {BLOB} {dev} | md5sum > /tmp/in.md5; echo CAT-IN''-DONE) &")
    sender = threading.Thread(target=peer.sendall, args=(blob,))
    sender.start()
    vm.wait_for(r"CAT-IN-DONE", 300)
    sender.join(60)
    peer.close()
    assert vm.guest_cmd("cat /tmp/in.md5").split()[0] == hashlib.md5(blob).hexdigest()


@tb.retry_on_flake
def test_shell_on_hvc0(box, vms, up_regex):
    cfg = tb.default_config(cmdline="console=hvc0 reboot=acpi panic=-1")
    cfg["serial"] = {"mode": "off"}
    cfg["console"] = {"mode": "stdio"}
    vm = vms.start(cfg)
    # /init's first line goes nowhere (hvc0 exists once virtio_console is loaded, after it); the
    # shell init starts on the console is the first thing to see.
    vm.wait_shell(180, stall=None)
    assert vm.guest_cmd("cat /sys/class/tty/console/active").strip() == "hvc0"
    assert vm.guest_cmd("tty").strip() == "/dev/hvc0"
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0


API = "/tmp/vmm-console-api.sock"


def ctl(box: tb.Box, *args: str, timeout: float = 60) -> tuple[int, str]:
    return box.run(f"vmm ctl --api-socket {API} " + " ".join(args), timeout=timeout)


@tb.retry_on_flake
def test_built_in_agent(box, vms, up_regex):
    cfg = tb.default_config()
    cfg["agent"] = True
    vm = vms.start(cfg, ["--api-socket", API])
    boot_to_shell(vm, up_regex)
    assert "GUEST-AGENT-UP" in vm.log()
    status, out = ctl(box, "info")
    assert status == 0 and json.loads(out[out.index("{"):])["agent"] == {"connected": True}, out
    status, out = ctl(box, "agent", "guest-ping")
    assert status == 0 and json.loads(out) == {}, out
    status, out = ctl(box, "agent", "guest-network-get-interfaces")
    assert status == 0 and any(i["name"] == "lo" for i in json.loads(out)), out
    status, out = ctl(box, "agent", "guest-info")
    assert status == 0 and json.loads(out)["version"], out
    status, out = ctl(box, "agent", "guest-no-such-command")
    assert status != 0 and "refused" in out and "not been found" in out, out
    # An agent that no longer answers costs its timeout, not a hang; it comes back after.
    vm.guest_cmd("killall -STOP qemu-ga; echo STOPPED")
    t0 = time.monotonic()
    status, out = ctl(box, "agent", "guest-ping", "--timeout", "2")
    assert status != 0 and "did not answer" in out, out
    assert time.monotonic() - t0 < 30
    vm.guest_cmd("killall -CONT qemu-ga; echo CONTINUED")
    status, out = ctl(box, "agent", "guest-ping")
    assert status == 0 and json.loads(out) == {}, out
    # A clean shutdown through the agent ends the VMM with 0.
    status, out = ctl(box, "agent", "guest-shutdown")
    assert status == 0, out
    assert vm.wait_exit(120) == 0


@tb.retry_on_flake
def test_console_and_agent_survive_snapshot_and_restore(box, vms, up_regex):
    """A VM with the built-in agent and a data channel is saved, its process ends, and a new one
    restores it: the channel's socket is there again and carries the guest's output, the agent
    answers (a new session, resynchronised), and `set-time` puts right the guest clock that
    stood still while the VM was a file."""
    state = "/tmp/console-snap.state"
    box.check(f"rm -f {state} {DATA_SOCK}")
    cfg = tb.default_config()
    cfg["agent"] = True
    cfg["channels"] = [{"id": "data", "name": DATA_NAME, "socket": DATA_SOCK}]
    vm = vms.start(cfg, ["--api-socket", API])
    boot_to_shell(vm, up_regex)
    assert "GUEST-AGENT-UP" in vm.log()
    port_dev(vm, DATA_NAME)
    status, out = ctl(box, "agent", "guest-ping")
    assert status == 0 and json.loads(out) == {}, out
    status, out = ctl(box, "snapshot", state, timeout=600)
    assert status == 0, out
    status, out = ctl(box, "shutdown")
    assert status == 0, out
    assert vm.wait_exit(60) == 0
    time.sleep(20)   # the guest's clock stands still while it is a file

    r = vms.start(argv=["vmm", "--incoming", f"file:{state}", "--api-socket", API])
    r.wait_shell(300)
    # The agent: a fresh session on the restored channel.
    deadline = time.monotonic() + 60
    while True:
        status, out = ctl(box, "agent", "guest-ping", "--timeout", "5")
        if status == 0:
            break
        assert time.monotonic() < deadline, out
        time.sleep(1)
    assert json.loads(out) == {}, out
    lag = int(box.check("date +%s").strip()) - int(r.guest_cmd("date +%s").strip())
    status, out = ctl(box, "set-time")
    assert status == 0 and "Guest clock set" in out, out
    after = int(box.check("date +%s").strip()) - int(r.guest_cmd("date +%s").strip())
    assert abs(after) < 10, (lag, after)
    # The data channel's socket was made again by the restored process and carries data.
    box.check(f"rm -f /tmp/chan.out; (socat -u UNIX-CONNECT:{DATA_SOCK} - > /tmp/chan.out "
              f"2>&1 &) ; sleep 1")
    r.guest_cmd(f"echo HELLO-AFTER-RESTORE > /dev/virtio-ports/{DATA_NAME}; echo SENT")
    deadline = time.monotonic() + 30
    while "HELLO-AFTER-RESTORE" not in box.run("cat /tmp/chan.out")[1]:
        assert time.monotonic() < deadline, box.run("cat /tmp/chan.out")[1]
        time.sleep(0.5)
    box.run("pkill -f 'UNIX-CONNECT:/tmp/data.sock'")
    r.send("poweroff")
    assert r.wait_exit(60) == 0
    box.run(f"rm -f {state}")
