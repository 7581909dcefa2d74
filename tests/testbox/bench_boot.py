#!/usr/bin/env python3
"""Boot benchmark in the test box: our vmm vs QEMU q35 vs QEMU microvm (vs Cloud Hypervisor with
CH_BIN, vs Firecracker with FC_BIN), same kernel and initramfs, all in ONE L1 boot, interleaved over
a few repetitions.

Measured inside L1 for each VMM:
  boot   time from the VMM's exec to the guest's first userspace line (GUEST-USERSPACE-UP). The VMM's
         stdout goes through busybox `ts`, which stamps each line (µs) as it arrives; the launcher
         writes "VMM-EXEC-START" into the same stream right before exec, so both ends are stamped by
         one process with one clock (error: a few ms of pipe/scheduling latency). ts block-buffers,
         so its output (ts.out) is read once the VMM has ended; the live console is `out`.
  memory once the guest's shell answers: VmRSS from /proc/PID/status, and per-mapping Rss/Pss from
         /proc/PID/smaps. Guest RAM is anonymous memory inside the VMM process (only touched pages are
         resident); the mapping(s) whose size is the guest RAM size (up to +10%: QEMU adds alignment)
         are taken as guest RAM. overhead = VmRSS - Rss(guest RAM) (the VMM's own code, heap, stacks,
         device state, firmware copies...), and the same with Pss.

    python3 tests/testbox/bench_boot.py [--reps 3] [--vmms ours,ours-cold,ours-bz,q35,microvm,ch,fc]
                                        [--json out.json] [--append "quiet"]

--append adds kernel arguments to every VMM's command line alike: with "quiet" the guest's boot
messages no longer cross the serial port (two VM exits per byte, the same for every VMM), which shows
what the VMMs themselves cost.

Our rows: "ours" is the default path with the kernel cache warm (a first, untimed boot fills it: a
kernel's every boot but the first), "ours-cold" the default path with an empty cache each run (the
bzImage is decompressed on the host, a kernel's first boot), "ours-bz" the bzImage booted as it is
(--no-decompress: the guest decompresses itself).

Environment as for box.py (VMM_BIN; TESTBOX_L2=qemu makes "ours" a QEMU q35 stand-in).
CH_BIN=PATH adds Cloud Hypervisor ("ch", peers.py): it
boots the same kernel through its fastest path, the ELF vmlinux extracted from the guest's bzImage
(PVH entry), with the same initramfs and command line, the console on the legacy serial port.
Without CH_BIN the column is skipped with a line that says so.
FC_BIN=PATH adds Firecracker ("fc", peers.py), the same way:
the same ELF vmlinux (it boots nothing else on x86_64), initramfs and console; its command line has
reboot=k added and pci=off appended by Firecracker (it has no PCI bus by default; nor a CMOS RTC),
and it is stopped with the guest's `reboot` (its ACPI has no S5: no power-off). Without FC_BIN the
column is skipped with a line that says so.
Absolute numbers under TCG mean little: compare the VMMs with each other, in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402
import peers  # noqa: E402

MEM_MIB = 256
CPUS = 2
UP = r"GUEST-USERSPACE-UP"
CMDLINE = "console=ttyS0"   # every VMM's kernel command line (+ --append)


OURS = ("ours", "ours-cold", "ours-bz")
CACHE = "/tmp/bench-kernel-cache"


def ours_argv(box: tb.Box, key: str, i: int, attempt: int) -> list[str]:
    """Our vmm for row `key` (OURS): its own kernel cache in L1, warm for "ours", a fresh empty
    one every run for "ours-cold"; --no-decompress for "ours-bz"."""
    argv = box.vmm_argv(tb.default_config(vcpus=CPUS, memory_mib=MEM_MIB, cmdline=CMDLINE), name="bench",
                        flags=["--no-decompress"] if key == "ours-bz" else None)
    if tb.l2_is_qemu():
        return argv
    cache = CACHE if key != "ours-cold" else f"/tmp/bench-cold-cache-{i}-{attempt}"
    return ["env", f"XDG_CACHE_HOME={cache}", *argv]


def qemu_q35() -> list[str]:
    return ["qemu-system-x86_64", *tb.L1_QEMU_FW, "-machine", "q35", "-enable-kvm", "-cpu", "host",
            "-m", str(MEM_MIB), "-smp", str(CPUS), "-kernel", tb.L1_KERNEL, "-initrd", tb.L1_INITRD,
            "-append", CMDLINE, "-nographic", "-no-reboot", "-nic", "none"]


def qemu_microvm() -> list[str]:
    return ["qemu-system-x86_64", *tb.L1_QEMU_FW,
            "-machine", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-nodefaults", "-no-user-config",
            "-enable-kvm", "-cpu", "host", "-m", str(MEM_MIB), "-smp", str(CPUS),
            "-kernel", tb.L1_KERNEL, "-initrd", tb.L1_INITRD, "-append", CMDLINE,
            "-display", "none", "-serial", "stdio", "-no-reboot"]


# smaps per mapping -> "size_kb rss_kb pss_kb anon_kb name"
SMAPS_AWK = r"""awk '
function out() { if (have) print sz+0, rss+0, pss+0, anon+0, (name == "" ? "[anon]" : name) }
/^[0-9a-f]+-[0-9a-f]+ / { out(); have=1; sz=rss=pss=anon=0; name=$6; next }
/^Size:/ { sz=$2 } /^Rss:/ { rss=$2 } /^Pss:/ { pss=$2 } /^Anonymous:/ { anon=$2 }
END { out() }' /proc/PID/smaps"""


