"""Peer VMMs for the benchmarks (issue 18): Cloud Hypervisor and Firecracker as columns beside QEMU.

CH_BIN=PATH (a cloud-hypervisor binary you built; none of its code or build recipe is in this
repository) adds the column; ch-remote is taken from CH_REMOTE_BIN, else next to CH_BIN. Unset or missing: the
benchmarks print SKIP_LINE and measure nothing for it (never faked numbers).
FC_BIN=PATH (a firecracker binary, likewise) does the same for
Firecracker (bench_boot.py only), FC_SKIP_LINE when unset.

Cloud Hypervisor boots the same guest kernel through its fastest path, the ELF vmlinux (PVH entry):
extracted here from the guest's bzImage (build/guest/vmlinuz) like the kernel's own
scripts/extract-vmlinux, cached in build/peers/ and copied into L1 with the binaries
(Box(extra_bins=...): they land in /usr/bin of L1). Firecracker boots that same vmlinux (it loads
only ELF kernels on x86_64; PVH entry too).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import bz2
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import box as tb

PEERS = tb.BUILD / "peers"
SKIP_LINE = "Cloud Hypervisor: skipped (set CH_BIN to a cloud-hypervisor binary)"
FC_SKIP_LINE = "Firecracker: skipped (set FC_BIN to a firecracker binary)"
VMLINUX_NAME = "ch-guest-vmlinux"          # its name in L1: /usr/bin/ch-guest-vmlinux (CH and FC)
L1_VMLINUX = f"/usr/bin/{VMLINUX_NAME}"


def ch_bins() -> tuple[Path, Path] | None:
    """(cloud-hypervisor, ch-remote) from CH_BIN [CH_REMOTE_BIN], or None when not usable."""
    ch = os.environ.get("CH_BIN")
    if not ch:
        return None
    ch_p = Path(ch)
    rem = Path(os.environ.get("CH_REMOTE_BIN") or ch_p.with_name("ch-remote"))
    if not (ch_p.is_file() and os.access(ch_p, os.X_OK)):
        tb.log(f"CH_BIN={ch}: not an executable file")
        return None
    if not (rem.is_file() and os.access(rem, os.X_OK)):
        tb.log(f"ch-remote not found at {rem} (set CH_REMOTE_BIN)")
        return None
    return ch_p, rem


def fc_bins() -> Path | None:
    """The firecracker binary from FC_BIN, or None when not usable."""
    fc = os.environ.get("FC_BIN")
    if not fc:
        return None
    if not (Path(fc).is_file() and os.access(fc, os.X_OK)):
        tb.log(f"FC_BIN={fc}: not an executable file")
        return None
    return Path(fc)


def ch_version(ch: Path) -> str:
    return _version(ch)


def fc_version(fc: Path) -> str:
    return _version(fc)


def _version(binary: Path) -> str:
    try:
        return subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return f"{binary.name} (version unknown)"


# ---- vmlinux from a bzImage ---------------------------------------------------------------------
MAGICS = [(b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip"),
          (b"\x02\x21\x4c\x18", "lz4"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma")]


def _decompress(fmt: str, data: bytes) -> bytes:
    if fmt == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if fmt == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if fmt == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if fmt == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if fmt == "zstd":
        try:
            import zstandard  # type: ignore
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except ImportError:
            pass
    tool = {"zstd": "zstd", "lz4": "lz4"}[fmt]
    if not shutil.which(tool):
        raise tb.BoxError(f"the guest kernel is {fmt}-compressed: install the {tool} CLI")
    # the kernel appends the uncompressed size after the stream: the tool may complain about it
    # after having written the whole output, so its status is not trusted (ELF check below)
    r = subprocess.run([tool, "-dc"], input=data, capture_output=True)
    return r.stdout


def extract_vmlinux(bzimage: Path) -> bytes:
    """The ELF vmlinux inside a bzImage: the payload the setup header points to (payload_offset,
    payload_length), decompressed by its magic; falls back to scanning for magics like
    scripts/extract-vmlinux. Raises BoxError if no ELF comes out."""
    img = bzimage.read_bytes()
    cands: list[tuple[str, bytes]] = []
    if len(img) > 0x250 and img[0x202:0x206] == b"HdrS":
        setup_sects = img[0x1F1] or 4
        off, length = struct.unpack_from("<II", img, 0x248)
        start = (setup_sects + 1) * 512 + off
        payload = img[start:start + length]
        for magic, fmt in MAGICS:
            if payload.startswith(magic):
                cands.append((fmt, payload))
    for magic, fmt in MAGICS:
        pos = img.find(magic)
        if pos >= 0:
            cands.append((fmt, img[pos:]))
    for fmt, data in cands:
        try:
            out = _decompress(fmt, data)
        except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError):
            continue
        if out[:4] == b"\x7fELF":
            return out
    raise tb.BoxError(f"no ELF vmlinux found in {bzimage} (tried {[f for f, _ in cands]})")


def guest_vmlinux() -> Path:
    """build/peers/ch-guest-vmlinux for the current guest kernel (re-extracted when it changes)."""
    src = tb.GUEST_DIR / "vmlinuz"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = PEERS / VMLINUX_NAME
    stamp = PEERS / f"{VMLINUX_NAME}.sha256"
    if out.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return out
    PEERS.mkdir(parents=True, exist_ok=True)
    data = extract_vmlinux(src)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(out)
    stamp.write_text(digest + "\n")
    tb.log(f"extracted the guest's vmlinux ({len(data) >> 20} MiB ELF) to {out}")
    return out


def box_extra_bins(ch: bool = True, fc: bool = True) -> list[str]:
    """Extra files for Box(extra_bins=...): cloud-hypervisor, ch-remote and ch-ptyrun (ch, when
    CH_BIN is usable), firecracker (fc, when FC_BIN is usable), and the guest vmlinux for both;
    empty when none is."""
    bins: list[str] = []
    chb = ch_bins() if ch else None
    if chb:
        bins += [str(chb[0]), str(chb[1]), str(ptyrun())]
    fcb = fc_bins() if fc else None
    if fcb:
        bins.append(str(fcb))
    if bins:
        tb.build_guest()
        bins.append(str(guest_vmlinux()))
    return bins


# ---- a pty for its console ----------------------------------------------------------------------
# Cloud Hypervisor's `--serial tty` reads the guest's console input from stdin only when stdin is a
# terminal (vmm/src/serial_manager.rs: isatty(STDIN)); l2start.sh gives VMMs a FIFO. L1's busybox
# has no `script`, so this relay (built on the host, static, copied into L1 as /usr/bin/ch-ptyrun)
# runs it on a pty, raw from the start (no echo of early input): FIFO -> pty master -> stdout.
PTYRUN_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <sys/wait.h>
#include <unistd.h>
static pid_t child;
static void fwd(int sig) { if (child > 0) kill(child, sig); }
int main(int argc, char **argv) {
    int m;
    if (argc < 2) return 2;
    struct termios t;                          /* raw from the start: no echo of early input */
    if (tcgetattr(0, &t) < 0) { memset(&t, 0, sizeof t); t.c_cflag = CS8 | CREAD; }
    cfmakeraw(&t);
    child = forkpty(&m, NULL, &t, NULL);
    if (child < 0) return 111;
    if (child == 0) { execvp(argv[1], argv + 1); _exit(127); }
    signal(SIGTERM, fwd); signal(SIGINT, fwd); signal(SIGHUP, fwd);
    struct pollfd p[2] = {{0, POLLIN, 0}, {m, POLLIN, 0}};
    char buf[65536];
    for (;;) {
        if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; break; }
        if (p[1].revents) {
            ssize_t n = read(m, buf, sizeof buf);
            if (n <= 0) break;                 /* EIO: the child closed the pty */
            for (ssize_t o = 0; o < n;) { ssize_t w = write(1, buf + o, n - o); if (w <= 0) break; o += w; }
        }
        if (p[0].revents) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n <= 0) p[0].fd = -1;
            else for (ssize_t o = 0; o < n;) { ssize_t w = write(m, buf + o, n - o); if (w <= 0) break; o += w; }
        }
    }
    int st;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR) {}
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
"""
PTYRUN_NAME = "ch-ptyrun"


