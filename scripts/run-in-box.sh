#!/bin/bash
# Boots the default guest under our vmm inside the nested-KVM test box, console on this terminal
# (non-interactive without a terminal or in CI: boot, `uname -a`, poweroff). See
# tests/testbox/interactive.py. Installs what it needs. Arguments go to vmm (e.g. --cpus 1).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=../resources/lib/debian.sh
. "$ROOT/resources/lib/debian.sh"
need qemu-system-x86 busybox-static cpio e2fsprogs xz-utils
exec python3 "$ROOT/tests/testbox/interactive.py" "$@"
