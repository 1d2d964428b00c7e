// The sim platform's xenstore: Debian's real xenstored under the sim shim,
// reached through the real libxenstore exactly as every sim program does
// (XENSTORED_PATH=DIR/xenstored.sock). Each test case gets a fresh sim root
// and daemon.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "xensock/platform/sim_xenstored.hpp"

// Xen 4.17's xenstore.h has no extern "C" of its own.
extern "C" {
#include <xenstore.h>
}

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <poll.h>
#include <sys/stat.h>

namespace {

namespace sim = xensock::platform::sim;

struct XsClose {
    void operator()(xs_handle* h) const noexcept { xs_close(h); }
};
using Xs = std::unique_ptr<xs_handle, XsClose>;

struct Free {
    void operator()(void* p) const noexcept { std::free(p); }
};

// A fresh sim root on tmpfs with its own xenstored; removed afterwards.
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
            // No destructor runs for a half-built object: drop the root here.
            std::error_code ec;
            std::filesystem::remove_all(dir, ec);
            throw;
        }
        ::setenv("XENSTORED_PATH", xenstored->socket_path().c_str(), 1);
    }
    ~SimRoot() {
        xenstored.reset();
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);
    }
    SimRoot(const SimRoot&) = delete;
    SimRoot& operator=(const SimRoot&) = delete;

    Xs open() const {
        Xs h(xs_open(0));
        REQUIRE_MESSAGE(h, "xs_open failed: " << std::strerror(errno));
        return h;
    }
};

std::optional<std::string> read(xs_handle* h, const std::string& path, xs_transaction_t t = XBT_NULL) {
    unsigned len = 0;
    std::unique_ptr<char, Free> v(static_cast<char*>(xs_read(h, t, path.c_str(), &len)));
    if (!v) return std::nullopt;
    return std::string(v.get(), len);
}

bool write(xs_handle* h, const std::string& path, const std::string& value, xs_transaction_t t = XBT_NULL) {
    return xs_write(h, t, path.c_str(), value.data(), static_cast<unsigned>(value.size()));
}

std::vector<std::string> directory(xs_handle* h, const std::string& path) {
    unsigned n = 0;
    std::unique_ptr<char*, Free> d(xs_directory(h, XBT_NULL, path.c_str(), &n));
    REQUIRE_MESSAGE(d, "xs_directory " << path << ": " << std::strerror(errno));
    std::vector<std::string> out(d.get(), d.get() + n);
    std::sort(out.begin(), out.end());
    return out;
}

struct WatchEvent {
    std::string path;
    std::string token;
};

// The next watch event, waiting at most `timeout_ms` on xs_fileno().
std::optional<WatchEvent> next_watch(xs_handle* h, int timeout_ms = 2000) {
    pollfd pfd{xs_fileno(h), POLLIN, 0};
    REQUIRE(pfd.fd >= 0);
    int rc;
    do {
        rc = ::poll(&pfd, 1, timeout_ms);
    } while (rc < 0 && errno == EINTR);
    REQUIRE(rc >= 0);
    if (rc == 0) return std::nullopt;
    unsigned n = 0;
    std::unique_ptr<char*, Free> ev(xs_read_watch(h, &n));
    REQUIRE(ev);
    REQUIRE(n >= 2);
    return WatchEvent{ev.get()[XS_WATCH_PATH], ev.get()[XS_WATCH_TOKEN]};
}

}  // namespace

TEST_CASE("write, read, mkdir, rm and directory") {
    SimRoot root;
    Xs h = root.open();

    CHECK(write(h.get(), "/a/b", "hello"));
    CHECK(read(h.get(), "/a/b") == "hello");
    CHECK(write(h.get(), "/a/empty", ""));
    CHECK(read(h.get(), "/a/empty") == "");
    CHECK(xs_mkdir(h.get(), XBT_NULL, "/a/c"));
    CHECK(read(h.get(), "/a/c") == "");
    CHECK(directory(h.get(), "/a") == std::vector<std::string>{"b", "c", "empty"});

    CHECK(xs_rm(h.get(), XBT_NULL, "/a/b"));
    errno = 0;
    CHECK_FALSE(read(h.get(), "/a/b"));
    CHECK(errno == ENOENT);
    CHECK(directory(h.get(), "/a") == std::vector<std::string>{"c", "empty"});

    // rm is recursive, like Xen's.
    CHECK(xs_rm(h.get(), XBT_NULL, "/a"));
    const auto top = directory(h.get(), "/");
    CHECK(std::find(top.begin(), top.end(), "a") == top.end());
    CHECK(std::find(top.begin(), top.end(), "tool") != top.end());  // made by xenstored itself
}

TEST_CASE("set_permissions and get_permissions, naming guest domains") {
    SimRoot root;
    Xs h = root.open();

    // What attach does (spec, Lifetime): frontend dir owned by the guest,
    // readable by the backend; backend dir owned by dom0, readable by the guest.
    const std::string fe = "/local/domain/7/device/xensock/0";
    const std::string be = "/local/domain/0/backend/xensock/7/0";
    REQUIRE(xs_mkdir(h.get(), XBT_NULL, fe.c_str()));
    REQUIRE(xs_mkdir(h.get(), XBT_NULL, be.c_str()));
    xs_permissions fe_perms[] = {{7, XS_PERM_NONE}, {0, XS_PERM_READ}};
    xs_permissions be_perms[] = {{0, XS_PERM_NONE}, {7, XS_PERM_READ}};
    REQUIRE_MESSAGE(xs_set_permissions(h.get(), XBT_NULL, fe.c_str(), fe_perms, 2), std::strerror(errno));
    REQUIRE_MESSAGE(xs_set_permissions(h.get(), XBT_NULL, be.c_str(), be_perms, 2), std::strerror(errno));

    auto get = [&](const std::string& path) {
        unsigned n = 0;
        std::unique_ptr<xs_permissions, Free> p(xs_get_permissions(h.get(), XBT_NULL, path.c_str(), &n));
        REQUIRE(p);
        std::vector<std::pair<unsigned, int>> out;
        for (unsigned i = 0; i < n; ++i) out.emplace_back(p.get()[i].id, p.get()[i].perms);
        return out;
    };
    CHECK(get(fe) == std::vector<std::pair<unsigned, int>>{{7, XS_PERM_NONE}, {0, XS_PERM_READ}});
    CHECK(get(be) == std::vector<std::pair<unsigned, int>>{{0, XS_PERM_NONE}, {7, XS_PERM_READ}});

    // A node created below inherits its parent's permissions.
    REQUIRE(write(h.get(), fe + "/state", "1"));
    CHECK(get(fe + "/state") == get(fe));
}

