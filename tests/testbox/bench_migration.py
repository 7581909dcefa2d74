#!/usr/bin/env python3
"""Live migration benchmark in the test box: a running guest moves from one process to another
in the same L1 over 127.0.0.1, our vmm vs QEMU migrating to itself the same way, same guest
(256 MiB, 2 vCPUs, booted to its shell), same parameters (downtime-limit 300 ms, max-bandwidth
128 MiB/s, QEMU's defaults), all in ONE L1 boot, interleaved over a few repetitions.

Two guests: idle (its shell and a 10 ms ticker), and one that also rewrites a 16 MiB buffer with
a 1 MiB random pattern in a loop.

Measured for each VMM (the source's query-migrate, polled every 20 ms):
  total     query-migrate total-time (ms)
  downtime  query-migrate downtime (ms). Ours counts from the stop of the vCPUs until the
            destination said that it runs the VM; QEMU 7.2's until its last byte was sent.
  seen      the downtime the guest shows: a loop in the guest prints `TK` every 10 ms, both
            VMMs' consoles go through busybox `ts` (one L1 clock): the gap between the source's
            last tick and the destination's first (includes up to one tick period).
  passes    dirty-sync-count; MiB sent (ram.transferred)

    python3 tests/testbox/bench_migration.py [--reps 3] [--vmms ours,qemu] [--json out.json]

Environment as for box.py (VMM_BIN). Absolute numbers under TCG mean little: compare the VMMs with
each other, in the same run. Goals: downtime at most 50 ms for the idle guest (on hardware;
judged here against QEMU's in the same run), total time no worse than QEMU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402
from bench_snapshot import disconnect, qmp_connect, stamp, wait_completed  # noqa: E402

MEM_MIB = 256
CPUS = 2
UP = r"GUEST-USERSPACE-UP"
TIMEOUT = 600
SRC_PORT, DST_PORT = 4444, 4447
DEST = "tcp:127.0.0.1:5555"
PARAMS = {"downtime-limit": 300, "max-bandwidth": 128 << 20}
TICKER = "(while :; do echo TK; usleep 10000; done) &"
DIRTIER = ("dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null; "
           "(while :; do i=0; while [ $i -lt 16 ]; do dd if=/tmp/p of=/tmp/buf bs=1M seek=$i "
           "count=1 conv=notrunc 2>/dev/null; i=$((i+1)); done; done) &")


def qemu_argv(qmp_port: int, incoming: str | None = None) -> list[str]:
    argv = ["qemu-system-x86_64", *tb.L1_QEMU_FW, "-machine", "q35", "-enable-kvm", "-cpu", "host",
            "-m", str(MEM_MIB), "-smp", str(CPUS), "-kernel", tb.L1_KERNEL, "-initrd", tb.L1_INITRD,
            "-append", "console=ttyS0", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-no-reboot", "-nic", "none", "-qmp", f"tcp:0.0.0.0:{qmp_port},server,wait=off"]
    if incoming:
        argv += ["-incoming", incoming]
    return argv


def src_argv(box: tb.Box, key: str) -> list[str]:
    if key == "ours":
        return box.vmm_argv(tb.default_config(vcpus=CPUS, memory_mib=MEM_MIB),
                            ["--qmp", f"tcp:0.0.0.0:{SRC_PORT}", "--log-level", "info"],
                            name="bench-mig")
    return qemu_argv(SRC_PORT)


def dst_argv(key: str) -> list[str]:
    if key == "ours":
        return ["vmm", "--incoming", DEST, "--qmp", f"tcp:0.0.0.0:{DST_PORT}",
                "--log-level", "info"]
    return qemu_argv(DST_PORT, DEST)


async def migrate(src_port: int, dst_port: int) -> dict:
    dst = await qmp_connect(dst_port)
    await disconnect(dst)
    qmp = await qmp_connect(src_port)
    try:
        await qmp.execute("migrate-set-parameters", PARAMS)
        t0 = time.monotonic()
        await qmp.execute("migrate", {"uri": DEST})
        info = await wait_completed(qmp, t0, TIMEOUT)
        wall = time.monotonic() - t0
        await qmp.execute("quit")
        ram = info.get("ram", {})
        return {"wall_ms": wall * 1000, "total_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"), "setup_ms": info.get("setup-time"),
                "passes": ram.get("dirty-sync-count"), "sent_mib": ram.get("transferred", 0) / 2**20}
    finally:
        await disconnect(qmp)


def ticks(box: tb.Box, vm: tb.L2) -> list[float]:
    text = box.read_file(f"{vm.dir}/ts.out").decode(errors="replace")
    return [float(m.group(1)) for m in re.finditer(r"^(\d+\.\d+) TK\r?$", text, re.M)]


def one_run(box: tb.Box, key: str, load: str, i: int, attempt: int) -> dict:
    src = box.start_l2(f"bmig-{key}-{load}-{i}-{attempt}-src", src_argv(box, key), ts=True)
    dst = None
    try:
        src.wait_for(UP, 240, stall=60)
        src.wait_shell(120)
        if load == "dirty":
            src.send(DIRTIER)
        src.send(TICKER)
        src.wait_for(r"^TK\r?$", 60, count=20)
        time.sleep(2)
        dst = box.start_l2(f"bmig-{key}-{load}-{i}-{attempt}-dst", dst_argv(key), ts=True)
        r = asyncio.run(asyncio.wait_for(migrate(box.host_port("qmp"), box.host_port("chan")),
                                         TIMEOUT + 60))
        dst.wait_for(r"^TK\r?$", 60)
        answer = dst.guest_cmd("echo $((6*7))")
        if "42" not in answer.split():   # the ticker's lines may come in between
            raise tb.BoxError(f"migrated guest answered {answer!r}")
        # ts writes its stamped copy in blocks: complete once the VMM has exited.
        src.wait_exit(60)
        dst.send("poweroff")
        try:
            dst.wait_exit(60)
        except (AssertionError, tb.L2Error):
            dst.kill()
        before, after = ticks(box, src), ticks(box, dst)
        if not before or not after:
            raise tb.BoxError("no ticks on one side")
        r["seen_ms"] = (after[0] - before[-1]) * 1000
        # Where our switchover's time went (the VMMs' own info lines).
        r["trace"] = [ln.split("migration: ", 1)[1] for vm in (src, dst)
                      for ln in vm.stderr().splitlines() if "migration: " in ln]
        return {"ok": True, **r}
    except Exception as e:  # noqa: BLE001 -- a QMP client left by a dying L1 raises its own
        # The box's own flakes: a stalled boot, L1 gone, or an L2 vCPU that triple-faulted in
        # early boot (nested SVM under TCG; QEMU as L2 exits 0 on it, ours 1 with this line).
        flake = isinstance(e, tb.BootStall) or not box.alive() or tb.l2_triple_faulted(src)
        if not box.alive():
            e = tb.BoxError(f"L1 died: {box.crash_signature()}")
        tail = ""
        if box.alive():
            tail = src.diagnostics(15) + ("\n" + dst.diagnostics(15) if dst else "")
        return {"ok": False, "flake": flake, "error": (str(e).splitlines() or [repr(e)])[0],
                "log_tail": tail}
    finally:
        try:
            if box.alive():
                src.kill()
                if dst:
                    dst.kill()
        except (tb.BoxError, OSError):
            pass   # L1 went away meanwhile: the next run boots a fresh one


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vmms", default="ours,qemu")
    ap.add_argument("--json", help="write the raw results there")
    args = ap.parse_args()
    keys = [k.strip() for k in args.vmms.split(",") if k.strip()]
    if any(k not in ("ours", "qemu") for k in keys):
        raise SystemExit("VMMs: ours, qemu")
    loads = ("idle", "dirty")
    results: dict[tuple[str, str], list[dict]] = {(k, l): [] for k in keys for l in loads}
    with tb.Box(with_qemu=True) as box:
        warm = f"cat {tb.L1_KERNEL} {tb.L1_INITRD} > /dev/null"
        box.check(warm)
        for i in range(args.reps):
            for load in loads:
                for k in keys:
                    for attempt in (1, 2, 3):
                        if not box.alive():
                            box.restart()
                            box.check(warm)
                        r = one_run(box, k, load, i, attempt)
                        if r["ok"] or not r.get("flake"):
                            break
                        tb.log(f"{k} {load} #{i}: box flake ({r['error']}), running it again")
                    results[(k, load)].append(r)
                    if r["ok"]:
                        tb.log(f"{k} {load} #{i}: total {r['total_ms']} ms, downtime "
                               f"{r['downtime_ms']} ms (guest saw {r['seen_ms']:.0f} ms), "
                               f"{r['passes']} passes, {r['sent_mib']:.1f} MiB")
                        for line in r.get("trace", []):
                            tb.log(f"  {line}")
                    else:
                        tb.log(f"{k} {load} #{i}: FAILED: {r['error']}")
                        print(r["log_tail"], file=sys.stderr)
        try:
            if not box.alive():
                box.restart()
            kernel = box.check(f"cat {tb.L1_GUEST}/guest.env; uname -r; qemu-system-x86_64 "
                               f"--version | head -1").split("\n")
        except (tb.BoxError, OSError) as e:   # the figures are in; only the legend is lost
            kernel = [f"(versions unknown: {e})"]

    def med(rs, f):
        vals = [r[f] for r in rs if r.get(f) is not None]
        return statistics.median(vals) if vals else None

    summary = {}
    print()
    print(f"Live migration benchmark in the test box: guest {MEM_MIB} MiB, {CPUS} vCPUs "
          f"({' '.join(x.strip() for x in kernel if x.strip())}); medians of {args.reps} runs; "
          f"downtime-limit 300 ms, max-bandwidth 128 MiB/s")
    hdr = (f"{'guest':<6} {'VMM':<5} {'runs':>5} {'total ms':>9} {'downtime ms':>12} "
           f"{'guest saw ms':>13} {'passes':>7} {'MiB sent':>9}")
    print(hdr)
    print("-" * len(hdr))
    for load in loads:
        for k in keys:
            rs = [r for r in results[(k, load)] if r["ok"]]
            if not rs:
                err = results[(k, load)][0]["error"] if results[(k, load)] else "not run"
                print(f"{load:<6} {k:<5} {'n/a':>5}  {err}")
                continue
            s = {f: med(rs, f) for f in ("total_ms", "downtime_ms", "seen_ms", "passes", "sent_mib")}
            summary[f"{k}-{load}"] = s
            print(f"{load:<6} {k:<5} {len(rs):>3}/{len(results[(k, load)]):<1} "
                  f"{s['total_ms']:>9.0f} {s['downtime_ms']:>12.0f} {s['seen_ms']:>13.0f} "
                  f"{s['passes']:>7.0f} {s['sent_mib']:>9.1f}")
    print("downtime: the VMM's own figure (ours: vCPUs stopped -> the destination runs the VM; "
          "QEMU: stopped -> last byte sent); guest saw: last 10 ms tick on the source -> first "
          "on the destination, one L1 clock")
    for load in loads:
        o, q = summary.get(f"ours-{load}"), summary.get(f"qemu-{load}")
        if o and q:
            print(f"ours/qemu {load}: total time x{o['total_ms'] / q['total_ms']:.2f}, downtime "
                  f"x{o['downtime_ms'] / max(q['downtime_ms'], 1):.2f}, guest-seen downtime "
                  f"x{o['seen_ms'] / max(q['seen_ms'], 1):.2f}")
    o, q = summary.get("ours-idle"), summary.get("qemu-idle")
    if o and q:
        # The aim (<= 50 ms idle) is for real hardware; under TCG every step is tens of times
        # slower, so here it is judged against QEMU's own downtime in the same run.
        ok = o["downtime_ms"] <= q["downtime_ms"]
        print(f"idle downtime aim (50 ms on hardware; here: no worse than QEMU in this run): "
              f"{'met' if ok else 'NOT met'} (ours {o['downtime_ms']:.0f} ms to the "
              f"destination's answer, QEMU {q['downtime_ms']:.0f} ms to its last byte; guest saw "
              f"{o['seen_ms']:.0f} vs {q['seen_ms']:.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"summary": summary, "runs": {f"{k}-{l}": v for (k, l), v in results.items()}},
            indent=1))
    return 0 if all(summary.get(f"{k}-{l}") for k in keys for l in loads) else 1


if __name__ == "__main__":
    sys.exit(main())
