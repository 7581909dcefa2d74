#!/usr/bin/env bash
# Builds a pinned Firecracker release for the benchmarks' peer column (issue 18):
#   build/peers/firecracker
# then: FC_BIN=build/peers/firecracker python3 tests/testbox/bench_boot.py
# None of its code enters this repository: the source is cloned into build/peers/src (git-ignored).
# Built for the host's gnu target (upstream releases are musl): Firecracker then compiles in its
# empty default seccomp policy (resources/seccomp/unimplemented.json: allow everything), so it runs
# without --no-seccomp; its syscall filters are not part of what the benchmarks measure.
# Environment:
#   FC_SRC      a git dir (bare mirror) or checkout of firecracker to take the source from; unset:
#               /work/.mirror/firecracker-microvm+firecracker/repo if present, else
#               git clone https://github.com/firecracker-microvm/firecracker
#   FC_VERSION  the tag to build (default v1.16.1)
#   FC_NICE     run cargo under nice -n 19 (default 1; 0 disables)
#   FC_MICRO_HTTP_SRC, FC_RUST_VMM_CI_SRC  git dirs or checkouts of firecracker-microvm/micro-http
#               (Firecracker's only git dependency; crates come from crates.io) and of its submodule
#               rust-vmm/rust-vmm-ci, for machines that cannot reach github.com (defaults: the
#               matching /work/.mirror/OWNER+NAME/repo when present)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION="${FC_VERSION:-v1.16.1}"
OUT="$ROOT/build/peers"
SRC="$OUT/src/firecracker"
UPSTREAM=https://github.com/firecracker-microvm/firecracker
MIRRORS=/work/.mirror
TARGET=x86_64-unknown-linux-gnu
mkdir -p "$OUT/src"

mirror() { [ -d "$MIRRORS/$1/repo" ] && echo "$MIRRORS/$1/repo" || true; }
FC_SRC="${FC_SRC:-$(mirror firecracker-microvm+firecracker)}"
FC_MICRO_HTTP_SRC="${FC_MICRO_HTTP_SRC:-$(mirror firecracker-microvm+micro-http)}"
FC_RUST_VMM_CI_SRC="${FC_RUST_VMM_CI_SRC:-$(mirror rust-vmm+rust-vmm-ci)}"

if [ -x "$OUT/firecracker" ] && [ -f "$OUT/FC_VERSION" ] \
   && [ "$(cat "$OUT/FC_VERSION")" = "$VERSION" ] && [ -z "${FC_REBUILD:-}" ]; then
  echo "firecracker $VERSION already built: $OUT/firecracker (FC_REBUILD=1 to rebuild)"
  echo "FC_BIN=$OUT/firecracker"
  exit 0
fi

if [ ! -d "$SRC/.git" ]; then
  rm -rf "$SRC"
  if [ -n "$FC_SRC" ]; then
    # A bare mirror (…/repo with HEAD+objects) or a checkout: clone locally, no network needed.
    git clone -q --no-checkout "$FC_SRC" "$SRC"
  else
    git clone -q --no-checkout "$UPSTREAM" "$SRC" || {
      echo "build-firecracker: cannot clone $UPSTREAM; set FC_SRC to a local git dir or checkout" >&2
      exit 1
    }
  fi
fi
git -C "$SRC" rev-parse -q --verify "refs/tags/$VERSION" >/dev/null || git -C "$SRC" fetch -q --tags origin || true
git -C "$SRC" rev-parse -q --verify "refs/tags/$VERSION" >/dev/null || {
  echo "build-firecracker: tag $VERSION not found in $SRC (have: $(git -C "$SRC" tag | tail -5 | tr '\n' ' '))" >&2
  exit 1
}
# A mirror may lack its largest blobs (the one seen: a test kernel of the unit tests,
# src/vmm/src/test_utils/mock_resources/test_noisy_elf.bin): leave them out of the checkout
# (sparse), the build does not read them.
tree=$(git -C "$SRC" ls-tree -r "refs/tags/$VERSION")
missing=$(awk '$2=="blob"{print $3}' <<<"$tree" | git -C "$SRC" cat-file --batch-check | awk '$2=="missing"{print $1}')
printf '/*\n' >"$SRC/.git/info/sparse-checkout"
for sha in $missing; do
  path=$(awk -v s="$sha" '$3==s{sub(/^[^\t]*\t/, ""); print}' <<<"$tree")
  echo "build-firecracker: $path is not in $SRC (object $sha missing): left out of the checkout" >&2
  printf '!/%s\n' "$path" >>"$SRC/.git/info/sparse-checkout"
