#!/usr/bin/env python3
"""Balloon benchmark in the test box (issue 12): how much memory, and how fast, our vmm's
virtio-balloon gives back to L1 compared with QEMU q35's virtio-balloon-pci, same guest, all in ONE
L1 boot.

Each VMM in turn (one at a time) boots the default guest (512 MiB, 1 vCPU) twice, with a QMP
monitor on L1's port 4444 (forwarded to this host):
  ours   vmm with "balloon": {"deflate_on_oom": false, "free_page_reporting": F,
         "stats_interval_s": 0} and --qmp tcp:0.0.0.0:4444
  q35    qemu-system-x86_64 -machine q35 ... -device virtio-balloon-pci,id=balloon0[,free-page-
         reporting=on] -qmp tcp:0.0.0.0:4444,server=on,wait=off
and measures the VMM process's RSS in L1 (VmRSS of /proc/PID/status):
  inflate  (F off) the guest fills 400 MiB of a tmpfs and deletes the file (all its memory touched
           once); RSS; QMP `balloon` 256 MiB; `query-balloon` polled every 50 ms until `actual` <=
           260 MiB: the time from the command to that answer, timed on THIS HOST (monotonic clock,
           through the box's port forward: a few ms of error); RSS again 1 s later: the drop.
  fpr      (F on, a fresh boot) the guest keeps 300 MiB in the tmpfs; after SETTLE_S seconds a
           shell loop in L1 reads RSS, types `rm -f /fill/x` into the guest's console itself and
           reads RSS every 0.5 s for WINDOW seconds, timed by L1's /proc/uptime (10 ms): the
           largest drop seen, and the time from the typed rm to the first sample 200 MiB below.

    python3 tests/testbox/bench_balloon.py [--reps 1] [--vmms ours,q35] [--window 60] [--json out.json]

Ratios (ours/QEMU column): above 1.0 means ours is better (memory returned ours/QEMU, time
QEMU/ours). Environment as for box.py (VMM_BIN; TESTBOX_L2=qemu makes "ours" a QEMU stand-in).
Absolute times under TCG mean little (L1 is emulated): compare the VMMs in the same run. Not run
in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402
from bench_console import CompilerWatch  # noqa: E402
from bench_disk import other_boxes  # noqa: E402
from qemu.qmp import QMPError  # noqa: E402
from test_balloon import rss_mib, touch  # noqa: E402
from test_control import connect  # noqa: E402

MEM_MIB = 512
CPUS = 1
MIB = 1 << 20
TARGET = 256 * MIB          # the balloon's target
REACHED = 260 * MIB         # `actual` at or below this: inflated
INFLATE_MIB = 400           # touched (then freed) before the inflate
FPR_MIB = 300               # kept in the tmpfs, then freed, with free page reporting
FPR_GOAL_MIB = 200          # the time until this much has come back
POLL_S = 0.05               # query-balloon every POLL_S (from the host)
INFLATE_TIMEOUT = 300
SETTLE_S = 3                # after the fill, before the RSS reading (reports of earlier frees)
QMP_L1 = tb.GUEST_PORTS["qmp"]
KEYS = ("ours", "q35")
NAMES = {"ours": "ours", "q35": "QEMU q35"}
SCENARIOS = ("inflate", "fpr")
# (key, scenario, field, label, unit, decimals, higher is better)
METRICS = [("inflate_mib", "inflate", "drop_mib", "inflate: RSS returned", "MiB", 0, True),
           ("inflate_s", "inflate", "secs", "inflate: time to 256 MiB", "s", 2, False),
           ("fpr_mib", "fpr", "drop_mib", "free page rep.: RSS returned", "MiB", 0, True),
           ("fpr_s", "fpr", "secs_goal", f"free page rep.: time to {FPR_GOAL_MIB} MiB", "s", 1, False)]


def vm_argv(box: tb.Box, key: str, fpr: bool) -> list[str]:
    cfg = tb.default_config(vcpus=CPUS, memory_mib=MEM_MIB)
    if key == "q35" or tb.l2_is_qemu():
        dev = "virtio-balloon-pci,id=balloon0" + (",free-page-reporting=on" if fpr else "")
        return tb.qemu_argv_for(cfg, []) + ["-device", dev, "-qmp",
                                            f"tcp:0.0.0.0:{QMP_L1},server=on,wait=off"]
    cfg["balloon"] = {"deflate_on_oom": False, "free_page_reporting": fpr, "stats_interval_s": 0}
    return box.vmm_argv(cfg, ["--qmp", f"tcp:0.0.0.0:{QMP_L1}"], name="bench-balloon")


def filled(vm: tb.L2, mib: int, keep: bool) -> None:
    out = touch(vm, mib, keep=keep)
    if "RC=0" not in out or f"{mib}+0 records out" not in out:
        raise AssertionError(f"the guest could not fill {mib} MiB of its tmpfs: {out.strip()!r}")


async def balloon_to_target(port: int) -> dict:
    """`balloon` to TARGET, then query-balloon until actual <= REACHED (timed on this host)."""
    qmp = await connect(port)
    try:
        start = (await qmp.execute("query-balloon"))["actual"]
        t0 = time.monotonic()
        await qmp.execute("balloon", {"value": TARGET})
        polls = 0
        while True:
            actual = (await qmp.execute("query-balloon"))["actual"]
            polls += 1
            if actual <= REACHED:
                return {"secs": time.monotonic() - t0, "polls": polls, "actual_before": start,
                        "actual": actual}
            if time.monotonic() - t0 > INFLATE_TIMEOUT:
                raise AssertionError(f"the balloon did not reach {REACHED >> 20} MiB within "
                                     f"{INFLATE_TIMEOUT} s (actual {actual >> 20} MiB)")
            await asyncio.sleep(POLL_S)
    finally:
        try:
            await qmp.disconnect()
        except Exception:  # noqa: BLE001 - a VMM that died says so elsewhere
            pass


def inflate(box: tb.Box, vm: tb.L2) -> dict:
    filled(vm, INFLATE_MIB, keep=False)
    before = rss_mib(box, vm)
    r = asyncio.run(asyncio.wait_for(balloon_to_target(box.host_port("qmp")), INFLATE_TIMEOUT + 120))
    time.sleep(1)
    after = rss_mib(box, vm)
    return {**r, "rss_before": before, "rss_after": after, "drop_mib": before - after}


def fpr(box: tb.Box, vm: tb.L2, window: float) -> dict:
    filled(vm, FPR_MIB, keep=True)
    tag = uuid.uuid4().hex[:8]
    esc = "".join(f"\\{b:03o}" for b in f"rm -f /fill/x; echo FR''EED{tag}\n".encode())
    # All in L1, one console command: no host round trips between the samples. Times in 1/100 s.
    out = box.check(
        f"p={vm.pid()}; rss() {{ set -- $(grep VmRSS /proc/$p/status); echo $2; }}; "
        f"now() {{ set -- $(cat /proc/uptime); echo ${{1%.*}}${{1#*.}}; }}; sleep {SETTLE_S}; "
        f"echo B $(rss); printf '{esc}' > {vm.dir}/in; t0=$(now); echo T0 $t0; "
        f"while [ $(($(now) - t0)) -le {int(window * 100)} ] && [ ! -e {vm.dir}/rc ]; do "
        f"echo S $(now) $(rss); usleep 500000; done", timeout=window + 120)
    vm.wait_for(rf"FREED{tag}", 60)
    m0, mt = re.search(r"^B (\d+)$", out, re.M), re.search(r"^T0 (\d+)$", out, re.M)
    samples = [(int(t), int(k)) for t, k in re.findall(r"^S (\d+) (\d+)$", out, re.M)]
    if not (m0 and mt and samples):
        raise AssertionError(f"no RSS samples from L1: {out.strip()[-300:]!r}")
    before, t0 = int(m0.group(1)) / 1024, int(mt.group(1))
    drops = [((t - t0) / 100, before - k / 1024) for t, k in samples]
    goal = next((s for s, d in drops if d >= FPR_GOAL_MIB), None)
    return {"rss_before": before, "rss_min": before - max(d for _, d in drops),
            "drop_mib": max(d for _, d in drops), "secs_goal": goal, "samples": len(samples),
            "trace": [[round(s, 2), round(d, 1)] for s, d in drops]}


def one_run(box: tb.Box, key: str, scen: str, rep: int, window: float) -> dict:
    up = tb.guest_env().get("UP_REGEX", "GUEST-USERSPACE-UP")
    vm = box.start_l2(f"bench-balloon-{key}-{scen}-{rep}", vm_argv(box, key, scen == "fpr"))
    try:
        vm.wait_for(up, 240, stall=60)
        vm.wait_shell(120)
        out = vm.guest_cmd("grep -c '^virtio_balloon ' /proc/modules; "
                           "dmesg | grep -ci 'free page reporting enabled'")
        counts = re.findall(r"^(\d+)$", out, re.M)
        if len(counts) < 2:
            raise AssertionError(f"unexpected guest output: {out!r}")
        mod, rep_on = int(counts[-2]), int(counts[-1])
        if not mod:
            raise AssertionError("the guest has no virtio_balloon module loaded")
        if scen == "fpr" and not rep_on:
            raise AssertionError("free page reporting is not enabled in the guest (dmesg)")
        r = inflate(box, vm) if scen == "inflate" else fpr(box, vm, window)
        tb.log(f"{key} {scen} #{rep}: {fmt(scen, {'ok': True, **r})}")
        vm.send("poweroff")
        try:
            rc = vm.wait_exit(60)
        except AssertionError:
            rc = None
        return {"ok": True, **r, "reporting_enabled": bool(rep_on), "poweroff_rc": rc}
    finally:
        if box.alive():   # else kill() would raise and hide the real error
            vm.kill()


def run_one(box: tb.Box, key: str, scen: str, rep: int, window: float) -> dict:
    """one_run, again after a flake of the nested box (tb.bench_run)."""
    return tb.bench_run(box, f"{key} {scen} #{rep}", lambda: one_run(box, key, scen, rep, window),
                        (tb.BoxError, TimeoutError, AssertionError, QMPError, OSError, EOFError))


def fmt(scen: str, r: dict) -> str:
    if not r.get("ok"):
        return f"FAILED ({r.get('error')})"
    if scen == "inflate":
        return (f"RSS {r['rss_before']:.0f} -> {r['rss_after']:.0f} MiB (-{r['drop_mib']:.0f}), "
                f"actual {r['actual'] >> 20} MiB after {r['secs']:.2f} s ({r['polls']} polls)")
    goal = "n/a" if r["secs_goal"] is None else f"{r['secs_goal']:.1f} s"
    return (f"RSS {r['rss_before']:.0f} -> min {r['rss_min']:.0f} MiB (-{r['drop_mib']:.0f}), "
            f"{FPR_GOAL_MIB} MiB back after {goal} ({r['samples']} samples)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=1, help="repetitions, VMMs interleaved (default 1)")
    ap.add_argument("--vmms", default=",".join(KEYS))
    ap.add_argument("--window", type=float, default=60, help="free page reporting: seconds of RSS "
                    "samples after the rm (default 60)")
    ap.add_argument("--json", help="write the raw results there")
    args = ap.parse_args()
    keys = [k.strip() for k in args.vmms.split(",") if k.strip()]
    for k in keys:
        if k not in KEYS:
            raise SystemExit(f"unknown VMM {k} ({', '.join(KEYS)})")
    busy = other_boxes()
    if busy:
        tb.log(f"warning: {len(busy)} other test box(es) running on this machine: numbers will be noisy")

    results: dict[str, list[dict]] = {k: [] for k in keys}
    notes: list[str] = []
    watch = CompilerWatch()
    t_start = time.monotonic()
    with tb.Box(with_qemu=True) as box:
        if "ours" in keys and not box.has_vmm() and not tb.l2_is_qemu():
            raise SystemExit("no vmm binary: build it (cargo build --release) or set VMM_BIN")
        if tb.l2_is_qemu():
            notes.append("TESTBOX_L2=qemu: QEMU q35 stands in for our vmm")
        box.check(f"cat {tb.L1_KERNEL} {tb.L1_INITRD} > /dev/null")   # warm L1's page cache
        for i in range(args.reps):
            for k in keys:
                run = {}
                for scen in SCENARIOS:
                    busy = busy or other_boxes(box)
                    watch.current = f"{NAMES[k]} {scen} #{i}"
                    run[scen] = run_one(box, k, scen, i, args.window)
                    watch.current = None
                results[k].append(run)
        busy = busy or other_boxes(box)
        if not box.healthy():
            box.restart()
        info = box.check(f"uname -r; . {tb.L1_GUEST}/guest.env; echo $KERNEL_VERSION").split()
    elapsed = time.monotonic() - t_start

    # per metric, medians over the repetitions where that scenario succeeded (None: all failed;
    # "n/a": succeeded, but the figure was never reached)
    summary: dict[str, dict] = {}
    for k, runs in results.items():
        summary[k] = {}
        for m, scen, field, *_ in METRICS:
            ok = [r[scen] for r in runs if r[scen]["ok"]]
            vals = [r[field] for r in ok if r[field] is not None]
            summary[k][m] = statistics.median(vals) if vals else (None if not ok else "n/a")
            summary[k][f"{m}_runs"] = f"{len(vals)}/{len(runs)}"

    print()
    print(f"Balloon benchmark in the test box: guest {MEM_MIB} MiB / {CPUS} vCPU (L1 {info[0]}, guest "
          f"{info[-1]}); inflate to {TARGET >> 20} MiB after {INFLATE_MIB} MiB touched; free page "
          f"reporting: {FPR_MIB} MiB freed, {args.window:g} s of RSS samples; medians of {args.reps} "
          f"rep(s); total {elapsed / 60:.1f} min")
    print("NOTE: L1 runs under QEMU/TCG, so absolute times are TCG-slowed and mean little: only the "
          "ratios between VMMs of the same run matter. ours/QEMU > 1 means ours is better "
          "(memory returned ours/QEMU, time QEMU/ours).")
    cols = list(results)
    both = "ours" in cols and "q35" in cols
    hdr = f"{'metric':<40}" + "".join(f"{NAMES[k]:>12}" for k in cols) + (f"{'ours/QEMU':>12}" if both else "")
    print(hdr)
    print("-" * len(hdr))
    for m, _, _, label, unit, dec, higher in METRICS:
        row = f"{label + ' ' + unit:<40}"
        for k in cols:
            v = summary[k][m]
            row += f"{'FAILED' if v is None else v if isinstance(v, str) else f'{v:.{dec}f}':>12}"
        if both:
            o, q = summary["ours"][m], summary["q35"][m]
            num, den = (o, q) if higher else (q, o)
            ok = all(isinstance(x, (int, float)) for x in (o, q)) and den > 0
            row += f"{'x%.2f' % (num / den) if ok else 'n/a':>12}"
        print(row)
    for k in cols:
        for i, run in enumerate(results[k]):
            for scen in SCENARIOS:
                r = run[scen]
                print(f"{NAMES[k]} {scen} #{i}: {fmt(scen, r)}")
                if not r["ok"] and "\n" in r.get("detail", ""):
                    print(r["detail"], file=sys.stderr)
    for n in notes:
        print(f"note: {n}")
    print("timing: inflate = this host's clock, QMP balloon -> the query-balloon answer at <= "
          f"{REACHED >> 20} MiB (polled every {POLL_S * 1000:.0f} ms through the port forward); free "
          "page reporting = L1's clock (/proc/uptime), the rm typed by L1 -> the first RSS sample "
          f"{FPR_GOAL_MIB} MiB lower (sampled every ~0.5 s); RSS = VmRSS of the VMM process in L1")
    if busy:
        print("note: other test box(es) ran on this machine during the run: numbers are noisy")
    if watch.hit:
        print(f"note: a compiler ({'/'.join(CompilerWatch.PROGS)}) ran on this machine during "
              f"{', '.join(sorted(watch.hit))}: those figures are noisy")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results, "notes": notes,
                                               "compiler_during": sorted(watch.hit),
                                               "window": args.window}, indent=1))
    return 0 if all(summary[k][m] is not None for k in cols for m, *_ in METRICS) else 1


if __name__ == "__main__":
    sys.exit(main())
