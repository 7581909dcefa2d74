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
need qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs xz-utils
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q qemu.qmp
bash "$ROOT/resources/guest/build.sh"
cd "$ROOT"
exec python3 -m pytest tests/testbox -v --tb=short -p no:cacheprovider "$@"