done
git -C "$SRC" config core.sparseCheckout "$([ -n "$missing" ] && echo true || echo false)"
# (git still names the missing objects while writing its index: noise, the checkout succeeds)
git -C "$SRC" -c advice.detachedHead=false checkout -q -f "refs/tags/$VERSION" 2>&1 \
  | { grep -v '^error: invalid object' >&2 || true; }

# Without github.com, cargo fetches the git dependency from a local copy (git CLI, as Firecracker's
# .cargo/config.toml asks, + insteadOf passed through the environment: no global config is touched).
export CARGO_NET_GIT_FETCH_WITH_CLI=true
n=0
# (both URL spellings: git picks the longest matching prefix, and submodules use ".git")
for pair in "$FC_MICRO_HTTP_SRC=https://github.com/firecracker-microvm/micro-http" \
            "$FC_MICRO_HTTP_SRC=https://github.com/firecracker-microvm/micro-http.git" \
            "$FC_RUST_VMM_CI_SRC=https://github.com/rust-vmm/rust-vmm-ci" \
            "$FC_RUST_VMM_CI_SRC=https://github.com/rust-vmm/rust-vmm-ci.git"; do
  dir="${pair%%=*}" url="${pair#*=}"
  [ -n "$dir" ] || continue
  export "GIT_CONFIG_KEY_$n=url.$(cd "$dir" && pwd).insteadOf" "GIT_CONFIG_VALUE_$n=$url"
  n=$((n + 1))
done
export GIT_CONFIG_COUNT=$n

# Its rust-toolchain.toml pins a channel and asks rustup for the musl targets: the pinned channel
# is used when installed (else the default toolchain), without installing anything.
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$SRC/rust-toolchain.toml" 2>/dev/null || true)
if [ -n "$channel" ] && command -v rustup >/dev/null && rustup toolchain list | grep -q "^$channel"; then
  export RUSTUP_TOOLCHAIN=$channel
else
  export RUSTUP_TOOLCHAIN="$(rustup default 2>/dev/null | cut -d' ' -f1 || true)"
  [ -n "$RUSTUP_TOOLCHAIN" ] || unset RUSTUP_TOOLCHAIN
  echo "build-firecracker: toolchain ${channel:-?} (its rust-toolchain.toml) not installed, using $(rustc --version)" >&2
fi

# bindgen (userfaultfd-sys's build script) needs libclang; seccompiler links libseccomp.
# shellcheck source=../resources/lib/debian.sh
source "$ROOT/resources/lib/debian.sh"
need libclang-dev libseccomp-dev

NICE=()
[ "${FC_NICE:-1}" = 0 ] || NICE=(nice -n 19)
# Its own target dir (.cargo/config.toml: build/cargo_target inside the clone), release profile as
# upstream (lto, codegen-units=1), default features.
(cd "$SRC" && "${NICE[@]}" cargo build --release --locked --target "$TARGET" -p firecracker --bin firecracker)
# stripped, as upstream ships its release binaries (debug info in a separate file)
cp -f "$SRC/build/cargo_target/$TARGET/release/firecracker" "$OUT/firecracker"
strip "$OUT/firecracker"
echo "$VERSION" >"$OUT/FC_VERSION"
"$OUT/firecracker" --version | head -1
echo "built: $OUT/firecracker"
echo "FC_BIN=$OUT/firecracker"
