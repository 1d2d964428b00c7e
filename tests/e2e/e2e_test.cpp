// End to end on sim: xensockd serving guests that are separate processes,
// against real host sockets on 127.0.0.1. Each test builds its own sim
// installation (SimEnv); guest bodies run in forked processes and report
// through their exit codes.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "guest_util.hpp"

#include "xensock/toolstack/toolstack.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

using namespace xensock;
using namespace xensock::testing;
using frontend::RingOptions;

namespace {

constexpr uint32_t kMaxOrder = 6;

// xensockd's options for one test: the harness's defaults plus these.
SimEnvOptions daemon_options(std::vector<std::string> extra_args, unsigned max_ring_order = kMaxOrder) {
    SimEnvOptions options;
    options.max_ring_order = max_ring_order;
    options.extra_args = std::move(extra_args);
    return options;
}

// A port nobody listens on (bound, then closed).
// Counts the watch events on one node (what a frontend watching it would
// see), on a xenstore connection of its own.
class WatchCounter {
public:
    WatchCounter(const std::string& root, const std::string& path) : xs_(root + "/xenstored.sock") {
        if (!xs_.watch(path, "count").ok()) throw std::runtime_error("cannot watch " + path);
        // Registering fires the watch once: wait for that event and drop it.
        pollfd pfd{xs_.fd(), POLLIN, 0};
        (void)::poll(&pfd, 1, 2000);
        (void)xs_.read_watch();
    }
    // Events queued so far plus those arriving within `window`.
    size_t count_for(std::chrono::milliseconds window) {
        const auto end = std::chrono::steady_clock::now() + window;
        size_t n = 0;
        while (true) {
            while (xs_.read_watch()) ++n;
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
            if (left.count() <= 0) return n;
            pollfd pfd{xs_.fd(), POLLIN, 0};
            (void)::poll(&pfd, 1, static_cast<int>(left.count()) + 1);
        }
    }

private:
    platform::XenStore xs_;
};

// Writes a frontend's transport nodes and state in one transaction, as dom0
// playing a (hostile) frontend.
bool publish_frontend(platform::XenStore& xs, const wire::ProtocolProfile& profile, const std::string& fe,
                      wire::FrontendParams params, int state) {
    const auto nodes = profile.frontend_nodes(params);
    return xs.transaction([&](platform::XenStore& t) {
                 for (const auto& [node, value] : nodes)
                     if (!t.write(fe + "/" + node, value).ok()) return false;
                 return t.write(fe + "/state", std::to_string(state)).ok();
             })
        .ok();
}

wire::Request raw(wire::Command cmd, uint64_t sockid) {
    wire::Request r;
    r.cmd = cmd;
    r.raw_cmd = static_cast<uint32_t>(cmd);
    r.sockid = sockid;
    return r;
}

// Sends `total` pattern bytes (64 KiB application writes).
rt::Task<void> send_pattern(Guest& g, uint64_t id, size_t total, uint64_t seed, int& rc, rt::Event& done) {
    std::vector<std::byte> chunk(64 * 1024);
    for (size_t off = 0; off < total; off += chunk.size()) {
        const size_t n = std::min(chunk.size(), total - off);
        fill_pattern(chunk.data(), n, off, seed);
        const ssize_t s = co_await g.send_all(id, std::span(chunk.data(), n), 30s);
        if (s != static_cast<ssize_t>(n)) {
            std::fprintf(stderr, "send_pattern: send_all returned %zd at offset %zu\n", s, off);
            rc = 1;
            break;
        }
    }
    done.set();
}

// Receives `total` bytes and checks them against the pattern.
rt::Task<int> recv_pattern(Guest& g, uint64_t id, size_t total, uint64_t seed) {
    std::vector<std::byte> got(64 * 1024), want(64 * 1024);
    size_t off = 0;
    while (off < total) {
        const size_t n = std::min(got.size(), total - off);
        const ssize_t k = co_await g.recv(id, std::span(got.data(), n), 30s);
        if (k <= 0) {
            std::fprintf(stderr, "recv_pattern: recv returned %zd at offset %zu of %zu\n", k, off, total);
            co_return 1;
        }
        fill_pattern(want.data(), static_cast<size_t>(k), off, seed);
        if (std::memcmp(got.data(), want.data(), static_cast<size_t>(k)) != 0) {
            std::fprintf(stderr, "recv_pattern: data mismatch near offset %zu\n", off);
            co_return 1;
        }
        off += static_cast<size_t>(k);
    }
    co_return 0;
}

// Through an echo server: both directions at once, every byte checked.
rt::Task<int> echo_stream(Guest& g, rt::Reactor& r, uint64_t id, size_t total, uint64_t seed) {
    int send_rc = 0;
    rt::Event sent(r);
    r.spawn(send_pattern(g, id, total, seed, send_rc, sent));
    const int recv_rc = co_await recv_pattern(g, id, total, seed);
    co_await sent.wait();
    co_return (recv_rc == 0 && send_rc == 0) ? 0 : 1;
}

}  // namespace

// ------------------------------------------------------------- handshake

TEST_CASE("handshake: backend publishes its nodes, connects, and closes with the frontend") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        env.attach(3, *profile);
        const auto be = env.backend_path(3, *profile);
        REQUIRE(env.wait_for(be + "/state", "2"));
        if (profile->name() == "xensock") {
            CHECK(env.read(be + "/max-dataring-page-order") == "6");
        } else {
            CHECK(env.read(be + "/versions") == "1");
            CHECK(env.read(be + "/max-page-order") == "6");
            CHECK(env.read(be + "/function-calls") == "1");
        }
        const pid_t guest = spawn_guest(env, 3, *profile, [](Guest& g, rt::Reactor&) -> rt::Task<int> {
            GCHECK(g.connected());
            GCHECK_EQ(g.backend_state(), 4);
            GCHECK_EQ(g.max_ring_order(), 6u);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest) == 0);
        // The guest closed: the backend followed to Closed and holds nothing.
        CHECK(env.wait_for(be + "/state", "6"));
        CHECK(eventually([&] { return env.daemon_ring_mappings() == 0; }));
        CHECK(env.detach(3, *profile).ok());
        CHECK(env.read(be + "/state").empty());
    }
}

TEST_CASE("handshake: a frontend that resets gets a fresh connection; a vanished frontend is torn down") {
    for (const auto* profile_ptr : wire::all_profiles()) {
        const auto& profile = *profile_ptr;
        CAPTURE(profile.name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const pid_t echo = spawn_echo_server(env, lfd, 2);
        env.attach(4, profile);
        const size_t baseline_fds = env.daemon_fd_count();

        // First incarnation: connects, uses a socket, then dies without
        // closing (as a crashed guest kernel would).
        const pid_t first = env.spawn([root = env.root(), port, profile_ptr]() -> int {
            auto platform = platform::open_sim_platform(root, 4);
            rt::Reactor reactor;
            frontend::GuestOptions options;
            options.profile = profile_ptr;
            auto body = [](rt::Reactor& r, platform::Platform& p, frontend::GuestOptions o,
                           uint16_t port) -> rt::Task<int> {
                auto g = co_await Guest::attach(r, p, o);
                uint64_t id = 0;
                GCHECK_EQ(co_await g->socket(id), 0);
                GCHECK_EQ(co_await g->connect(id, loopback(port)), 0);
                GCHECK_EQ(co_await echo_stream(*g, r, id, 1 << 20, 1), 0);
                std::fflush(nullptr);
                _exit(0);  // no close(), no release: a crash
            };
            return reactor.run_until(body(reactor, *platform, options, port));
        });
        REQUIRE(SimEnv::wait_child(first) == 0);

        // Second incarnation of the same domain: resets to Initialising, and
        // the backend drops the dead connection and serves the new one.
        const pid_t second = spawn_guest(env, 4, profile, [port](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            GCHECK_EQ(co_await echo_stream(g, r, id, 1 << 20, 2), 0);
            GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(second) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
        ::close(lfd);

        // The frontend directory vanishes (domain destroyed): backend goes Closed.
        const auto be = env.backend_path(4, profile);
        const pid_t third = spawn_guest(env, 4, profile, [](Guest& g, rt::Reactor&) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            std::fflush(nullptr);
            _exit(0);
        });
        REQUIRE(SimEnv::wait_child(third) == 0);
        REQUIRE(env.wait_for(be + "/state", "4"));
        CHECK(env.xs().rm(env.frontend_path(4, profile)).ok());
        CHECK(env.wait_for(be + "/state", "6"));
        CHECK(env.xs().rm(be).ok());
        CHECK(eventually([&] { return env.daemon_fd_count() <= baseline_fds && env.daemon_ring_mappings() == 0; }));
        CHECK(env.daemon_alive());
    }
}

TEST_CASE("handshake: toolstack detach of a connected guest completes (backend reaches Closed)") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        env.attach(5, *profile);
        const pid_t guest = spawn_guest(env, 5, *profile, [](Guest& g, rt::Reactor&) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            std::fflush(nullptr);
            _exit(0);  // stays "connected" in xenstore
        });
        REQUIRE(SimEnv::wait_child(guest) == 0);
        const auto be = env.backend_path(5, *profile);
        REQUIRE(env.wait_for(be + "/state", "4"));
        std::string why;
        auto st = toolstack::detach(env.xs(), *profile, 5, 0, 5s, &why);
        CHECK_MESSAGE(st.ok(), why);
        CHECK(env.read(be + "/state").empty());
        CHECK(eventually([&] { return env.daemon_ring_mappings() == 0; }));
    }
}