def measure_memory(box: tb.Box, pid: int, guest_mib: int) -> dict:
    status = box.check(f"grep -E '^(VmRSS|VmHWM|RssAnon|RssFile|RssShmem|Threads):' /proc/{pid}/status")
    st = {}
    for line in status.splitlines():
        k, v = line.split(":", 1)
        st[k] = int(v.split()[0])
    maps = []
    for line in box.check(SMAPS_AWK.replace("PID", str(pid))).splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5:
            maps.append({"size": int(parts[0]), "rss": int(parts[1]), "pss": int(parts[2]),
                         "anon": int(parts[3]), "name": parts[4]})
    gkb = guest_mib * 1024
    ram = [m for m in maps if gkb <= m["size"] <= gkb * 1.10]
    note = ""
    if not ram:
        big = sorted((m for m in maps if m["name"] == "[anon]"), key=lambda m: m["size"], reverse=True)
        ram = big[:1]
        note = "no mapping of the guest RAM size: took the largest anonymous mapping"
    ram_rss = sum(m["rss"] for m in ram)
    ram_pss = sum(m["pss"] for m in ram)
    total_pss = sum(m["pss"] for m in maps)
    return {
        "vmrss_kib": st.get("VmRSS", 0), "vmhwm_kib": st.get("VmHWM", 0), "threads": st.get("Threads", 0),
        "guest_ram_maps": [(m["size"], m["rss"]) for m in ram], "guest_ram_rss_kib": ram_rss,
        "overhead_rss_kib": st.get("VmRSS", 0) - ram_rss, "overhead_pss_kib": total_pss - ram_pss,
        "note": note,
    }


def one_run(box: tb.Box, key: str, argv: list[str], i: int, attempt: int) -> dict:
    vm = box.start_l2(f"bench-{key}-{i}-{attempt}", argv, ts=True)
    try:
        vm.wait_for(UP, 240, stall=60)
        vm.wait_shell(120)
        pid = peers.vmm_pid(box, vm.pid()) if key == "ch" else vm.pid()   # CH runs under ch-ptyrun
        mem = measure_memory(box, pid, MEM_MIB)
        vm.send("reboot" if key == "fc" else "poweroff")   # FC: no ACPI power-off, reboot=k ends it
        try:
            rc = vm.wait_exit(30)
        except AssertionError:
            rc = None
            vm.kill()
            vm.wait_exit(30)
        stamped = box.read_file(f"{vm.dir}/ts.out").decode(errors="replace")
        t0 = re.search(r"^(\d+\.\d+) VMM-EXEC-START", stamped, re.M)
        t1 = re.search(rf"^(\d+\.\d+) [^\n]*{UP}", stamped, re.M)
        if not (t0 and t1):
            raise tb.BoxError(f"no timestamps in ts.out: {stamped[:300]!r}")
        boot_ms = (float(t1.group(1)) - float(t0.group(1))) * 1000
        return {"ok": True, "boot_ms": boot_ms, **mem, "poweroff_rc": rc}
    except (AssertionError, tb.BoxError, TimeoutError) as e:
        # a flake of the box (see box.retry_on_flake) is worth another try; Firecracker ends with
        # status 1 on the L2 triple fault that ends ours with 0 (KVM_EXIT_SHUTDOWN: no reboot=k reset)
        # (box.retry_on_flake: ours stops with "the guest triple-faulted" there)
        flake = (isinstance(e, tb.BootStall) or not box.alive()
                 or (key in OURS and "the guest triple-faulted" in str(e))
                 or (key == "fc" and "exit reason on vcpu run: Shutdown" in str(e)))
        if not box.alive():
            e = tb.BoxError(f"L1 died: {box.crash_signature()}")
        tail = vm.diagnostics(15) if box.alive() else ""
        return {"ok": False, "flake": flake, "error": str(e).splitlines()[0], "log_tail": tail}
    finally:
        if box.alive():
            vm.kill()


