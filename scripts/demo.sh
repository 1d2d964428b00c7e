#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# demo.sh — build xensockd and run it on the sim platform, with a demo guest
# making real traffic through it. From a fresh Debian 12 machine:
#
#   ./scripts/demo.sh
#
#   1. scripts/install-deps.sh (apt-get; skips what is installed)
#   2. builds into build-demo/ (meson; the sim's xenstored is unpacked from
#      Debian's xen-utils-4.17 into build-demo/xen-cache)
#   3. a sim root /dev/shm/xs-XXXXXX; the sim's xenstored (xensock-sim up);
#      xensockd --sim; `xensockctl attach --domid 1` (the toolstack's part);
#      the demo guest, domid 1 (tools/demo/xensock-demo.cpp): an HTTP GET,
#      a 1 MiB echo round trip and a server inside the guest, all through
#      xensockd to services on 127.0.0.1; then `xensockctl list`
#   4. tears everything down (also on failure or Ctrl-C)
#
# Exit status: 0 if every demo step passed, non-zero otherwise.
#
# Options:
#   --builddir DIR   build directory (default: build-demo)
#   --no-build       use DIR's binaries as they are: no apt, no meson (the
#                    'demo' test of `meson test` runs it this way)
#   --protocol P     xensock (default) or pvcalls
# Environment: XENSOCK_JOBS=N compile jobs (default: nproc).

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
BUILD=""
DO_BUILD=1
PROTOCOL=xensock
DOMID=1

usage() {
    sed -n '4,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --builddir) [ $# -ge 2 ] || usage; BUILD=$2; shift 2 ;;
        --no-build) DO_BUILD=0; shift ;;
        --protocol) [ $# -ge 2 ] || usage; PROTOCOL=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "demo: unknown argument '$1'" >&2; usage ;;
    esac
done
[ -n "$BUILD" ] || BUILD="$ROOT/build-demo"
case "$BUILD" in /*) ;; *) BUILD="$PWD/$BUILD" ;; esac

say() {
    printf '\n=== demo: %s\n' "$*"
}
die() {
    echo "demo: error: $*" >&2
    exit 1
}

if [ "$DO_BUILD" = 1 ]; then
    cd "$ROOT" || exit 1
    say "installing dependencies"
    ./scripts/install-deps.sh || die "installing dependencies failed"
    say "building into $BUILD"
    if [ -f "$BUILD/meson-private/coredata.dat" ]; then
        meson setup --reconfigure "$BUILD" -Dtests=false >/dev/null ||
            meson setup --wipe "$BUILD" -Dtests=false || die "meson setup failed"
    else
        rm -rf "$BUILD"
        meson setup "$BUILD" -Dtests=false || die "meson setup failed"
    fi
    meson compile -C "$BUILD" -j "${XENSOCK_JOBS:-$(nproc)}" || die "compilation failed"
fi

XENSOCKD=$BUILD/src/daemon/xensockd
XENSOCKCTL=$BUILD/tools/xensockctl/xensockctl
SIM=$BUILD/src/platform/sim/xenstored/xensock-sim
DEMO=$BUILD/tools/demo/xensock-demo
for bin in "$XENSOCKD" "$SIM" "$DEMO"; do
    [ -x "$bin" ] || die "$bin is missing: build first (without --no-build)"
done
HAVE_CTL=1
if [ ! -x "$XENSOCKCTL" ]; then
    HAVE_CTL=0
    echo "demo: warning: $XENSOCKCTL is missing; cannot attach the guest or list sessions" >&2
fi

# ---- the sim installation, torn down on every exit --------------------
SIM_ROOT=$(mktemp -d /dev/shm/xs-XXXXXX) || die "cannot create a sim root in /dev/shm"
SIM_PID=""
DAEMON_PID=""
RESULT=1

stop_pid() {  # stop_pid PID NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1 name=$2 i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "demo: $name (pid $pid) did not stop on SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}

cleanup() {
    trap - EXIT INT TERM
    if [ "$RESULT" -ne 0 ] && [ -s "$SIM_ROOT/xensockd.log" ]; then
        echo "--- xensockd log ($SIM_ROOT/xensockd.log) ---" >&2
        tail -n 40 "$SIM_ROOT/xensockd.log" >&2
    fi
    stop_pid "$DAEMON_PID" xensockd
    stop_pid "$SIM_PID" "xensock-sim"
    rm -rf "${SIM_ROOT:?}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for PATH PID NAME: until PATH exists (bounded), while PID lives.
wait_for() {
    local path=$1 pid=$2 name=$3 i
    for i in $(seq 200); do
        [ -e "$path" ] && return 0
        kill -0 "$pid" 2>/dev/null || die "$name exited during start-up"
        sleep 0.05
    done
    die "$name did not create $path within 10 s"
}

say "sim root $SIM_ROOT"
"$SIM" up "$SIM_ROOT" &
SIM_PID=$!
wait_for "$SIM_ROOT/xenstored.sock" "$SIM_PID" "the sim's xenstored (xensock-sim up)"
echo "sim xenstored (Debian's xen-utils-4.17 xenstored) up: $SIM_ROOT/xenstored.sock"

"$XENSOCKD" --sim "$SIM_ROOT" --log-level info >"$SIM_ROOT/xensockd.log" 2>&1 &
DAEMON_PID=$!
wait_for "$SIM_ROOT/control" "$DAEMON_PID" xensockd
echo "xensockd --sim $SIM_ROOT running (pid $DAEMON_PID), control socket $SIM_ROOT/control"

if [ "$HAVE_CTL" = 1 ]; then
    say "xensockctl attach --domid $DOMID --protocol $PROTOCOL"
    "$XENSOCKCTL" --sim "$SIM_ROOT" attach --domid "$DOMID" --protocol "$PROTOCOL" || die "xensockctl attach failed"
fi

say "demo guest, domid $DOMID"
"$DEMO" --sim "$SIM_ROOT" --domid "$DOMID" --protocol "$PROTOCOL"
DEMO_RC=$?

if [ "$HAVE_CTL" = 1 ]; then
    say "xensockctl list"
    "$XENSOCKCTL" --sim "$SIM_ROOT" list || echo "demo: xensockctl list failed" >&2
    say "xensockctl stats"
    "$XENSOCKCTL" --sim "$SIM_ROOT" stats || echo "demo: xensockctl stats failed" >&2
    say "xensockctl detach --domid $DOMID"
    "$XENSOCKCTL" --sim "$SIM_ROOT" detach --domid "$DOMID" || echo "demo: xensockctl detach failed" >&2
fi

if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    echo "demo: xensockd died during the demo" >&2
    DEMO_RC=1
fi

if [ "$DEMO_RC" -eq 0 ]; then
    RESULT=0
    say "PASS: the demo guest's traffic went through xensockd"
else
    say "FAIL: the demo guest exited with status $DEMO_RC"
fi
exit "$RESULT"
