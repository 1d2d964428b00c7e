#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# fetch-xen-tools.sh CACHE_DIR
#
# Unpacks Debian's C xenstored (package xen-utils-4.17) and any Xen runtime
# library it needs that is not installed into CACHE_DIR, for the sim
# platform's xenstore. The package is never installed: installing it would
# pull in systemd-sysv and udev. Only `apt-get download` and `dpkg -x` are used.
#
# Layout of CACHE_DIR:
#   root/          the unpacked packages (root/usr/lib/xen-4.17/bin/xenstored)
#   lib            symlink to the unpacked multiarch library directory: the
#                  LD_LIBRARY_PATH for xenstored (XENSOCK_XEN_LIBDIR)
#   debs/          the downloaded .deb files
#   .complete      stamp: present once everything above is in place
#
# Idempotent: with the stamp present it only prints the path. On success
# the single line on stdout is the absolute path of xenstored; progress
# and errors go to stderr. Exits non-zero with a message when it cannot.

set -eu

XEN_UTILS_PKG=xen-utils-4.17
XENSTORED_REL=usr/lib/xen-4.17/bin/xenstored
# Runtime libraries xenstored links against (see `ldd xenstored`), by package.
LIB_PKGS="libxenevtchn1 libxengnttab1 libxenmisc4.17 libxentoollog1 \
libxentoolcore1 libxencall1 libxenforeignmemory1 libxendevicemodel1"

die() {
    echo "fetch-xen-tools: error: $*" >&2
    exit 1
}
say() {
    echo "fetch-xen-tools: $*" >&2
}

[ $# -eq 1 ] || die "usage: $0 CACHE_DIR"
[ -n "$1" ] || die "CACHE_DIR is empty"

for tool in apt-get dpkg dpkg-query flock ldd; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found in PATH (needs a Debian system)"
done

mkdir -p "$1" || die "cannot create cache directory '$1'"
CACHE=$(cd "$1" && pwd -P) || die "cannot enter cache directory '$1'"
XENSTORED="$CACHE/root/$XENSTORED_REL"

if [ -f "$CACHE/.complete" ] && [ -x "$XENSTORED" ]; then
    echo "$XENSTORED"
    exit 0
fi

# Two concurrent `meson setup` runs may share one cache: serialise them.
exec 9>"$CACHE/.lock" || die "cannot create lock file $CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"
if [ -f "$CACHE/.complete" ] && [ -x "$XENSTORED" ]; then
    echo "$XENSTORED"
    exit 0
fi

MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null) ||
    MULTIARCH=$(gcc -print-multiarch 2>/dev/null) ||
    MULTIARCH=$(uname -m)-linux-gnu

mkdir -p "$CACHE/debs" "$CACHE/root" || die "cannot create directories in $CACHE"

# apt-get download into the current directory; refresh the package lists
# once if the first try fails (stale or missing lists).
download() {
    say "downloading $*"
    if (cd "$CACHE/debs" && apt-get download "$@" >&2); then
        return 0
    fi
    say "apt-get download failed; running apt-get update and retrying"
    apt-get update >&2 || die "apt-get update failed (no network or not root?)"
    (cd "$CACHE/debs" && apt-get download "$@" >&2) ||
        die "apt-get download $* failed"
}

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

unpack() {
    for deb in "$CACHE"/debs/"$1"_*.deb; do
        [ -f "$deb" ] || die "no .deb for $1 in $CACHE/debs after download"
        say "unpacking $(basename "$deb")"
        dpkg -x "$deb" "$CACHE/root" || die "dpkg -x $deb failed"
    done
}

# Start from a clean tree: a half-finished earlier run leaves no stamp.
rm -rf "${CACHE:?}/root" "${CACHE:?}/debs" "${CACHE:?}/lib"
mkdir -p "$CACHE/debs" "$CACHE/root"

need="$XEN_UTILS_PKG"
for pkg in $LIB_PKGS; do
    installed "$pkg" || need="$need $pkg"
done
# shellcheck disable=SC2086 # word splitting of the package list is intended
download $need
for pkg in $need; do
    unpack "$pkg"
done

[ -x "$XENSTORED" ] || die "$XEN_UTILS_PKG did not contain $XENSTORED_REL"

mkdir -p "$CACHE/root/usr/lib/$MULTIARCH"
ln -s "root/usr/lib/$MULTIARCH" "$CACHE/lib" || die "cannot create $CACHE/lib"

missing=$(LD_LIBRARY_PATH="$CACHE/lib" ldd "$XENSTORED" 2>&1 | grep 'not found' || true)
[ -z "$missing" ] || die "xenstored still lacks libraries after unpacking:
$missing"

touch "$CACHE/.complete" || die "cannot write $CACHE/.complete"
say "xenstored ready in $CACHE"
echo "$XENSTORED"
