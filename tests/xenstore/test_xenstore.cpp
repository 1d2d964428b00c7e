// xensock::platform::XenStore — the RAII wrapper over the real libxenstore —
// against the real xenstored of the sim platform. Each test case gets a
// fresh sim root on tmpfs and its own daemon.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "xensock/platform/sim_xenstored.hpp"
#include "xensock/platform/xenstore.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <poll.h>

namespace {

namespace sim = xensock::platform::sim;
using xensock::platform::Watch;
using xensock::platform::WatchEvent;
using xensock::platform::XenStore;
using xensock::platform::XsPermission;
using xensock::Status;

struct SimRoot {
    std::string dir;
    std::optional<sim::XenstoredProcess> xenstored;

    SimRoot() {
        char tmpl[] = "/dev/shm/xs-XXXXXX";
        if (!::mkdtemp(tmpl)) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
        dir = tmpl;
        try {
            xenstored.emplace(sim::XenstoredProcess::start(dir, sim::default_xenstored_paths()));
        } catch (...) {
            std::error_code ec;
            std::filesystem::remove_all(dir, ec);
            throw;
        }
    }
    ~SimRoot() {
        xenstored.reset();
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);
    }
    SimRoot(const SimRoot&) = delete;
    SimRoot& operator=(const SimRoot&) = delete;

    std::string socket() const { return xenstored->socket_path(); }
};

std::vector<std::string> sorted(std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
}

// Waits (at most timeout_ms) for fd() to turn readable, then takes one event.
std::optional<WatchEvent> next_watch(XenStore& xs, int timeout_ms = 2000) {
    if (auto ev = xs.read_watch()) return ev;
    pollfd pfd{xs.fd(), POLLIN, 0};
    REQUIRE(pfd.fd >= 0);
    int rc;
    do {
        rc = ::poll(&pfd, 1, timeout_ms);
    } while (rc < 0 && errno == EINTR);
    REQUIRE(rc >= 0);
    if (rc == 0) return std::nullopt;
    auto ev = xs.read_watch();
    REQUIRE_MESSAGE(ev, "fd() was readable but read_watch() returned nothing");
    return ev;
}

// "7:n" per entry: comparable and printable.
std::vector<std::string> text(const std::vector<XsPermission>& perms) {
    std::vector<std::string> out;
    for (const auto& p : perms) out.push_back(std::to_string(p.domid) + ":" + p.access);
    return out;
}

}  // namespace

TEST_CASE("read, write, mkdir, rm and directory") {
    SimRoot root;
    XenStore xs(root.socket());

    CHECK(xs.write("/a/b", "hello").ok());
    CHECK(xs.read("/a/b") == "hello");

    // Values are byte strings, not C strings.
    const std::string binary("x\0y\xff", 4);
    CHECK(xs.write("/a/bin", binary).ok());
    CHECK(xs.read("/a/bin") == binary);

    CHECK(xs.write("/a/empty", "").ok());
    CHECK(xs.read("/a/empty") == "");

    CHECK(xs.mkdir("/a/dir").ok());
    CHECK(xs.mkdir("/a/dir").ok());  // already there: fine
    CHECK(xs.read("/a/dir") == "");
    REQUIRE(xs.directory("/a"));
    CHECK(sorted(*xs.directory("/a")) == std::vector<std::string>{"b", "bin", "dir", "empty"});
    CHECK(xs.directory("/a/dir") == std::vector<std::string>{});

    errno = 0;
    CHECK_FALSE(xs.read("/a/missing"));
    CHECK(errno == ENOENT);
    CHECK_FALSE(xs.directory("/no/such/dir"));

    CHECK(xs.rm("/a/b").ok());
    CHECK_FALSE(xs.read("/a/b"));
    CHECK(sorted(*xs.directory("/a")) == std::vector<std::string>{"bin", "dir", "empty"});

    // rm removes a whole subtree.
    CHECK(xs.rm("/a").ok());
    CHECK_FALSE(xs.read("/a/bin"));
    CHECK_FALSE(xs.directory("/a"));

    // Bigger than a xenstore message can carry: refused before sending.
    CHECK(xs.write("/big", std::string(5000, 'x')).error() == E2BIG);
    // The connection is still fine afterwards.
    CHECK(xs.write("/after", "ok").ok());
    CHECK(xs.read("/after") == "ok");
}