TEST_CASE("a watch fires on write and on remove") {
    SimRoot root;
    Xs watcher = root.open();
    Xs writer = root.open();

    REQUIRE(xs_watch(watcher.get(), "/w", "tok"));
    // Xen fires every new watch once at registration.
    auto ev = next_watch(watcher.get());
    REQUIRE(ev);
    CHECK(ev->path == "/w");
    CHECK(ev->token == "tok");

    REQUIRE(write(writer.get(), "/w/x", "1"));
    ev = next_watch(watcher.get());
    REQUIRE(ev);
    CHECK(ev->path == "/w/x");
    CHECK(ev->token == "tok");

    REQUIRE(xs_rm(writer.get(), XBT_NULL, "/w/x"));
    ev = next_watch(watcher.get());
    REQUIRE(ev);
    CHECK(ev->path == "/w/x");

    // Nothing else is pending, and after unwatch nothing more comes.
    CHECK_FALSE(next_watch(watcher.get(), 100));
    REQUIRE(xs_unwatch(watcher.get(), "/w", "tok"));
    REQUIRE(write(writer.get(), "/w/y", "2"));
    CHECK_FALSE(next_watch(watcher.get(), 200));
}

TEST_CASE("transactions commit, abort, and conflict with EAGAIN") {
    SimRoot root;
    Xs h1 = root.open();
    Xs h2 = root.open();

    SUBCASE("commit") {
        xs_transaction_t t = xs_transaction_start(h1.get());
        REQUIRE(t != XBT_NULL);
        REQUIRE(write(h1.get(), "/t/a", "1", t));
        CHECK(read(h1.get(), "/t/a", t) == "1");
        CHECK_FALSE(read(h2.get(), "/t/a"));  // not visible before commit
        REQUIRE(xs_transaction_end(h1.get(), t, false));
        CHECK(read(h2.get(), "/t/a") == "1");
    }
    SUBCASE("abort") {
        xs_transaction_t t = xs_transaction_start(h1.get());
        REQUIRE(t != XBT_NULL);
        REQUIRE(write(h1.get(), "/t/b", "1", t));
        REQUIRE(xs_transaction_end(h1.get(), t, true));
        CHECK_FALSE(read(h2.get(), "/t/b"));
    }
    SUBCASE("conflict") {
        REQUIRE(write(h1.get(), "/t/c", "0"));
        xs_transaction_t t = xs_transaction_start(h1.get());
        REQUIRE(t != XBT_NULL);
        CHECK(read(h1.get(), "/t/c", t) == "0");
        REQUIRE(write(h1.get(), "/t/c", "from-t", t));
        REQUIRE(write(h2.get(), "/t/c", "outside"));  // changes what t read
        errno = 0;
        CHECK_FALSE(xs_transaction_end(h1.get(), t, false));
        CHECK(errno == EAGAIN);
        CHECK(read(h2.get(), "/t/c") == "outside");
    }
}

TEST_CASE("XenstoredProcess: stop reaps the daemon and cleans up; one daemon per root") {
    SimRoot root;
    const pid_t pid = root.xenstored->pid();
    REQUIRE(pid > 0);

    struct stat st {};
    CHECK(::stat(root.xenstored->pid_path().c_str(), &st) == 0);
    CHECK_THROWS_WITH_AS(sim::XenstoredProcess::start(root.dir, sim::default_xenstored_paths()),
                         doctest::Contains("already serves"), std::runtime_error);

    root.xenstored->stop();
    CHECK(::kill(pid, 0) == -1);  // reaped, not a zombie
    CHECK(errno == ESRCH);
    CHECK(::stat((root.dir + "/xenstored.sock").c_str(), &st) == -1);
    CHECK(::stat((root.dir + "/xenstored.pid").c_str(), &st) == -1);
    root.xenstored->stop();  // idempotent
}

TEST_CASE("XenstoredProcess: failures name what failed") {
    char tmpl[] = "/dev/shm/xs-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    const std::string dir = tmpl;

    auto paths = sim::default_xenstored_paths();
    auto bad = paths;
    bad.xenstored = dir + "/no-such-xenstored";
    CHECK_THROWS_WITH_AS(sim::XenstoredProcess::start(dir, bad), doctest::Contains("no-such-xenstored"),
                         std::runtime_error);

    // A sim root that does not exist.
    CHECK_THROWS_WITH_AS(sim::XenstoredProcess::start(dir + "/missing", paths),
                         doctest::Contains("missing"), std::runtime_error);

    // Without the shim (ld.so ignores an unloadable preload) the daemon finds
    // no hypervisor and exits; the error says so and quotes its log.
    auto no_shim = paths;
    no_shim.shim = "/dev/null";
    CHECK_THROWS_WITH_AS(sim::XenstoredProcess::start(dir, no_shim), doctest::Contains("before becoming ready"),
                         std::runtime_error);

    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
}
