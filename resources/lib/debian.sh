# shellcheck shell=bash
# Shared helpers for the artifact builders (sourced, not run): Debian package installation and
# download, copying dynamically linked binaries with their libraries, and build stamps.
# Used by resources/guest/build.sh and tests/testbox/build_l1.sh.

# need PKG...: install the Debian packages that are missing (we run as root on dev and CI machines).
need() {
  local miss=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || miss+=("$p"); done
  [ ${#miss[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${miss[*]}" >&2
  apt_updated_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${miss[@]}" >/dev/null
}

# apt_updated_once: run `apt-get update` once per process (apt-cache and downloads need fresh lists).
apt_updated_once() {
  [ -n "${_APT_UPDATED:-}" ] && return 0
  apt-get update -qq >/dev/null
  _APT_UPDATED=1
}

# deb_fetch DIR PKG: print the path of PKG's .deb in DIR, downloading it with `apt-get download` if
# DIR has none yet. A cached .deb is reused as is (offline-repeatable builds); delete it to refresh.
deb_fetch() {
  local dir=$1 pkg=$2 f
  mkdir -p "$dir"
  f=$(find "$dir" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -1)
  if [ -z "$f" ]; then
    (cd "$dir" && { apt-get download -q "$pkg" >/dev/null 2>&1 || { apt_updated_once && apt-get download -q "$pkg" >/dev/null; }; }) \
      || { echo "error: cannot download Debian package $pkg" >&2; return 1; }
    f=$(find "$dir" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -1)
  fi
  [ -n "$f" ] || { echo "error: no .deb for $pkg in $dir" >&2; return 1; }
  echo "$f"
}

# kernel_deb DIR META: the .deb of the kernel image that metapackage META (e.g.
# linux-image-cloud-amd64) points to. A kernel .deb already in DIR for that flavour is reused.
kernel_deb() {
  local dir=$1 meta=$2 flavour real f
  flavour=${meta#linux-image-}                       # cloud-amd64
  # ABI-FLAVOUR exactly (6.1.0-57-amd64 is not 6.1.0-57-cloud-amd64)
  f=$(find "$dir" -maxdepth 1 -name "linux-image-[0-9]*-${flavour}_*.deb" 2>/dev/null \
      | grep -E "/linux-image-[0-9.]+-[0-9]+-${flavour}_[^/]*\.deb\$" | sort -V | tail -1 || true)
  if [ -z "$f" ]; then
    real=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image/{print $2; exit}')
    if [ -z "$real" ]; then
      apt_updated_once
      real=$(apt-cache depends "$meta" | awk '/Depends: linux-image/{print $2; exit}')
    fi
    [ -n "$real" ] || { echo "error: cannot resolve kernel package $meta" >&2; return 1; }
    f=$(deb_fetch "$dir" "$real") || return 1
  fi
  echo "$f"
}

# deb_depends DEB: the package names in DEB's Depends field (versions and alternatives dropped).
deb_depends() {
  dpkg-deb -f "$1" Depends | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' -e 's/ //g' | grep -v '^$'
}

# copy_bin ROOT BINARY [DEST]: copy a binary into ROOT (at DEST, default its own path) together with
# every shared library `ldd` resolves for it, and the dynamic loader.
copy_bin() {
  local r=$1 b=$2 d=${3:-$2} l
  mkdir -p "$r$(dirname "$d")"
  cp -L "$b" "$r$d"
  if ldd "$b" 2>/dev/null | grep -q 'not found'; then
    echo "error: $b has unresolved libraries:" >&2; ldd "$b" | grep 'not found' >&2; return 1
  fi
  for l in $(ldd "$b" 2>/dev/null | grep -o '/[^ ]*'); do
    [ -e "$r$l" ] && continue
    mkdir -p "$r$(dirname "$l")"; cp -L "$l" "$r$l"
  done
}

# kmods KDIR DEST MODULE...: copy kernel modules (by name, '-' and '_' equivalent) from the unpacked
# kernel package KDIR into the flat directory DEST; fails on a missing module.
kmods() {
  local k=$1 dst=$2 m f alt; shift 2
  mkdir -p "$dst"
  for m in "$@"; do
    alt=$(echo "$m" | tr '_-' '-_')
    f=$(find "$k/lib/modules" \( -name "$m.ko" -o -name "$alt.ko" -o -name "$m.ko.xz" -o -name "$alt.ko.xz" \) | head -1)
    [ -n "$f" ] || { echo "error: kernel module $m not found in $k" >&2; return 1; }
    case $f in
      *.xz) xz -dc "$f" > "$dst/$m.ko" ;;
      *) cp "$f" "$dst/$m.ko" ;;
    esac
  done
}

# busybox_root ROOT: static busybox in ROOT/bin with one symlink per applet (no --install at boot).
busybox_root() {
  local r=$1 a
  mkdir -p "$r/bin" "$r/sbin" "$r/usr/bin" "$r/usr/sbin"
  cp /bin/busybox "$r/bin/busybox"
  for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] && continue
    [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"
  done
  ln -sf ../bin/busybox "$r/sbin/init"
}

# make_cpio ROOT OUT: pack ROOT as a gzip'd newc cpio archive (the Linux initramfs format).
make_cpio() {
  local r=$1 out=$2
  (cd "$r" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0 | gzip -1 -n > "$out.tmp.$$")
  mv "$out.tmp.$$" "$out"
}

# stamp_of WORDS...: a short digest of the given words and of the contents of those that are files.
stamp_of() {
  local w
  for w in "$@"; do
    if [ -f "$w" ]; then echo "$(basename "$w") $(sha256sum < "$w")"; else echo "$w"; fi
  done | sha256sum | cut -c1-16
}
