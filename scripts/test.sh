#!/usr/bin/env bash
# Runs every test: formatting and lints, the unit and host-KVM tests (cargo), then the test-box
# scenarios that boot real Linux guests under our vmm inside a nested KVM (tests/testbox).
# Installs what it needs (Debian packages, PyPI packages); safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "toolchain components and host packages"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# shellcheck source=../resources/lib/debian.sh
. resources/lib/debian.sh
# qemu-img (qemu-utils) is the reference the disk image tests compare against.
need qemu-utils e2fsprogs

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --release (the binary the test box boots guests with)"
cargo build --release --locked -p vmm

step "cargo test (unit tests, host KVM tests, bad-input tests)"
cargo test --workspace --locked

if [ "${SKIP_TESTBOX:-}" = 1 ]; then
  echo "SKIP_TESTBOX=1: test box scenarios not run"
  exit 0
fi
step "test box: real Linux guests under vmm in a nested KVM"
VMM_BIN="$PWD/target/release/vmm" bash tests/testbox/run.sh
