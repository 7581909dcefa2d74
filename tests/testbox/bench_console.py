#!/usr/bin/env python3
"""Channel benchmark in the test box (issue 11): our vmm's virtio-console channels vs QEMU q35's
virtio-serial ports, same guest, all in ONE L1 boot.

Each VMM in turn (one at a time) boots the default guest (512 MiB, 2 vCPUs: room for a 64 MiB file
in its RAM) with two named ports, each on a unix socket in L1 that the VMM listens on:
  org.qemu.guest_agent.0   the guest's rcS starts the real qemu-ga on it
  org.test.bench           the data channel
  ours   vmm with "channels": [{"id": "qga", "name": "org.qemu.guest_agent.0", "socket": ...},
                               {"id": "data", "name": "org.test.bench", "socket": ...}]
         (plain channels, not "agent": true, so that one client talks to qemu-ga under both)
  q35    qemu-system-x86_64 -machine q35 ... -device virtio-serial-pci,id=vs0
         -chardev socket,id=qga,path=...,server=on,wait=off
         -device virtserialport,bus=vs0.0,chardev=qga,name=org.qemu.guest_agent.0  (and the same
         for the data port)
and measures, with a small static client in L1 (CHANBENCH_C below: built on the host with gcc,
copied into L1 as /usr/bin/chanbench), every figure timed by L1's clock:
  guest->L1   the guest's `dd if=/tmp/blob of=/dev/virtio-ports/org.test.bench bs=32k` (64 MiB
              from /dev/urandom); L1 reads it all into memory: first byte to last byte.
  L1->guest   the guest opens the port (read-write), writes "R", reads exactly 64 MiB with dd
              (iflag=fullblock,count_bytes) into /tmp/in, writes "K"; L1 waits for "R", sends
              the 64 MiB (from /dev/urandom in L1): first write to the "K".
              Both ways the md5 of what arrived must be that of what was sent, or the row says
              FAILED for that VMM.
  agent RTT   a qemu-ga session as libvirt opens one: 0xFF + guest-sync-delimited once, then
              WARMUP guest-ping, then PINGS timed ones, one in flight; the median round trip. In
              L1 on the socket itself, and (secondary, through QEMU's user network and socat)
              from this host with test_console.Agent.

    python3 tests/testbox/bench_console.py [--mib 64] [--pings 50] [--warmup 10] [--reps 1]
                                           [--vmms ours,q35] [--no-host-rtt] [--json out.json]

Ratios (ours/QEMU column): above 1.0 means ours is better (throughput ours/QEMU, latency
QEMU/ours). Environment as for box.py (VMM_BIN; TESTBOX_L2=qemu makes "ours" a QEMU stand-in).
Absolute numbers under TCG mean little (L1 is emulated): compare the VMMs in the same run.
MB = 10^6 bytes. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402
from bench_disk import other_boxes  # noqa: E402

MEM_MIB = 512
CPUS = 2
AGENT_NAME = "org.qemu.guest_agent.0"
DATA_NAME = "org.test.bench"
QGA_SOCK = "/tmp/bc-qga.sock"
DATA_SOCK = "/tmp/bc-data.sock"
L1_SRC = "/tmp/bc-src"          # the L1->guest payload in L1 (/tmp is tmpfs)
L1_OUT = "/tmp/bc-out"          # what the guest sent
OUT = tb.BUILD / "consolebench"
HELPER = "chanbench"            # /usr/bin/chanbench in L1
HELPER_TIMEOUT = 900            # seconds, per helper run
KEYS = ("ours", "q35")
NAMES = {"ours": "ours", "q35": "QEMU q35"}
# (key, label, unit, decimals, higher is better)
METRICS = [("tx", "chan guest->L1", "MB/s", 1, True), ("rx", "chan L1->guest", "MB/s", 1, True),
           ("rtt", "agent ping RTT, L1", "us", 0, False),
           ("rtt_host", "agent ping RTT, host", "us", 0, False)]

# The L1 end of every measurement. Modes (a deadline of CHANBENCH_TIMEOUT seconds, default 900):
#   chanbench recv SOCK BYTES OUTFILE   connect, print CONNECTED, read BYTES into memory (timed:
#                                       first byte to last), then write them to OUTFILE
#   chanbench send SOCK INFILE          connect, print CONNECTED, wait for "R", send INFILE (timed:
#                                       first write to the peer's "K")
#   chanbench ping SOCK WARMUP COUNT    the qemu-ga session: 0xFF + guest-sync-delimited, WARMUP
#                                       untimed and COUNT timed guest-pings
# Results: one line "CHANBENCH ..." or "CHANPING ..."; failures "CHANBENCH-ERROR ...", status 1.
CHANBENCH_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double deadline;
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
static void fail(const char *what, long long done) {
    printf("CHANBENCH-ERROR %s: %s (after %lld bytes)\n", what, errno ? strerror(errno) : "EOF", done);
    fflush(stdout);
    exit(1);
}
static int wait_fd(int fd, short ev) {          /* 1: ready, 0: past the deadline */
    for (;;) {
        int ms = (int)((deadline - now()) * 1000);
        if (ms <= 0) { errno = ETIMEDOUT; return 0; }
        struct pollfd p = {fd, ev, 0};
        int r = poll(&p, 1, ms);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return 0;
    }
}
static ssize_t rd(int fd, void *b, size_t n) {   /* > 0 bytes, 0 EOF, < 0 error/timeout */
    for (;;) {
        if (!wait_fd(fd, POLLIN)) return -1;
        ssize_t k = read(fd, b, n);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k == 0) errno = 0;
        return k;
    }
}
static void write_all(int fd, const char *b, size_t n, const char *what) {
    size_t o = 0;
    while (o < n) {
        if (!wait_fd(fd, POLLOUT)) fail(what, o);
        ssize_t k = write(fd, b + o, n - o);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k <= 0) fail(what, o);
        o += k;
    }
}
static int connect_to(const char *path) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    double end = now() + 30;
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) fail("socket", 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
            fcntl(fd, F_SETFL, O_NONBLOCK);
            printf("CONNECTED\n");
            fflush(stdout);
            return fd;
        }
        close(fd);
        if (now() > end) fail("connect", 0);
        usleep(100000);
    }
}
static char *buffer(long long n) {
    char *b = malloc(n > 0 ? n : 1);
    if (!b) fail("malloc", 0);
    return b;
}
static int do_recv(const char *sock, long long want, const char *path) {
    char *b = buffer(want);
    int fd = connect_to(sock);
    long long got = 0, first = 0;
    double t_first = 0, t_last = 0;
    while (got < want) {
        ssize_t k = rd(fd, b + got, want - got > (1 << 20) ? (1 << 20) : want - got);
        if (k <= 0) fail("recv", got);
        if (got == 0) { t_first = now(); first = k; }
        got += k;
        t_last = now();
    }
    int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0) fail("open output", got);
    for (long long o = 0; o < got;) {
        ssize_t k = write(out, b + o, got - o);
        if (k <= 0) fail("write output", o);
        o += k;
    }
    close(out);
    printf("CHANBENCH dir=recv bytes=%lld first_chunk=%lld secs=%.6f\n", got, first, t_last - t_first);
    return 0;
}
static int do_send(const char *sock, const char *path) {
    int in = open(path, O_RDONLY);
    struct stat st;
    if (in < 0 || fstat(in, &st) < 0) fail("open input", 0);
    char *b = buffer(st.st_size);
    for (long long o = 0; o < st.st_size;) {
        ssize_t k = read(in, b + o, st.st_size - o);
        if (k <= 0) fail("read input", o);
        o += k;
    }
    int fd = connect_to(sock);
    char c = 0;
    if (rd(fd, &c, 1) != 1 || c != 'R') { printf("CHANBENCH-ERROR no R from the guest (got %d)\n", c); return 1; }
    double t0 = now();
    write_all(fd, b, st.st_size, "send");
    double tw = now();
    if (rd(fd, &c, 1) != 1 || c != 'K') { printf("CHANBENCH-ERROR no K from the guest (got %d)\n", c); return 1; }
    double t1 = now();
    printf("CHANBENCH dir=send bytes=%lld secs=%.6f write_secs=%.6f\n", (long long)st.st_size, t1 - t0, tw - t0);
    return 0;
}
static char ib[1 << 16];
static size_t ip, il;
static char *line(int fd) {                       /* the next line, without its '\n' */
    for (;;) {
        char *nl = memchr(ib + ip, '\n', il - ip);
        if (nl) { *nl = 0; char *s = ib + ip; ip = nl + 1 - ib; return s; }
        if (ip > 0) { memmove(ib, ib + ip, il - ip); il -= ip; ip = 0; }
        if (il == sizeof ib) { il = 0; }          /* an over-long line: drop it */
        ssize_t k = rd(fd, ib + il, sizeof ib - il);
        if (k <= 0) fail("agent reply", il);
        il += k;
    }
}
static int do_ping(const char *sock, int warm, int count) {
    int fd = connect_to(sock);
    unsigned token = ((unsigned)getpid() * 2654435761u ^ (unsigned)now()) & 0x7fffffff;
    char msg[256], want[32];
    int n = snprintf(msg, sizeof msg, "\xff{\"execute\": \"guest-sync-delimited\", \"arguments\": {\"id\": %u}}\n", token);
    snprintf(want, sizeof want, "%u", token);
    double t0 = now();
    write_all(fd, msg, n, "sync");
    for (;;) {                                    /* everything up to the agent's 0xFF is stale */
        char *ff = memchr(ib, 0xff, il);
        if (ff) { ip = ff + 1 - ib; break; }
        il = 0;
        ssize_t k = rd(fd, ib, sizeof ib);
        if (k <= 0) fail("sync", 0);
        il = k;
    }
    for (;;) {
        char *s = line(fd);
        if (strstr(s, "\"return\"") && strstr(s, want)) break;
    }
    double sync_us = (now() - t0) * 1e6;
    const char *ping = "{\"execute\": \"guest-ping\"}\n";
    double *us = calloc(count + 1, sizeof *us);
    for (int i = 0; i < warm + count; i++) {
        double t = now();
        write_all(fd, ping, strlen(ping), "ping");
        char *s = line(fd);
        double dt = (now() - t) * 1e6;
        if (!strstr(s, "\"return\"")) { printf("CHANBENCH-ERROR guest-ping answered: %.200s\n", s); return 1; }
        if (i >= warm) us[i - warm] = dt;
    }
    printf("CHANPING sync_us=%.0f us=", sync_us);
    for (int i = 0; i < count; i++) printf("%s%.1f", i ? "," : "", us[i]);
    printf("\n");
    return 0;
}
int main(int argc, char **argv) {
    const char *t = getenv("CHANBENCH_TIMEOUT");
    deadline = now() + (t ? atof(t) : 900);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 5 && !strcmp(argv[1], "recv")) return do_recv(argv[2], atoll(argv[3]), argv[4]);
    if (argc == 4 && !strcmp(argv[1], "send")) return do_send(argv[2], argv[3]);
    if (argc == 5 && !strcmp(argv[1], "ping")) return do_ping(argv[2], atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: chanbench recv SOCK BYTES OUT | send SOCK IN | ping SOCK WARMUP COUNT\n");
    return 2;
}
"""


