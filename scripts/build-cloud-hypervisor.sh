#!/usr/bin/env bash
# Builds a pinned Cloud Hypervisor release for the benchmarks' peer column (issue 18):
#   build/peers/cloud-hypervisor and build/peers/ch-remote
# then: CH_BIN=build/peers/cloud-hypervisor python3 tests/testbox/bench_boot.py (and bench_*.py).
# None of its code enters this repository: the source is cloned into build/peers/src (git-ignored).
# Environment:
#   CH_SRC      a git dir (bare mirror) or checkout of cloud-hypervisor to take the source from;
#               unset: git clone https://github.com/cloud-hypervisor/cloud-hypervisor
#   CH_VERSION  the tag to build (default v53.0)
#   CH_NICE     run cargo under nice (default 1; 0 disables)
#   CH_MICRO_HTTP_SRC, CH_RUST_VMM_CI_SRC  git dirs or checkouts of firecracker-microvm/micro-http
#               (Cloud Hypervisor's only git dependency; crates come from crates.io) and of its
#               submodule rust-vmm/rust-vmm-ci: for machines that cannot reach github.com
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION="${CH_VERSION:-v53.0}"
OUT="$ROOT/build/peers"
SRC="$OUT/src/cloud-hypervisor"
UPSTREAM=https://github.com/cloud-hypervisor/cloud-hypervisor
mkdir -p "$OUT/src"

if [ -x "$OUT/cloud-hypervisor" ] && [ -x "$OUT/ch-remote" ] && [ -f "$OUT/VERSION" ] \
   && [ "$(cat "$OUT/VERSION")" = "$VERSION" ] && [ -z "${CH_REBUILD:-}" ]; then
  echo "cloud-hypervisor $VERSION already built: $OUT/cloud-hypervisor (CH_REBUILD=1 to rebuild)"
  exit 0
fi

if [ ! -d "$SRC/.git" ]; then
  rm -rf "$SRC"
  if [ -n "${CH_SRC:-}" ]; then
    # A bare mirror (…/repo with HEAD+objects) or a checkout: clone locally, no network needed.
    git clone -q --no-checkout "$CH_SRC" "$SRC"
  else
    git clone -q --no-checkout "$UPSTREAM" "$SRC" || {
      echo "build-cloud-hypervisor: cannot clone $UPSTREAM; set CH_SRC to a local git dir or checkout" >&2
      exit 1
    }
  fi
fi
git -C "$SRC" rev-parse -q --verify "refs/tags/$VERSION" >/dev/null || git -C "$SRC" fetch -q --tags origin || true
git -C "$SRC" rev-parse -q --verify "refs/tags/$VERSION" >/dev/null || {
  echo "build-cloud-hypervisor: tag $VERSION not found in $SRC (have: $(git -C "$SRC" tag | tail -5 | tr '\n' ' '))" >&2
  exit 1
}
git -C "$SRC" -c advice.detachedHead=false checkout -q -f "refs/tags/$VERSION"

# Without github.com, cargo fetches the git dependency from a local copy (git CLI + insteadOf,
# passed through the environment: no global git or cargo config is touched).
export CARGO_NET_GIT_FETCH_WITH_CLI=true
n=0
# (both URL spellings: git picks the longest matching prefix, and submodules use ".git")
for pair in "${CH_MICRO_HTTP_SRC:-}=https://github.com/firecracker-microvm/micro-http" \
            "${CH_MICRO_HTTP_SRC:-}=https://github.com/firecracker-microvm/micro-http.git" \
            "${CH_RUST_VMM_CI_SRC:-}=https://github.com/rust-vmm/rust-vmm-ci" \
            "${CH_RUST_VMM_CI_SRC:-}=https://github.com/rust-vmm/rust-vmm-ci.git"; do
  dir="${pair%%=*}" url="${pair#*=}"
  [ -n "$dir" ] || continue
  export "GIT_CONFIG_KEY_$n=url.$(cd "$dir" && pwd).insteadOf" "GIT_CONFIG_VALUE_$n=$url"
  n=$((n + 1))
done
export GIT_CONFIG_COUNT=$n

NICE=()
[ "${CH_NICE:-1}" = 0 ] || NICE=(nice -n 10)
# Its own target dir (inside the clone); default features (kvm, io_uring) as upstream releases.
(cd "$SRC" && "${NICE[@]}" cargo build --release --locked --bin cloud-hypervisor --bin ch-remote)
cp -f "$SRC/target/release/cloud-hypervisor" "$SRC/target/release/ch-remote" "$OUT/"
echo "$VERSION" >"$OUT/VERSION"
"$OUT/cloud-hypervisor" --version
echo "built: $OUT/cloud-hypervisor $OUT/ch-remote"