TEST_CASE("daemon stop: attached guests see the backend Closed, connected ones their rings reset") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const pid_t echo = spawn_echo_server(env, lfd, 1);
        env.attach(6, *profile);   // stays attached, never connects
        env.attach(26, *profile);  // connected, with a socket
        const auto be = env.backend_path(6, *profile);
        REQUIRE(env.wait_for(be + "/state", "2"));
        const std::string root = env.root();
        const pid_t guest = spawn_guest(env, 26, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            GCHECK_EQ(co_await echo_stream(g, r, id, 4096, 26), 0);
            mark(root, "up");
            for (int i = 0; i < 2000 && g.connected(); ++i) co_await r.sleep_for(10ms);
            GCHECK(!g.connected());
            GCHECK_EQ(g.data_intf(id)->in_error(), -ECONNRESET);
            GCHECK_EQ(g.data_intf(id)->out_error(), -ECONNRESET);
            std::array<std::byte, 4> buf{};
            GCHECK(co_await g.recv(id, buf, 1s) < 0);
            co_return 0;
        });
        REQUIRE(eventually([&] { return marked(root, "up"); }, 20s));
        CHECK(env.stop_daemon() == 0);
        CHECK(env.read(be + "/state") == "6");
        CHECK(env.read(env.backend_path(26, *profile) + "/state") == "6");
        CHECK(SimEnv::wait_child(guest) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
        ::close(lfd);
    }
}

TEST_CASE("handshake: a bad ring-ref at Initialised leaves the backend Closing without looping; a reset frontend with a good ring connects") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        env.attach(20, *profile);
        const auto be = env.backend_path(20, *profile);
        const auto fe = env.frontend_path(20, *profile);
        REQUIRE(env.wait_for(be + "/state", "2"));
        WatchCounter state_changes(env.root(), be + "/state");
        // A frontend publishes a ring-ref it never granted, and a port it
        // never allocated.
        REQUIRE(publish_frontend(env.xs(), *profile, fe, {30000, 4000}, 3));
        REQUIRE(env.wait_for(be + "/state", "5"));
        CHECK(env.read(be + "/error").find("cannot map command ring") != std::string::npos);
        // Closing, and it stays there: our own Closing write must not send
        // the backend round InitWait -> map -> Closing again.
        const size_t changes = state_changes.count_for(1s);
        CHECK(changes >= 1);  // the Closing itself
        CHECK(changes <= 2);
        CHECK(env.read(be + "/state") == "5");
        // The frontend resets through Initialising with a good ring: served.
        const pid_t guest = spawn_guest(env, 20, *profile, [](Guest& g, rt::Reactor&) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK(!g.xenstore().read(g.backend_path() + "/error"));  // cleared by the success
            GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest) == 0);
        CHECK(env.wait_for(be + "/state", "6"));
    }
}

TEST_CASE("handshake: a backend directory removed at awkward moments stays removed; the domain attaches again") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        const auto be = env.backend_path(21, *profile);
        const auto fe = env.frontend_path(21, *profile);
        auto exists = [&](const std::string& path) { return env.xs().read(path).has_value(); };

        // 1. Removed right after it appeared, while the session may be
        //    starting: the session must not publish its nodes into a
        //    directory that is gone.
        for (int round = 0; round < 20; ++round) {
            CAPTURE(round);
            REQUIRE_NOTHROW(env.attach(21, *profile));
            REQUIRE(env.xs().rm(be).ok());
            REQUIRE(env.xs().rm(fe).ok());
        }
        CHECK(eventually([&] { return env.session_count(21) == 0; }));
        std::this_thread::sleep_for(200ms);
        CHECK(!exists(be));
        CHECK(env.session_count(21) == 0);

        // 2. Removed while the session disconnects (a kill with many
        //    sockets to tear down): its Closing must not recreate it.
        constexpr int kSockets = 200;
        uint16_t port = 0;
        const int lfd = host_listen(port, 4096);
        const pid_t host = env.spawn([lfd]() -> int {
            std::vector<int> conns;
            for (int i = 0; i < kSockets; ++i) {
                const int c = ::accept(lfd, nullptr, nullptr);
                if (c < 0) return 2;
                conns.push_back(c);
            }
            char b;
            for (int c : conns) (void)::recv(c, &b, 1, 0);  // until the daemon closes them
            for (int c : conns) ::close(c);
            return 0;
        });
        REQUIRE_NOTHROW(env.attach(21, *profile));
        const std::string root = env.root();
        const pid_t guest = spawn_guest(env, 21, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            RingOptions smallest;
            smallest.order = g.profile().min_ring_order();
            for (int i = 0; i < kSockets; ++i) {
                uint64_t id = 0;
                GCHECK_EQ(co_await g.socket(id), 0);
                GCHECK_EQ(co_await g.connect(id, loopback(port), smallest), 0);
            }
            mark(root, "connected");
            for (int i = 0; i < 3000 && g.connected(); ++i) co_await r.sleep_for(10ms);
            std::fflush(nullptr);
            _exit(g.connected() ? 1 : 0);  // no close(): its directory is gone
        });
        REQUIRE(eventually([&] { return marked(root, "connected"); }, 60s));
        REQUIRE(env.control({{"op", "kill"}, {"domid", 21}})["ok"] == true);
        REQUIRE(env.xs().rm(be).ok());
        REQUIRE(env.xs().rm(fe).ok());
        CHECK(SimEnv::wait_child(guest) == 0);
        CHECK(eventually([&] { return env.session_count(21) == 0; }));
        std::this_thread::sleep_for(200ms);
        CHECK(!exists(be));
        CHECK(env.session_count(21) == 0);
        CHECK(SimEnv::wait_child(host) == 0);
        ::close(lfd);

        // The same domain attaches again and is served.
        REQUIRE_NOTHROW(env.attach(21, *profile));
        REQUIRE(env.wait_for(be + "/state", "2"));
        const pid_t again = spawn_guest(env, 21, *profile, [](Guest& g, rt::Reactor&) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(again) == 0);
        CHECK(env.detach(21, *profile).ok());
        CHECK(eventually([&] { return env.daemon_ring_mappings() == 0; }));
    }
}

TEST_CASE("handshake: a frontend that reset while the backend looked away (coalesced events) is reconnected") {
    for (const auto* profile : wire::all_profiles()) {
        // Seen at Initialised again, or straight at Connected with a new ring.
        for (const int state : {3, 4}) {
            CAPTURE(profile->name());
            CAPTURE(state);
            SimEnv env;
            env.attach(24, *profile);
            const auto be = env.backend_path(24, *profile);
            // First incarnation: connected, then gone without a word.
            const pid_t first = spawn_guest(env, 24, *profile, [](Guest& g, rt::Reactor&) -> rt::Task<int> {
                uint64_t id = 0;
                GCHECK_EQ(co_await g.socket(id), 0);
                std::fflush(nullptr);
                _exit(0);
            });
            REQUIRE(SimEnv::wait_child(first) == 0);
            REQUIRE(env.wait_for(be + "/state", "4"));
            // Second: publishes a new ring (other ref and port numbers than
            // the first's) and `state` in one step, never passing through
            // Initialising, and expects its ring to be served.
            const pid_t second = env.spawn([root = env.root(), profile, state, be]() -> int {
                RawFrontend raw(root, 24, *profile);
                std::string why;
                auto old = profile->read_frontend(
                    [&](std::string_view node) { return raw.xs().read(raw.frontend_path() + "/" + std::string(node)); },
                    why);
                if (!old) return 2;
                for (int i = 0; i < 4 && (raw.ring_ref() == 0 || raw.ring_ref() == old->ring_ref ||
                                          raw.port() == old->port);
                     ++i)
                    if (!raw.make_ring()) return 2;
                if (raw.ring_ref() == old->ring_ref || raw.port() == old->port) return 2;
                if (!raw.publish(state)) return 2;
                wire::Request req;
                req.cmd = wire::Command::socket;
                req.raw_cmd = static_cast<uint32_t>(wire::Command::socket);
                req.sockid = 7;
                req.domain = AF_INET;
                req.type = SOCK_STREAM;
                const auto rsp = raw.call(req, 10s);
                if (!rsp) {
                    std::fprintf(stderr, "no answer on the new command ring\n");
                    return 3;
                }
                if (rsp->ret != 0 || rsp->sockid != 7) return 4;
                (void)raw.xs().write(raw.frontend_path() + "/state", "4");
                // Checked here, while this incarnation's pages exist: once it
                // exits they are freed (on sim they then read as zeros, and
                // the backend rightly finds the ring broken).
                if (raw.xs().read(be + "/state").value_or("") != "4") return 5;
                return 0;
            });
            CHECK(SimEnv::wait_child(second) == 0);
            CHECK(env.detach(24, *profile).ok());
            CHECK(eventually([&] { return env.daemon_ring_mappings() == 0; }));
        }
    }
}

