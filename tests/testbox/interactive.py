#!/usr/bin/env python3
"""Boot the default guest under our vmm inside the test box, with its console on this terminal.

    python3 tests/testbox/interactive.py [VMM FLAG...]      (or scripts/run-in-box.sh)

On a terminal: the guest's serial console is yours (L1's console is put in raw mode and our vmm runs
in the foreground on it); type `poweroff` in the guest to leave, or press Ctrl-] to kill everything.
Without a terminal (CI, pipes) or with --batch: boots, prints the console up to the userspace marker,
types `uname -a` and prints its answer, powers the guest off and exits with the vmm's exit status.
Extra arguments are passed to vmm after `--config vm.json` (e.g. --cpus 1 --memory 512).
TESTBOX_L2=qemu runs QEMU in our vmm's place.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import sys
import termios
import time
import tty
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import box as tb  # noqa: E402


def batch(box: tb.Box, argv: list[str]) -> int:
    vm = box.start_l2("console", argv)
    shown = 0

    def show() -> None:
        nonlocal shown
        text = vm.log()
        sys.stdout.write(text[shown:].replace("\r\n", "\n").replace("\x1b[6n", ""))
        sys.stdout.flush()
        shown = len(text)

    up = tb.guest_env().get("UP_REGEX", "GUEST-USERSPACE-UP")
    try:
        vm.wait_for(up, 240)
        vm.wait_shell(120)
        show()
        out = vm.guest_cmd("uname -a")
        show()
        print(f"\n[run-in-box] guest answered `uname -a`: {out.strip()}")
        vm.send("poweroff")
        rc = vm.wait_exit(60)
        show()
    except AssertionError as e:
        show()
        print(f"\n[run-in-box] FAILED: {e}", file=sys.stderr)
        return 1
    print(f"\n[run-in-box] vmm exited with status {rc}")
    return rc


def interactive(box: tb.Box, argv: list[str]) -> int:
    tag = uuid.uuid4().hex[:12]
    done = re.compile(rb"__VMMEXIT" + tag.encode() + rb"_(\d+)")
    seen = bytearray()
    out = sys.stdout.buffer

    def tap(data: bytes) -> None:
        seen.extend(data)
        out.write(data.replace(b"__VMMEXIT" + tag.encode() + b"_", b"\r\n[run-in-box] vmm exit status "))
        out.flush()

    cmd = " ".join(shlex.quote(a) for a in argv)
    print("[run-in-box] guest console follows; `poweroff` in the guest to leave, Ctrl-] to abort\r")
    box.tap = tap
    # L1's console becomes a transparent pipe to the vmm (raw: Ctrl-C etc. reach the guest)
    box._write(f"stty raw -echo -isig; {cmd}; echo __VMMEXIT''{tag}_$?; stty sane -echo\n".encode())
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        while box.alive():
            m = done.search(seen)
            if m:
                return int(m.group(1))
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                data = os.read(fd, 1024)
                if b"\x1d" in data:
                    return 130
                box._write(data)
        return 1
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
        box.tap = None
        print()


def main() -> int:
    args = sys.argv[1:]
    force_batch = "--batch" in args
    args = [a for a in args if a != "--batch"]
    tb.build_guest()
    with tb.Box(with_qemu=tb.l2_is_qemu()) as box:
        argv = box.vmm_argv(tb.default_config(), args, name="console")
        if force_batch or os.environ.get("CI") or not (sys.stdin.isatty() and sys.stdout.isatty()):
            return batch(box, argv)
        return interactive(box, argv)


if __name__ == "__main__":
    sys.exit(main())
