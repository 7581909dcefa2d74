#!/bin/bash
# Runs the test-box suite: installs what the box needs (Debian packages, pytest from PyPI), builds
# the guest, then `python3 -m pytest tests/testbox -v [ARGS...]`; exits with pytest's status.
#   tests/testbox/run.sh                      # our vmm (VMM_BIN, else target/release|debug/vmm)
#   TESTBOX_L2=qemu tests/testbox/run.sh      # QEMU stands in for our vmm (harness self-check)
#   tests/testbox/run.sh -k poweroff          # extra pytest arguments
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../resources/lib/debian.sh
. "$ROOT/resources/lib/debian.sh"
need qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs xz-utils socat
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q qemu.qmp
python3 -c 'import prometheus_client' 2>/dev/null || python3 -m pip install -q prometheus_client
command -v schemathesis >/dev/null || python3 -m pip install -q schemathesis
bash "$ROOT/resources/guest/build.sh"
cd "$ROOT"
# The nested box has flakes of its own (see README.md: QEMU/TCG's SVM emulation can crash or
# soft-lock L1). Scenarios already retry once inside a session; scenarios that still failed get
# one more run in a fresh box, and only a failure there fails the suite (a real bug fails twice).
mkdir -p build/testbox
set +e
python3 -m pytest tests/testbox -v --tb=short -p no:cacheprovider \
  --junitxml=build/testbox/junit.xml "$@"
rc=$?
set -e
if [ $rc -eq 1 ] && [ -z "${TESTBOX_NO_RERUN:-}" ]; then
  failed=$(python3 - build/testbox/junit.xml <<'PY'
import sys
import xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
        mod = case.get("classname", "").replace(".", "/")
        print(f"{mod}.py::{case.get('name')}")
PY
)
  if [ -n "$failed" ]; then
    echo "test box: re-running in a fresh box the scenarios that failed: $(echo $failed)"
    # shellcheck disable=SC2086
    python3 -m pytest -v --tb=short -p no:cacheprovider $failed
    rc=$?
  fi
fi
exit $rc
