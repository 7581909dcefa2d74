"""The nested-KVM test box: boots an L1 Linux under QEMU/TCG (with an emulated SVM CPU, so L1 has a
real /dev/kvm) and runs L2 guests under our VMM (or QEMU) inside it.

Why: this project's machines expose /dev/kvm through PVM, where unmodified Linux guests hang. L1 is
Debian's cloud kernel + busybox; it loads kvm-amd, vhost-net and tun, mounts a payload disk (our vmm,
QEMU, the guest artifacts) and runs a root shell on its serial console, which this module drives.

    with Box() as box:                       # builds what is missing, boots L1 once
        status, out = box.run("ls /dev/kvm")
        vm = box.start_l2("t1", box.vmm_argv(config))   # our vmm, console on a FIFO + log
        vm.wait_for(r"GUEST-USERSPACE-UP", 120)
        vm.send("poweroff"); assert vm.wait_exit(30) == 0

Environment: VMM_BIN (default target/release/vmm, else target/debug/vmm), TESTBOX_L2=qemu (QEMU
stands in for our vmm: validates the harness and the scenarios themselves), TESTBOX_TIMEOUT (global
limit in seconds for one box, default 3600), TESTBOX_MEM (L1 MiB, 3072), TESTBOX_PORT_QMP /
TESTBOX_PORT_AGENT / TESTBOX_PORT_API (host ports forwarded to 4444/4445/4446 in L1; default: free
ports), TESTBOX_VERBOSE=1 (echo L1's console on stderr). Logs: build/testbox/logs/.

Box(scratch_mib=N) adds an empty N MiB scratch disk, /dev/vdb in L1 (Box.SCRATCH_DEV), backed by a
sparse host file build/testbox/scratch-PID.img (cache=unsafe: the host's page cache). Unlike L1's
tmpfs /tmp it takes O_DIRECT, so L2 VMMs can use it as a raw image with cache=none (bench_disk.py).
"""

from __future__ import annotations

import base64
import binascii
import collections
import ctypes
import functools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build"
BOX_DIR = BUILD / "testbox"
GUEST_DIR = Path(os.environ.get("GUEST_OUT", BUILD / "guest"))
HERE = Path(__file__).resolve().parent