TEST_CASE("permissions round-trip") {
    SimRoot root;
    XenStore xs(root.socket());

    REQUIRE(xs.mkdir("/local/domain/7/device/xensock/0").ok());
    const std::vector<XsPermission> perms{{7, 'n'}, {0, 'r'}, {3, 'w'}, {5, 'b'}};
    REQUIRE(xs.set_permissions("/local/domain/7/device/xensock/0", perms).ok());
    const auto got = xs.get_permissions("/local/domain/7/device/xensock/0");
    REQUIRE(got);
    CHECK(text(*got) == std::vector<std::string>{"7:n", "0:r", "3:w", "5:b"});

    // A node created below inherits its parent's permissions.
    REQUIRE(xs.write("/local/domain/7/device/xensock/0/state", "1").ok());
    const auto inherited = xs.get_permissions("/local/domain/7/device/xensock/0/state");
    REQUIRE(inherited);
    CHECK(text(*inherited) == text(*got));

    CHECK(xs.set_permissions("/local/domain/7/device/xensock/0", {}).error() == EINVAL);
    CHECK(xs.set_permissions("/local/domain/7/device/xensock/0", {{7, 'x'}}).error() == EINVAL);
    CHECK(xs.set_permissions("/no/such/node", {{0, 'n'}}).error() == ENOENT);
    CHECK_FALSE(xs.get_permissions("/no/such/node"));
}

TEST_CASE("watches fire on write and rm, through fd() and read_watch()") {
    SimRoot root;
    XenStore watcher(root.socket());
    XenStore writer(root.socket());
    CHECK(watcher.fd() == watcher.fd());  // stable

    REQUIRE(watcher.watch("/w", "tok").ok());
    // xenstored fires every new watch once, at registration.
    auto ev = next_watch(watcher);
    REQUIRE(ev);
    CHECK(ev->path == "/w");
    CHECK(ev->token == "tok");

    REQUIRE(writer.write("/w/x", "1").ok());
    ev = next_watch(watcher);
    REQUIRE(ev);
    CHECK(ev->path == "/w/x");
    CHECK(ev->token == "tok");

    REQUIRE(writer.rm("/w/x").ok());
    ev = next_watch(watcher);
    REQUIRE(ev);
    CHECK(ev->path == "/w/x");
    CHECK(ev->token == "tok");

    // Two changes queue two events; fd() stays readable until both are read.
    REQUIRE(writer.write("/w/y", "1").ok());
    REQUIRE(writer.write("/w/z", "1").ok());
    std::vector<std::string> paths;
    while (paths.size() < 2) {
        ev = next_watch(watcher);
        REQUIRE(ev);
        paths.push_back(ev->path);
    }
    CHECK(sorted(paths) == std::vector<std::string>{"/w/y", "/w/z"});
    CHECK_FALSE(next_watch(watcher, 100));

    REQUIRE(watcher.unwatch("/w", "tok").ok());
    REQUIRE(writer.write("/w/after", "1").ok());
    CHECK_FALSE(next_watch(watcher, 200));
    CHECK(watcher.unwatch("/w", "tok").error() == ENOENT);
}

static_assert(!std::is_copy_constructible_v<Watch> && !std::is_copy_assignable_v<Watch>);
static_assert(std::is_nothrow_move_constructible_v<Watch> && std::is_nothrow_move_assignable_v<Watch>);

// Drains what is queued (the initial fire, earlier changes) within a bound.
void drain_watches(XenStore& xs) {
    while (next_watch(xs, 100)) {
    }
}