TEST_CASE("commands: a broken command ring (req_prod more than a ring ahead) disconnects the guest") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        // Host: one connection, read until the daemon closes it.
        const pid_t host = env.spawn([lfd]() -> int {
            const int c = ::accept(lfd, nullptr, nullptr);
            if (c < 0) return 2;
            const timeval bound{20, 0};
            ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof bound);
            char buf[256];
            ssize_t n;
            while ((n = ::recv(c, buf, sizeof buf, 0)) > 0) {
            }
            ::close(c);
            return n == 0 ? 0 : 3;  // EOF, not a timeout
        });
        env.attach(25, *profile);
        const auto be = env.backend_path(25, *profile);
        const pid_t guest = spawn_guest(env, 25, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            GCHECK_EQ(co_await g.send_all(id, std::as_bytes(std::span("hello", 5))), 5);
            // req_prod 40 ahead of what the backend consumed: a ring is 32.
            wire::SringHeader* header = g.command_ring_header();
            GCHECK(header != nullptr);
            __atomic_store_n(&header->req_prod, header->req_prod + 40, __ATOMIC_RELEASE);
            GCHECK(g.notify_command_ring().ok());
            for (int i = 0; i < 1000 && g.backend_state() == 4; ++i) co_await r.sleep_for(5ms);
            GCHECK_EQ(g.backend_state(), 5);  // Closing
            const auto error = g.xenstore().read(g.backend_path() + "/error");
            GCHECK(error && error->find("command ring") != std::string::npos);
            // Every data ring was reset.
            GCHECK_EQ(g.data_intf(id)->in_error(), -ECONNRESET);
            GCHECK_EQ(g.data_intf(id)->out_error(), -ECONNRESET);
            co_return 0;  // close(): Closing -> Closed
        });
        CHECK(SimEnv::wait_child(guest) == 0);
        CHECK(SimEnv::wait_child(host) == 0);
        CHECK(env.wait_for(be + "/state", "6"));
        CHECK(eventually([&] { return env.daemon_ring_mappings() == 0; }));
        CHECK(env.counter("guest_protocol_errors", 25) == 1);
        // The domain resets and is served again.
        const pid_t again = spawn_guest(env, 25, *profile, [](Guest& g, rt::Reactor&) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(again) == 0);
        ::close(lfd);
    }
}

// -------------------------------------------------------------- commands

TEST_CASE("commands: success and error paths, echoed ids, unknown command") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t echo_port = 0;
        const int lfd = host_listen(echo_port);
        const pid_t echo = spawn_echo_server(env, lfd, 1);
        uint16_t busy_port = 0;
        const int busy_fd = host_listen(busy_port);  // held: binding it is EADDRINUSE
        const uint16_t closed_port = free_port();
        env.attach(7, *profile);
        const pid_t guest = spawn_guest(env, 7, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            // Unknown command: -ENOTSUPP, with id, cmd and sockid echoed.
            auto unknown = raw(wire::Command::unknown, 0xABCDEF12345ull);
            unknown.raw_cmd = 77;
            auto rsp = co_await g.call(unknown, 5s);
            GCHECK_EQ(rsp.ret, -524);
            GCHECK_EQ(rsp.raw_cmd, 77u);
            GCHECK_EQ(rsp.sockid, 0xABCDEF12345ull);

            // SOCKET: only AF_INET / SOCK_STREAM / 0 (or IPPROTO_TCP).
            const uint64_t base = 1ull << 40;
            auto sock = raw(wire::Command::socket, base + 1);
            sock.domain = AF_INET6, sock.type = SOCK_STREAM;
            GCHECK_EQ((co_await g.call(sock, 5s)).ret, -EAFNOSUPPORT);
            sock.domain = AF_INET, sock.type = SOCK_DGRAM;
            GCHECK_EQ((co_await g.call(sock, 5s)).ret, -EAFNOSUPPORT);
            sock.type = SOCK_STREAM, sock.protocol = 17;
            GCHECK_EQ((co_await g.call(sock, 5s)).ret, -EAFNOSUPPORT);
            sock.protocol = 0;
            rsp = co_await g.call(sock, 5s);
            GCHECK_EQ(rsp.ret, 0);
            GCHECK_EQ(rsp.sockid, base + 1);
            GCHECK_EQ((co_await g.call(sock, 5s)).ret, -EEXIST);  // live sockid reused

            // Unknown sockids get an answer (never silence, never 0).
            for (auto cmd : {wire::Command::connect, wire::Command::release, wire::Command::bind,
                             wire::Command::listen, wire::Command::accept, wire::Command::poll}) {
                auto req = raw(cmd, base + 999);
                req.addr_len = 16;
                GCHECK_EQ((co_await g.call(req, 5s)).ret, -EBADF);
            }

            // Address validation.
            auto bad = raw(wire::Command::bind, base + 1);
            bad.addr_len = 8;
            GCHECK_EQ((co_await g.call(bad, 5s)).ret, -EINVAL);
            bad.addr_len = 16;
            const uint16_t inet6 = AF_INET6;
            std::memcpy(bad.addr.data(), &inet6, 2);
            GCHECK_EQ((co_await g.call(bad, 5s)).ret, -EAFNOSUPPORT);

            // BIND: address in use, then a good bind, then a double bind.
            uint64_t a = 0;
            GCHECK_EQ(co_await g.socket(a), 0);
            GCHECK_EQ(co_await g.bind(a, loopback(busy_port)), -EADDRINUSE);
            const uint16_t mine = free_port();
            GCHECK_EQ(co_await g.bind(a, loopback(mine)), 0);
            GCHECK_EQ(co_await g.bind(a, loopback(mine)), -EINVAL);
            // ACCEPT/POLL need a listening socket.
            uint64_t unused = 0;
            GCHECK_EQ(co_await g.poll(a), -EINVAL);
            GCHECK_EQ(co_await g.accept(a, unused), -EINVAL);
            GCHECK_EQ(co_await g.listen(a, 16), 0);
            GCHECK_EQ(co_await g.release(a), 0);

            // CONNECT: refused; a ring order above the maximum; then success,
            // and a second connect on a connected socket.
            uint64_t c = 0;
            GCHECK_EQ(co_await g.socket(c), 0);
            GCHECK_EQ(co_await g.connect(c, loopback(closed_port)), -ECONNREFUSED);
            RingOptions too_big;
            too_big.order = kMaxOrder + 1;
            GCHECK_EQ(co_await g.connect(c, loopback(echo_port), too_big), -EINVAL);
            GCHECK_EQ(co_await g.connect(c, loopback(echo_port)), 0);
            GCHECK_EQ(co_await echo_stream(g, r, c, 4096, 3), 0);
            auto again = raw(wire::Command::connect, c);
            again.addr_len = 16;
            const auto addr = loopback(echo_port);
            std::memcpy(again.addr.data(), &addr, sizeof addr);
            GCHECK_EQ((co_await g.call(again, 5s)).ret, -EISCONN);
            GCHECK_EQ((co_await g.call(raw(wire::Command::listen, c), 5s)).ret, -EINVAL);
            GCHECK_EQ(co_await g.release(c), 0);
            // Released: the id is unknown again.
            GCHECK_EQ((co_await g.call(raw(wire::Command::release, c), 5s)).ret, -EBADF);
            GCHECK_EQ((co_await g.call(raw(wire::Command::release, base + 1), 5s)).ret, 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
        ::close(lfd);
        ::close(busy_fd);
    }
}