def build_helper() -> Path:
    """build/consolebench/chanbench, static, (re)built when CHANBENCH_C changed."""
    out, src = OUT / HELPER, OUT / f"{HELPER}.c"
    if out.exists() and src.exists() and src.read_text() == CHANBENCH_C:
        return out
    OUT.mkdir(parents=True, exist_ok=True)
    src.write_text(CHANBENCH_C)
    subprocess.run(["gcc", "-O2", "-static", "-s", "-Wall", "-o", str(out), str(src)], check=True)
    return out


# ---- L1 and the VMs -------------------------------------------------------------------------------
def l1_setup(box: tb.Box, nbytes: int) -> str:
    """The L1->guest payload in L1 (again after an L1 restart: /tmp is gone); returns its md5."""
    out = box.check(f"[ -s {L1_SRC}.md5 ] || {{ dd if=/dev/urandom of={L1_SRC} bs=1M count={nbytes >> 20} "
                    f"iflag=fullblock 2>/dev/null && md5sum {L1_SRC} > {L1_SRC}.md5; }}; "
                    f"stat -c %s {L1_SRC}; cat {L1_SRC}.md5", timeout=600)
    size, md5 = out.split()[:2]
    assert int(size) == nbytes, f"{L1_SRC} has {size} bytes"
    return md5