TEST_CASE("Watch registers in its constructor and removes the watch however its scope ends") {
    SimRoot root;
    XenStore watcher(root.socket());
    XenStore writer(root.socket());
    {
        Watch w(watcher, "/rw", "raii");
        REQUIRE(w.active());
        CHECK(w.status().ok());
        CHECK(w.path() == "/rw");
        CHECK(w.token() == "raii");
        auto ev = next_watch(watcher);  // the initial fire
        REQUIRE(ev);
        CHECK(ev->token == "raii");
        REQUIRE(writer.write("/rw/a", "1").ok());
        ev = next_watch(watcher);
        REQUIRE(ev);
        CHECK(ev->path == "/rw/a");
    }
    // Gone: no more events, and xenstored no longer knows it.
    REQUIRE(writer.write("/rw/b", "1").ok());
    CHECK_FALSE(next_watch(watcher, 200));
    CHECK(watcher.unwatch("/rw", "raii").error() == ENOENT);

    // An exception leaving the scope removes it too.
    try {
        Watch w(watcher, "/rw", "thrown");
        REQUIRE(w.active());
        throw std::runtime_error("unwinding");
    } catch (const std::runtime_error&) {
    }
    CHECK(watcher.unwatch("/rw", "thrown").error() == ENOENT);

    // reset() removes it at once, and only once.
    Watch early(watcher, "/rw", "early");
    REQUIRE(early.active());
    early.reset();
    CHECK_FALSE(early.active());
    CHECK(watcher.unwatch("/rw", "early").error() == ENOENT);
    early.reset();
}

TEST_CASE("a moved Watch has one owner: the moved-from one removes nothing") {
    SimRoot root;
    XenStore watcher(root.socket());
    XenStore writer(root.socket());
    std::vector<Watch> watches;
    {
        Watch w(watcher, "/mv", "moved");
        REQUIRE(w.active());
        watches.push_back(std::move(w));
        CHECK_FALSE(w.active());  // NOLINT(bugprone-use-after-move): that is the point
    }
    drain_watches(watcher);
    REQUIRE(writer.write("/mv/a", "1").ok());
    auto ev = next_watch(watcher);  // still registered
    REQUIRE(ev);
    CHECK(ev->token == "moved");

    Watch other(watcher, "/mv", "other");
    REQUIRE(other.active());
    watches.front() = std::move(other);  // removes "moved", takes "other"
    CHECK(watcher.unwatch("/mv", "moved").error() == ENOENT);
    CHECK(watches.front().token() == "other");
    watches.clear();
    CHECK(watcher.unwatch("/mv", "other").error() == ENOENT);
}

TEST_CASE("a Watch whose registration failed holds nothing") {
    SimRoot root;
    XenStore xs(root.socket());
    Watch bad(xs, "/bad//path", "bad");
    CHECK_FALSE(bad.active());
    CHECK(bad.status().error() == EINVAL);
    Watch none;
    CHECK_FALSE(none.active());
    CHECK(none.status().ok());
}

TEST_CASE("read_watch() returns nothing at once when no event is queued") {
    SimRoot root;
    XenStore xs(root.socket());

    const auto start = std::chrono::steady_clock::now();
    errno = 0;
    CHECK_FALSE(xs.read_watch());  // no watch registered at all
    CHECK(errno == EAGAIN);

    REQUIRE(xs.watch("/quiet", "q").ok());
    REQUIRE(next_watch(xs));  // the registration event
    CHECK_FALSE(xs.read_watch());
    CHECK_FALSE(xs.read_watch());
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(1));

    pollfd pfd{xs.fd(), POLLIN, 0};
    CHECK(::poll(&pfd, 1, 0) == 0);  // and fd() is not readable
}