TEST_CASE("commands: ACCEPT and POLL on a passive socket, concurrently; release answers pending ones first") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        const uint16_t port = free_port();
        env.attach(8, *profile);
        const std::string root = env.root();
        const pid_t guest = spawn_guest(env, 8, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t l = 0;
            GCHECK_EQ(co_await g.socket(l), 0);
            GCHECK_EQ(co_await g.bind(l, loopback(port)), 0);
            GCHECK_EQ(co_await g.listen(l, 16), 0);

            // A POLL and two ACCEPTs wait at once.
            struct Results {
                int poll = 1, accept1 = 1, accept2 = 1;
                uint64_t id1 = 0, id2 = 0;
                int finished = 0;
            } res;
            rt::Event progress(r);
            auto run_poll = [](Guest& g, uint64_t l, Results& res, rt::Event& ev) -> rt::Task<void> {
                res.poll = co_await g.poll(l);
                ++res.finished;
                ev.set();
            };
            auto run_accept = [](Guest& g, uint64_t l, int& rc, uint64_t& id, Results& res,
                                 rt::Event& ev) -> rt::Task<void> {
                rc = co_await g.accept(l, id);
                ++res.finished;
                ev.set();
            };
            r.spawn(run_poll(g, l, res, progress));
            r.spawn(run_accept(g, l, res.accept1, res.id1, res, progress));
            r.spawn(run_accept(g, l, res.accept2, res.id2, res, progress));
            co_await r.sleep_for(50ms);
            GCHECK_EQ(res.finished, 0);  // nothing queued yet: nobody answered
            mark(root, "listening");
            while (res.finished < 3) co_await progress.wait();
            GCHECK_EQ(res.poll, 0);
            GCHECK_EQ(res.accept1, 0);
            GCHECK_EQ(res.accept2, 0);
            for (uint64_t id : {res.id1, res.id2}) {
                std::array<std::byte, 5> hello{};
                GCHECK_EQ(co_await g.recv_exact(id, hello, 10s), 5);
                GCHECK(std::memcmp(hello.data(), "hello", 5) == 0);
                const char* reply = "world";
                GCHECK_EQ(co_await g.send_all(id, std::as_bytes(std::span(reply, 5))), 5);
                GCHECK_EQ(co_await g.release(id), 0);
            }

            // A pending ACCEPT is answered (-EBADF) before RELEASE's reply.
            int pending_rc = 1;
            uint64_t pending_id = 0;
            int order = 0, accept_order = 0, release_order = 0;
            auto late_accept = [](Guest& g, uint64_t l, int& rc, uint64_t& id, int& order,
                                  int& mine) -> rt::Task<void> {
                rc = co_await g.accept(l, id);
                mine = ++order;
            };
            r.spawn(late_accept(g, l, pending_rc, pending_id, order, accept_order));
            co_await r.sleep_for(50ms);
            GCHECK_EQ(co_await g.release(l), 0);
            release_order = ++order;
            co_await r.sleep_for(10ms);
            GCHECK_EQ(pending_rc, -EBADF);
            GCHECK(accept_order != 0 && accept_order < release_order);
            co_return 0;
        });
        // The host connects twice once the guest listens.
        REQUIRE(eventually([&] { return marked(root, "listening"); }, 20s));
        std::vector<int> clients;
        for (int i = 0; i < 2; ++i) {
            int fd = -1;
            REQUIRE(eventually([&] { return (fd = host_connect(port)) >= 0; }, 10s));
            CHECK(write_all(fd, "hello", 5));
            clients.push_back(fd);
        }
        for (int fd : clients) {
            char buf[5] = {};
            size_t got = 0;
            while (got < 5) {
                const ssize_t n = ::recv(fd, buf + got, 5 - got, 0);
                if (n <= 0) break;
                got += static_cast<size_t>(n);
            }
            CHECK(got == 5);
            CHECK(std::memcmp(buf, "world", 5) == 0);
            ::close(fd);
        }
        CHECK(SimEnv::wait_child(guest) == 0);
    }
}

TEST_CASE("commands: ACCEPT onto a live sockid, bad refs and ports, ring order, address length, CONNECT while connecting, POLL at RELEASE") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t echo_port = 0;
        const int echo_fd = host_listen(echo_port);
        const pid_t echo = spawn_echo_server(env, echo_fd, 2);  // the reset CONNECT, then the good one
        uint16_t hole = 0;  // a blackhole: full accept queue, SYNs dropped
        const int hole_fd = host_listen(hole, 0);
        std::vector<int> fillers;
        for (int i = 0; i < 4; ++i) {
            const int f = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            const auto a = loopback(hole);
            ::connect(f, reinterpret_cast<const sockaddr*>(&a), sizeof a);
            fillers.push_back(f);
        }
        const uint16_t guest_port = free_port();
        const std::string root = env.root();
        env.attach(27, *profile);
        const pid_t guest = spawn_guest(env, 27, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            constexpr uint32_t kBogusRef = 30000;  // a ref this guest never granted
            constexpr uint32_t kBogusPort = 4000;  // a port it never allocated
            uint64_t l = 0, other = 0;
            GCHECK_EQ(co_await g.socket(l), 0);
            GCHECK_EQ(co_await g.socket(other), 0);
            GCHECK_EQ(co_await g.bind(l, loopback(guest_port)), 0);
            GCHECK_EQ(co_await g.listen(l, 16), 0);

            // ACCEPT whose new sockid is already in use.
            for (uint64_t taken : {l, other}) {
                auto req = raw(wire::Command::accept, l);
                req.new_sockid = taken;
                GCHECK_EQ((co_await g.call(req, 5s)).ret, -EEXIST);
            }
            // ACCEPT with a ring order above the maximum, a bad ref: refused
            // at once, before any connection.
            uint64_t unused = 0;
            RingOptions too_big;
            too_big.order = kMaxOrder + 1;
            GCHECK_EQ(co_await g.accept(l, unused, too_big), -EINVAL);
            RingOptions bad_ref;
            bad_ref.ref_override = kBogusRef;
            GCHECK_EQ(co_await g.accept(l, unused, bad_ref), -EPERM);
            // ACCEPT with a bad port: it takes the first connection, cannot
            // bind the port, resets that connection; the next ACCEPT (good)
            // takes the second one.
            mark(root, "listening");
            RingOptions bad_port;
            bad_port.evtchn_override = kBogusPort;
            GCHECK_EQ(co_await g.accept(l, unused, bad_port), -EINVAL);
            uint64_t accepted = 0;
            GCHECK_EQ(co_await g.accept(l, accepted), 0);
            std::array<std::byte, 5> hello{};
            GCHECK_EQ(co_await g.recv_exact(accepted, hello, 10s), 5);
            GCHECK(std::memcmp(hello.data(), "hello", 5) == 0);
            GCHECK_EQ(co_await g.release(accepted), 0);

            // CONNECT with a bad ref: refused before connecting.
            uint64_t c = 0;
            GCHECK_EQ(co_await g.socket(c), 0);
            GCHECK_EQ(co_await g.connect(c, loopback(echo_port), bad_ref), -EPERM);
            // CONNECT with a bad port: the host connection is made, then
            // reset; the socket is as new and connects again.
            GCHECK_EQ(co_await g.connect(c, loopback(echo_port), bad_port), -EINVAL);
            GCHECK_EQ(co_await g.connect(c, loopback(echo_port)), 0);
            GCHECK_EQ(co_await echo_stream(g, r, c, 64 << 10, 27), 0);
            GCHECK_EQ(co_await g.release(c), 0);

            // Address length above 28 (the field's size), for BIND and CONNECT.
            const uint16_t spare_port = free_port();
            for (auto cmd : {wire::Command::bind, wire::Command::connect}) {
                auto req = raw(cmd, other);
                const auto addr = loopback(spare_port);
                std::memcpy(req.addr.data(), &addr, sizeof addr);
                req.addr_len = 29;
                GCHECK_EQ((co_await g.call(req, 5s)).ret, -EINVAL);
                req.addr_len = 28;  // the largest allowed: padding after sockaddr_in
                if (cmd == wire::Command::bind) GCHECK_EQ((co_await g.call(req, 5s)).ret, 0);
            }

            // CONNECT while a connect is in progress: -EALREADY from the
            // backend; releasing answers the pending one (negative), then
            // the RELEASE.
            uint64_t slow = 0;
            GCHECK_EQ(co_await g.socket(slow), 0);
            int slow_rc = 1;
            bool slow_done = false;
            auto hang = [](Guest& g, uint64_t id, uint16_t hole, int& rc, bool& done) -> rt::Task<void> {
                rc = co_await g.connect(id, loopback(hole));
                done = true;
            };
            r.spawn(hang(g, slow, hole, slow_rc, slow_done));
            co_await r.sleep_for(50ms);
            GCHECK(!slow_done);
            auto again = raw(wire::Command::connect, slow);
            const auto addr = loopback(echo_port);
            std::memcpy(again.addr.data(), &addr, sizeof addr);
            again.addr_len = sizeof addr;
            GCHECK_EQ((co_await g.call(again, 5s)).ret, -EALREADY);
            GCHECK_EQ(co_await g.release(slow), 0);
            GCHECK(slow_done);  // answered before the RELEASE
            GCHECK(slow_rc < 0);

            // A POLL still pending at RELEASE: answered (negative errno)
            // before RELEASE's reply.
            int poll_rc = 1, order = 0, poll_order = 0;
            auto pending_poll = [](Guest& g, uint64_t l, int& rc, int& order, int& mine) -> rt::Task<void> {
                rc = co_await g.poll(l);
                mine = ++order;
            };
            r.spawn(pending_poll(g, l, poll_rc, order, poll_order));
            co_await r.sleep_for(50ms);
            GCHECK_EQ(poll_order, 0);  // nothing queued: still waiting
            GCHECK_EQ(co_await g.release(l), 0);
            const int release_order = ++order;
            GCHECK_EQ(poll_rc, -EBADF);
            GCHECK(poll_order != 0 && poll_order < release_order);
            GCHECK_EQ(co_await g.release(other), 0);
            co_return 0;
        });
        // Host: two clients once the guest listens; the first is reset.
        REQUIRE(eventually([&] { return marked(root, "listening"); }, 20s));
        const int first = host_connect(guest_port);
        const int second = host_connect(guest_port);
        REQUIRE(first >= 0);
        REQUIRE(second >= 0);
        CHECK(write_all(second, "hello", 5));
        const timeval bound{20, 0};
        ::setsockopt(first, SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof bound);
        char byte;
        errno = 0;
        const ssize_t n = ::recv(first, &byte, 1, 0);
        CHECK(n < 0);
        CHECK(errno == ECONNRESET);  // an RST, not an orderly (empty) session
        CHECK(SimEnv::wait_child(guest) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
        ::close(first);
        ::close(second);
        for (int f : fillers) ::close(f);
        ::close(hole_fd);
        ::close(echo_fd);
    }
}

