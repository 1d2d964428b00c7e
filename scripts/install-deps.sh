#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# install-deps.sh [EXTRA_PACKAGE...]
#
# Installs, from Debian 12's own packages, everything xensock's build, its
# tests and its demo need, plus any EXTRA_PACKAGE named on the command line.
# Packages already installed are skipped; `apt-get update` runs only when
# something is missing (or when apt knows no package lists at all, which
# scripts/fetch-xen-tools.sh needs for its `apt-get download`). With
# everything present it makes no network access and takes well under a
# second.
#
# Runs as root, or through sudo when not root. Non-interactive: safe in CI
# with no standard input.
#
# Not installed here, on purpose: xen-utils-4.17. The sim platform needs
# only its xenstored, which scripts/fetch-xen-tools.sh unpacks (apt-get
# download + dpkg -x) into the build tree at `meson setup` time; installing
# the package would pull in systemd-sysv and udev.

set -eu

# What needs what:
#   build       compiler, meson/ninja/pkg-config, and the libraries named in
#               meson.build (liburing, libxen*, fmt, CLI11, nlohmann-json,
#               doctest for the tests)
#   sim         dpkg-dev (dpkg-architecture) for fetch-xen-tools.sh; apt,
#               dpkg, flock and ldd are in every Debian base image
#   scripts     procps (ps/pgrep, for tests and the demo's diagnostics)
BUILD_PKGS="build-essential g++ meson ninja-build pkg-config \
liburing-dev libxen-dev libfmt-dev libcli11-dev nlohmann-json3-dev doctest-dev"
SIM_PKGS="dpkg-dev"
SCRIPT_PKGS="procps"

PKGS="$BUILD_PKGS $SIM_PKGS $SCRIPT_PKGS $*"

say() {
    echo "install-deps: $*" >&2
}
die() {
    echo "install-deps: error: $*" >&2
    exit 1
}

command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 ||
    die "needs a Debian system (dpkg-query and apt-get not found)"

# Root, or sudo (non-interactive: never wait for a password with no stdin).
if [ "$(id -u)" -eq 0 ]; then
    AS_ROOT=""
elif command -v sudo >/dev/null 2>&1; then
    AS_ROOT="sudo"
else
    AS_ROOT="none"
fi
as_root() {
    case "$AS_ROOT" in
        "") "$@" ;;
        none) die "not root and sudo is not installed: run this as root (needs: $*)" ;;
        *) $AS_ROOT "$@" ;;
    esac
}

missing=""
for pkg in $PKGS; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = installed ] || missing="$missing $pkg"
done

# fetch-xen-tools.sh needs apt to know xen-utils-4.17 (a base image ships
# with no package lists at all).
apt_knows_xen=yes
apt-cache show xen-utils-4.17 >/dev/null 2>&1 || apt_knows_xen=no

if [ -z "$missing" ] && [ "$apt_knows_xen" = yes ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS="-y -q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300"

say "running apt-get update"
# shellcheck disable=SC2086 # option list
as_root env DEBIAN_FRONTEND=noninteractive apt-get $APT_OPTS update >&2 ||
    die "apt-get update failed (no network?)"

if [ -n "$missing" ]; then
    say "installing:$missing"
    # shellcheck disable=SC2086 # package and option lists
    as_root env DEBIAN_FRONTEND=noninteractive apt-get $APT_OPTS install --no-install-recommends $missing >&2 ||
        die "apt-get install failed:$missing"
fi

apt-cache show xen-utils-4.17 >/dev/null 2>&1 ||
    die "apt knows no package xen-utils-4.17: is this Debian 12 (bookworm) with its main archive in sources?"
say "all dependencies installed"