def vm_argv(box: tb.Box, key: str) -> list[str]:
    cfg = tb.default_config(vcpus=CPUS, memory_mib=MEM_MIB)
    if key == "q35" or tb.l2_is_qemu():
        ports = []
        for cid, name, sock in (("qga", AGENT_NAME, QGA_SOCK), ("data", DATA_NAME, DATA_SOCK)):
            ports += ["-chardev", f"socket,id={cid},path={sock},server=on,wait=off",
                      "-device", f"virtserialport,bus=vs0.0,chardev={cid},name={name}"]
        return tb.qemu_argv_for(cfg, []) + ["-device", "virtio-serial-pci,id=vs0"] + ports
    cfg["channels"] = [{"id": "qga", "name": AGENT_NAME, "socket": QGA_SOCK},
                       {"id": "data", "name": DATA_NAME, "socket": DATA_SOCK}]
    return box.vmm_argv(cfg, name="bench-console")


def helper_start(box: tb.Box, args: str, tag: str) -> str:
    """Start chanbench in L1 in the background; returns once it is connected. Its log's path."""
    log = f"/tmp/bc-{tag}.log"
    out = box.check(f"rm -f {log}; CHANBENCH_TIMEOUT={HELPER_TIMEOUT} {HELPER} {args} > {log} 2>&1 "
                    f"< /dev/null & echo $! > {log}.pid; i=0; while ! grep -q '^CONNECTED' {log} && "
                    f"kill -0 $(cat {log}.pid) 2>/dev/null && [ $i -lt 300 ]; do usleep 100000; "
                    f"i=$((i+1)); done; cat {log}")
    if "CONNECTED" not in out:
        raise AssertionError(f"chanbench did not connect: {out.strip()[-500:]}")
    return log