def fmt(v, unit=""):
    return "-" if v is None else f"{v:.0f}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vmms", default="ours,ours-cold,ours-bz,q35,microvm,ch,fc")
    ap.add_argument("--json", help="write the raw results there")
    ap.add_argument("--append", default="",
                    help="kernel arguments added to every VMM's command line (e.g. quiet)")
    args = ap.parse_args()
    global CMDLINE
    CMDLINE = " ".join(["console=ttyS0", args.append]).strip()
    fc_cmdline = " ".join([peers.FC_CMDLINE, args.append]).strip()
    keys = [k.strip() for k in args.vmms.split(",") if k.strip()]
    results: dict[str, list[dict]] = {k: [] for k in keys}
    notes: dict[str, str] = {}
    ch = peers.ch_bins() if "ch" in keys else None
    if "ch" in keys and not ch:
        print(peers.SKIP_LINE)
        keys.remove("ch")
        del results["ch"]
    fc = peers.fc_bins() if "fc" in keys else None
    if "fc" in keys and not fc:
        print(peers.FC_SKIP_LINE)
        keys.remove("fc")
        del results["fc"]
    with tb.Box(with_qemu=True,
                extra_bins=peers.box_extra_bins(ch=bool(ch), fc=bool(fc)) if ch or fc else None) as box:
        argvs = {}
        for k in keys:
            if k in OURS:
                if not box.has_vmm() and not tb.l2_is_qemu():
                    notes[k] = "no vmm binary (build it or set VMM_BIN)"
                    continue
                argvs[k] = ours_argv(box, k, 0, 0)
                if tb.l2_is_qemu():
                    notes[k] = "TESTBOX_L2=qemu: QEMU q35 stands in for our vmm"
            elif k == "q35":
                argvs[k] = qemu_q35()
            elif k == "microvm":
                argvs[k] = qemu_microvm()
            elif k == "ch":
                argvs[k] = peers.ch_argv(MEM_MIB, CPUS, cmdline=CMDLINE)
            elif k == "fc":
                argvs[k] = peers.fc_argv(box, MEM_MIB, CPUS, cmdline=fc_cmdline)
            else:
                raise SystemExit(f"unknown VMM {k}")
        # warm L1's page cache: the first run must not pay for reading the kernel from the payload disk
        warm = f"cat {tb.L1_KERNEL} {tb.L1_INITRD} {peers.L1_VMLINUX if ch or fc else ''} > /dev/null"
        box.check(warm)
        if "ours" in argvs and not tb.l2_is_qemu():   # fill the kernel cache: an untimed boot
            r = one_run(box, "ours", argvs["ours"], -1, 1)
            tb.log(f"ours: warm-up boot {'done' if r['ok'] else 'failed: ' + r['error']}")
        for i in range(args.reps):
            for k, argv in argvs.items():
                for attempt in (1, 2, 3):   # up to two more tries after a flake of the box
                    if not box.alive():
                        box.restart()
                        box.check(warm)
                    if k in OURS:   # (re)writes vm.json in L1: a restarted L1 has lost it
                        argv = ours_argv(box, k, i, attempt)
                    elif k == "fc":   # the same for its config file
                        argv = peers.fc_argv(box, MEM_MIB, CPUS, cmdline=fc_cmdline)
                    r = one_run(box, k, argv, i, attempt)
                    if r["ok"] or not r.get("flake"):
                        break
                    tb.log(f"{k} #{i}: box flake ({r['error']}), running it again")
                results[k].append(r)
                if r["ok"]:
                    tb.log(f"{k} #{i}: boot {r['boot_ms']:.0f} ms, VmRSS {r['vmrss_kib'] / 1024:.1f} MiB, "
                           f"overhead {r['overhead_rss_kib'] / 1024:.1f} MiB")
                else:
                    tb.log(f"{k} #{i}: FAILED: {r['error']}")
                    if not any(x["ok"] for x in results[k]) and sum(1 for x in results[k]) == 1:
                        print(r["log_tail"], file=sys.stderr)   # the first failure of each VMM

        if "microvm" in results and results["microvm"] and not any(r["ok"] for r in results["microvm"]):
            notes["microvm"] = f"QEMU microvm could not boot the guest: {results['microvm'][0]['error']}"
        if not box.alive():
            box.restart()
        kernel = box.check(f"cat {tb.L1_GUEST}/guest.env; uname -r").split()

    summary = {}
    for k in keys:
        ok = [r for r in results[k] if r["ok"]]
        if not ok:
            summary[k] = None
            continue
        med = lambda f: statistics.median(r[f] for r in ok)  # noqa: E731
        summary[k] = {
            "runs": len(ok), "failed": len(results[k]) - len(ok),
            "boot_ms": med("boot_ms"), "boot_min": min(r["boot_ms"] for r in ok),
            "boot_max": max(r["boot_ms"] for r in ok),
            "vmrss_mib": med("vmrss_kib") / 1024, "guest_ram_rss_mib": med("guest_ram_rss_kib") / 1024,
            "overhead_rss_mib": med("overhead_rss_kib") / 1024, "overhead_pss_mib": med("overhead_pss_kib") / 1024,
            "threads": med("threads"), "guest_ram_maps": ok[-1]["guest_ram_maps"], "note": ok[-1]["note"],
        }

    print()
    print(f"Boot benchmark in the test box: guest {MEM_MIB} MiB, {CPUS} vCPUs, same kernel/initramfs "
          f"({' '.join(kernel)}), cmdline \"{CMDLINE}\"; medians of {args.reps} runs")
    hdr = (f"{'VMM':<10} {'runs':>5} {'boot ms (median [min-max])':>28} {'VmRSS MiB':>10} "
           f"{'guest RAM RSS':>14} {'overhead RSS':>13} {'overhead PSS':>13} {'threads':>8}")
    print(hdr)
    print("-" * len(hdr))
    for k in keys:
        s = summary.get(k)
        if not s:
            why = notes.get(k) or (f"all runs failed: {results[k][0]['error']}" if results[k] else "not run")
            print(f"{k:<10} {'n/a':>5}  {why}")
            continue
        boot = f"{s['boot_ms']:.0f} [{s['boot_min']:.0f}-{s['boot_max']:.0f}]"
        print(f"{k:<10} {s['runs']:>3}/{s['runs'] + s['failed']:<1} {boot:>28} {s['vmrss_mib']:>10.1f} "
              f"{s['guest_ram_rss_mib']:>14.1f} {s['overhead_rss_mib']:>13.1f} {s['overhead_pss_mib']:>13.1f} "
              f"{s['threads']:>8.0f}")
    if ch:
        print(f"ch: {peers.ch_version(ch[0])}, the same kernel as ELF vmlinux (PVH entry), "
              f"console on its legacy serial port")
    if fc:
        print(f"fc: {peers.fc_version(fc)}, the same kernel as ELF vmlinux (PVH entry), console on its "
              f"legacy serial port; cmdline \"{fc_cmdline}\" + pci=off (no PCI bus), no RTC, "
              f"no ACPI power-off (stopped by the guest's reboot)")
    for k, n in notes.items():
        if summary.get(k):
            print(f"note ({k}): {n}")
    for k in keys:
        s = summary.get(k)
        if s and s["note"]:
            print(f"note ({k}): {s['note']}")
    print()
    for mine in (k for k in OURS if k in keys):
        ours = summary.get(mine)
        for ref in ("q35", "microvm", "ch", "fc"):
            r = summary.get(ref)
            if ours and r:
                print(f"{mine}/{ref}: boot time x{ours['boot_ms'] / r['boot_ms']:.2f}, "
                      f"memory overhead (RSS) x{ours['overhead_rss_mib'] / r['overhead_rss_mib']:.2f}, "
                      f"(PSS) x{ours['overhead_pss_mib'] / r['overhead_pss_mib']:.2f}")
            elif ref in keys:
                why = f"{mine} not measured" if not ours else f"{ref} not measured"
                print(f"{mine}/{ref}: n/a ({why})")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results, "notes": notes}, indent=1))
    # failure: a VMM that should have been measured (not explained by a note) has no result
    return 0 if all(summary.get(k) or k in notes for k in keys) else 1


if __name__ == "__main__":
    sys.exit(main())
