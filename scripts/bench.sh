#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# bench.sh — xensock's benchmark suite on the sim platform, in one command:
#
#   ./scripts/bench.sh
#
#   1. scripts/install-deps.sh socat: the build dependencies and
#      Debian's socat (the relay baseline); skips what is installed
#   2. builds build-bench/ (meson, --buildtype=release)
#   3. runs build-bench/bench/xensock-bench: bulk throughput both ways (1 and
#      8 streams), a socat relay, 1-byte round trips, connection rate, 10,000
#      concurrent connections, xensockd's CPU per GiB, then the ring-order x
#      worker-thread sweep; prints the table with the ratios to the baselines
#      measured in the same run, and which targets were met
#
# Every argument goes to xensock-bench, e.g.
#   ./scripts/bench.sh --reps 5                    steadier medians
#   ./scripts/bench.sh --only throughput,rtt       some sections
#   ./scripts/bench.sh --sweep-orders 6,9 --sweep-workers 1,2
#   ./scripts/bench.sh --help                      every option
#
# Environment:
#   XENSOCK_JOBS=N        compile jobs (default: nproc)
#   XENSOCK_BENCH_BUILD   build directory (default: build-bench)
#   XENSOCK_NO_BUILD=1    use the build directory as it is (no apt, no meson)
#
# Exit status: 0 if every measurement ran and every byte arrived (missed
# targets are reported, not failures); non-zero otherwise.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
BUILD=${XENSOCK_BENCH_BUILD:-$ROOT/build-bench}
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac
JOBS=${XENSOCK_JOBS:-$(nproc)}

for a in "$@"; do
    case "$a" in
        -h|--help)
            sed -n '4,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            [ -x "$BUILD/bench/xensock-bench" ] && { echo; "$BUILD/bench/xensock-bench" --help; }
            exit 0
            ;;
    esac
done

say() {
    printf '=== bench: %s\n' "$*" >&2
}
die() {
    echo "bench: error: $*" >&2
    exit 1
}

if [ "${XENSOCK_NO_BUILD:-0}" != 1 ]; then
    cd "$ROOT" || exit 1
    say "dependencies (build, socat)"
    ./scripts/install-deps.sh socat >&2 || die "installing dependencies failed"
    say "building $BUILD (release)"
    if [ -f "$BUILD/meson-private/coredata.dat" ]; then
        meson setup --reconfigure "$BUILD" -Dbuildtype=release >/dev/null ||
            die "meson setup failed"
    else
        meson setup "$BUILD" -Dbuildtype=release >/dev/null || die "meson setup failed"
    fi
    meson compile -C "$BUILD" -j "$JOBS" bench/xensock-bench src/daemon/xensockd \
        src/platform/sim/xenstored/xensock-sim-xenstored-shim >&2 || die "compilation failed"
fi

BENCH=$BUILD/bench/xensock-bench
[ -x "$BENCH" ] || die "$BENCH is missing: run without XENSOCK_NO_BUILD=1"
command -v socat >/dev/null 2>&1 || say "socat is not installed: the relay column will be empty"

say "running $BENCH $*"
exec "$BENCH" "$@"