def helper_wait(box: tb.Box, log: str) -> str:
    """Wait (in L1, one poll a second: no console traffic meanwhile) until chanbench has ended."""
    return box.check(f"i=0; while kill -0 $(cat {log}.pid) 2>/dev/null && [ $i -lt {HELPER_TIMEOUT + 30} ]; "
                     f"do sleep 1; i=$((i+1)); done; cat {log}", timeout=HELPER_TIMEOUT + 120)


def helper_result(out: str) -> dict:
    m = re.search(r"^CHANBENCH (dir=.*)$", out, re.M)
    if not m:
        err = re.search(r"^CHANBENCH-ERROR.*$", out, re.M)
        return {"ok": False, "error": err.group(0) if err else f"no result: {out.strip()[-300:]!r}"}
    r: dict = {"ok": True}
    for kv in m.group(1).split():
        k, v = kv.split("=", 1)
        r[k] = v if k == "dir" else float(v)
    return r


def to_host(box: tb.Box, vm: tb.L2, port: str, nbytes: int, want_md5: str) -> dict:
    """guest->L1: the guest's dd into the port, L1's chanbench reads it (first to last byte)."""
    box.check(f"rm -f {L1_OUT}")
    log = helper_start(box, f"recv {DATA_SOCK} {nbytes} {L1_OUT}", "recv")
    tag = uuid.uuid4().hex[:8]
    vm.send(f"dd if=/tmp/blob of={port} bs=32k 2>&1; echo DE''{tag}")
    r = helper_result(helper_wait(box, log))
    if not r["ok"]:   # a dd stuck on the port: Ctrl-C (which drops the rest of the line too)
        vm.send_raw(b"\x03")
        vm.wait_shell(60)
        return r
    vm.wait_for(rf"DE{tag}", timeout=HELPER_TIMEOUT)
    r["mbps"] = (r["bytes"] - r["first_chunk"]) / r["secs"] / 1e6
    got = box.check(f"md5sum {L1_OUT}").split()[0]
    if got != want_md5:
        r.update(ok=False, error=f"checksum mismatch: sent {want_md5}, L1 got {got}")
    box.run(f"rm -f {L1_OUT}")
    return r