TEST_CASE("commands: the socket quota: -EMFILE beyond --max-sockets-per-guest, counted as quota refusals") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env(daemon_options({"--max-sockets-per-guest", "3"}));
        env.attach(28, *profile);
        const pid_t guest = spawn_guest(env, 28, *profile, [](Guest& g, rt::Reactor&) -> rt::Task<int> {
            uint64_t a = 0, b = 0, c = 0, d = 0, unused = 0;
            GCHECK_EQ(co_await g.socket(a), 0);
            GCHECK_EQ(co_await g.socket(b), 0);
            GCHECK_EQ(co_await g.socket(c), 0);
            GCHECK_EQ(co_await g.socket(d), -EMFILE);
            // ACCEPT would make a fourth: refused at once.
            GCHECK_EQ(co_await g.bind(a, loopback(free_port())), 0);
            GCHECK_EQ(co_await g.listen(a, 4), 0);
            GCHECK_EQ(co_await g.accept(a, unused), -EMFILE);
            // Releasing one makes room again.
            GCHECK_EQ(co_await g.release(b), 0);
            GCHECK_EQ(co_await g.socket(d), 0);
            GCHECK_EQ(co_await g.socket(b), -EMFILE);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest) == 0);
        CHECK(env.counter("quota_refusals", 28) == 3);
        CHECK(env.counter("errno_24", 28) == 3);  // EMFILE
    }
}

// ------------------------------------------------------------- data rings

TEST_CASE("data: bulk both directions with checksums, ring orders min..9, 128+ MiB each way per protocol") {
    constexpr unsigned kTopOrder = wire::kHardMaxRingOrder;
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env(daemon_options({}, kTopOrder));
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const unsigned first = profile->min_ring_order();
        const int streams = static_cast<int>(kTopOrder - first + 1) + 1;
        const pid_t echo = spawn_echo_server(env, lfd, streams);
        env.attach(9, *profile);
        const pid_t guest = spawn_guest(env, 9, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            GCHECK_EQ(g.max_ring_order(), kTopOrder);
            // Bytes each way per order: small rings are slow (many round
            // trips per MiB), big ones fast; 128 MiB or more each way in all,
            // plus a ring whose indexes start just below 2^32 to wrap.
            size_t total = 0;
            for (unsigned order = first; order <= kTopOrder; ++order) {
                const size_t bytes = (order < 3 ? 8u : order < 6 ? 12u : 20u) << 20;
                uint64_t id = 0;
                GCHECK_EQ(co_await g.socket(id), 0);
                RingOptions ring;
                ring.order = order;
                GCHECK_EQ(co_await g.connect(id, loopback(port), ring), 0);
                GCHECK_EQ(g.socket_info(id)->ring_order, order);
                const auto t0 = std::chrono::steady_clock::now();
                GCHECK_EQ(co_await echo_stream(g, r, id, bytes, order), 0);
                const std::chrono::duration<double> took = std::chrono::steady_clock::now() - t0;
                if (std::getenv("XENSOCK_TEST_VERBOSE"))
                    std::fprintf(stderr, "bulk %s order %u: %zu MiB each way in %.2f s\n",
                                 std::string(g.profile().name()).c_str(), order, bytes >> 20, took.count());
                GCHECK_EQ(co_await g.release(id), 0);
                total += bytes;
            }
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            RingOptions wrap;
            wrap.order = first;
            wrap.start_index = 0xFFFFF000u;
            GCHECK_EQ(co_await g.connect(id, loopback(port), wrap), 0);
            GCHECK_EQ(co_await echo_stream(g, r, id, 3u << 20, 99), 0);
            GCHECK_EQ(co_await g.release(id), 0);
            total += 3u << 20;
            GCHECK(total >= (size_t{128} << 20));
            GCHECK_EQ(g.stats().bytes_sent, total);
            GCHECK_EQ(g.stats().bytes_received, total);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest, 300s) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
        // The daemon moved the same bytes, both ways.
        const auto stats = env.control({{"op", "stats"}, {"domid", 9}});
        REQUIRE(stats["sessions"].size() == 1);
        CHECK(stats["sessions"][0]["bytes_to_guest"].get<uint64_t>() >= (uint64_t{128} << 20));
        CHECK(stats["sessions"][0]["bytes_from_guest"].get<uint64_t>() ==
              stats["sessions"][0]["bytes_to_guest"].get<uint64_t>());
        ::close(lfd);
    }
}

TEST_CASE("data: half-close by the peer, and RELEASE still delivers what the guest queued") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const std::string root = env.root();
        // Host: sends "abc" and half-closes; reads "xyz" then EOF. On a second
        // connection it reads nothing until the guest has released the socket
        // with its ring still full, exited, and its device is gone (as after
        // xl destroy), then reads to EOF: every byte the guest queued must
        // still arrive, in order.
        const pid_t host = env.spawn([lfd, root]() -> int {
            int c = ::accept(lfd, nullptr, nullptr);
            if (c < 0 || !write_all(c, "abc", 3)) return 2;
            ::shutdown(c, SHUT_WR);
            char buf[3];
            size_t got = 0;
            while (got < 3) {
                const ssize_t n = ::recv(c, buf + got, 3 - got, 0);
                if (n <= 0) return 3;
                got += static_cast<size_t>(n);
            }
            if (std::memcmp(buf, "xyz", 3) != 0) return 4;
            if (::recv(c, buf, 1, 0) != 0) return 5;  // guest released: EOF
            ::close(c);
            c = ::accept(lfd, nullptr, nullptr);
            if (!eventually([&] { return marked(root, "guest-gone"); }, 60s)) return 9;
            size_t queued = 0;
            std::ifstream(root + "/test-queued") >> queued;
            std::vector<std::byte> data(1 << 16), want(1 << 16);
            size_t total = 0;
            while (true) {
                const ssize_t n = ::recv(c, data.data(), data.size(), 0);
                if (n < 0) return 6;
                if (n == 0) break;
                fill_pattern(want.data(), static_cast<size_t>(n), total, 7);
                if (std::memcmp(data.data(), want.data(), static_cast<size_t>(n)) != 0) return 7;
                total += static_cast<size_t>(n);
            }
            if (total != queued || queued == 0) {
                std::fprintf(stderr, "host received %zu of %zu queued bytes\n", total, queued);
                return 8;
            }
            return 0;
        });
        env.attach(10, *profile);
        const pid_t guest = spawn_guest(env, 10, *profile, [=](Guest& g, rt::Reactor&) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            std::array<std::byte, 8> buf{};
            GCHECK_EQ(co_await g.recv_exact(id, std::span(buf.data(), 3), 10s), 3);
            GCHECK(std::memcmp(buf.data(), "abc", 3) == 0);
            GCHECK_EQ(co_await g.recv(id, buf, 10s), 0);  // orderly shutdown after the data
            const auto intf = g.data_intf(id);
            GCHECK_EQ(intf->in_error(), -ENOTCONN);
            // Our direction still works.
            GCHECK_EQ(co_await g.send_all(id, std::as_bytes(std::span("xyz", 3))), 3);
            GCHECK_EQ(co_await g.release(id), 0);

            // Fill the socket buffers and then the ring (the host does not
            // read), and release with the ring full: the backend must still
            // deliver what was queued.
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            std::vector<std::byte> chunk(1 << 16);
            size_t queued = 0;
            int stalls = 0;
            while (stalls < 3) {
                fill_pattern(chunk.data(), chunk.size(), queued, 7);
                const ssize_t n = co_await g.send(id, chunk, 300ms);
                if (n == -ETIMEDOUT) {
                    ++stalls;
                    continue;
                }
                GCHECK(n > 0);
                queued += static_cast<size_t>(n);
                stalls = 0;
            }
            const auto ring = g.data_ring(id);
            const uint32_t still_in_ring = ring->intf.out_prod() - ring->intf.out_cons();
            GCHECK(still_in_ring > 0);  // the case under test: unsent bytes at RELEASE
            std::ofstream(root + "/test-queued") << queued;
            GCHECK_EQ(co_await g.release(id), 0);
            mark(root, "released");
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest, 120s) == 0);
        std::string why;
        CHECK_MESSAGE(toolstack::detach(env.xs(), *profile, 10, 0, 5s, &why).ok(), why);
        mark(root, "guest-gone");
        CHECK(SimEnv::wait_child(host, 120s) == 0);
        ::close(lfd);
    }
}

