#!/usr/bin/env python3
"""Network benchmark in the test box: our vmm's virtio-net (userspace data path on a tap) vs QEMU
q35's virtio-net-pci on a tap (vhost=off, and vhost=on as a reference), same guest, all in ONE L1
boot, interleaved over a few repetitions.

L1 gets a bridge br0 (10.0.3.1/24). Each VMM in turn (one at a time) boots the default guest
(256 MiB, 2 vCPUs, same kernel, initramfs and command line) with one NIC on a tap that the QEMU-style
script /payload/tb/qemu-ifup.sh puts on br0 (the guest is 10.0.3.2, MAC 52:54:00:12:34:56 for all):
  ours        vmm with "net": [{"id": "net0", "tap": T, "mac": M, "queues": 1,
              "script": ".../qemu-ifup.sh", "downscript": ".../qemu-ifdown.sh"}]
  q35         qemu-system-x86_64 -machine q35 -enable-kvm -cpu host ...
              -netdev tap,id=n0,ifname=T,script=...,downscript=...,vhost=off
              -device virtio-net-pci,netdev=n0,mac=M,romfile=
              (romfile=: no iPXE option ROM, which the box does not carry and a direct kernel boot
              does not use)
  ours-vhost  ours with "vhost": true: the data path in L1's vhost-net kernel thread.
  q35-vhost   QEMU with vhost=on: the same in-kernel data path, QEMU's setup of it.
              Both vhost rows are skipped, said so, when L1 has no /dev/vhost-net.
Ratios: ours/QEMU (both userspace) and ours-vhost/QEMU-vhost.
and measures between the guest and L1, over the bridge:
  TCP guest->L1 and L1->guest   iperf3 (one stream, -t SECONDS, the first second omitted: slow
                                start) with its server in the guest and its client in L1
                                (`-R` for guest->L1); the receiver's Mbit/s (10^6 bits).
  TCP_RR 1 byte                 resources/guest/netrr.c: 1-byte TCP ping-pong with TCP_NODELAY, one
                                transaction in flight, for SECONDS; its server in the guest echoes,
                                its client in L1 counts transactions/s (the inverse of a round trip
                                through both stacks, the tap, the bridge and the VMM).
All clients run in L1, so every figure is timed by L1's clock, not by a nested guest's.

Tools: iperf3 is the host's (Debian package iperf3, installed with apt-get when missing, as
resources/lib/debian.sh `need` does); netrr is built static with gcc into build/netbench/. L1 gets
both through Box(extra_bins=...) (with iperf3's shared libraries). The default guest's initramfs has
neither (it would slow every boot): build/netbench/netbench-guest.tar.gz holds /usr/bin/iperf3, every
shared library ldd resolves for it on the host under its full path (libc and the dynamic loader
included, so the guest's own libc need not match; the default guest's is the host's, copied for
qemu-ga when it was built, and the benchmark checks and reports whether it still is) and
/usr/bin/netrr. L1 serves it with busybox httpd; the guest fetches it with busybox wget and unpacks
it into / with busybox tar, at run time, before the measurements.

    python3 tests/testbox/bench_net.py [--secs 8] [--reps 3] [--vmms ours,q35,ours-vhost,q35-vhost]
                                       [--json out.json]
    python3 tests/testbox/bench_net.py --reps 1 --secs 3      # a quick look (or a smoke test)

Environment as for box.py (VMM_BIN; TESTBOX_L2=qemu makes "ours" a QEMU q35 vhost=off stand-in).
Absolute numbers under TCG mean little (L1 is emulated, so are L1's end of every connection and
the bridge): compare the VMMs with each other, in the same run. Not run in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402
from bench_disk import other_boxes  # noqa: E402

MEM_MIB = 256
CPUS = 2
L1_IP, GUEST_IP = "10.0.3.1", "10.0.3.2"
MAC = "52:54:00:12:34:56"   # one MAC for every VMM: L1's neighbour entry stays right between VMs
IFUP = "/payload/tb/qemu-ifup.sh"
IFDOWN = "/payload/tb/qemu-ifdown.sh"
HTTP_PORT, IPERF_PORT, RR_PORT = 8090, 5201, 5202
OUT = tb.BUILD / "netbench"
NETRR_SRC = tb.REPO / "resources/guest/netrr.c"
TARBALL = "netbench-guest.tar.gz"           # in L1: /usr/bin/netbench-guest.tar.gz (extra_bins)
KEYS = ("ours", "q35", "ours-vhost", "q35-vhost")
NAMES = {"ours": "ours", "q35": "QEMU q35", "ours-vhost": "ours vhost", "q35-vhost": "QEMU vhost"}
TAPS = {"ours": "tapnbo", "q35": "tapnbq", "ours-vhost": "tapnbw",
        "q35-vhost": "tapnbv"}   # all on br0 (no "b1" suffix)
# (ours, peer) pairs whose ratio is printed.
RATIOS = (("ours", "q35"), ("ours-vhost", "q35-vhost"))
# (key, label, unit, decimals)
METRICS = [("tx", "TCP guest->L1", "Mbit/s", 1), ("rx", "TCP L1->guest", "Mbit/s", 1),
           ("rr", "TCP_RR 1 byte", "trans/s", 0)]

# ---- host side: tools, netrr, the guest tarball ---------------------------------------------------
def need(*pkgs: str) -> None:
    """Install the Debian packages that are missing (resources/lib/debian.sh `need`)."""
    subprocess.run(["bash", "-c", f'. "{tb.REPO}/resources/lib/debian.sh" && need "$@"', "need", *pkgs],
                   check=True, stdout=sys.stderr)


def build_netrr() -> Path:
    """build/netbench/netrr, static, (re)built when netrr.c changed."""
    out = OUT / "netrr"
    stamp = OUT / "netrr.sha256"
    digest = hashlib.sha256(NETRR_SRC.read_bytes()).hexdigest()
    if out.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return out
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-static", "-s", "-Wall", "-o", str(out), str(NETRR_SRC)], check=True)
    stamp.write_text(digest + "\n")
    return out


def shared_libs(binary: str) -> list[str]:
    """The shared libraries ldd resolves for `binary`, with their full paths (the dynamic loader
    included, the vDSO not)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    if "not found" in out:
        raise SystemExit(f"{binary} has unresolved libraries:\n{out}")
    return [m.group(1) for line in out.splitlines() if (m := re.search(r"(/\S+) \(0x", line))]