TEST_CASE("transaction() commits, aborts, and is isolated while it runs") {
    SimRoot root;
    XenStore xs(root.socket());
    XenStore other(root.socket());

    SUBCASE("commit") {
        int runs = 0;
        const auto st = xs.transaction([&](XenStore& t) {
            ++runs;
            REQUIRE(t.write("/t/a", "1").ok());
            REQUIRE(t.write("/t/b", "2").ok());
            CHECK(t.read("/t/a") == "1");       // we see our own writes
            CHECK_FALSE(other.read("/t/a"));    // nobody else does yet
            return true;
        });
        CHECK(st.ok());
        CHECK(runs == 1);
        CHECK(other.read("/t/a") == "1");
        CHECK(other.read("/t/b") == "2");
    }
    SUBCASE("abort") {
        const auto st = xs.transaction([&](XenStore& t) {
            REQUIRE(t.write("/t/c", "1").ok());
            return false;
        });
        CHECK(st.error() == ECANCELED);
        CHECK_FALSE(other.read("/t/c"));
        CHECK_FALSE(xs.read("/t/c"));  // and xs is outside a transaction again
        CHECK(xs.write("/t/d", "1").ok());
        CHECK(other.read("/t/d") == "1");
    }
    SUBCASE("an exception from the body aborts and propagates") {
        const auto body = [&](XenStore& t) -> bool {
            REQUIRE(t.write("/t/e", "1").ok());
            throw std::logic_error("boom");
        };
        CHECK_THROWS_AS(static_cast<void>(xs.transaction(body)), std::logic_error);
        CHECK_FALSE(other.read("/t/e"));
        CHECK(xs.write("/t/f", "1").ok());
        CHECK(other.read("/t/f") == "1");
    }
    SUBCASE("no nesting") {
        Status inner;
        const auto st = xs.transaction([&](XenStore& t) {
            inner = t.transaction([](XenStore&) { return true; });
            return true;
        });
        CHECK(st.ok());
        CHECK(inner.error() == EBUSY);
    }
}

TEST_CASE("transaction() retries the body when the commit conflicts") {
    SimRoot root;
    XenStore xs(root.socket());
    XenStore other(root.socket());
    REQUIRE(xs.write("/c/n", "0").ok());

    SUBCASE("a conflict is retried and the retry succeeds") {
        int runs = 0;
        const auto st = xs.transaction([&](XenStore& t) {
            ++runs;
            const auto n = t.read("/c/n");
            REQUIRE(n);
            if (runs == 1) REQUIRE(other.write("/c/n", "41").ok());  // someone else changes it meanwhile
            return t.write("/c/n", std::to_string(std::stoi(*n) + 1)).ok();
        });
        CHECK(st.ok());
        CHECK(runs == 2);
        // The retry read the other writer's value: no lost update.
        CHECK(other.read("/c/n") == "42");
    }
    SUBCASE("every attempt conflicting gives EAGAIN") {
        int runs = 0;
        const auto st = xs.transaction(
            [&](XenStore& t) {
                ++runs;
                REQUIRE(t.read("/c/n"));
                REQUIRE(other.write("/c/n", std::to_string(100 + runs)).ok());
                return t.write("/c/n", "mine").ok();
            },
            3);
        CHECK(st.error() == EAGAIN);
        CHECK(runs == 3);
        CHECK(other.read("/c/n") == "103");
    }
}

TEST_CASE("self_domid() reads \"domid\" relative to our domain's home") {
    SimRoot root;
    XenStore xs(root.socket());
    // Every sim client is dom0 to xenstored: home is /local/domain/0.
    CHECK(xs.self_domid() == 0);  // unset
    REQUIRE(xs.write("/local/domain/0/domid", "0").ok());
    CHECK(xs.self_domid() == 0);
    REQUIRE(xs.write("/local/domain/0/domid", "12").ok());
    CHECK(xs.self_domid() == 12);
    REQUIRE(xs.write("/local/domain/0/domid", "12x").ok());
    CHECK_THROWS_WITH_AS(xs.self_domid(), doctest::Contains("12x"), std::runtime_error);
}

TEST_CASE("opening names the socket and what to do when xenstored is not there") {
    char tmpl[] = "/dev/shm/xs-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    const std::string sock = std::string(tmpl) + "/xenstored.sock";
    try {
        XenStore xs(sock);
        FAIL("opened a xenstore that does not exist");
    } catch (const std::system_error& e) {
        const std::string what = e.what();
        CHECK(what.find(sock) != std::string::npos);
        CHECK(what.find("is the sim running?") != std::string::npos);
        CHECK(e.code().value() == ENOENT);
    }
    std::filesystem::remove_all(tmpl);
}