def to_guest(box: tb.Box, vm: tb.L2, port: str, nbytes: int, want_md5: str) -> dict:
    """L1->guest: the guest says R, reads exactly nbytes with dd, says K; L1 times R..K."""
    log = helper_start(box, f"send {DATA_SOCK} {L1_SRC}", "send")
    tag = uuid.uuid4().hex[:8]
    # One open of the port, read-write: fd 0 for dd, fd 1 (a dup) for the R and the K.
    vm.send(f"rm -f /tmp/in; {{ printf R; dd of=/tmp/in bs=64k count={nbytes} "
            f"iflag=fullblock,count_bytes 2>/tmp/ddin.err; printf K; }} <>{port} >&0; "
            f"cat /tmp/ddin.err; echo IE''{tag}")
    r = helper_result(helper_wait(box, log))
    if not r["ok"]:   # a dd still waiting for data: Ctrl-C (which drops the rest of the line too)
        vm.send_raw(b"\x03")
        vm.wait_shell(60)
        return r
    vm.wait_for(rf"IE{tag}", timeout=HELPER_TIMEOUT)
    r["mbps"] = r["bytes"] / r["secs"] / 1e6
    got = vm.guest_cmd("md5sum /tmp/in; rm -f /tmp/in", timeout=300).split()[0]
    if got != want_md5:
        r.update(ok=False, error=f"checksum mismatch: L1 sent {want_md5}, the guest got {got}")
    return r


def ping_stats(us: list[float]) -> dict:
    s = sorted(us)
    return {"ok": True, "us": statistics.median(s), "min": s[0], "p90": s[int(0.9 * (len(s) - 1))],
            "n": len(s)}


def rtt_l1(box: tb.Box, warm: int, pings: int) -> dict:
    out = box.run(f"CHANBENCH_TIMEOUT=240 {HELPER} ping {QGA_SOCK} {warm} {pings} 2>&1", timeout=300)[1]
    m = re.search(r"^CHANPING sync_us=(\S+) us=(\S+)$", out, re.M)
    if not m:
        return {"ok": False, "error": out.strip()[-300:]}
    r = ping_stats([float(x) for x in m.group(2).split(",")])
    r["sync_us"] = float(m.group(1))
    return r


def rtt_host(box: tb.Box, warm: int, pings: int) -> dict:
    """The same session from this host, with test_console's libvirt-like client (socat in L1 joins
    the forwarded port to the agent's socket)."""
    try:
        from test_console import Agent, forward
    except ImportError as e:   # pytest or qemu.qmp missing: the row is skipped, said so
        return {"ok": False, "error": f"test_console not importable ({e})"}
    forward(box, tb.GUEST_PORTS["agent"], QGA_SOCK)
    us = []
    try:
        agent = Agent(box.host_port("agent"))
        try:
            for i in range(warm + pings):
                t = time.perf_counter()
                assert agent.cmd("guest-ping") == {}
                if i >= warm:
                    us.append((time.perf_counter() - t) * 1e6)
        finally:
            agent.close()
    except (OSError, ValueError, AssertionError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e} (after {len(us)} timed pings)"}
    finally:
        box.run(f"pkill -f 'TCP-LISTEN:{tb.GUEST_PORTS['agent']}'")
    return ping_stats(us)


class CompilerWatch:
    """Notes which runs a compiler on this machine overlapped (a cargo build of the other VMM
    checkout takes both of a 2-core machine's CPUs from the box): pgrep every 2 s."""
    PROGS = ("rustc", "cc1", "cc1plus", "ld")

    def __init__(self):
        self.current: str | None = None
        self.hit: set[str] = set()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            cur = self.current
            if cur and any(subprocess.run(["pgrep", "-x", p], capture_output=True).returncode == 0
                           for p in self.PROGS):
                self.hit.add(cur)
            time.sleep(2)