def md5(path: str) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def guest_tarball(iperf3: str, netrr: Path) -> tuple[Path, dict[str, str]]:
    """build/netbench/netbench-guest.tar.gz: iperf3 + its libraries (full paths) + netrr, and the
    md5 of the libc and the dynamic loader in it (to compare with the guest's own)."""
    libs = shared_libs(iperf3)
    files = [(iperf3, "usr/bin/iperf3"), (str(netrr), "usr/bin/netrr")] + [(lib, lib.lstrip("/")) for lib in libs]
    out = OUT / TARBALL
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz", dereference=True) as t:   # symlinked libraries as plain files
        for src, arc in files:
            t.add(src, arcname=arc, recursive=False)
    tmp.replace(out)
    core = {lib: md5(lib) for lib in libs if re.search(r"/(libc\.so\.6|ld-linux[^/]*)$", lib)}
    tb.log(f"guest tarball {out} ({out.stat().st_size >> 10} KiB): iperf3, netrr, {' '.join(libs)}")
    return out, core


# ---- L1 and the VMs -------------------------------------------------------------------------------
def l1_setup(box: tb.Box) -> None:
    """br0 and the tarball's web server in L1 (again after an L1 restart: /tmp and br0 are gone)."""
    box.check(f"[ -e /sys/class/net/br0 ] || {{ brctl addbr br0 && ip addr add {L1_IP}/24 dev br0 "
              f"&& ip link set br0 up; }}; "
              f"[ -e /tmp/nbwww/nb.tgz ] || {{ mkdir -p /tmp/nbwww && cp /usr/bin/{TARBALL} /tmp/nbwww/nb.tgz "
              f"&& (httpd -p {HTTP_PORT} -h /tmp/nbwww &); sleep 1; }}")


def qemu_net(key: str) -> list[str]:
    vhost = "on" if key == "q35-vhost" else "off"
    return ["-netdev", f"tap,id=n0,ifname={TAPS[key]},script={IFUP},downscript={IFDOWN},vhost={vhost}",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC},romfile="]


def vm_argv(box: tb.Box, key: str) -> list[str]:
    cfg = tb.default_config(vcpus=CPUS, memory_mib=MEM_MIB)
    if not key.startswith("ours"):   # q35, q35-vhost
        return tb.qemu_argv_for(cfg, []) + qemu_net(key)
    if tb.l2_is_qemu():   # the TESTBOX_L2=qemu stand-in
        return tb.qemu_argv_for(cfg, []) + qemu_net("q35-vhost" if key == "ours-vhost" else "q35")
    cfg["net"] = [{"id": "net0", "tap": TAPS[key], "mac": MAC, "queues": 1,
                   "script": IFUP, "downscript": IFDOWN, "vhost": key == "ours-vhost"}]
    return box.vmm_argv(cfg, name="bench-net")


