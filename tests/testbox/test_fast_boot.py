"""The fast boot path (issue 18): a bzImage is booted through its vmlinux, extracted on the host and
kept in the kernel cache ($XDG_CACHE_HOME/vmm/kernels). Every other scenario boots this way; these
check the cache itself with the real guest kernel: a cached kernel that was modified is thrown away
and extracted afresh (the right kernel boots), and `--no-decompress` boots the bzImage as it is;
and Debian's generic kernel boots the fast way as well as the cloud kernel.
"""

from __future__ import annotations

import pytest

import box as tb
from test_boot import boot_to_shell

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="our vmm's kernel cache")

CACHE = "/tmp/kcache-test"


def start(vms, name: str, flags: list[str] | None = None) -> tb.L2:
    return start_with(vms, name, tb.default_config(vcpus=1), flags)


def start_with(vms, name: str, config: dict, flags: list[str] | None = None) -> tb.L2:
    argv = ["env", f"XDG_CACHE_HOME={CACHE}"] + vms.box.vmm_argv(config, flags, name=name)
    return vms.start(argv=argv)


def stderr(box: tb.Box, vm: tb.L2) -> str:
    return box.read_file(f"{vm.dir}/err").decode(errors="replace")


def entries(box: tb.Box) -> list[str]:
    return sorted(box.check(f"ls {CACHE}/vmm/kernels").split())


def guest_release(vm: tb.L2) -> str:
    return vm.guest_cmd("uname -r").strip()


@tb.retry_on_flake
def test_kernel_cache_fills_survives_tampering_and_can_be_bypassed(box, vms, up_regex):
    box.check(f"rm -rf {CACHE}")

    # --no-decompress: the bzImage as it is (the guest decompresses itself), the reference kernel;
    # the cache is left alone.
    vm = start(vms, "fast-bzimage", ["--no-decompress"])
    boot_to_shell(vm, up_regex)
    release = guest_release(vm)
    assert release
    assert box.run(f"ls {CACHE}/vmm/kernels")[0] != 0, "--no-decompress wrote the cache"
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0

    # Extracted and cached (the entry, its stamp, the index by file identity): the same kernel.
    vm = start(vms, "fast-first")
    boot_to_shell(vm, up_regex)
    assert guest_release(vm) == release
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0
    names = entries(box)
    vmlinux = [n for n in names if n.endswith(".vmlinux")]
    assert len(vmlinux) == 1 and any(n.endswith(".stamp") for n in names), names
    assert "booting the bzImage as it is" not in stderr(box, vm)

    # One byte of the cached kernel changed in place (same size): never booted as it is.
    path = f"{CACHE}/vmm/kernels/{vmlinux[0]}"
    box.check(f"printf '\\377' | dd of={path} bs=1 seek=$(( $(stat -c %s {path}) / 2 )) "
              f"conv=notrunc 2>/dev/null")
    vm = start(vms, "fast-tampered")
    vm.wait_for(r"discarding cached kernel .*changed since it was written", 60, source=f"{vm.dir}/err")
    boot_to_shell(vm, up_regex)
    assert guest_release(vm) == release
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0

    # The rewritten entry is used, quietly.
    vm = start(vms, "fast-again")
    boot_to_shell(vm, up_regex)
    assert guest_release(vm) == release
    assert "discarding" not in stderr(box, vm)
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0


@tb.retry_on_flake
def test_generic_debian_kernel_boots_extracted(box, vms, up_regex):
    """Debian's generic kernel (linux-image-amd64, a different build and compression setup from the
    cloud kernel every other scenario boots) goes the fast way too: extracted, cached, booted."""
    version = tb.guest_env().get("GENERIC_KERNEL_VERSION")
    if not version:
        pytest.skip("the guest has no generic kernel (a custom guest)")
    box.check(f"rm -rf {CACHE}")
    config = tb.default_config(vcpus=1)
    config["boot"]["kernel"] = f"{tb.L1_GUEST}/vmlinuz-generic"
    vm = start_with(vms, "fast-generic", config)
    boot_to_shell(vm, up_regex)
    assert guest_release(vm) == version
    vm.send("poweroff")
    assert vm.wait_exit(60) == 0
    assert "booting the bzImage as it is" not in stderr(box, vm)
    assert [n for n in entries(box) if n.endswith(".vmlinux")], "the generic kernel was not cached"
