"""The REST API against its own OpenAPI document (api/openapi.json), by schemathesis: a client
generated from the document, not written by us, on a running guest with the built-in agent
(the real qemu-ga answering) and a balloon.

Every documented operation gets schema-valid and schema-invalid requests (schemathesis' coverage
and fuzzing phases, with its default checks): every answer must be documented (status code,
content type, body schema), a schema-valid request must be accepted unless
tests/testbox/schemathesis.toml names the rejection the schema cannot express, a schema-invalid
one must be refused, and none may be a server error. Afterwards the VM still runs, its console
and its agent answer.

Left out: the operations that end or restart the guest or write files where they are told
(shutdown, power-button, reset, agent shutdown, snapshot, restore), and the balloon's target (a
random one squeezes a 256 MiB guest to a few MiB, and it stalls in reclaim, as it would under
QEMU); test_control.py, test_snapshot.py, test_console.py and test_balloon.py drive those with
meaningful arguments.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import box as tb
from test_boot import boot_to_shell
from test_console import forward

pytestmark = pytest.mark.skipif(tb.l2_is_qemu(), reason="our vmm's REST API")

ROOT = Path(__file__).resolve().parents[2]
API = "/tmp/vmm-schema-api.sock"
LEFT_OUT = ["/vm/shutdown", "/vm/power-button", "/vm/reset", "/vm/agent/shutdown",
            "/vm/snapshot", "/vm/restore"]


@tb.retry_on_flake
def test_rest_api_answers_as_its_openapi_document_says(box, vms, up_regex, tmp_path):
    st = shutil.which("schemathesis") or shutil.which("st")
    assert st, "schemathesis is not installed (tests/testbox/run.sh installs it)"
    cfg = tb.default_config(memory_mib=256)
    cfg["agent"] = True
    cfg["balloon"] = {"stats_interval_s": 2}
    vm = vms.start(cfg, ["--api-socket", API])
    boot_to_shell(vm, up_regex)
    forward(box, tb.GUEST_PORTS["api"], API)
    url = f"http://127.0.0.1:{box.host_port('api')}"
    argv = [st, "--config-file", str(ROOT / "tests/testbox/schemathesis.toml"), "--no-color",
            "run", str(ROOT / "api/openapi.json"), "--url", url,
            "--max-examples", "25", "--request-timeout", "30", "--workers", "1",
            "--seed", "20261202", "--report", "junit",
            "--report-junit-path", str(tmp_path / "schemathesis.xml")]
    for path in LEFT_OUT:
        argv += ["--exclude-path", path]
    argv += ["--exclude-operation-id", "setBalloon"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    report = run.stdout[-12000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"schemathesis found answers the document does not allow:\n{report}"
    assert "passed" in run.stdout, report

    # Nothing it sent hurt the VM: it runs (or was left paused), its console and agent answer.
    status, out = box.run(f"vmm ctl --api-socket {API} info")
    assert status == 0, out
    if json.loads(out[out.index("{"):])["state"] == "paused":
        box.check(f"vmm ctl --api-socket {API} resume")
    assert vm.exited() is None, vm.diagnostics()
    assert "ALIVE" in vm.guest_cmd("echo AL''IVE")
    status, out = box.run(f"vmm ctl --api-socket {API} agent guest-ping")
    assert status == 0 and json.loads(out) == {}, out
    vm.send("poweroff")
    assert vm.wait_exit(120) == 0
