// End to end on sim: xensockd serving guests that are separate processes,
// against real host sockets on 127.0.0.1. Each test builds its own sim
// installation (SimEnv); guest bodies run in forked processes and report
// through their exit codes.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "guest_util.hpp"

#include "xensock/toolstack/toolstack.hpp"

#include <fcntl.h>
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

// A port nobody listens on (bound, then closed).
uint16_t free_port() {
    uint16_t port = 0;
    const int fd = host_listen(port);
    ::close(fd);
    return port;
}

// Cross-process markers for orchestration between the test and its guests
// (test plumbing only; the guests talk to xensockd through sim alone).
void mark(const std::string& root, const std::string& name) { std::ofstream(root + "/test-" + name) << "1"; }
bool marked(const std::string& root, const std::string& name) {
    return ::access((root + "/test-" + name).c_str(), F_OK) == 0;
}
rt::Task<bool> wait_mark(rt::Reactor& r, std::string root, std::string name, std::chrono::milliseconds bound = 20s) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    while (!marked(root, name)) {
        if (std::chrono::steady_clock::now() > deadline) co_return false;
        co_await r.sleep_for(5ms);
    }
    co_return true;
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
    const auto& profile = wire::xensock_v3_profile();
    SimEnv env;
    uint16_t port = 0;
    const int lfd = host_listen(port);
    const pid_t echo = spawn_echo_server(env, lfd, 2);
    env.attach(4, profile);
    const size_t baseline_fds = env.daemon_fd_count();

    // First incarnation: connects, uses a socket, then dies without closing
    // (as a crashed guest kernel would).
    const pid_t first = env.spawn([root = env.root(), port]() -> int {
        auto platform = platform::open_sim_platform(root, 4);
        rt::Reactor reactor;
        frontend::GuestOptions options;
        options.profile = &wire::xensock_v3_profile();
        auto body = [](rt::Reactor& r, platform::Platform& p, frontend::GuestOptions o, uint16_t port) -> rt::Task<int> {
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

    // Second incarnation of the same domain: resets to Initialising, and the
    // backend drops the dead connection and serves the new one.
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

TEST_CASE("daemon stop: attached guests see the backend Closed") {
    const auto& profile = wire::pvcalls_v1_profile();
    SimEnv env;
    env.attach(6, profile);
    const auto be = env.backend_path(6, profile);
    REQUIRE(env.wait_for(be + "/state", "2"));
    CHECK(env.stop_daemon() == 0);
    CHECK(env.read(be + "/state") == "6");
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

// ------------------------------------------------------------- data rings

TEST_CASE("data: bulk both directions with checksums, every ring order, 256+ MiB in all") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const unsigned first = profile->min_ring_order();
        const int streams = static_cast<int>(kMaxOrder - first + 1) + 1;
        const pid_t echo = spawn_echo_server(env, lfd, streams);
        env.attach(9, *profile);
        const pid_t guest = spawn_guest(env, 9, *profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            // 10 MiB each way per order, plus one ring whose indexes start
            // just below 2^32 so they wrap mid-stream.
            constexpr size_t kPerOrder = 10u << 20;
            for (unsigned order = first; order <= kMaxOrder; ++order) {
                uint64_t id = 0;
                GCHECK_EQ(co_await g.socket(id), 0);
                RingOptions ring;
                ring.order = order;
                GCHECK_EQ(co_await g.connect(id, loopback(port), ring), 0);
                GCHECK_EQ(g.socket_info(id)->ring_order, order);
                GCHECK_EQ(co_await echo_stream(g, r, id, kPerOrder, order), 0);
                GCHECK_EQ(co_await g.release(id), 0);
            }
            uint64_t id = 0;
            GCHECK_EQ(co_await g.socket(id), 0);
            RingOptions wrap;
            wrap.order = first;
            wrap.start_index = 0xFFFFF000u;
            GCHECK_EQ(co_await g.connect(id, loopback(port), wrap), 0);
            GCHECK_EQ(co_await echo_stream(g, r, id, 3u << 20, 99), 0);
            GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest, 300s) == 0);
        CHECK(SimEnv::wait_child(echo) == 0);
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
    const auto& profile = wire::xensock_v3_profile();
    SimEnv env;
    constexpr int kSockets = 1000;
    uint16_t port = 0;
    const int lfd = host_listen(port, 4096);
    // Host: accept them all, then echo one byte on each.
    const pid_t host = env.spawn([lfd]() -> int {
        std::vector<int> conns;
        for (int i = 0; i < kSockets; ++i) {
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
    env.attach(11, profile);
    const size_t baseline_fds = env.daemon_fd_count();
    const std::string root = env.root();
    const pid_t guest = spawn_guest(
        env, 11, profile,
        [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            std::vector<uint64_t> ids(kSockets);
            RingOptions smallest;  // one page: 2 KiB each way
            smallest.order = 0;
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
    MESSAGE("xensockd descriptors for ", kSockets, " connections: ", open_fds - baseline_fds, " beyond ",
            baseline_fds);
    CHECK(open_fds >= baseline_fds + 2 * kSockets);
    CHECK(open_fds <= baseline_fds + 2 * kSockets + 8);
    mark(root, "counted");
    CHECK(SimEnv::wait_child(guest, 120s) == 0);
    CHECK(SimEnv::wait_child(host) == 0);
    ::close(lfd);
    CHECK(eventually([&] { return env.daemon_fd_count() <= baseline_fds; }));
}

TEST_CASE("data: a guest that corrupts one ring's indexes loses that socket only") {
    const auto& profile = wire::pvcalls_v1_profile();
    SimEnv env;
    uint16_t port = 0;
    const int lfd = host_listen(port);
    const pid_t echo = env.spawn([lfd]() -> int {
        // Serve two connections at once: the broken one and the good one.
        const int a = ::accept(lfd, nullptr, nullptr);
        const int b = ::accept(lfd, nullptr, nullptr);
        // Trickle bytes into the broken socket: the backend looks at in_cons
        // each time it has something to deliver.
        std::thread trickle([a] {
            for (int i = 0; i < 1000; ++i) {
                if (::send(a, "x", 1, MSG_NOSIGNAL) <= 0) break;
                std::this_thread::sleep_for(5ms);
            }
        });
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
        return 0;
    });
    env.attach(12, profile);
    const pid_t guest = spawn_guest(env, 12, profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        uint64_t bad = 0, good = 0;
        GCHECK_EQ(co_await g.socket(bad), 0);
        GCHECK_EQ(co_await g.connect(bad, loopback(port)), 0);
        GCHECK_EQ(co_await g.socket(good), 0);
        GCHECK_EQ(co_await g.connect(good, loopback(port)), 0);
        // out_prod two rings ahead of out_cons, in_cons past in_prod.
        auto intf = *g.data_intf(bad);
        const uint32_t size = g.data_ring(bad)->size;
        intf.set_out_prod(intf.out_cons() + 2 * size);
        intf.set_in_cons(intf.in_prod() + 3 * size);
        GCHECK(g.notify_socket(bad).ok());
        for (int i = 0; i < 200 && (intf.out_error() == 0 || intf.in_error() == 0); ++i) co_await r.sleep_for(5ms);
        GCHECK_EQ(intf.out_error(), -EINVAL);
        GCHECK_EQ(intf.in_error(), -EINVAL);
        // The other socket and the command ring are untouched.
        GCHECK_EQ(co_await echo_stream(g, r, good, 2 << 20, 12), 0);
        GCHECK_EQ(co_await g.release(bad), 0);
        GCHECK_EQ(co_await g.release(good), 0);
        co_return 0;
    });
    CHECK(SimEnv::wait_child(guest) == 0);
    CHECK(SimEnv::wait_child(echo) == 0);
    ::close(lfd);
    CHECK(env.daemon_alive());
}

// ---------------------------------------------------------- independence

TEST_CASE("commands: a blackholed connect delays neither the same guest's nor another guest's commands") {
    const auto& profile = wire::xensock_v3_profile();
    SimEnv env;
    // A loopback blackhole: a listener whose accept queue is full drops SYNs,
    // so a connect to it hangs (for minutes) in SYN retransmission.
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
    env.attach(13, profile);
    env.attach(14, profile);
    const std::string root = env.root();

    const pid_t a = spawn_guest(env, 13, profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
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
        uint64_t id = 0;
        GCHECK_EQ(co_await g.socket(id), 0);
        GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
        GCHECK_EQ(co_await echo_stream(g, r, id, 1 << 20, 13), 0);
        GCHECK_EQ(co_await g.release(id), 0);
        GCHECK(co_await wait_mark(r, root, "b-done"));
        GCHECK(!stuck_done);  // everything above overtook the hanging connect
        // Releasing the hanging socket answers its CONNECT, then the RELEASE.
        GCHECK_EQ(co_await g.release(stuck), 0);
        for (int i = 0; i < 100 && !stuck_done; ++i) co_await r.sleep_for(5ms);
        GCHECK(stuck_done);
        GCHECK(stuck_rc < 0);
        co_return 0;
    });
    const pid_t b = spawn_guest(env, 14, profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        GCHECK(co_await wait_mark(r, root, "a-stuck"));
        uint64_t id = 0;
        GCHECK_EQ(co_await g.socket(id), 0);
        GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
        GCHECK_EQ(co_await echo_stream(g, r, id, 1 << 20, 14), 0);
        GCHECK_EQ(co_await g.release(id), 0);
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