def one_vm(box: tb.Box, key: str, rep: int, args, src_md5: str) -> dict:
    up = tb.guest_env().get("UP_REGEX", "GUEST-USERSPACE-UP")
    nbytes = args.mib << 20
    box.check(f"rm -f {QGA_SOCK} {DATA_SOCK}")
    vm = box.start_l2(f"bench-console-{key}-{rep}", vm_argv(box, key))
    try:
        vm.wait_for(up, 240, stall=60)
        vm.wait_shell(120)
        vm.wait_for(f"GUEST-AGENT-UP /dev/virtio-ports/{AGENT_NAME}", 30)
        port = f"/dev/virtio-ports/{DATA_NAME}"
        out = vm.guest_cmd(f"readlink -f {port}; dd if=/dev/urandom of=/tmp/blob bs=1M count={args.mib} "
                           f"iflag=fullblock 2>/dev/null; stat -c %s /tmp/blob; md5sum /tmp/blob", timeout=600)
        words = out.split()
        assert words and words[0].startswith("/dev/vport"), f"{port}: {out!r}"
        assert int(words[1]) == nbytes, f"the guest's /tmp/blob: {out!r}"
        res = {"rtt": rtt_l1(box, args.warmup, args.pings)}
        res["tx"] = to_host(box, vm, port, nbytes, words[2])
        vm.guest_cmd("rm -f /tmp/blob")
        res["rx"] = to_guest(box, vm, port, nbytes, src_md5)
        res["rtt_host"] = ({"ok": False, "error": "--no-host-rtt"} if args.no_host_rtt
                           else rtt_host(box, args.warmup, args.pings))
        tb.log(f"{key} #{rep}: " + ", ".join(f"{m} {fmt(res[m], m)}" for m, *_ in METRICS))
        vm.send("poweroff")
        try:
            rc = vm.wait_exit(60)
        except AssertionError:
            rc = None
        return {"ok": True, "runs": res, "poweroff_rc": rc}
    finally:
        if box.alive():   # else kill() would raise and hide the real error
            vm.kill()


def run_vm(box: tb.Box, key: str, rep: int, args, nbytes: int) -> dict:
    """one_vm, again after a flake of the nested box (tb.bench_run)."""
    return tb.bench_run(box, f"{key} #{rep}", lambda: one_vm(box, key, rep, args, l1_setup(box, nbytes)))


def fmt(r: dict, metric: str) -> str:
    if not r.get("ok"):
        return f"FAILED ({r.get('error')})"
    if metric in ("tx", "rx"):
        return f"{r['mbps']:.1f} MB/s ({r['secs']:.2f} s)"
    return f"median {r['us']:.0f} us (min {r['min']:.0f}, p90 {r['p90']:.0f})"