TEST_CASE("data: 1000 sockets at once in one guest, then none left behind") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        // XenSock: 1000 one-page rings; PVCalls (two pages at least): 500.
        const int sockets = profile->name() == "xensock" ? 1000 : 500;
        uint16_t port = 0;
        const int lfd = host_listen(port, 4096);
        // Host: accept them all, then echo one byte on each.
        const pid_t host = env.spawn([lfd, sockets]() -> int {
            std::vector<int> conns;
            for (int i = 0; i < sockets; ++i) {
                const int c = ::accept(lfd, nullptr, nullptr);
                if (c < 0) return 2;
                conns.push_back(c);
            }
            for (int c : conns) {
                char b;
                if (::recv(c, &b, 1, MSG_WAITALL) != 1 || !write_all(c, &b, 1)) return 3;
            }
            for (int c : conns) ::close(c);
            return 0;
        });
        env.attach(11, *profile);
        const size_t baseline_fds = env.daemon_fd_count();
        const std::string root = env.root();
        const pid_t guest = spawn_guest(env, 11, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            std::vector<uint64_t> ids(static_cast<size_t>(sockets));
            RingOptions smallest;  // the protocol's smallest ring
            smallest.order = g.profile().min_ring_order();
            for (auto& id : ids) {
                GCHECK_EQ(co_await g.socket(id), 0);
                GCHECK_EQ(co_await g.connect(id, loopback(port), smallest), 0);
            }
            for (size_t i = 0; i < ids.size(); ++i) {
                const std::byte b{static_cast<unsigned char>(i)};
                GCHECK_EQ(co_await g.send_all(ids[i], std::span(&b, 1)), 1);
            }
            for (size_t i = 0; i < ids.size(); ++i) {
                std::byte b{};
                GCHECK_EQ(co_await g.recv_exact(ids[i], std::span(&b, 1), 20s), 1);
                GCHECK_EQ(static_cast<unsigned>(b), i & 0xFF);
            }
            mark(root, "all-open");
            GCHECK(co_await wait_mark(r, root, "counted"));
            for (auto id : ids) GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        // With all of them open: on sim a connection costs xensockd its host
        // socket and its data ring's event-channel socket, nothing more (the
        // slack is the guest's own: command ring port, mem and gnttab files).
        REQUIRE(eventually([&] { return marked(root, "all-open"); }, 120s));
        const size_t open_fds = env.daemon_fd_count();
        MESSAGE("xensockd descriptors for ", sockets, " connections: ", open_fds - baseline_fds, " beyond ",
                baseline_fds);
        CHECK(open_fds >= baseline_fds + 2 * static_cast<size_t>(sockets));
        CHECK(open_fds <= baseline_fds + 2 * static_cast<size_t>(sockets) + 8);
        mark(root, "counted");
        CHECK(SimEnv::wait_child(guest, 120s) == 0);
        CHECK(SimEnv::wait_child(host) == 0);
        ::close(lfd);
        CHECK(eventually([&] { return env.daemon_fd_count() <= baseline_fds; }));
        CHECK(env.daemon_ring_mappings() <= 1);  // the command ring only
    }
}

TEST_CASE("data: a guest that corrupts one index of one ring loses that socket only (both halves, host side shut)") {
    for (const auto* profile : wire::all_profiles()) {
        for (const bool corrupt_in_cons : {true, false}) {
            CAPTURE(profile->name());
            CAPTURE(corrupt_in_cons);
            SimEnv env;
            uint16_t port = 0;
            const int lfd = host_listen(port);
            const std::string root = env.root();
            const pid_t host = env.spawn([lfd, root]() -> int {
                // Two connections at once: the broken one and the good one.
                const int a = ::accept(lfd, nullptr, nullptr);
                const int b = ::accept(lfd, nullptr, nullptr);
                if (a < 0 || b < 0) return 2;
                // Trickle bytes into the broken socket (the backend looks at
                // in_cons each time it has something to deliver) until the
                // backend shuts the host socket down: then EOF.
                std::thread trickle([a] {
                    for (int i = 0; i < 2000; ++i) {
                        if (::send(a, "x", 1, MSG_NOSIGNAL) <= 0) break;
                        std::this_thread::sleep_for(5ms);
                    }
                });
                const timeval bound{20, 0};
                ::setsockopt(a, SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof bound);
                char byte;
                const ssize_t eof = ::recv(a, &byte, 1, 0);
                if (eof == 0) mark(root, "a-eof");
                std::vector<char> buf(1 << 16);
                while (true) {
                    const ssize_t n = ::recv(b, buf.data(), buf.size(), 0);
                    if (n <= 0) break;
                    if (!write_all(b, buf.data(), static_cast<size_t>(n))) break;
                }
                ::shutdown(a, SHUT_RDWR);
                trickle.join();
                ::close(a);
                ::close(b);
                return eof == 0 ? 0 : 3;
            });
            env.attach(12, *profile);
            const pid_t guest = spawn_guest(env, 12, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
                uint64_t bad = 0, good = 0;
                GCHECK_EQ(co_await g.socket(bad), 0);
                GCHECK_EQ(co_await g.connect(bad, loopback(port)), 0);
                GCHECK_EQ(co_await g.socket(good), 0);
                GCHECK_EQ(co_await g.connect(good, loopback(port)), 0);
                // One index only: in_cons past in_prod, or out_prod two
                // rings ahead of out_cons.
                auto intf = *g.data_intf(bad);
                const uint32_t size = g.data_ring(bad)->size;
                if (corrupt_in_cons) {
                    intf.set_in_cons(intf.in_prod() + 3 * size);
                } else {
                    intf.set_out_prod(intf.out_cons() + 2 * size);
                }
                GCHECK(g.notify_socket(bad).ok());
                for (int i = 0; i < 400 && (intf.out_error() == 0 || intf.in_error() == 0); ++i)
                    co_await r.sleep_for(5ms);
                // The whole socket failed: both halves, and the host side.
                GCHECK_EQ(intf.out_error(), -EINVAL);
                GCHECK_EQ(intf.in_error(), -EINVAL);
                GCHECK(co_await wait_mark(r, root, "a-eof"));
                // The other socket and the command ring are untouched.
                GCHECK_EQ(co_await echo_stream(g, r, good, 2 << 20, 12), 0);
                GCHECK_EQ(co_await g.release(bad), 0);
                GCHECK_EQ(co_await g.release(good), 0);
                co_return 0;
            });
            CHECK(SimEnv::wait_child(guest) == 0);
            CHECK(SimEnv::wait_child(host) == 0);
            CHECK(env.counter("guest_protocol_errors", 12) == 1);
            ::close(lfd);
            CHECK(env.daemon_alive());
        }
    }
}

TEST_CASE("data: an idle connected socket causes no notifications, either way") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const pid_t echo = spawn_echo_server(env, lfd, 1);
        env.attach(29, *profile);
        const std::string root = env.root();
        const pid_t guest = spawn_guest(env, 29, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            GCHECK_EQ(co_await echo_stream(g, r, id, 256 << 10, 29), 0);
            co_await r.sleep_for(100ms);  // let the last notifications land
            const frontend::GuestStats before = g.stats();
            mark(root, "idle");
            co_await r.sleep_for(500ms);
            const frontend::GuestStats after = g.stats();
            GCHECK_EQ(after.events, before.events);  // nothing came from the backend
            GCHECK_EQ(after.data_notifies, before.data_notifies);
            GCHECK_EQ(after.command_notifies, before.command_notifies);
            GCHECK(co_await wait_mark(r, root, "checked"));
            GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        REQUIRE(eventually([&] { return marked(root, "idle"); }, 20s));
        const uint64_t sent = env.counter("notifications_sent", 29);
        const uint64_t received = env.counter("notifications_received", 29);
        std::this_thread::sleep_for(500ms);
        CHECK(env.counter("notifications_sent", 29) == sent);
        CHECK(env.counter("notifications_received", 29) == received);
        mark(root, "checked");
        CHECK(SimEnv::wait_child(guest) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
        ::close(lfd);
    }
}