def ptyrun() -> Path:
    """build/peers/ch-ptyrun, (re)built from PTYRUN_C when the source changed."""
    out = PEERS / PTYRUN_NAME
    src = PEERS / f"{PTYRUN_NAME}.c"
    if out.exists() and src.exists() and src.read_text() == PTYRUN_C:
        return out
    PEERS.mkdir(parents=True, exist_ok=True)
    src.write_text(PTYRUN_C)
    subprocess.run(["gcc", "-O2", "-static", "-s", "-Wall", "-o", str(out), str(src), "-lutil"],
                   check=True)
    return out


def vmm_pid(box: tb.Box, pid: int) -> int:
    """The cloud-hypervisor process under ch-ptyrun (pid: the one l2start.sh recorded)."""
    kids = box.check(f"cat /proc/{pid}/task/{pid}/children 2>/dev/null; true").split()
    return int(kids[0]) if kids else pid


# ---- command lines ------------------------------------------------------------------------------
def ch_argv(mem_mib: int, cpus: int, api_socket: str | None = None, cmdline: str = "console=ttyS0",
            extra: list[str] | None = None) -> list[str]:
    """cloud-hypervisor booting the test guest (vmlinux + initramfs), its console on stdio (the
    legacy serial port, ttyS0, as for ours and QEMU) through ch-ptyrun, no virtio-console."""
    argv = [PTYRUN_NAME, "cloud-hypervisor", "--kernel", L1_VMLINUX, "--initramfs", tb.L1_INITRD,
            "--cmdline", cmdline, "--cpus", f"boot={cpus}", "--memory", f"size={mem_mib}M",
            "--serial", "tty", "--console", "off"]
    if api_socket:
        argv += ["--api-socket", f"path={api_socket}"]
    return argv + list(extra or [])