def value(r: dict, metric: str) -> float:
    return r["mbps"] if metric in ("tx", "rx") else r["us"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB each way (default 64)")
    ap.add_argument("--pings", type=int, default=50, help="timed guest-pings (default 50)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed guest-pings first (default 10)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, VMMs interleaved (default 1)")
    ap.add_argument("--vmms", default=",".join(KEYS))
    ap.add_argument("--no-host-rtt", action="store_true", help="skip the RTT from this host")
    ap.add_argument("--json", help="write the raw results there")
    args = ap.parse_args()
    keys = [k.strip() for k in args.vmms.split(",") if k.strip()]
    for k in keys:
        if k not in KEYS:
            raise SystemExit(f"unknown VMM {k} ({', '.join(KEYS)})")
    nbytes = args.mib << 20
    helper = build_helper()
    busy = other_boxes()
    if busy:
        tb.log(f"warning: {len(busy)} other test box(es) running on this machine: numbers will be noisy")

    results: dict[str, list[dict]] = {k: [] for k in keys}
    notes: list[str] = []
    watch = CompilerWatch()
    t_start = time.monotonic()
    with tb.Box(with_qemu=True, extra_bins=[str(helper), "/usr/bin/socat"]) as box:
        if "ours" in keys and not box.has_vmm() and not tb.l2_is_qemu():
            raise SystemExit("no vmm binary: build it (cargo build --release) or set VMM_BIN")
        if tb.l2_is_qemu():
            notes.append("TESTBOX_L2=qemu: QEMU q35 stands in for our vmm")
        box.check(f"cat {tb.L1_KERNEL} {tb.L1_INITRD} > /dev/null")   # warm L1's page cache
        for i in range(args.reps):
            for k in keys:
                busy = busy or other_boxes(box)
                watch.current = f"{NAMES[k]} #{i}"
                results[k].append(run_vm(box, k, i, args, nbytes))
                watch.current = None
        busy = busy or other_boxes(box)
        if not box.healthy():
            box.restart()
        info = box.check(f"uname -r; . {tb.L1_GUEST}/guest.env; echo $KERNEL_VERSION").split()
    elapsed = time.monotonic() - t_start

    # per metric, medians over the repetitions where that metric succeeded
    summary: dict[str, dict] = {}
    for k, runs in results.items():
        summary[k] = {}
        for m, *_ in METRICS:
            ok = [r["runs"][m] for r in runs if r["ok"] and r["runs"][m].get("ok")]
            summary[k][m] = statistics.median(value(r, m) for r in ok) if ok else None
            summary[k][f"{m}_runs"] = f"{len(ok)}/{len(runs)}"

    print()
    print(f"Channel benchmark in the test box: guest {MEM_MIB} MiB / {CPUS} vCPUs (L1 {info[0]}, guest "
          f"{info[-1]}); {args.mib} MiB each way over the port {DATA_NAME}, qemu-ga guest-ping x{args.pings} "
          f"after {args.warmup} (one session, 0xFF + guest-sync-delimited first); medians of {args.reps} "
          f"rep(s); total {elapsed / 60:.1f} min")
    print("NOTE: L1 runs under QEMU/TCG, so absolute numbers are TCG-slowed and mean little: only the "
          "ratios between VMMs of the same run matter. ours/QEMU > 1 means ours is better "
          "(throughput ours/QEMU, latency QEMU/ours).")
    cols = list(results)
    metrics = [m for m in METRICS if not (args.no_host_rtt and m[0] == "rtt_host")]
    both = "ours" in cols and "q35" in cols
    hdr = f"{'metric':<28}" + "".join(f"{NAMES[k]:>12}" for k in cols) + (f"{'ours/QEMU':>12}" if both else "")
    print(hdr)
    print("-" * len(hdr))
    for m, label, unit, dec, higher in metrics:
        row = f"{label + ' ' + unit:<28}"
        for k in cols:
            v = summary[k][m]
            row += f"{'FAILED' if v is None else f'{v:.{dec}f}':>12}"
        if both:
            o, q = summary["ours"][m], summary["q35"][m]
            row += f"{'n/a' if o is None or q is None else 'x%.2f' % (o / q if higher else q / o):>12}"
        print(row)
    # the details: times, ping spread, failures
    for k in cols:
        for r in results[k]:
            if not r["ok"]:
                print(f"{NAMES[k]}: run failed: {r['error']}")
                if "\n" in r.get("detail", ""):
                    print(r["detail"], file=sys.stderr)
                continue
            print(f"{NAMES[k]}: " + "; ".join(f"{m} {fmt(r['runs'][m], m)}" for m, *_ in metrics))
    for n in notes:
        print(f"note: {n}")
    print("timing: guest->L1 = L1 reader, first byte to last; L1->guest = L1 writer, first write to the "
          "guest's ack after its dd read the last byte; RTT 'L1' = chanbench on the socket in L1, "
          "'host' = test_console.Agent from this host through QEMU's user network and socat in L1")
    if busy:
        print("note: other test box(es) ran on this machine during the run: numbers are noisy")
    if watch.hit:
        print(f"note: a compiler ({'/'.join(CompilerWatch.PROGS)}) ran on this machine during "
              f"{', '.join(sorted(watch.hit))}: those figures are noisy")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results, "notes": notes,
                                               "compiler_during": sorted(watch.hit),
                                               "mib": args.mib, "pings": args.pings}, indent=1))
    return 0 if all(summary[k][m] is not None for k in cols for m, *_ in metrics) else 1


if __name__ == "__main__":
    sys.exit(main())