# In-L1 paths (see build_l1.sh).
L1_GUEST = "/payload/guest"
L1_KERNEL = f"{L1_GUEST}/vmlinuz"
L1_INITRD = f"{L1_GUEST}/initramfs.cpio.gz"
L1_QEMU_FW = ["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]
L1_RUN = "/run/l2"

# Ports in L1 that the host reaches through QEMU's user network (hostfwd).
GUEST_PORTS = {"qmp": 4444, "agent": 4445, "api": 4446, "chan": 4447}


class BoxError(Exception):
    """The box could not be built, booted or driven."""


def log(msg: str) -> None:
    print(f"[testbox {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def find_vmm_bin() -> Path | None:
    """Our vmm binary: $VMM_BIN, else target/release/vmm, else target/debug/vmm."""
    env = os.environ.get("VMM_BIN")
    if env:
        p = Path(env)
        if not p.is_file():
            raise BoxError(f"VMM_BIN={env} is not a file")
        return p.resolve()
    for flavour in ("release", "debug"):
        p = REPO / "target" / flavour / "vmm"
        if p.is_file():
            return p
    return None


def l2_is_qemu() -> bool:
    """TESTBOX_L2=qemu: QEMU plays our vmm's part (harness self-validation)."""
    return os.environ.get("TESTBOX_L2", "vmm") == "qemu"


def _sh(args: list[str], **kw) -> None:
    r = subprocess.run(args, **kw)
    if r.returncode != 0:
        raise BoxError(f"command failed ({r.returncode}): {' '.join(map(str, args))}")


def build_guest() -> Path:
    """Build (or reuse) the L2 guest artifacts with resources/guest/build.sh."""
    _sh(["bash", str(REPO / "resources/guest/build.sh"), str(GUEST_DIR)], stdout=sys.stderr)
    return GUEST_DIR


def guest_env(guest_dir: Path = GUEST_DIR) -> dict[str, str]:
    """guest.env written by the guest builder (UP_REGEX, KIND, KERNEL_VERSION)."""
    env = {}
    f = guest_dir / "guest.env"
    if f.exists():
        for line in f.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                env[k] = shlex.split(v)[0] if v else ""
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_pdeathsig() -> None:
    # Runs in the child before exec: die with the parent (thread) that started us.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


class Box:
    """One L1 machine. Use as a context manager (or call close()): L1 is killed on exit, on error,
    and by a watchdog after `timeout` seconds whatever happens."""

    SCRATCH_DEV = "/dev/vdb"   # the scratch disk in L1 (after the payload disk, /dev/vda)

    def __init__(self, *, with_qemu: bool = True, vmm_bin: Path | None | str = "auto",
                 mem_mib: int | None = None, timeout: float | None = None,
                 extra_bins: list[str] | None = None, verbose: bool | None = None,
                 scratch_mib: int = 0):
        self.with_qemu = with_qemu or l2_is_qemu()
        self.vmm_bin = find_vmm_bin() if vmm_bin == "auto" else (Path(vmm_bin) if vmm_bin else None)
        self.mem_mib = mem_mib or int(os.environ.get("TESTBOX_MEM", "3072"))
        self.timeout = timeout or float(os.environ.get("TESTBOX_TIMEOUT", "3600"))
        self.extra_bins = extra_bins or []
        self.verbose = verbose if verbose is not None else os.environ.get("TESTBOX_VERBOSE") == "1"
        self.ports = {name: int(os.environ.get(f"TESTBOX_PORT_{name.upper()}", "0")) or _free_port()
                      for name in GUEST_PORTS}
        self.proc: subprocess.Popen | None = None
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._lock = threading.RLock()       # one run() at a time
        self._reader: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None
        self._deadline = 0.0
        # Several boxes may run at once from one tree (other sessions, CI): per-box files.
        self.logdir = BOX_DIR / "logs"
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.console_log = self.logdir / f"{self.run_id}-l1-console.log"
        self.payload = BOX_DIR / f"payload-{os.getpid()}.img"
        self.scratch_mib = scratch_mib
        self.scratch = BOX_DIR / f"scratch-{os.getpid()}.img" if scratch_mib else None
        self.l2s: list[L2] = []
        self.tap = None                      # callable(bytes): sees L1's console output as it comes
        self.restarts = 0
        self._eof = False

    # ---- build ----------------------------------------------------------------------------------
    def build(self) -> None:
        BOX_DIR.mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(parents=True, exist_ok=True)
        build_guest()
        script = str(HERE / "build_l1.sh")
        _sh(["bash", script, "base", str(BOX_DIR)], stdout=sys.stderr)
        self._prune_logs()
        args = ["bash", script, "payload", str(self.payload), "--guest", str(GUEST_DIR)]
        if self.vmm_bin:
            args += ["--vmm", str(self.vmm_bin)]
        if self.with_qemu:
            args += ["--qemu"]
        for b in self.extra_bins:
            args += ["--bin", b]
        _sh(args, stdout=sys.stderr)
        if self.scratch:   # a fresh, sparse (all zero) disk on every build
            self.scratch.unlink(missing_ok=True)
            with open(self.scratch, "wb") as f:
                f.truncate(self.scratch_mib << 20)

    def _prune_logs(self, keep: int = 20) -> None:
        logs = sorted(self.logdir.glob("*-l1-console.log"))
        for f in logs[:-keep]:
            f.unlink(missing_ok=True)
        for img in [*BOX_DIR.glob("payload-*.img"), *BOX_DIR.glob("scratch-*.img")]:
            pid = img.stem.split("-", 1)[1]          # left by boxes whose process is gone
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                img.unlink(missing_ok=True)

    # ---- boot -----------------------------------------------------------------------------------
    def qemu_argv(self) -> list[str]:
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{self.ports[n]}-:{p}" for n, p in GUEST_PORTS.items())
        return [
            "qemu-system-x86_64", "-machine", "q35", "-cpu", os.environ.get("TESTBOX_CPU", "max,+svm"),
            "-smp", os.environ.get("TESTBOX_SMP", "2"),
            "-accel", os.environ.get("TESTBOX_ACCEL", "tcg,thread=multi"), "-m", str(self.mem_mib),
            "-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(BOX_DIR / "vmlinuz-l1"), "-initrd", str(BOX_DIR / "l1-initramfs.cpio.gz"),
            "-append", os.environ.get("TESTBOX_L1_CMDLINE", "console=ttyS0 panic=-1 quiet tsc=reliable"),
            "-drive", f"file={self.payload},if=virtio,format=raw,readonly=on",
            # if=virtio drives get their PCI slots in command-line order: payload vda, scratch vdb
            *(["-drive", f"file={self.scratch},if=virtio,format=raw,cache=unsafe"] if self.scratch else []),
            "-netdev", f"user,id=u0,{fwd}", "-device", "virtio-net-pci,netdev=u0,romfile=",
        ]

    def start(self) -> "Box":
        self.build()
        self._deadline = time.monotonic() + self.timeout
        self._watchdog = threading.Timer(self.timeout, self._on_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._boot()
        return self

    def restart(self) -> None:
        """Boot L1 again (after it died: see retry_on_flake), keeping the built artifacts and the
        global deadline. L2 machines of the old L1 are forgotten."""
        if time.monotonic() > self._deadline:
            raise BoxError(f"L1 is gone and the box's global timeout ({self.timeout:.0f}s) has passed")
        log(f"restarting L1{self._exit_note()}: {self.crash_signature() or 'no crash message'}")
        self._kill()
        if self._reader:
            self._reader.join(5)
        if getattr(self, "_console_file", None):
            self._console_file.close()
        self.l2s.clear()
        self.restarts += 1
        self.console_log = self.logdir / f"{self.run_id}-l1-console-restart{self.restarts}.log"
        self._buf = bytearray()
        self._eof = False
        self._boot()

    def crash_signature(self) -> str:
        """The first line of an L1 kernel crash in its console output, if any."""
        with self._cond:
            m = re.search(rb"[^\n]*(BUG: |Oops|Kernel panic|general protection)[^\r\n]*", self._buf)
        return m.group(0).decode(errors="replace").strip() if m else ""

    def _boot(self) -> None:
        argv = self.qemu_argv()
        log(f"booting L1: {' '.join(argv)}")
        self._console_file = open(self.console_log, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=_set_pdeathsig)
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        t0 = time.monotonic()
        try:
            m = self.expect(rb"L1-UP ([^\r\n]*)\r?\n", timeout=300, start=0)
            log(f"L1 up after {time.monotonic() - t0:.1f}s: {m.group(1).decode(errors='replace')}")
            self._sync(timeout=120)
        except Exception:
            self.close()
            raise

    def __enter__(self) -> "Box":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_timeout(self) -> None:
        log(f"global timeout ({self.timeout:.0f}s) reached: killing L1")
        self._kill()

    def _kill(self) -> None:
        p = self.proc
        if p and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        """Kill L1 (no graceful shutdown is needed: nothing in it persists)."""
        if self._watchdog:
            self._watchdog.cancel()
        self._kill()
        if self._reader:
            self._reader.join(5)
        if getattr(self, "_console_file", None):
            self._console_file.close()
            self._console_file = None
        self.payload.unlink(missing_ok=True)
        if self.scratch:
            self.scratch.unlink(missing_ok=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 20) -> bool:
        """Alive and answering a trivial command. An L1 whose CPU is soft-locked (seen after a
        nested guest's exit under TCG) is alive but not healthy, and must be booted again."""
        if not self.alive():
            return False
        # An L1 whose kernel hit a BUG (the stack guard, see the README) still answers, but the
        # scenarios after it stall or fail: it is not healthy.
        if self.crash_signature():
            return False
        try:
            return self.run("true", timeout=timeout)[0] == 0
        except Exception:  # noqa: BLE001 - any failure to answer means "not healthy"
            return False

    # ---- console plumbing -----------------------------------------------------------------------
    def _read_loop(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self._cond:
                if data:
                    self._buf += data
                else:
                    self._eof = True
                self._cond.notify_all()
            if not data:
                break
            f = self._console_file
            if f:
                try:
                    f.write(data)
                    f.flush()
                except ValueError:
                    pass
            if self.tap:
                self.tap(data)
            if self.verbose:
                sys.stderr.buffer.write(data)
                sys.stderr.flush()

    def _write(self, data: bytes) -> None:
        if not self.alive():
            raise BoxError("L1 is not running" + self._exit_note())
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise BoxError(f"cannot write to L1's console: {e}") from e

    def _exit_note(self) -> str:
        if self.proc and self.proc.poll() is not None:
            return f" (QEMU exited with {self.proc.returncode}; see {self.console_log})"
        return ""

    def mark(self) -> int:
        """Current end of the console buffer (for expect(start=...))."""
        with self._cond:
            return len(self._buf)

    def expect(self, pattern: bytes, timeout: float, start: int | None = None) -> re.Match:
        """Wait until `pattern` appears in L1's console output after offset `start`."""
        rx = re.compile(pattern, re.S)
        end = time.monotonic() + timeout
        with self._cond:
            pos = len(self._buf) if start is None else start
            while True:
                m = rx.search(self._buf, pos)
                if m:
                    return m
                left = min(end, self._deadline or end) - time.monotonic()
                if left <= 0:
                    tail = bytes(self._buf[-2000:]).decode(errors="replace")
                    raise TimeoutError(f"L1 console: no {pattern!r} within {timeout}s"
                                       f"{self._exit_note()}; console tail:\n{tail}")
                if getattr(self, "_eof", False):
                    raise BoxError(f"L1 console closed while waiting for {pattern!r}{self._exit_note()}")
                self._cond.wait(min(left, 1.0))

    def _sync(self, timeout: float) -> None:
        """Get the console shell into a known state: echo off, no prompts, nothing half-typed."""
        end = time.monotonic() + timeout
        while True:
            tag = uuid.uuid4().hex[:12]
            pos = self.mark()
            # \x03 clears a half-typed line; the marker is split so the echoed input never matches.
            self._write(b"\x03\nstty -echo; PS1=''; PS2=''; echo SYNC''" + tag.encode() + b"\n")
            try:
                self.expect(rb"SYNC" + tag.encode(), timeout=min(10, max(1, end - time.monotonic())), start=pos)
                return
            except TimeoutError:
                if time.monotonic() > end:
                    raise

    # ---- running commands in L1 -----------------------------------------------------------------
    def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        """Run shell code in L1 (busybox sh, stdin /dev/null, stderr merged into stdout).
        Returns (exit status, output). Raises TimeoutError after interrupting it on timeout."""
        with self._lock:
            tag = uuid.uuid4().hex[:16]
            b64 = base64.b64encode(cmd.encode()).decode()
            # Chunks keep every typed line far below the tty's 4095-character canonical limit.
            lines = [f": > /tmp/.tb.b64"]
            lines += [f"echo {b64[i:i + 512]} >> /tmp/.tb.b64" for i in range(0, len(b64), 512)]
            lines.append(f"base64 -d /tmp/.tb.b64 > /tmp/.tb.sh; echo __TBB''{tag}; "
                         f"sh /tmp/.tb.sh < /dev/null 2>&1; echo __TBE''{tag}_$?")
            pos = self.mark()
            self._write(("\n".join(lines) + "\n").encode())
            try:
                m = self.expect(rb"__TBB" + tag.encode() + rb"\r?\n(.*?)__TBE" + tag.encode() + rb"_(\d+)",
                                timeout=timeout, start=pos)
            except TimeoutError as e:
                if self.alive():
                    self._write(b"\x03")
                    try:
                        self._sync(timeout=30)
                    except Exception:
                        pass
                raise TimeoutError(f"L1 command timed out after {timeout}s: {cmd[:200]!r}\n{e}") from None
            out = m.group(1).decode(errors="replace").replace("\r\n", "\n")
            return int(m.group(2)), out

    def check(self, cmd: str, timeout: float = 60) -> str:
        """run() that raises on a non-zero exit status; returns the output."""
        status, out = self.run(cmd, timeout)
        if status != 0:
            raise BoxError(f"L1 command failed with {status}: {cmd[:200]!r}\n{out}")
        return out

    def write_file(self, path: str, data: bytes | str, mode: str = "644") -> None:
        if isinstance(data, str):
            data = data.encode()
        b64 = base64.b64encode(data).decode()
        q = shlex.quote(path)
        self.check(f"mkdir -p $(dirname {q}); echo '{b64}' | base64 -d > {q}; chmod {mode} {q}")

    def read_file(self, path: str, offset: int = 0, timeout: float = 60) -> bytes:
        """Bytes of an L1 file from `offset` (binary-safe: base64 over the console)."""
        status, out = self.run(f"tail -c +{offset + 1} {shlex.quote(path)} | base64", timeout)
        if status != 0:
            raise BoxError(f"cannot read {path} in L1: {out}")
        try:
            return base64.b64decode("".join(out.split()), validate=True)
        except binascii.Error as e:
            # L1's kernel printed into the console mid-transfer (a crash on its way, usually)
            raise BoxError(f"garbled read of {path} from L1 ({e}); console tail:\n{out[-600:]}") from None

    def host_port(self, name: str) -> int:
        """Host port forwarded to L1's port GUEST_PORTS[name]."""
        return self.ports[name]

    # ---- L2 machines ----------------------------------------------------------------------------
    def start_l2(self, name: str, argv: list[str], ts: bool = False) -> "L2":
        """Start an L2 VMM in L1 in the background (see l1/l2start.sh)."""
        vm = L2(self, name, argv, ts)
        vm.start()
        self.l2s.append(vm)
        return vm

    def kill_all_l2(self) -> None:
        for vm in self.l2s:
            try:
                vm.kill()
            except Exception:
                pass
        self.l2s.clear()

    def has_vmm(self) -> bool:
        return self.vmm_bin is not None

    def vmm_argv(self, config: dict | None = None, flags: list[str] | None = None,
                 name: str = "vm") -> list[str]:
        """argv that runs our vmm with `config` (written to L1 as JSON) and `flags`; with
        TESTBOX_L2=qemu, the QEMU command line that behaves the same way."""
        flags = list(flags or [])
        if l2_is_qemu():
            return qemu_argv_for(config or {}, flags)
        if not self.vmm_bin:
            raise BoxError("no vmm binary: build it (cargo build --release) or set VMM_BIN")
        argv = ["vmm"]
        if config is not None:
            path = f"/tmp/{name}.json"
            self.write_file(path, json.dumps(config, indent=1))
            argv += ["--config", path]
        return argv + flags


def default_config(vcpus: int = 2, memory_mib: int = 256, cmdline: str = "console=ttyS0",
                   on_reboot: str = "exit", serial: dict | None = None) -> dict:
    """The JSON config of our vmm for the default guest in L1."""
    return {
        "machine": {"vcpus": vcpus, "memory_mib": memory_mib},
        "boot": {"kernel": L1_KERNEL, "initrd": L1_INITRD, "cmdline": cmdline},
        "serial": serial or {"mode": "stdio"},
        "on_reboot": on_reboot,
    }


def qemu_argv_for(config: dict, flags: list[str]) -> list[str]:
    """QEMU (q35, KVM) command line equivalent to our vmm's config + flags (TESTBOX_L2=qemu)."""
    cfg = json.loads(json.dumps(config))
    m = cfg.setdefault("machine", {})
    b = cfg.setdefault("boot", {})
    serial = cfg.get("serial", {"mode": "stdio"})
    on_reboot = cfg.get("on_reboot", "exit")
    it = iter(flags)
    for f in it:
        if f in ("--kernel", "--initrd", "--cmdline"):
            b[f[2:]] = next(it)
        elif f == "--cpus":
            m["vcpus"] = int(next(it))
        elif f == "--memory":
            m["memory_mib"] = int(next(it))
        elif f == "--on-reboot":
            on_reboot = next(it)
        elif f == "--serial":
            v = next(it)
            mode, _, path = v.partition(":")
            serial = {"mode": mode, **({"path": path} if path else {})}
        else:
            raise BoxError(f"qemu stand-in: unsupported flag {f}")
    chardev = {
        "stdio": "stdio",
        "off": "none",
        "file": f"file:{serial.get('path')}",
        "socket": f"unix:{serial.get('path')},server=on,wait=off",
    }[serial.get("mode", "stdio")]
    argv = ["qemu-system-x86_64", *L1_QEMU_FW, "-machine", "q35", "-enable-kvm", "-cpu", "host",
            "-m", str(m.get("memory_mib", 256)), "-smp", str(m.get("vcpus", 1)),
            "-display", "none", "-monitor", "none", "-serial", chardev, "-nic", "none",
            "-kernel", b["kernel"]]
    if b.get("initrd"):
        argv += ["-initrd", b["initrd"]]
    argv += ["-append", b.get("cmdline", "console=ttyS0")]
    if on_reboot == "exit":
        argv.append("-no-reboot")
    return argv


def parse_cpus_memtotal(out: str) -> tuple[int, int]:
    """Parse the output of `grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo`."""
    m = re.search(r"^(\d+)\s*$.*^MemTotal:\s+(\d+) kB", out, re.M | re.S)
    if not m:
        raise AssertionError(f"unexpected guest output: {out!r}")
    return int(m.group(1)), int(m.group(2))


class L2:
    """An L2 VMM process running in L1 with its console on a FIFO (stdin) and a log (stdout)."""

    def __init__(self, box: Box, name: str, argv: list[str], ts: bool = False):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad L2 name {name!r}")
        self.box, self.name, self.argv, self.ts = box, name, argv, ts
        self.dir = f"{L1_RUN}/{name}"
        self._log = b""          # stdout fetched so far
        self.started_at = 0.0

    def start(self) -> None:
        cmd = " ".join(shlex.quote(a) for a in self.argv)
        self.box.check(f"setsid /payload/tb/l2start.sh {self.dir} {'ts' if self.ts else 'raw'} {cmd} "
                       f"< /dev/null > /dev/null 2>&1 &\n"
                       f"i=0; while [ ! -s {self.dir}/pid ] && [ ! -e {self.dir}/rc ] && [ $i -lt 200 ]; do "
                       f"usleep 50000; i=$((i+1)); done; cat {self.dir}/pid")
        self.started_at = time.monotonic()

    # -- console --
    def send(self, line: str) -> None:
        """Type a line on the guest console."""
        self.send_raw(line.encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        esc = "".join(f"\\{b:03o}" for b in data)
        self.box.check(f"printf '{esc}' > {self.dir}/in")

    def log(self) -> str:
        """The VMM's stdout so far (the guest console in stdio mode)."""
        self._log += self.box.read_file(f"{self.dir}/out", offset=len(self._log))
        return self._log.decode(errors="replace")

    def stderr(self) -> str:
        return self.box.read_file(f"{self.dir}/err").decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120, count: int = 1,
                 source: str | None = None, stall: float | None = None) -> re.Match:
        """Wait until `pattern` matches the console log `count` times (source: another L1 file
        to watch instead of the VMM's stdout, e.g. a serial output file). With `stall`, raise
        BootStall when the log has not grown for that many seconds (see BootStall)."""
        rx = re.compile(pattern, re.S | re.M)
        end = time.monotonic() + timeout
        data = b""
        last_len, last_change = -1, time.monotonic()
        while True:
            if source:
                data += self.box.read_file(source, offset=len(data)) if self._exists(source) else b""
                text = data.decode(errors="replace")
            else:
                text = self.log()
            ms = list(rx.finditer(text))
            if len(ms) >= count:
                return ms[count - 1]
            if not source and len(GUEST_RCU_STALL.findall(text)) >= 2 and "NMI backtrace" not in text:
                # A vCPU that stopped for good (see GuestStall): nothing more will come.
                raise GuestStall(self, f"an L2 vCPU stopped (RCU stall reported twice, the NMI"
                                 f" sent to it unanswered) while waiting for {pattern!r}")
            if not source and GUEST_PANIC.search(text):
                # a panicked guest prints nothing more: say so now rather than at the timeout
                raise GuestPanic(self, f"the L2 guest kernel panicked while waiting for {pattern!r}:"
                                 f" {GUEST_PANIC.search(text).group(0).strip()}")
            rc = self.exited()
            if rc is not None:
                # a guest reset during a boot ends the VMM with 0 (on_reboot=exit): see BootStall
                cls = BootStall if stall and rc == 0 else L2Error
                raise cls(self, f"VMM exited ({rc}) before {pattern!r} was seen"
                          f" {count} time(s) (seen {len(ms)})")
            now = time.monotonic()
            if len(text) != last_len:
                last_len, last_change = len(text), now
            elif stall and now - last_change > stall:
                raise BootStall(self, f"console silent for {stall:.0f}s while waiting for {pattern!r}"
                                f" (seen {len(ms)} of {count})")
            if now > end:
                raise L2Error(self, f"{pattern!r} not seen {count} time(s) within {timeout}s"
                              f" (seen {len(ms)})")
            time.sleep(0.3)

    def _exists(self, path: str) -> bool:
        return self.box.run(f"[ -e {shlex.quote(path)} ]")[0] == 0

    def guest_cmd(self, cmd: str, timeout: float = 60) -> str:
        """Type `cmd` at the guest's shell and return its output (the text between two markers)."""
        tag = uuid.uuid4().hex[:8]
        self.send(f"echo GB''{tag}; {cmd}; echo GE''{tag}")
        m = self.wait_for(rf"GB{tag}\r?\n(.*?)GE{tag}", timeout)
        return m.group(1).replace("\r\n", "\n").replace("\r", "")

    def wait_shell(self, timeout: float = 120, stall: float | None = 60) -> None:
        """Wait until the guest's console shell answers (typing a probe every few seconds). With
        `stall`: BootStall when the console has not grown for that long (a live guest at least
        echoes the probes), as the end of a boot is still a boot."""
        end = time.monotonic() + timeout
        last_len, last_change = len(self._log), time.monotonic()
        while True:
            tag = uuid.uuid4().hex[:8]
            self.send(f"echo RDY''{tag}")
            try:
                self.wait_for(rf"RDY{tag}\r?$", timeout=min(8, max(1, end - time.monotonic())))
                return
            except (BootStall, GuestPanic, GuestStall):
                raise
            except L2Error:
                now = time.monotonic()
                if len(self._log) != last_len:
                    last_len, last_change = len(self._log), now
                elif stall and now - last_change > stall and self.exited() is None:
                    raise BootStall(self, f"console silent for {stall:.0f}s while waiting for the shell")
                rc = self.exited()
                if stall and rc == 0:   # a guest reset before its shell came up (see BootStall)
                    raise BootStall(self, "VMM exited (0) while waiting for the shell")
                if rc is not None or now > end:
                    raise

    # -- process --
    def pid(self) -> int:
        return int(self.box.check(f"cat {self.dir}/pid").strip())

    def exited(self) -> int | None:
        status, out = self.box.run(f"cat {self.dir}/rc 2>/dev/null")
        return int(out.strip()) if status == 0 and out.strip() else None

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait for the VMM to end; returns its exit status (raises L2Error on timeout)."""
        q = f"{self.dir}/rc"
        status, out = self.box.run(f"i=0; while [ ! -e {q} ] && [ $i -lt {int(timeout * 10)} ]; do "
                                   f"usleep 100000; i=$((i+1)); done; cat {q}", timeout=timeout + 60)
        if status != 0 or not out.strip():
            raise L2Error(self, f"VMM still running after {timeout}s")
        return int(out.strip())

    def kill(self) -> None:
        """Stop the VMM (SIGTERM, then SIGKILL) if it still runs."""
        self.box.run(f"p=$(cat {self.dir}/pid 2>/dev/null); [ -n \"$p\" ] || exit 0; "
                     f"[ -e {self.dir}/rc ] && exit 0; kill $p 2>/dev/null; i=0; "
                     f"while [ ! -e {self.dir}/rc ] && [ $i -lt 30 ]; do usleep 100000; i=$((i+1)); done; "
                     f"[ -e {self.dir}/rc ] || kill -9 $p 2>/dev/null; true", timeout=60)

    def diagnostics(self, lines: int = 60) -> str:
        """Tail of the VMM's stdout and stderr, for failure messages."""
        try:
            out = self.box.run(f"echo '--- {self.name}: argv'; cat /proc/$(cat {self.dir}/pid)/cmdline "
                               f"2>/dev/null | tr '\\0' ' '; echo; echo '--- exit status:'; "
                               f"cat {self.dir}/rc 2>/dev/null || echo running; "
                               # A VMM still running: what each thread is doing (a hang shows
                               # as a thread asleep in a futex or busy in a loop).
                               f"[ -e {self.dir}/rc ] || for t in /proc/$(cat {self.dir}/pid)/task/*; do "
                               f"echo \"--- thread $(cat $t/comm): $(cut -d' ' -f3 $t/stat) "
                               f"wchan=$(cat $t/wchan) syscall=$(cut -d' ' -f1 $t/syscall)\"; "
                               f"head -n 8 $t/stack 2>/dev/null; done; "
                               # ... and where its vCPUs are: a second of KVM exits (guest RIPs).
                               f"[ -e {self.dir}/rc ] || {{ T=/sys/kernel/tracing; "
                               f"[ -e $T/trace ] || mount -t tracefs nodev $T 2>/dev/null; "
                               f"echo > $T/trace; echo 1 > $T/events/kvm/kvm_exit/enable && "
                               f"sleep 1; echo 0 > $T/events/kvm/kvm_exit/enable; "
                               f"echo '--- KVM exits in one second (the last 40)'; "
                               f"grep -v '^#' $T/trace | tail -n 40; }} 2>/dev/null; "
                               f"echo '--- stdout (tail)'; tail -n {lines} {self.dir}/out; "
                               f"echo '--- stderr (tail)'; tail -n {lines} {self.dir}/err", timeout=60)[1]
        except Exception as e:  # the box itself may be gone
            out = f"(no diagnostics: {e})"
        return f"L2 {self.name} started as: {' '.join(self.argv)}\n{out}"


class L2Error(AssertionError):
    """An L2 expectation failed; the message carries the tail of the VMM's logs."""

    def __init__(self, vm: L2, msg: str):
        super().__init__(f"{msg}\n{vm.diagnostics()}")


class BootStall(L2Error):
    """The guest console went silent in the middle of a boot, or the VMM ended before the boot did.
    Nested KVM under QEMU/TCG has rare flakes (a few % of L2 boots, with QEMU as L2 as well): an L2
    vCPU spins and the boot never ends, or the L2 guest resets (triple fault) early on. Tests
    treat this as infrastructure trouble and retry the scenario once (retry_on_stall); a VMM that
    really hangs fails on the retry as well."""


GUEST_RCU_STALL = re.compile(r"rcu: INFO: rcu_preempt detected stalls on CPUs/tasks")


class GuestStall(L2Error):
    """An L2 vCPU stopped for good in the middle of a run: the guest's RCU reports the stall
    again and again, and the NMI it sends the stalled CPU for a backtrace is never taken (a
    guest spinning in a loop of its own, e.g. waiting on a device, would print one). The vCPU is
    not running at all: the nested box's counterpart of the boot stall (BootStall), seen with
    and without any virtio device in use; retry_on_flake runs the scenario again in a fresh L1."""


GUEST_PANIC = re.compile(r"(?:Kernel panic - not syncing|traps: PANIC: double fault)[^\r\n]*")


class GuestPanic(L2Error):
    """The L2 guest's kernel panicked (it will print nothing more). A double fault is the nested
    box's own (see the README's pitfalls: the same SVM emulation trouble that triple-faults early
    L2 boots): retry_on_flake runs the scenario again after one; any other panic fails."""

    @property
    def nested_fault(self) -> bool:
        return "double fault" in str(self).splitlines()[0]


def retry_on_flake(fn):
    """Decorator for scenarios: run again (up to FLAKE_RETRIES times) after a flake of the nested
    box itself: a BootStall,
    an L2 triple fault, or L1 dying under the test (QEMU/TCG's SVM emulation occasionally crashes L1's kernel on a
    VM exit: "BUG: TASK stack guard page was hit" in exc_page_fault, see README.md). L1 is booted
    again first. The scenario's fixtures `vms` (cleaned up) and `box` are found in its kwargs."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        vms = kwargs.get("vms")
        box = kwargs.get("box") or getattr(vms, "box", None)
        for attempt in range(FLAKE_RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except (BootStall, BoxError, TimeoutError, AssertionError) as e:
                why = flake_reason(e, box) or triple_fault_of(vms)
                if why is None or attempt == FLAKE_RETRIES:
                    raise
                log(f"{fn.__name__}: {why} -- known nested-TCG flake, running it again")
                warnings.warn(f"{fn.__name__}: test-box flake ({why}); the scenario was run again")
                # After an L2 double fault or a stopped vCPU, L1 has been seen to die soon
                # after: a fresh one.
                nested = isinstance(e, GuestStall) or (isinstance(e, GuestPanic) and e.nested_fault)
                if box is not None and (nested or not box.healthy()):
                    box.restart()
                elif vms is not None:
                    vms.cleanup()
                if vms is not None:
                    vms.started.clear()
    return wrapper


# Runs of a scenario after a flake of the box's own (a real bug fails every one of them). Three:
# a bad run of the box has handed one scenario three flakes in a row (a console silent in early
# boot, L1's stack-guard BUG, then an early-boot L2 triple fault, 2026-12-02).
FLAKE_RETRIES = 3


# A kvm_exit trace line (L2Error's diagnostics hold a second of them for a VMM still running).
KVM_NPF_EXIT = re.compile(r"kvm_exit: vcpu (\d+) reason npf rip (0x[0-9a-f]+) info1 0x[0-9a-f]+ "
                          r"info2 (0x[0-9a-f]+) intr_info (0x[0-9a-f]+)")
# Injecting a page fault (vector 14, hardware exception with an error code).
PF_INJECTION = 0x80000b0e


def npf_loop(text: str) -> str | None:
    """The nested box's NPF loop, if `text` (diagnostics) shows one: an L2 vCPU that takes the
    same nested page fault over and over, at a guest-physical address above 4 GiB (none of the
    scenarios' guests has RAM there), while the CPU delivers a #PF to the guest. Seen during an
    L2's SMP bring-up with our VMM and with QEMU as L2 alike (the L1 console logs of QEMU
    baseline runs, 2026-12-02): the SVM emulation's, not the VMM's."""
    hits = [m.groups() for m in KVM_NPF_EXIT.finditer(text)]
    looping = collections.Counter(h for h in hits
                                  if int(h[3], 16) == PF_INJECTION and int(h[2], 16) >= 1 << 32)
    if not looping or looping.most_common(1)[0][1] < 10:
        return None
    vcpu, rip, gpa, _ = looping.most_common(1)[0][0]
    return (f"L2 vCPU {vcpu} loops on a nested page fault at {gpa} (rip {rip}) while a #PF is "
            f"delivered (nested SVM under TCG)")


def flake_reason(e: BaseException, box: "Box | None") -> str | None:
    """Why `e` is the nested box's own trouble (see retry_on_flake), or None if it is not."""
    if isinstance(e, BootStall):
        return str(e).splitlines()[0]
    if isinstance(e, L2Error) and (loop := npf_loop(str(e))):
        return loop
    if isinstance(e, L2Error) and "the guest triple-faulted" in str(e):
        # The same nested-SVM fault makes QEMU as L2 reset the guest ("early L2 reset" in the
        # README); our vmm stops with this error instead. A real bug fails the retries too.
        return "an L2 vCPU triple-faulted (nested SVM under TCG)"
    if isinstance(e, GuestPanic) and e.nested_fault:
        return "the L2 guest kernel took a double fault (nested SVM under TCG)"
    if isinstance(e, GuestStall):
        return "an L2 vCPU stopped for good (nested SVM under TCG)"
    if box is not None and not box.healthy():
        return f"L1 died or stopped answering: {box.crash_signature() or box._exit_note()}"
    return None


def l2_triple_faulted(vm: "L2") -> bool:
    """Whether our VMM `vm` ended on the nested-SVM triple fault (see flake_reason)."""
    try:
        return vm.exited() is not None and "the guest triple-faulted" in vm.stderr()
    except Exception:  # the box itself may be gone; flake_reason judges that
        return False


def triple_fault_of(vms) -> str | None:
    """The nested-SVM triple fault (see flake_reason) when an L2 of the scenario ended with one
    while the scenario was failing on something else (a client that lost the VMM's socket)."""
    for vm in getattr(vms, "started", []):
        if l2_triple_faulted(vm):
            return "an L2 vCPU triple-faulted (nested SVM under TCG)"
    return None


retry_on_stall = retry_on_flake   # older name


def bench_run(box: "Box", label: str, run, errors: tuple = (BoxError, TimeoutError,
                                                             AssertionError)) -> dict:
    """A benchmark's `run()` (a dict of results), again after a flake of the nested box
    (flake_reason), up to FLAKE_RETRIES times; L1 is booted again when it died, stopped
    answering or lost an L2 vCPU. Any other failure is returned as {"ok": False, "error": ...}
    so that the other columns are still measured."""
    for attempt in range(FLAKE_RETRIES + 1):
        try:
            return run()
        except errors as e:
            why = flake_reason(e, box)
            if not box.healthy() or isinstance(e, GuestStall):
                box.restart()
            if why is None or attempt == FLAKE_RETRIES:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                log(f"{label}: FAILED: {first}")
                return {"ok": False, "error": first, "detail": str(e)[-3000:]}
            log(f"{label}: nested-box flake ({why}); running it again")
    raise AssertionError("unreachable")
