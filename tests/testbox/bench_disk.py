#!/usr/bin/env python3
"""Disk benchmark in the test box: our vmm's virtio-blk vs QEMU q35's virtio-blk-pci, same guest, same
image, all in ONE L1 boot.

The box gets a scratch disk (/dev/vdb in L1: a block device, so O_DIRECT works, unlike L1's tmpfs),
filled once with zeros so that no run reads holes. Each VMM in turn (never both at once: they take
QEMU-compatible locks on the image) boots the default guest (256 MiB, 2 vCPUs) with it as a raw disk
opened with O_DIRECT by the VMM:
  ours  vmm --disk path=/dev/vdb,format=raw,cache=none
  q35   qemu-system-x86_64 -machine q35 ... -drive file=/dev/vdb,if=none,id=d0,format=raw,cache=none,
        aio=threads -device virtio-blk-pci,drive=d0
  ch    cloud-hypervisor --disk path=/dev/vdb,direct=on,image_type=raw   (with CH_BIN=PATH, see
        peers.py: the same kernel as ELF vmlinux, same initramfs; virtio-blk-pci, 1 queue; its
        default I/O engine, io_uring when L1's kernel has it. Without CH_BIN: skipped, said so)
and runs the guest's /bin/iobench (resources/guest/iobench.c: O_DIRECT, queue depth 1, fixed-seed
random offsets over the whole disk) on its /dev/vda: seqwrite and seqread with 1 MiB blocks, then
randwrite and randread with 4 KiB blocks, SECONDS each. The same tool runs first on /dev/vdb in L1
itself ("L1": no VMM in between, the ceiling both VMMs share).

    python3 tests/testbox/bench_disk.py [--secs 8] [--reps 1] [--vmms ours,q35,ch] [--no-l1]
                                        [--disk-mib 1024] [--json out.json]

Environment as for box.py (VMM_BIN; TESTBOX_L2=qemu makes "ours" a QEMU q35 stand-in).
Absolute numbers under TCG mean little (L1 is emulated): compare the VMMs with each other, in the
same run. MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402
import peers  # noqa: E402

MEM_MIB = 256
CPUS = 2
DEV = tb.Box.SCRATCH_DEV
# (mode, block size, the figure that matters)
WORKLOADS = [("seqwrite", "1M", "mbps"), ("seqread", "1M", "mbps"),
             ("randwrite", "4096", "iops"), ("randread", "4096", "iops")]
NAMES = {"l1": "L1 (no VMM)", "ours": "ours", "q35": "QEMU q35", "ch": "CloudHyperv"}
LINE = re.compile(r"IOBENCH (mode=\S+(?: \w+=\S+)*)")


def parse(out: str) -> dict:
    m = LINE.search(out)
    if not m:
        raise AssertionError(f"no IOBENCH line in: {out.strip()[-500:]!r}")
    r = {}
    for kv in m.group(1).split():
        k, v = kv.split("=", 1)
        r[k] = v if k == "mode" else float(v)
    return r


def vm_argv(box: tb.Box, key: str) -> list[str]:
    cfg = tb.default_config(vcpus=CPUS, memory_mib=MEM_MIB)
    qdisk = ["-drive", f"file={DEV},if=none,id=d0,format=raw,cache=none,aio=threads",
             "-device", "virtio-blk-pci,drive=d0"]
    if key == "ch":
        return peers.ch_argv(MEM_MIB, CPUS, extra=["--disk", f"path={DEV},direct=on,image_type=raw"])
    if key == "q35" or tb.l2_is_qemu():
        return tb.qemu_argv_for(cfg, []) + qdisk
    return box.vmm_argv(cfg, ["--disk", f"path={DEV},format=raw,cache=none"], name="bench-disk")


def l1_requests(box: tb.Box) -> int:
    """Read + write requests completed so far by the scratch disk in L1 (/sys/block/vdb/stat)."""
    f = box.check(f"cat /sys/block/{DEV[5:]}/stat").split()
    return int(f[0]) + int(f[4])


def guest_iobench(vm: tb.L2, mode: str, bs: str, secs: float) -> dict:
    """Run iobench in the guest. The console is not polled while it runs (polling costs L1 CPU).
    Also counts the requests the VMM made of L1's disk meanwhile (l1_reqs_per_op: how many host
    I/Os one guest request became)."""
    tag = uuid.uuid4().hex[:8]
    before = l1_requests(vm.box)
    vm.send(f"echo IB''{tag}; iobench /dev/vda {mode} {bs} {secs} 2>&1; echo IE''{tag}")
    time.sleep(secs)
    m = vm.wait_for(rf"IB{tag}\r?\n(.*?)IE{tag}", timeout=secs + 180)
    r = parse(m.group(1))
    r["l1_reqs_per_op"] = (l1_requests(vm.box) - before) / max(r["ops"], 1)
    return r


def one_vm(box: tb.Box, key: str, rep: int, secs: float) -> dict:
    up = tb.guest_env().get("UP_REGEX", "GUEST-USERSPACE-UP")
    vm = box.start_l2(f"bench-disk-{key}-{rep}", vm_argv(box, key))
    try:
        vm.wait_for(up, 240, stall=60)
        vm.wait_shell(120)
        out = vm.guest_cmd("[ -x /bin/iobench ] && echo HAVE-IOBENCH; cat /sys/block/vda/size")
        if "HAVE-IOBENCH" not in out:
            raise AssertionError("the guest has no /bin/iobench (a custom guest? use the default one)")
        # the request limits the guest's driver took from the device (segments, sizes, queues)
        q = vm.guest_cmd("cd /sys/block/vda/queue; echo $(cat max_segments max_segment_size "
                         "max_hw_sectors_kb max_sectors_kb nr_requests) $(ls /sys/block/vda/mq | wc -l)")
        limits = dict(zip(("max_segments", "max_segment_size", "max_hw_sectors_kb", "max_sectors_kb",
                           "nr_requests", "queues"), q.split()))
        res = {}
        for mode, bs, _ in WORKLOADS:
            res[mode] = guest_iobench(vm, mode, bs, secs)
            tb.log(f"{key} #{rep} {mode}: {fmt_run(res[mode])}")
        vm.send("poweroff")
        try:
            rc = vm.wait_exit(60)
        except AssertionError:
            rc = None
        return {"ok": True, "runs": res, "guest_sectors": int(out.split()[-1]), "limits": limits,
                "poweroff_rc": rc}
    finally:
        if box.alive():   # else kill() would raise and hide the real error
            vm.kill()


def run_vm(box: tb.Box, key: str, rep: int, secs: float) -> dict:
    """one_vm, once more after a known flake of the nested box (a stalled L2 boot, L1 dying)."""
    for attempt in (1, 2):
        try:
            return one_vm(box, key, rep, secs)
        except (tb.BoxError, TimeoutError, AssertionError) as e:
            flake = isinstance(e, tb.BootStall) or not box.alive()
            why = f"L1 died: {box.crash_signature()}" if not box.alive() else str(e).splitlines()[0]
            if not flake or attempt == 2:
                tb.log(f"{key} #{rep}: FAILED: {why}")
                return {"ok": False, "error": why,
                        "detail": str(e)[-3000:]}
            tb.log(f"{key} #{rep}: nested-box flake ({why}); running it again")
            if not box.alive():
                box.restart()
    raise AssertionError("unreachable")


def l1_runs(box: tb.Box, secs: float) -> dict:
    res = {}
    for mode, bs, _ in WORKLOADS:
        before = l1_requests(box)
        out = box.check(f"/payload/guest/iobench {DEV} {mode} {bs} {secs} 2>&1", timeout=secs + 180)
        res[mode] = parse(out)
        res[mode]["l1_reqs_per_op"] = (l1_requests(box) - before) / max(res[mode]["ops"], 1)
        tb.log(f"L1 {mode}: {fmt_run(res[mode])}")
    return {"ok": True, "runs": res}


def fmt_run(r: dict) -> str:
    return (f"{r['mbps']:.1f} MB/s, {r['iops']:.0f} IOPS, {r['lat_us']:.0f} us/op "
            f"({r['ops']:.0f} ops in {r['secs']:.1f} s)")


def other_boxes(mine: tb.Box | None = None) -> list[str]:
    """Command lines of other test boxes running on this machine (they skew every number)."""
    r = subprocess.run(["pgrep", "-af", "qemu-system-x86_64 -machine q35 -cpu max"],
                       capture_output=True, text=True)
    own = str(mine.proc.pid) if mine and mine.proc else None
    return [line for line in r.stdout.splitlines() if line.strip() and line.split()[0] != own]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--secs", type=float, default=8, help="seconds per workload (default 8)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, VMMs interleaved (default 1)")
    ap.add_argument("--vmms", default="ours,q35,ch")
    ap.add_argument("--no-l1", action="store_true", help="skip the reference runs in L1 itself")
    ap.add_argument("--disk-mib", type=int, default=1024, help="scratch disk size (default 1024)")
    ap.add_argument("--json", help="write the raw results there")
    args = ap.parse_args()
    keys = [k.strip() for k in args.vmms.split(",") if k.strip()]
    for k in keys:
        if k not in ("ours", "q35", "ch"):
            raise SystemExit(f"unknown VMM {k} (ours, q35, ch)")
    ch = peers.ch_bins() if "ch" in keys else None
    if "ch" in keys and not ch:
        print(peers.SKIP_LINE)
        keys.remove("ch")
    busy = other_boxes()
    if busy:
        tb.log(f"warning: {len(busy)} other test box(es) running on this machine: numbers will be noisy")

    results: dict[str, list[dict]] = {k: [] for k in (["l1"] if not args.no_l1 else []) + keys}
    notes: list[str] = []
    t_start = time.monotonic()
    with tb.Box(with_qemu=True, scratch_mib=args.disk_mib,
                extra_bins=peers.box_extra_bins() if ch else None) as box:
        if "ours" in keys and not box.has_vmm() and not tb.l2_is_qemu():
            raise SystemExit("no vmm binary: build it (cargo build --release) or set VMM_BIN")
        if tb.l2_is_qemu():
            notes.append("TESTBOX_L2=qemu: QEMU q35 stands in for our vmm")
        sectors = int(box.check(f"cat /sys/block/{DEV[5:]}/size").strip())
        if sectors != args.disk_mib * 2048:
            raise SystemExit(f"{DEV} in L1 has {sectors} sectors, not the scratch disk's {args.disk_mib * 2048}")
        if box.run("[ -x /payload/guest/iobench ]")[0] != 0:
            raise SystemExit("no iobench in the guest artifacts (a custom guest? use the default one)")
        # allocate every block of the host file: reads must never hit holes
        t0 = time.monotonic()
        box.check(f"dd if=/dev/zero of={DEV} bs=1M oflag=direct 2>&1 | tail -1; sync",
                  timeout=60 + args.disk_mib)
        tb.log(f"scratch disk {DEV} ({args.disk_mib} MiB) filled in {time.monotonic() - t0:.1f}s")
        # warm L1's page cache
        box.check(f"cat {tb.L1_KERNEL} {tb.L1_INITRD} {peers.L1_VMLINUX if ch else ''} > /dev/null")
        if not args.no_l1:
            results["l1"].append(l1_runs(box, args.secs))
        for i in range(args.reps):
            for k in keys:
                busy = busy or other_boxes(box)
                results[k].append(run_vm(box, k, i, args.secs))
        busy = busy or other_boxes(box)
        info = box.check(f"uname -r; cat {tb.L1_GUEST}/guest.env").split()
    elapsed = time.monotonic() - t_start

    # medians over the successful repetitions
    summary: dict[str, dict | None] = {}
    for k, runs in results.items():
        ok = [r for r in runs if r["ok"]]
        summary[k] = {mode: {f: statistics.median(r["runs"][mode][f] for r in ok)
                             for f in ("mbps", "iops", "lat_us", "l1_reqs_per_op")} for mode, _, _ in WORKLOADS} if ok else None
        if summary[k] is not None:
            summary[k]["_runs"] = f"{len(ok)}/{len(runs)}"

    print()
    print(f"Disk benchmark in the test box: guest {MEM_MIB} MiB / {CPUS} vCPUs, virtio-blk on {DEV} in L1 "
          f"({args.disk_mib} MiB, raw, cache=none; L1 {info[0]}); iobench O_DIRECT, queue depth 1, "
          f"{args.secs:g} s per workload; medians of {args.reps} rep(s); total {elapsed / 60:.1f} min")
    print("NOTE: L1 runs under QEMU/TCG, so absolute numbers are TCG-slowed and mean little: "
          "only the ratios between VMMs of the same run matter.")
    cols = [k for k in results]
    hdr = f"{'workload':<22}" + "".join(f"{NAMES[k]:>14}" for k in cols)
    if "ours" in cols and "q35" in cols:
        hdr += f"{'ours/QEMU':>11}"
    both_ch = "ours" in cols and "ch" in cols
    if both_ch:
        hdr += f"{'ours/CH':>9}"
    print(hdr)
    print("-" * len(hdr))
    both = "ours" in cols and "q35" in cols
    for mode, bs, fig in WORKLOADS:
        label = f"{mode} {'1 MiB' if bs == '1M' else '4 KiB'} {'MB/s' if fig == 'mbps' else 'IOPS'}"
        row = f"{label:<22}"
        for k in cols:
            s = summary[k]
            row += f"{'n/a':>14}" if not s else f"{s[mode][fig]:>14.{1 if fig == 'mbps' else 0}f}"
        if both:
            o, q = summary["ours"], summary["q35"]
            row += f"{'n/a':>11}" if not (o and q) else f"{'x%.2f' % (o[mode][fig] / q[mode][fig]):>11}"
        if both_ch:
            o, c = summary["ours"], summary["ch"]
            row += f"{'n/a':>9}" if not (o and c) else f"{'x%.2f' % (o[mode][fig] / c[mode][fig]):>9}"
        print(row)
    for title, f, prec in (("mean latency per guest request, us:", "lat_us", 0),
                           (f"requests to {DEV} in L1 per guest request:", "l1_reqs_per_op", 1)):
        print(title)
        for mode, _, _ in WORKLOADS:
            row = f"  {mode:<20}"
            for k in cols:
                s = summary[k]
                row += f"{'n/a':>14}" if not s else f"{s[mode][f]:>14.{prec}f}"
            print(row)
    for k in cols:
        lim = next((r.get("limits") for r in results[k] if r.get("limits")), None)
        if lim:
            print(f"guest queue limits under {NAMES[k]}: " + ", ".join(f"{a}={b}" for a, b in lim.items()))
    for k in cols:
        s = summary[k]
        if s is None:
            first = results[k][0] if results[k] else {}
            print(f"{NAMES[k]}: no result: {first.get('error', 'not run')}")
            if "\n" in first.get("detail", ""):
                print(first["detail"], file=sys.stderr)
        elif s["_runs"] != f"{len(results[k])}/{len(results[k])}":
            print(f"{NAMES[k]}: only {s['_runs']} repetitions succeeded")
    if ch:
        print(f"CloudHyperv: {peers.ch_version(ch[0])}, --disk path={DEV},direct=on,image_type=raw "
              f"(O_DIRECT like cache=none)")
    for n in notes:
        print(f"note: {n}")
    if busy:
        print("note: other test box(es) ran on this machine during the run: numbers are noisy")
    if both and summary["ours"] and summary["q35"]:
        worst = min((summary["ours"][m][f] / summary["q35"][m][f], m) for m, _, f in WORKLOADS)
        verdict = "at or above QEMU on every workload" if worst[0] >= 0.95 else \
            f"below QEMU (worst: {worst[1]} x{worst[0]:.2f})"
        print(f"aim: ours at or above QEMU -> {verdict} (within 5% counts as at)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results, "notes": notes,
                                               "secs": args.secs, "disk_mib": args.disk_mib}, indent=1))
    return 0 if all(summary[k] for k in cols) else 1


if __name__ == "__main__":
    sys.exit(main())