# Firecracker's own defaults: reboot=k (the guest's `reboot` resets through the i8042, which ends
# Firecracker; its ACPI is hardware-reduced with S0 only, so a guest `poweroff` halts and leaves it
# running) and it appends pci=off itself (no PCI unless --enable-pci). panic=1 and the rest of its
# default boot_args (8250.nr_uarts=0 would even hide the console) are left out to stay close to ours.
FC_CMDLINE = "console=ttyS0 reboot=k"


def fc_argv(box: tb.Box, mem_mib: int, cpus: int, cmdline: str = FC_CMDLINE,
            name: str = "fc") -> list[str]:
    """firecracker booting the test guest (vmlinux + initramfs) from a config file written to L1
    (/tmp/NAME.json; --no-api: no API socket), its console on stdio (the legacy serial port,
    ttyS0; stdin, a FIFO, is read as console input), its log on stderr, no virtio device (no
    disk, no net). A gnu-target build carries Firecracker's empty seccomp policy, so no
    --no-seccomp is needed."""
    config = {
        "boot-source": {"kernel_image_path": L1_VMLINUX, "initrd_path": tb.L1_INITRD,
                        "boot_args": cmdline},
        "machine-config": {"vcpu_count": cpus, "mem_size_mib": mem_mib},
        "drives": [],
    }
    path = f"/tmp/{name}.json"
    box.write_file(path, json.dumps(config, indent=1))
    # its log defaults to stdout: --log-path (applied before its first line, unlike the config's
    # "logger") keeps stdout for the console alone
    return ["firecracker", "--no-api", "--config-file", path, "--log-path", "/proc/self/fd/2"]
