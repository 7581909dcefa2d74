#!/usr/bin/env python3
"""Snapshot benchmark in the test box: save a running guest to a file and restore it in a new
process, our vmm vs QEMU, same guest (256 MiB, 2 vCPUs, booted to its shell), all in ONE L1 boot,
interleaved over a few repetitions.

Measured for each VMM:
  save      wall time from QMP `migrate` to query-migrate saying "completed" (polled every 20 ms
            from the host, through the box's port forward: a few ms of error), and the VMM's own
            query-migrate total-time and downtime. Ours: `migrate {"uri": "file:/tmp/..."}`.
            QEMU 7.2 (Debian 12) has no `file:` transport: `migrate {"uri": "exec:cat > FILE"}`,
            its documented way to save to a file before 8.2.
  size      the state file's apparent size (`stat`) and what it occupies (`du`; ours skips zero
            pages as holes, QEMU writes a marker per zero page).
  restore   time from the new process's exec (`vmm --incoming file:F` / `qemu-system-x86_64 ...
            -incoming "exec:cat F"`) to the guest's shell answering a typed command. A loop in L1,
            started together with the VMM, types `echo MA''RK-k` into its console every 20 ms; the
            VMM's stdout goes through busybox `ts` (µs stamps, one clock, as bench_boot.py): the
            time is stamp(first "MARK-k" output line) - stamp("VMM-EXEC-START"). Also the time
            to the restored guest's first console output of any kind (QEMU loses the input that
            arrives while it loads the state: its first lines come out garbled), and the
            destination's query-migrate total-time when it reports one.

    python3 tests/testbox/bench_snapshot.py [--reps 3] [--vmms ours,qemu,ch] [--json out.json] [--verbose]

Cloud Hypervisor ("ch", with CH_BIN=PATH; peers.py; ch-remote next to it): the guest booted from the same kernel as ELF vmlinux, same initramfs; save = in L1,
`ch-remote pause` + `ch-remote snapshot file:///tmp/DIR` (timed by busybox ts, in L1: no host
round trip, unlike the QMP figures), size = the snapshot directory (config.json, state.json,
memory-ranges), restore = `cloud-hypervisor --restore source_url=file:///tmp/DIR,resume=true` (its
default eager memory copy) measured exactly as the others (exec -> first answered command). Without
CH_BIN the column is skipped with a line that says so.

Environment as for box.py (VMM_BIN). Absolute numbers under TCG mean little: compare the VMMs with
each other, in the same run. Goals: restore at least 5x faster than QEMU, save no slower.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402
from qemu.qmp import QMPClient  # noqa: E402
import peers  # noqa: E402

MEM_MIB = 256
CPUS = 2
UP = r"GUEST-USERSPACE-UP"
SAVE_TIMEOUT = 600
RESTORE_TIMEOUT = 240
PROBE_US = 20000
# An answer to the probe: the probe types `echo MA''RK-k`, so "MARK-k" is only in the shell's
# output, never in the tty's echo of the input; it may follow the prompt on the same line.
MARK = r"MARK-\d+\r?$"


def qemu_argv(incoming: str | None = None) -> list[str]:
    argv = ["qemu-system-x86_64", *tb.L1_QEMU_FW, "-machine", "q35", "-enable-kvm", "-cpu", "host",
            "-m", str(MEM_MIB), "-smp", str(CPUS), "-kernel", tb.L1_KERNEL, "-initrd", tb.L1_INITRD,
            "-append", "console=ttyS0", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-no-reboot", "-nic", "none", "-qmp", "tcp:0.0.0.0:4444,server,wait=off"]
    if incoming:
        argv += ["-incoming", incoming]
    return argv


def ours_argv(box: tb.Box) -> list[str]:
    return box.vmm_argv(tb.default_config(vcpus=CPUS, memory_mib=MEM_MIB),
                        ["--qmp", "tcp:0.0.0.0:4444"], name="bench-snap")


def save_uri(key: str, path: str) -> str:
    return f"file:{path}" if key == "ours" else f"exec:cat > {path}"


CH_SRC_SOCK = "/tmp/bsnap-ch-src.sock"
CH_DST_SOCK = "/tmp/bsnap-ch-dst.sock"


def restore_argv(key: str, path: str) -> list[str]:
    if key == "ch":
        return [peers.PTYRUN_NAME, "cloud-hypervisor", "--api-socket", f"path={CH_DST_SOCK}",
                "--restore", f"source_url=file://{path},resume=true"]
    if key == "ours":
        return ["vmm", "--incoming", f"file:{path}", "--qmp", "tcp:0.0.0.0:4444"]
    return qemu_argv(incoming=f"exec:cat {path}")


async def qmp_connect(port: int, timeout: float = 60) -> QMPClient:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        qmp = QMPClient("bench-snapshot")
        try:
            await asyncio.wait_for(qmp.connect(("127.0.0.1", port)), 10)
            return qmp
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
            await asyncio.sleep(0.5)
    raise tb.BoxError(f"cannot connect to QMP on port {port}: {last!r}")


async def disconnect(qmp: QMPClient) -> None:
    try:
        await qmp.disconnect()
    except Exception:  # noqa: BLE001 - the VMM may have closed it (quit)
        pass


async def wait_completed(qmp: QMPClient, t0: float, timeout: float) -> dict:
    """Polls query-migrate every 20 ms until `completed` (its final info); BoxError when it
    fails, is cancelled, or takes more than `timeout` seconds from `t0` (time.monotonic())."""
    while True:
        info = await qmp.execute("query-migrate")
        st = info.get("status")
        if st == "completed":
            return info
        if st in ("failed", "cancelled") or time.monotonic() - t0 > timeout:
            raise tb.BoxError(f"migration did not complete: {info}")
        await asyncio.sleep(0.02)


async def qmp_save(port: int, uri: str) -> dict:
    """migrate, poll query-migrate until completed, quit. Returns times and the final info."""
    qmp = await qmp_connect(port)
    try:
        status = await qmp.execute("query-status")
        if status.get("status") != "running":
            raise tb.BoxError(f"VM not running before the save: {status}")
        t0 = time.monotonic()
        await asyncio.wait_for(qmp.execute("migrate", {"uri": uri}), SAVE_TIMEOUT)
        t_cmd = time.monotonic() - t0
        info = await wait_completed(qmp, t0, SAVE_TIMEOUT)
        wall = time.monotonic() - t0
        await qmp.execute("quit")
        return {"save_wall_ms": wall * 1000, "migrate_cmd_ms": t_cmd * 1000,
                "save_total_ms": info.get("total-time"), "save_downtime_ms": info.get("downtime"),
                "ram": info.get("ram", {})}
    finally:
        await disconnect(qmp)


async def qmp_dest_view(port: int) -> dict:
    qmp = await qmp_connect(port, 30)
    try:
        status = await qmp.execute("query-status")
        info = await qmp.execute("query-migrate")
        return {"dest_status": status.get("status"), "dest_total_ms": info.get("total-time"),
                "dest_migrate_status": info.get("status")}
    finally:
        await disconnect(qmp)


def ch_save(box: tb.Box, path: str) -> dict:
    """pause + snapshot of the running CH guest, timed in L1 by busybox ts (one clock)."""
    rem = f"ch-remote --api-socket={CH_SRC_SOCK}"
    out = box.check(
        f"rm -rf {path}; mkdir -p {path}; {{ echo SAVE-T0; {rem} pause 2>&1 && echo SAVE-PAUSED && "
        f"{rem} snapshot file://{path} 2>&1 && echo SAVE-T1; }} | ts '%.s'", timeout=SAVE_TIMEOUT)
    t0 = stamp(out, r"^(\d+\.\d+) SAVE-T0")
    tp = stamp(out, r"^(\d+\.\d+) SAVE-PAUSED")
    t1 = stamp(out, r"^(\d+\.\d+) SAVE-T1")
    if t0 is None or t1 is None:
        raise tb.BoxError(f"ch-remote pause/snapshot failed: {out.strip()[-300:]!r}")
    return {"save_wall_ms": (t1 - t0) * 1000, "pause_ms": (tp - t0) * 1000 if tp else None,
            "save_total_ms": None, "save_downtime_ms": None}


def start_with_probe(box: tb.Box, name: str, argv: list[str]) -> tb.L2:
    """Starts an L2 VMM (stdout stamped by ts) together with a loop in L1 that types
    `echo MA''RK-k` on its console every PROBE_US µs until DIR/stop-probe exists or it ends."""
    vm = tb.L2(box, name, argv, ts=True)
    d = vm.dir
    cmd = " ".join(shlex.quote(a) for a in argv)
    box.check(
        f"rm -rf {d}; setsid /payload/tb/l2start.sh {d} ts {cmd} < /dev/null > /dev/null 2>&1 &\n"
        f"(while [ ! -p {d}/in ]; do usleep 2000; done; k=0; "
        f"while [ ! -e {d}/rc ] && [ ! -e {d}/stop-probe ] && [ $k -lt 5000 ]; do "
        f"echo \"echo MA''RK-$k\" > {d}/in; usleep {PROBE_US}; k=$((k+1)); done) "
        f"< /dev/null > /dev/null 2>&1 &\n"
        f"i=0; while [ ! -s {d}/pid ] && [ ! -e {d}/rc ] && [ $i -lt 200 ]; do usleep 50000; "
        f"i=$((i+1)); done; cat {d}/pid")
    vm.started_at = time.monotonic()
    box.l2s.append(vm)
    return vm


def stamp(text: str, rx: str) -> float | None:
    m = re.search(rx, text, re.M)
    return float(m.group(1)) if m else None


def one_run(box: tb.Box, key: str, i: int, attempt: int) -> dict:
    port = box.host_port("qmp")
    path = f"/tmp/bench-{key}.snap"
    box.run(f"rm -rf {path} {CH_SRC_SOCK} {CH_DST_SOCK}")
    if key == "ch":
        src_argv = peers.ch_argv(MEM_MIB, CPUS, api_socket=CH_SRC_SOCK)
    else:
        src_argv = ours_argv(box) if key == "ours" else qemu_argv()
    src = box.start_l2(f"bsnap-{key}-{i}-{attempt}-src", src_argv)
    dst = None
    try:
        src.wait_for(UP, 240, stall=60)
        src.wait_shell(120)
        if key == "ch":
            r = ch_save(box, path)
            src.kill()   # the source stays paused after a snapshot
            rc = None
            # a directory: apparent size of its files, and what it occupies
            sizes = box.check(f"cat {path}/* | wc -c; du -sk {path}").split()
        else:
            r = asyncio.run(asyncio.wait_for(qmp_save(port, save_uri(key, path)), SAVE_TIMEOUT + 60))
            rc = src.wait_exit(60)
            sizes = box.check(f"stat -c %s {path}; du -k {path}").split()
        r.update({"file_bytes": int(sizes[0]), "file_du_kib": int(sizes[1]), "quit_rc": rc})
        # every restore reads its state from L1's page cache
        box.check(f"cat {path} > /dev/null" if key != "ch" else f"cat {path}/* > /dev/null")

        dst = start_with_probe(box, f"bsnap-{key}-{i}-{attempt}-dst", restore_argv(key, path))
        dst.wait_for(MARK, RESTORE_TIMEOUT)
        box.check(f"touch {dst.dir}/stop-probe")
        if key != "ch":
            r.update(asyncio.run(asyncio.wait_for(qmp_dest_view(port), 60)))
        answer = dst.guest_cmd("echo $((6*7))").strip()
        if not answer.endswith("42"):
            raise tb.BoxError(f"restored guest answered {answer!r}")
        dst.send("poweroff")
        try:
            r["poweroff_rc"] = dst.wait_exit(60)
        except AssertionError:
            r["poweroff_rc"] = None
            dst.kill()
            dst.wait_exit(30)
        stamped = box.read_file(f"{dst.dir}/ts.out").decode(errors="replace")
        t0 = stamp(stamped, r"^(\d+\.\d+) VMM-EXEC-START")
        t1 = stamp(stamped, r"^(\d+\.\d+) .*?" + MARK)
        if t0 is None or t1 is None:
            raise tb.BoxError(f"no timestamps in ts.out: {stamped[:300]!r}")
        r["restore_ms"] = (t1 - t0) * 1000
        # any console output of the restored guest (its tty echoing the typed probe, a half-lost
        # line...) already shows it runs: the lower bound, fair to a VMM that drops early input
        tf = stamp(stamped, r"^(\d+\.\d+) (?!VMM-EXEC-START)\S")
        r["first_output_ms"] = (tf - t0) * 1000 if tf is not None and tf >= t0 else None
        # the first console lines of the restored VMM, ms after its exec (where the time went)
        trace = []
        for line in stamped.splitlines():
            m = re.match(r"^(\d+\.\d+) (.*)", line)
            if m and float(m.group(1)) >= t0:
                trace.append(f"{(float(m.group(1)) - t0) * 1000:8.1f} {m.group(2)[:60]!r}")
            if len(trace) >= 8:
                break
        r["restore_trace"] = trace
        return {"ok": True, **r}
    except (AssertionError, tb.BoxError, TimeoutError, asyncio.TimeoutError, OSError) as e:
        flake = isinstance(e, tb.BootStall) or not box.alive()
        if not box.alive():
            e = tb.BoxError(f"L1 died: {box.crash_signature()}")
        tail = ""
        if box.alive():
            tail = src.diagnostics(15) + ("\n" + dst.diagnostics(15) if dst else "")
        return {"ok": False, "flake": flake, "error": (str(e).splitlines() or [repr(e)])[0],
                "log_tail": tail}
    finally:
        if box.alive():
            src.kill()
            if dst:
                dst.kill()
            box.run(f"rm -rf {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vmms", default="ours,qemu,ch")
    ap.add_argument("--json", help="write the raw results there")
    ap.add_argument("--verbose", action="store_true",
                    help="print the restored console's first lines with their times")
    args = ap.parse_args()
    keys = [k.strip() for k in args.vmms.split(",") if k.strip()]
    for k in keys:
        if k not in ("ours", "qemu", "ch"):
            raise SystemExit(f"unknown VMM {k}")
    if tb.l2_is_qemu():
        raise SystemExit("TESTBOX_L2=qemu: our vmm's state files need our vmm")
    results: dict[str, list[dict]] = {k: [] for k in keys}
    notes: dict[str, str] = {}
    ch = peers.ch_bins() if "ch" in keys else None
    if "ch" in keys and not ch:
        print(peers.SKIP_LINE)
        keys.remove("ch")
        del results["ch"]
    with tb.Box(with_qemu=True, extra_bins=peers.box_extra_bins() if ch else None) as box:
        if "ours" in keys and not box.has_vmm():
            notes["ours"] = "no vmm binary (build it or set VMM_BIN)"
            keys_run = [k for k in keys if k != "ours"]
        else:
            keys_run = list(keys)
        warm = f"cat {tb.L1_KERNEL} {tb.L1_INITRD} {peers.L1_VMLINUX if ch else ''} > /dev/null"
        box.check(warm)
        for i in range(args.reps):
            for k in keys_run:
                for attempt in (1, 2, 3):
                    if not box.alive():
                        box.restart()
                        box.check(warm)
                    r = one_run(box, k, i, attempt)
                    if r["ok"] or not r.get("flake"):
                        break
                    tb.log(f"{k} #{i}: box flake ({r['error']}), running it again")
                results[k].append(r)
                if r["ok"]:
                    tb.log(f"{k} #{i}: save {r['save_wall_ms']:.0f} ms (VMM: {r['save_total_ms']} ms, "
                           f"pause: {r.get('pause_ms')}), "
                           f"file {r['file_bytes'] / 2**20:.1f} MiB ({r['file_du_kib'] / 1024:.1f} MiB "
                           f"on disk), restore -> answer {r['restore_ms']:.0f} ms")
                    if args.verbose:
                        tb.log("restored console (ms after exec):\n  " + "\n  ".join(r["restore_trace"]))
                else:
                    tb.log(f"{k} #{i}: FAILED: {r['error']}")
                    if sum(1 for x in results[k] if not x["ok"]) == 1:
                        print(r["log_tail"], file=sys.stderr)
        if not box.alive():
            box.restart()
        kernel = box.check(f"cat {tb.L1_GUEST}/guest.env; uname -r; qemu-system-x86_64 --version "
                           f"| head -1").split("\n")

    summary = {}
    for k in keys:
        ok = [r for r in results[k] if r["ok"]]
        if not ok:
            summary[k] = None
            continue

        def med(f):
            vals = [r[f] for r in ok if r.get(f) is not None]
            return statistics.median(vals) if vals else None
        summary[k] = {
            "runs": len(ok), "failed": len(results[k]) - len(ok),
            "save_wall_ms": med("save_wall_ms"), "save_total_ms": med("save_total_ms"),
            "save_downtime_ms": med("save_downtime_ms"),
            "file_mib": med("file_bytes") / 2**20, "file_du_mib": med("file_du_kib") / 1024,
            "restore_ms": med("restore_ms"),
            "restore_min": min(r["restore_ms"] for r in ok),
            "restore_max": max(r["restore_ms"] for r in ok),
            "dest_total_ms": med("dest_total_ms"), "first_output_ms": med("first_output_ms"),
        }

    def f(v, spec=".0f"):
        return "-" if v is None else format(v, spec)

    print()
    print(f"Snapshot benchmark in the test box: guest {MEM_MIB} MiB, {CPUS} vCPUs, booted to its shell "
          f"({' '.join(x.strip() for x in kernel if x.strip())}); medians of {args.reps} runs")
    hdr = (f"{'VMM':<6} {'runs':>5} {'save ms':>9} {'save (VMM)':>11} {'downtime':>9} "
           f"{'file MiB':>9} {'on disk':>8} {'restore->answer ms [min-max]':>30} {'first output':>13} "
           f"{'restore (VMM)':>14}")
    print(hdr)
    print("-" * len(hdr))
    for k in keys:
        s = summary.get(k)
        if not s:
            why = notes.get(k) or (f"all runs failed: {results[k][0]['error']}" if results[k] else "not run")
            print(f"{k:<6} {'n/a':>5}  {why}")
            continue
        rest = f"{s['restore_ms']:.0f} [{s['restore_min']:.0f}-{s['restore_max']:.0f}]"
        print(f"{k:<6} {s['runs']:>3}/{s['runs'] + s['failed']:<1} {f(s['save_wall_ms']):>9} "
              f"{f(s['save_total_ms']):>11} {f(s['save_downtime_ms']):>9} {s['file_mib']:>9.1f} "
              f"{s['file_du_mib']:>8.1f} {rest:>30} {f(s['first_output_ms']):>13} {f(s['dest_total_ms']):>14}")
    print("save ms: QMP migrate -> query-migrate completed (host wall clock); save (VMM): its "
          "total-time; restore->answer: new process exec -> first answered console command; first "
          "output: -> the restored guest's first console output of any kind")
    if "qemu" in keys:
        print("QEMU 7.2 saves/restores through exec:cat (no file: transport before QEMU 8.2)")
    ours, qemu = summary.get("ours"), summary.get("qemu")
    if ours and qemu:
        rr = qemu["restore_ms"] / ours["restore_ms"]
        sr = ours["save_wall_ms"] / qemu["save_wall_ms"]
        print(f"\nours/qemu: restore time x{ours['restore_ms'] / qemu['restore_ms']:.2f} "
              f"({rr:.1f}x faster; goal >= 5x: {'met' if rr >= 5 else 'NOT met'}), "
              f"save time x{sr:.2f} (goal <= 1: {'met' if sr <= 1 else 'NOT met'}), "
              f"file size (apparent) x{ours['file_mib'] / qemu['file_mib']:.2f}, "
              f"(on disk) x{ours['file_du_mib'] / qemu['file_du_mib']:.2f}")
        if ours["first_output_ms"] and qemu["first_output_ms"]:
            print(f"ours/qemu: time to the first console output x"
                  f"{ours['first_output_ms'] / qemu['first_output_ms']:.2f} "
                  f"({qemu['first_output_ms'] / ours['first_output_ms']:.1f}x faster)")
    elif "ours" in keys and "qemu" in keys:
        print("\nours/qemu: n/a (" + ("ours" if not ours else "QEMU") + " not measured)")
    if ch:
        print(f"ch: {peers.ch_version(ch[0])}; save = ch-remote pause + snapshot (timed in L1), "
              f"file = its snapshot directory, restore with resume=true (eager memory copy)")
    chs = summary.get("ch")
    if ours and chs:
        print(f"ours/ch: restore time x{ours['restore_ms'] / chs['restore_ms']:.2f}, "
              f"save time x{ours['save_wall_ms'] / chs['save_wall_ms']:.2f}, "
              f"file size (apparent) x{ours['file_mib'] / chs['file_mib']:.2f}, "
              f"(on disk) x{ours['file_du_mib'] / chs['file_du_mib']:.2f}")
        if ours["first_output_ms"] and chs["first_output_ms"]:
            print(f"ours/ch: time to the first console output x"
                  f"{ours['first_output_ms'] / chs['first_output_ms']:.2f}")
    elif "ours" in keys and "ch" in keys:
        print("ours/ch: n/a (" + ("ours" if not ours else "Cloud Hypervisor") + " not measured)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results, "notes": notes},
                                              indent=1))
    ok = all(summary.get(k) or k in notes for k in keys)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