TEST_CASE("data: a full in half stops the host sender; xensockd idles meanwhile; no byte lost") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        constexpr size_t kTotal = 16u << 20;  // far more than the ring plus both socket buffers
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const std::string root = env.root();
        const pid_t host = env.spawn([lfd, root]() -> int {
            const int c = ::accept(lfd, nullptr, nullptr);
            if (c < 0) return 2;
            std::vector<std::byte> chunk(1 << 16);
            for (size_t off = 0; off < kTotal; off += chunk.size()) {
                fill_pattern(chunk.data(), chunk.size(), off, 31);
                if (!write_all(c, chunk.data(), chunk.size())) return 3;
            }
            mark(root, "host-sent");
            ::close(c);
            return 0;
        });
        env.attach(30, *profile);
        const pid_t guest = spawn_guest(env, 30, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            RingOptions smallest;
            smallest.order = g.profile().min_ring_order();
            GCHECK_EQ(co_await g.connect(id, loopback(port), smallest), 0);
            mark(root, "connected");
            GCHECK(co_await wait_mark(r, root, "read", 30s));  // not reading until told
            GCHECK_EQ(co_await recv_pattern(g, id, kTotal, 31), 0);
            std::array<std::byte, 16> tail{};
            GCHECK_EQ(co_await g.recv(id, tail, 10s), 0);  // then the orderly end, nothing more
            GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        REQUIRE(eventually([&] { return marked(root, "connected"); }, 20s));
        // The in half fills, and the backend stalls on it.
        CHECK(eventually([&] { return env.counter("ring_full_stalls", 30) > 0; }));
        const uint64_t stalls = env.counter("ring_full_stalls", 30);
        const double cpu_before = env.daemon_cpu_seconds();
        std::this_thread::sleep_for(1s);
        const double cpu_used = env.daemon_cpu_seconds() - cpu_before;
        CHECK(cpu_used < 0.2);  // waiting, not spinning
        // Stalled once, not re-checking in a loop.
        CHECK(env.counter("ring_full_stalls", 30) <= stalls + 1);
        CHECK(!marked(root, "host-sent"));  // the host sender is held back too
        mark(root, "read");
        CHECK(SimEnv::wait_child(guest, 120s) == 0);
        CHECK(SimEnv::wait_child(host) == 0);
        ::close(lfd);
    }
}

namespace {
// Fills a connected socket's out half while the peer does not read: sends
// until the ring stays full. Returns the bytes queued (pattern `seed`).
rt::Task<size_t> fill_until_stalled(Guest& g, uint64_t id, uint64_t seed) {
    std::vector<std::byte> chunk(1 << 16);
    size_t queued = 0;
    int stalls = 0;
    while (stalls < 2) {
        fill_pattern(chunk.data(), chunk.size(), queued, seed);
        const ssize_t n = co_await g.send(id, chunk, 150ms);
        if (n == -ETIMEDOUT) {
            ++stalls;
            continue;
        }
        if (n <= 0) co_return 0;
        queued += static_cast<size_t>(n);
        stalls = 0;
    }
    co_return queued;
}
}  // namespace

TEST_CASE("data: bytes queued at RELEASE linger within a per-guest budget; beyond it the connection is reset") {
    struct Case {
        std::vector<std::string> args;
        int sockets, lingering;  // released with queued bytes; of which delivered
    };
    const Case cases[] = {
        {{"--max-lingering-sockets-per-guest", "2"}, 4, 2},
        {{"--max-lingering-bytes-per-guest", "1000"}, 1, 0},  // less than one full ring
    };
    for (const auto* profile : wire::all_profiles()) {
        for (const Case& tc : cases) {
            CAPTURE(profile->name());
            CAPTURE(tc.args[0]);
            SimEnv env(daemon_options(tc.args, wire::kHardMaxRingOrder));
            const std::string root = env.root();
            // The host's receive buffer small, so that the guest's ring
            // fills quickly; it reads nothing until every socket is released.
            const int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            const int small = 4096;
            ::setsockopt(lfd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
            sockaddr_in a = loopback(0);
            REQUIRE(::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
            REQUIRE(::listen(lfd, 16) == 0);
            socklen_t alen = sizeof a;
            ::getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &alen);
            const uint16_t port = ntohs(a.sin_port);
            const int sockets = tc.sockets, lingering = tc.lingering;
            const pid_t host = env.spawn([lfd, root, sockets, lingering]() -> int {
                std::vector<int> conns;
                for (int i = 0; i < sockets; ++i) conns.push_back(::accept(lfd, nullptr, nullptr));
                if (!eventually([&] { return marked(root, "released"); }, 60s)) return 9;
                for (int i = 0; i < sockets; ++i) {
                    size_t queued = 0;
                    std::ifstream(fmt::format("{}/test-queued-{}", root, i)) >> queued;
                    std::vector<std::byte> data(1 << 16), want(1 << 16);
                    size_t total = 0;
                    ssize_t n;
                    while ((n = ::recv(conns[i], data.data(), data.size(), 0)) > 0) {
                        fill_pattern(want.data(), static_cast<size_t>(n), total, 40 + i);
                        if (std::memcmp(data.data(), want.data(), static_cast<size_t>(n)) != 0) return 4;
                        total += static_cast<size_t>(n);
                    }
                    const int err = n < 0 ? errno : 0;
                    if (i < lingering && (n != 0 || total != queued)) {
                        std::fprintf(stderr, "lingering socket %d: %zu of %zu bytes, errno %d\n", i, total, queued, err);
                        return 5;
                    }
                    if (i >= lingering && (err != ECONNRESET || total >= queued)) {
                        std::fprintf(stderr, "reset socket %d: %zu of %zu bytes, errno %d\n", i, total, queued, err);
                        return 6;
                    }
                    ::close(conns[i]);
                }
                return 0;
            });
            env.attach(31, *profile);
            const size_t baseline_fds = env.daemon_fd_count();
            const pid_t guest = spawn_guest(env, 31, *profile, [=](Guest& g, rt::Reactor&) -> rt::Task<int> {
                for (int i = 0; i < sockets; ++i) {
                    uint64_t id = 0;
                    GCHECK_EQ(co_await g.socket(id), 0);
                    // A big ring: what it holds at RELEASE cannot squeeze into
                    // the full socket buffer, so it really lingers.
                    RingOptions big;
                    big.order = wire::kHardMaxRingOrder;
                    GCHECK_EQ(co_await g.connect(id, loopback(port), big), 0);
                    const size_t queued = co_await fill_until_stalled(g, id, 40 + i);
                    GCHECK(queued > 0);
                    const auto ring = g.data_ring(id);
                    GCHECK(ring->intf.out_prod() != ring->intf.out_cons());  // unsent bytes at RELEASE
                    std::ofstream(fmt::format("{}/test-queued-{}", root, i)) << queued;
                    GCHECK_EQ(co_await g.release(id), 0);
                }
                mark(root, "released");
                co_return 0;
            });
            CHECK(SimEnv::wait_child(guest, 60s) == 0);
            CHECK(SimEnv::wait_child(host, 60s) == 0);
            CHECK(env.counter("quota_refusals", 31) == static_cast<uint64_t>(sockets - lingering));
            CHECK(eventually([&] { return env.daemon_fd_count() <= baseline_fds; }));
            ::close(lfd);
        }
    }
}

TEST_CASE("frontend: shutdown(SHUT_WR) refuses sends, SHUT_RD drops what arrives; end-of-stream only at release") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const std::string root = env.root();
        constexpr size_t kFlood = 8u << 20;  // far more than the ring and the buffers
        const pid_t host = env.spawn([lfd, root]() -> int {
            const int c = ::accept(lfd, nullptr, nullptr);
            if (c < 0) return 2;
            char buf[3];
            if (::recv(c, buf, 3, MSG_WAITALL) != 3 || std::memcmp(buf, "xyz", 3) != 0) return 3;
            if (!eventually([&] { return marked(root, "shut-wr"); }, 20s)) return 9;
            // SHUT_WR is local: no end-of-stream has reached us.
            if (::recv(c, buf, 1, MSG_DONTWAIT) != -1 || errno != EAGAIN) return 4;
            if (!write_all(c, "abc", 3)) return 5;
            if (!eventually([&] { return marked(root, "shut-rd"); }, 20s)) return 9;
            // The guest reads nothing any more, yet we are never held back.
            const timeval bound{20, 0};
            ::setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &bound, sizeof bound);
            std::vector<char> flood(1 << 16, 'f');
            for (size_t sent = 0; sent < kFlood; sent += flood.size())
                if (!write_all(c, flood.data(), flood.size())) return 6;
            mark(root, "flooded");
            // Released: now the end of the stream (a reset if bytes of the
            // flood were still unread in xensockd's socket: close(2) with
            // unread data sends an RST).
            ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof bound);
            errno = 0;
            const ssize_t end = ::recv(c, buf, 1, 0);
            if (end != 0 && !(end < 0 && errno == ECONNRESET)) return 7;
            ::close(c);
            return 0;
        });
        env.attach(32, *profile);
        const pid_t guest = spawn_guest(env, 32, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t id = 0, idle = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.socket(idle), 0);
            GCHECK_EQ(g.shutdown(idle, SHUT_WR), -ENOTCONN);
            GCHECK_EQ(g.shutdown(12345, SHUT_WR), -EBADF);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            GCHECK_EQ(g.shutdown(id, 7), -EINVAL);
            GCHECK_EQ(co_await g.send_all(id, std::as_bytes(std::span("xyz", 3))), 3);
            GCHECK_EQ(g.shutdown(id, SHUT_WR), 0);
            GCHECK_EQ(co_await g.send(id, std::as_bytes(std::span("no", 2))), -EPIPE);
            mark(root, "shut-wr");
            // Reading still works after SHUT_WR.
            std::array<std::byte, 3> abc{};
            GCHECK_EQ(co_await g.recv_exact(id, abc, 10s), 3);
            GCHECK(std::memcmp(abc.data(), "abc", 3) == 0);
            GCHECK_EQ(g.shutdown(id, SHUT_RD), 0);
            std::array<std::byte, 64> buf{};
            GCHECK_EQ(co_await g.recv(id, buf, 1s), 0);
            mark(root, "shut-rd");
            GCHECK(co_await wait_mark(r, root, "flooded", 60s));
            GCHECK_EQ(co_await g.recv(id, buf, 1s), 0);
            GCHECK_EQ(g.stats().bytes_received, 3u);  // the flood was dropped, not delivered
            GCHECK_EQ(g.shutdown(id, SHUT_RDWR), 0);  // again: harmless
            GCHECK_EQ(co_await g.release(id), 0);
            GCHECK_EQ(co_await g.release(idle), 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest, 90s) == 0);
        CHECK(SimEnv::wait_child(host, 90s) == 0);
        ::close(lfd);
    }
}