def wait_carrier(vm: tb.L2, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while vm.guest_cmd("cat /sys/class/net/eth0/carrier 2>&1").strip() != "1":
        if time.monotonic() > end:
            raise AssertionError("the guest's eth0 has no carrier")
        time.sleep(1)


def guest_setup(vm: tb.L2, core: dict[str, str]) -> bool:
    """Address, tools (fetched from L1 and unpacked into /) and the two servers in the guest.
    Returns whether the guest's libc and loader were the host's before the tarball replaced them."""
    out = vm.guest_cmd(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && echo IF-OK")
    assert "IF-OK" in out, out
    wait_carrier(vm)
    out = vm.guest_cmd(f"md5sum {' '.join(core)} 2>&1")
    have = dict((p, h) for h, p in re.findall(r"^([0-9a-f]{32})\s+(\S+)", out, re.M))
    same = all(have.get(p) == h for p, h in core.items())
    out = vm.guest_cmd(f"for i in 1 2 3 4 5; do wget -q -O /tmp/nb.tgz http://{L1_IP}:{HTTP_PORT}/nb.tgz "
                       f"&& break; sleep 2; done; tar -xzf /tmp/nb.tgz -C / && rm -f /tmp/nb.tgz && "
                       f"iperf3 --version | head -1 && echo TOOLS-OK", timeout=600)
    assert "TOOLS-OK" in out, f"the guest could not fetch or run its tools: {out}"
    out = vm.guest_cmd(f"iperf3 -s -D -p {IPERF_PORT} && (netrr server {RR_PORT} > /dev/null 2>&1 &); "
                       f"sleep 1; netstat -ltn | grep -cE ':({IPERF_PORT}|{RR_PORT}) '", timeout=120)
    assert out.strip().splitlines()[-1:] == ["2"], f"servers not listening in the guest: {out}"
    return same


def iperf(box: tb.Box, secs: float, reverse: bool) -> dict:
    """One iperf3 run from L1's client to the guest's server; -R: the guest sends."""
    out = box.run(f"iperf3 -c {GUEST_IP} -p {IPERF_PORT} -t {secs:g} -O 1 -i 0 -J {'-R' if reverse else ''} "
                  f"> /tmp/nb-iperf.json 2>&1; echo rc=$?", timeout=secs + 120)[1]
    text = box.read_file("/tmp/nb-iperf.json").decode(errors="replace")
    try:
        j = json.loads(text)
    except ValueError:
        raise AssertionError(f"iperf3 ({out.strip()}) gave no JSON: {text[-500:]!r}") from None
    if "error" in j:
        raise AssertionError(f"iperf3: {j['error']}")
    end = j["end"]
    return {"mbps": end["sum_received"]["bits_per_second"] / 1e6,
            "retransmits": end["sum_sent"].get("retransmits", 0),
            "bytes": end["sum_received"]["bytes"], "secs": end["sum_received"]["seconds"]}


def netrr(box: tb.Box, secs: float) -> dict:
    out = box.run(f"netrr client {GUEST_IP} {RR_PORT} {secs:g} 2>&1", timeout=secs + 120)[1]
    m = re.search(r"NETRR trans=(\d+) secs=(\S+) tps=(\S+) lat_us=(\S+)", out)
    if not m:
        raise AssertionError(f"no NETRR line in: {out.strip()[-500:]!r}")
    return {"trans": int(m.group(1)), "secs": float(m.group(2)), "tps": float(m.group(3)),
            "lat_us": float(m.group(4))}


def fmt_run(r: dict) -> str:
    return (f"guest->L1 {r['tx']['mbps']:.1f} Mbit/s, L1->guest {r['rx']['mbps']:.1f} Mbit/s, "
            f"rr {r['rr']['tps']:.0f}/s ({r['rr']['lat_us']:.0f} us)")


def one_vm(box: tb.Box, key: str, rep: int, secs: float, core: dict[str, str]) -> dict:
    up = tb.guest_env().get("UP_REGEX", "GUEST-USERSPACE-UP")
    l1_setup(box)
    box.run("ip neigh flush dev br0")
    vm = box.start_l2(f"bench-net-{key}-{rep}", vm_argv(box, key))
    try:
        vm.wait_for(up, 240, stall=60)
        vm.wait_shell(120)
        same_libc = guest_setup(vm, core)
        st, out = box.run(f"ping -c 2 -W 5 {GUEST_IP} 2>&1", timeout=60)
        assert st == 0, f"L1 cannot reach the guest: {out}"
        res = {"rx": iperf(box, secs, reverse=False), "tx": iperf(box, secs, reverse=True),
               "rr": netrr(box, secs)}
        tb.log(f"{key} #{rep}: {fmt_run(res)}")
        vm.send("poweroff")
        try:
            rc = vm.wait_exit(60)
        except AssertionError:
            rc = None
        return {"ok": True, "runs": res, "guest_libc_is_hosts": same_libc, "poweroff_rc": rc}
    finally:
        if box.alive():   # else kill() would raise and hide the real error
            vm.kill()


def run_vm(box: tb.Box, key: str, rep: int, secs: float, core: dict[str, str]) -> dict:
    """one_vm, once more after a known flake of the nested box (a stalled L2 boot, an L2 triple
    fault, L1 dying or soft-locked)."""
    for attempt in (1, 2):
        try:
            return one_vm(box, key, rep, secs, core)
        except (tb.BoxError, TimeoutError, AssertionError) as e:
            # An L1 whose CPU is soft-locked is alive but answers nothing: a box flake too, and
            # every later row would fail on it, so it is booted again either way.
            healthy = box.healthy()
            flake = (isinstance(e, tb.BootStall) or not healthy
                     or "the guest triple-faulted" in str(e))
            if not box.alive():
                why = f"L1 died: {box.crash_signature()}"
            elif not healthy:
                why = f"L1 stopped answering: {str(e).splitlines()[0]}"
            else:
                why = str(e).splitlines()[0]
            if not healthy:
                box.restart()
            if not flake or attempt == 2:
                tb.log(f"{key} #{rep}: FAILED: {why}")
                return {"ok": False, "error": why, "detail": str(e)[-3000:]}
            tb.log(f"{key} #{rep}: nested-box flake ({why}); running it again")
    raise AssertionError("unreachable")


def value(r: dict, metric: str) -> float:
    return r["runs"][metric]["tps" if metric == "rr" else "mbps"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--secs", type=float, default=8, help="seconds per measurement (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, VMMs interleaved (default 3)")
    ap.add_argument("--vmms", default=",".join(KEYS))
    ap.add_argument("--json", help="write the raw results there")
    args = ap.parse_args()
    keys = [k.strip() for k in args.vmms.split(",") if k.strip()]
    for k in keys:
        if k not in KEYS:
            raise SystemExit(f"unknown VMM {k} ({', '.join(KEYS)})")

    need("iperf3", "gcc", "libc6-dev")
    iperf3 = shutil.which("iperf3")
    if not iperf3:
        raise SystemExit("iperf3 is not on PATH after installing the Debian package iperf3")
    iperf3 = str(Path(iperf3).resolve())
    rr_bin = build_netrr()
    tarball, core = guest_tarball(iperf3, rr_bin)
    busy = other_boxes()
    if busy:
        tb.log(f"warning: {len(busy)} other test box(es) running on this machine: numbers will be noisy")

    results: dict[str, list[dict]] = {k: [] for k in keys}
    notes: list[str] = []
    skipped: list[str] = []
    t_start = time.monotonic()
    with tb.Box(with_qemu=True, extra_bins=[iperf3, str(rr_bin), str(tarball)]) as box:
        if "ours" in keys and not box.has_vmm() and not tb.l2_is_qemu():
            raise SystemExit("no vmm binary: build it (cargo build --release) or set VMM_BIN")
        if tb.l2_is_qemu():
            notes.append("TESTBOX_L2=qemu: QEMU q35 (vhost=off) stands in for our vmm")
        for k in ("ours-vhost", "q35-vhost"):
            if k in keys and box.run("[ -c /dev/vhost-net ]")[0] != 0:
                skipped.append(f"{NAMES[k]}: skipped (no /dev/vhost-net in L1)")
                keys.remove(k)
                del results[k]
        box.check(f"cat {tb.L1_KERNEL} {tb.L1_INITRD} > /dev/null")   # warm L1's page cache
        for i in range(args.reps):
            for k in keys:
                busy = busy or other_boxes(box)
                results[k].append(run_vm(box, k, i, args.secs, core))
        busy = busy or other_boxes(box)
        if not box.alive():
            box.restart()
        info = box.check(f"uname -r; . {tb.L1_GUEST}/guest.env; echo $KERNEL_VERSION").split()
    elapsed = time.monotonic() - t_start

    # medians over the successful repetitions
    summary: dict[str, dict | None] = {}
    for k, runs in results.items():
        ok = [r for r in runs if r["ok"]]
        summary[k] = {m: statistics.median(value(r, m) for r in ok) for m, *_ in METRICS} if ok else None
        if summary[k] is not None:
            summary[k]["retransmits"] = {m: statistics.median(r["runs"][m]["retransmits"] for r in ok)
                                         for m in ("tx", "rx")}
            summary[k]["lat_us"] = statistics.median(r["runs"]["rr"]["lat_us"] for r in ok)
            summary[k]["_runs"] = f"{len(ok)}/{len(runs)}"

    print()
    for s in skipped:
        print(s)
    print(f"Network benchmark in the test box: guest {MEM_MIB} MiB / {CPUS} vCPUs, one virtio-net NIC on a "
          f"tap bridged to br0 in L1 (L1 {info[0]}, guest {info[-1]}); iperf3 one TCP stream "
          f"-t {args.secs:g} (-O 1), netrr 1-byte ping-pong {args.secs:g} s, all clients in L1; "
          f"medians of {args.reps} rep(s); total {elapsed / 60:.1f} min")
    print("NOTE: L1 runs under QEMU/TCG, so absolute numbers are TCG-slowed and mean little: "
          "only the ratios between VMMs of the same run matter. Higher is better for every metric.")
    cols = list(results)
    ratios = [(o, r) for o, r in RATIOS if o in cols and r in cols]
    rname = {"q35": "ours/QEMU", "q35-vhost": "vhost/vhost"}
    hdr = (f"{'metric':<24}" + "".join(f"{NAMES[k]:>12}" for k in cols)
           + "".join(f"{rname[r]:>12}" for _, r in ratios))
    print(hdr)
    print("-" * len(hdr))
    for m, label, unit, dec in METRICS:
        row = f"{label + ' ' + unit:<24}"
        for k in cols:
            s = summary[k]
            row += f"{'n/a':>12}" if not s else f"{s[m]:>12.{dec}f}"
        for ours, r in ratios:
            o, q = summary[ours], summary[r]
            row += f"{'n/a':>12}" if not (o and q) else f"{'x%.2f' % (o[m] / q[m]):>12}"
        print(row)
    for label, get in (("TCP_RR mean round trip, us", lambda s: f"{s['lat_us']:.0f}"),
                       ("retransmits guest->L1", lambda s: f"{s['retransmits']['tx']:.0f}"),
                       ("retransmits L1->guest", lambda s: f"{s['retransmits']['rx']:.0f}")):
        print(f"{label:<24}" + "".join(f"{get(summary[k]) if summary[k] else 'n/a':>12}" for k in cols))
    for k in cols:
        s = summary[k]
        if s is None:
            first = results[k][0] if results[k] else {}
            print(f"{NAMES[k]}: no result: {first.get('error', 'not run')}")
            if "\n" in first.get("detail", ""):
                print(first["detail"], file=sys.stderr)
        elif s["_runs"] != f"{len(results[k])}/{len(results[k])}":
            print(f"{NAMES[k]}: only {s['_runs']} repetitions succeeded")
    print()
    for ours, r in ratios:
        o, q = summary[ours], summary[r]
        what = ("ours/QEMU q35 (both vhost=off)" if r == "q35"
                else "ours vhost/QEMU q35 vhost=on")
        if o and q:
            print(f"{what}: " + ", ".join(f"{label} x{o[m] / q[m]:.2f}" for m, label, *_ in METRICS))
        else:
            print(f"{what}: n/a ({ours if not o else r} not measured)")
    libc = {r["guest_libc_is_hosts"] for rs in results.values() for r in rs if r["ok"]}
    if libc:
        print("guest tools: iperf3 + its libraries + netrr unpacked from L1 at run time; the guest's libc "
              "and loader " + ("were the host's" if libc == {True} else
                               "differed from the host's (the tarball's copies replaced them)"))
    for n in notes:
        print(f"note: {n}")
    if busy:
        print("note: other test box(es) ran on this machine during the run: numbers are noisy")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results, "notes": notes,
                                               "skipped": skipped, "secs": args.secs}, indent=1))
    return 0 if all(summary[k] for k in cols) else 1


if __name__ == "__main__":
    sys.exit(main())
