#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# run-tests.sh — every test of xensock, from a fresh Debian 12 machine.
#
#   1. scripts/install-deps.sh (apt-get; skips what is installed)
#   2. build-test/:      meson setup --werror, compile, meson test (all suites)
#   3. build-test-asan/: the same with -Dsanitizers=true (ASan + UBSan) at
#                        -O1, except a suite named 'slow' if there is one
#                        (mark a test `suite : ['slow']` to keep it out)
#
# Prints meson's test summary for each build, then one closing line
# "tests: N passed, N failed, N skipped" over both. Exits non-zero if any
# build or test failed.
#
# Environment:
#   XENSOCK_JOBS=N        compile jobs (default: nproc)
#   XENSOCK_TEST_ASAN=0   skip step 3 (quicker local runs; CI runs it)
#   XENSOCK_TEST_ARGS     extra arguments for both `meson test` runs,
#                         e.g. "--suite runtime"
#   XENSOCK_BUILD_PREFIX  build directory prefix (default: build-test)

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT" || exit 1

JOBS=${XENSOCK_JOBS:-$(nproc)}
PREFIX=${XENSOCK_BUILD_PREFIX:-build-test}
# shellcheck disable=SC2206 # word splitting intended
EXTRA_TEST_ARGS=(${XENSOCK_TEST_ARGS:-})

START=$(date +%s)
# What `time` prints after compiling and testing: wall and CPU seconds.
TIMEFORMAT='run-tests: took %0Rs (CPU: %0Us user, %0Ss sys)'

say() {
    printf '\n=== run-tests: %s (%ss)\n' "$*" "$(($(date +%s) - START))"
}

say "installing dependencies"
./scripts/install-deps.sh || { echo "run-tests: installing dependencies failed" >&2; exit 1; }

# configure BUILDDIR [meson options...]: set up, or reconfigure an existing
# build directory with the given options; wipe it if that fails.
configure() {
    local dir=$1
    shift
    if [ -f "$dir/meson-private/coredata.dat" ]; then
        meson setup --reconfigure "$dir" "$@" && return 0
        echo "run-tests: reconfiguring $dir failed; wiping it" >&2
        meson setup --wipe "$dir" "$@" && return 0
        rm -rf "$dir"
    elif [ -e "$dir" ]; then
        rm -rf "$dir"
    fi
    meson setup "$dir" "$@"
}

# suites BUILDDIR: the test suites of the build, one a line, without the
# "project:" prefix.
suites() {
    meson introspect --tests "$1" | python3 -c '
import json, sys
names = set()
for t in json.load(sys.stdin):
    for s in t.get("suite", []):
        names.add(s.split(":", 1)[-1])
print("\n".join(sorted(names)))'
}

# counts BUILDDIR: "passed failed skipped" from meson's testlog.json.
counts() {
    local log="$1/meson-logs/testlog.json"
    [ -f "$log" ] || { echo "0 0 0"; return; }
    python3 - "$log" <<'EOF'
import json, sys
passed = failed = skipped = 0
with open(sys.argv[1]) as f:
    for line in f:
        line = line.strip()
        if not line:
            continue
        result = json.loads(line).get("result", "")
        if result in ("OK", "EXPECTEDFAIL"):
            passed += 1
        elif result == "SKIP":
            skipped += 1
        else:
            failed += 1
print(passed, failed, skipped)
EOF
}

FAILED=0
BUILD_FAILED=0
TOTAL_PASSED=0 TOTAL_FAILED=0 TOTAL_SKIPPED=0

# run_build NAME BUILDDIR [meson setup options...]
run_build() {
    local name=$1 dir=$2
    shift 2
    say "$name: meson setup $dir $*"
    if ! configure "$dir" --werror "$@"; then
        echo "run-tests: $name: meson setup failed" >&2
        FAILED=1 BUILD_FAILED=1 TOTAL_FAILED=$((TOTAL_FAILED + 1))
        return
    fi
    say "$name: compiling (-j$JOBS)"
    local rc
    time meson compile -C "$dir" -j "$JOBS"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "run-tests: $name: compilation failed" >&2
        FAILED=1 BUILD_FAILED=1 TOTAL_FAILED=$((TOTAL_FAILED + 1))
        return
    fi
    local skip_args=()
    if [ "$name" = asan ]; then
        # Instrumented code runs a few times slower: stretch the timeouts.
        skip_args=(--timeout-multiplier 3)
        if suites "$dir" | grep -qx slow; then
            skip_args+=(--no-suite slow)
            echo "run-tests: $name: skipping suite 'slow' under the sanitizers"
        fi
    fi
    say "$name: meson test"
    rm -f "$dir/meson-logs/testlog.json"
    time meson test -C "$dir" --print-errorlogs "${skip_args[@]}" "${EXTRA_TEST_ARGS[@]}"
    rc=$?
    local p f s
    read -r p f s < <(counts "$dir")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1  # meson test failed without a failed test: count the run itself
    fi
    echo "run-tests: $name: $p passed, $f failed, $s skipped (meson test exit $rc)"
    [ "$rc" -eq 0 ] || FAILED=1
    TOTAL_PASSED=$((TOTAL_PASSED + p)) TOTAL_FAILED=$((TOTAL_FAILED + f)) TOTAL_SKIPPED=$((TOTAL_SKIPPED + s))
}

run_build plain "$PREFIX"
if [ "$BUILD_FAILED" -ne 0 ]; then
    echo "run-tests: the plain build failed: not building with the sanitizers" >&2
elif [ "${XENSOCK_TEST_ASAN:-1}" != 0 ]; then
    # Leaks are reported; UBSan stops at the first finding (see meson.build).
    export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    # -O1, as the sanitizers' authors recommend: a third less compile time
    # than the default -O2 (the costliest step of this script), same checks.
    run_build asan "$PREFIX-asan" -Dsanitizers=true -Doptimization=1
fi

say "done"
echo "tests: $TOTAL_PASSED passed, $TOTAL_FAILED failed, $TOTAL_SKIPPED skipped"
exit "$FAILED"
