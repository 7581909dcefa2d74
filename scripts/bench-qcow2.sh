#!/usr/bin/env bash
# qcow2 engine benchmark, host only: our engine (devices/examples/bench_qcow2.rs, release build)
# against `qemu-img bench` on the same 1 GiB image file with the same access pattern, in one run.
# Prints one row per case with both times and the ratio qemu_time / our_time (>= 1.0: we are at
# least as fast). Cache mode writeback for both (page cache), no flushes inside the timed loop.
# Environment: BENCH_DIR (default: a temp dir), BENCH_COUNT_4K (default 40000).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-img >/dev/null; then
  apt-get install -y qemu-utils >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y qemu-utils >/dev/null; }
fi
command -v qemu-img >/dev/null || { echo "bench-qcow2: qemu-img is required" >&2; exit 1; }

if [ -n "${BENCH_OURS:-}" ]; then
  OURS="$BENCH_OURS" # a prebuilt bench_qcow2
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
  cargo build --release -q -p devices --example bench_qcow2
  OURS="$CARGO_TARGET_DIR/release/examples/bench_qcow2"
fi

DIR="${BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
IMG="$DIR/bench.qcow2"
N4K="${BENCH_COUNT_4K:-40000}"
SIZE=1G
# A large odd stride scatters 4 KiB requests over the whole image (qemu-img bench has no random
# mode; both tools wrap the offset modulo image size - request size).
STRIDE=$((4096 * 104729))

secs() { sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p'; }

fresh() { rm -f "$IMG"; qemu-img create -q -f qcow2 "$IMG" "$SIZE"; }
filled() { fresh; qemu-io -f qcow2 -c "write -P 0x5a 0 $SIZE" "$IMG" >/dev/null; }

printf '%-34s %10s %10s %8s\n' "case (1 GiB qcow2, 64 KiB clusters)" "qemu-img s" "ours s" "ratio"
row() { # name, setup, args...
  local name="$1" setup="$2"; shift 2
  $setup; local q; q=$(qemu-img bench -q -f qcow2 -t writeback "$@" "$IMG" 2>&1 | secs || true)
  [ -n "$q" ] || q=$(qemu-img bench -f qcow2 -t writeback "$@" "$IMG" | secs)
  $setup; local o; o=$("$OURS" "$@" "$IMG" | secs)
  printf '%-34s %10s %10s %8s\n' "$name" "$q" "$o" "$(awk -v q="$q" -v o="$o" 'BEGIN{ if (o > 0) printf "%.2f", q / o; else print "inf" }')"
}
keep() { :; }

filled
row "4K random read, QD1"            keep -c "$N4K" -d 1  -s 4096 -S "$STRIDE"
row "4K random read, QD32"           keep -c "$N4K" -d 32 -s 4096 -S "$STRIDE"
row "4K random write (allocated), QD1"  keep -w -c "$N4K" -d 1  -s 4096 -S "$STRIDE"
row "4K random write (allocated), QD32" keep -w -c "$N4K" -d 32 -s 4096 -S "$STRIDE"
row "1M sequential read"             keep -c 1024 -d 1 -s 1048576
row "1M sequential write (allocated)"   keep -w -c 1024 -d 1 -s 1048576
# Allocation path: every request lands in an unallocated cluster (fresh image per tool).
row "4K first write (allocation)"    fresh -w -c 16383 -d 1 -s 4096 -S 65536
row "1M first write (allocation)"    fresh -w -c 1023 -d 1 -s 1048576
# Overwrites of allocated clusters with the same pattern.
row "4K overwrite (allocated)"       filled -w -c 16383 -d 1 -s 4096 -S 65536