// ---------------------------------------------------------- independence

TEST_CASE("commands: a blackholed connect delays neither the same guest's nor another guest's commands") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;  // one worker: both guests share it, the hard case
        // A loopback blackhole: a listener whose accept queue is full drops
        // SYNs, so a connect to it hangs (for minutes) in SYN retransmission.
        uint16_t hole = 0;
        const int hole_fd = host_listen(hole, 0);
        std::vector<int> fillers;
        for (int i = 0; i < 4; ++i) {
            const int f = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            const auto a = loopback(hole);
            ::connect(f, reinterpret_cast<const sockaddr*>(&a), sizeof a);
            fillers.push_back(f);
        }
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const pid_t echo = spawn_echo_server(env, lfd, 2);
        env.attach(13, *profile);
        env.attach(14, *profile);
        const std::string root = env.root();

        const pid_t a = spawn_guest(env, 13, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t stuck = 0;
            GCHECK_EQ(co_await g.socket(stuck), 0);
            int stuck_rc = 1;
            bool stuck_done = false;
            auto hang = [](Guest& g, uint64_t id, uint16_t hole, int& rc, bool& done) -> rt::Task<void> {
                rc = co_await g.connect(id, loopback(hole));
                done = true;
            };
            r.spawn(hang(g, stuck, hole, stuck_rc, stuck_done));
            co_await r.sleep_for(100ms);
            GCHECK(!stuck_done);
            mark(root, "a-stuck");
            // Same guest: a full socket life while the connect hangs.
            const auto t0 = std::chrono::steady_clock::now();
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            GCHECK_EQ(co_await echo_stream(g, r, id, 1 << 20, 13), 0);
            GCHECK_EQ(co_await g.release(id), 0);
            GCHECK(std::chrono::steady_clock::now() - t0 < 5s);  // generous: not "delayed until it gave up"
            GCHECK(co_await wait_mark(r, root, "b-done"));
            GCHECK(!stuck_done);  // everything above overtook the hanging connect
            // Releasing the hanging socket answers its CONNECT, then the RELEASE.
            GCHECK_EQ(co_await g.release(stuck), 0);
            for (int i = 0; i < 100 && !stuck_done; ++i) co_await r.sleep_for(5ms);
            GCHECK(stuck_done);
            GCHECK(stuck_rc < 0);
            co_return 0;
        });
        const pid_t b = spawn_guest(env, 14, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            GCHECK(co_await wait_mark(r, root, "a-stuck"));
            // The other guest, same worker: every command completes within a
            // generous bound while guest 13's connect is still pending (it
            // checks that once we are done).
            const auto t0 = std::chrono::steady_clock::now();
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            GCHECK_EQ(co_await echo_stream(g, r, id, 1 << 20, 14), 0);
            GCHECK_EQ(co_await g.release(id), 0);
            GCHECK(std::chrono::steady_clock::now() - t0 < 5s);
            mark(root, "b-done");
            co_return 0;
        });
        CHECK(SimEnv::wait_child(b) == 0);
        CHECK(SimEnv::wait_child(a) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
        for (int f : fillers) ::close(f);
        ::close(hole_fd);
        ::close(lfd);
    }
}

TEST_CASE("isolation: two guests cannot see each other's sockets") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const pid_t echo = spawn_echo_server(env, lfd, 1);
        env.attach(15, *profile);
        env.attach(16, *profile);
        const std::string root = env.root();
        const pid_t owner = spawn_guest(env, 15, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            std::ofstream(root + "/test-owner-id") << id;
            mark(root, "owner-ready");
            GCHECK(co_await wait_mark(r, root, "intruder-done"));
            GCHECK_EQ(co_await echo_stream(g, r, id, 1 << 20, 15), 0);
            GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        const pid_t intruder = spawn_guest(env, 16, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            GCHECK(co_await wait_mark(r, root, "owner-ready"));
            uint64_t theirs = 0;
            std::ifstream(root + "/test-owner-id") >> theirs;
            GCHECK(theirs != 0);
            // The other guest's id means nothing here.
            for (auto cmd : {wire::Command::release, wire::Command::poll, wire::Command::listen}) {
                auto req = raw(cmd, theirs);
                GCHECK_EQ((co_await g.call(req, 5s)).ret, -EBADF);
            }
            // And the same id can be ours, independently.
            auto sock = raw(wire::Command::socket, theirs);
            sock.domain = AF_INET, sock.type = SOCK_STREAM;
            GCHECK_EQ((co_await g.call(sock, 5s)).ret, 0);
            GCHECK_EQ((co_await g.call(raw(wire::Command::release, theirs), 5s)).ret, 0);
            mark(root, "intruder-done");
            co_return 0;
        });
        CHECK(SimEnv::wait_child(intruder) == 0);
        CHECK(SimEnv::wait_child(owner) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
        ::close(lfd);
    }
}

TEST_CASE("teardown: a guest killed with SIGKILL mid-transfer leaks nothing in xensockd") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        // Host: a sink and a source on each of 4 connections, forever.
        const pid_t host = env.spawn([lfd]() -> int {
            std::vector<std::thread> threads;
            for (int i = 0; i < 4; ++i) {
                const int c = ::accept(lfd, nullptr, nullptr);
                if (c < 0) return 2;
                threads.emplace_back([c] {
                    std::vector<char> buf(1 << 16, 'h');
                    std::thread writer([c, &buf] {
                        while (::send(c, buf.data(), buf.size(), MSG_NOSIGNAL) > 0) {
                        }
                    });
                    std::vector<char> in(1 << 16);
                    while (::recv(c, in.data(), in.size(), 0) > 0) {
                    }
                    ::shutdown(c, SHUT_RDWR);
                    writer.join();
                    ::close(c);
                });
            }
            for (auto& t : threads) t.join();
            return 0;
        });
        env.attach(17, *profile);
        const size_t baseline_fds = env.daemon_fd_count();
        const std::string root = env.root();
        const pid_t guest = spawn_guest(env, 17, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            std::vector<uint64_t> ids(4);
            for (auto& id : ids) {
                GCHECK_EQ(co_await g.socket(id), 0);
                GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
            }
            // A passive socket with a pending ACCEPT too.
            uint64_t l = 0, unused = 0;
            GCHECK_EQ(co_await g.socket(l), 0);
            GCHECK_EQ(co_await g.bind(l, loopback(free_port())), 0);
            GCHECK_EQ(co_await g.listen(l, 4), 0);
            auto wait_accept = [](Guest& g, uint64_t l, uint64_t& id) -> rt::Task<void> { (void)co_await g.accept(l, id); };
            r.spawn(wait_accept(g, l, unused));
            std::vector<std::byte> chunk(1 << 16);
            bool announced = false;
            while (true) {  // until SIGKILL
                for (auto id : ids) {
                    (void)co_await g.send(id, chunk, 1s);
                    (void)co_await g.recv(id, chunk, 1s);
                }
                if (!announced) {
                    mark(root, "streaming");
                    announced = true;
                }
            }
        });
        REQUIRE(eventually([&] { return marked(root, "streaming"); }, 30s));
        CHECK(env.daemon_ring_mappings() > 0);
        ::kill(guest, SIGKILL);
        CHECK(SimEnv::wait_child(guest) == 128 + SIGKILL);
        // The toolstack cleans up the dead domain, as xl destroy would.
        std::string why;
        CHECK_MESSAGE(toolstack::detach(env.xs(), *profile, 17, 0, 5s, &why).ok(), why);
        CHECK(eventually([&] { return env.daemon_fd_count() <= baseline_fds; }));
        CHECK(env.daemon_ring_mappings() == 0);
        CHECK(env.daemon_alive());
        CHECK(SimEnv::wait_child(host, 30s) == 0);
        ::close(lfd);
    }
}
