// xensockctl end to end: the real binary against a live sim (xenstored,
// xensockd, guest processes using the frontend library, host services on
// 127.0.0.1). Checks exact counters, kill of a socket and of a guest, the
// toolstack subcommands, and the documented exit codes.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "prom_check.hpp"
#include "sim_env.hpp"

#include "xensock/frontend/frontend.hpp"
#include "xensock/runtime/reactor.hpp"
#include "xensock/toolstack/toolstack.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <poll.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

using namespace xensock;
using namespace xensock::testing;
using frontend::Guest;
using nlohmann::json;

namespace {

// ---------------------------------------------------------------- running xensockctl
struct CtlRun {
    int rc = -1;
    std::string out, err;
    json parsed() const {
        try {
            return json::parse(out);
        } catch (const std::exception& e) {
            FAIL("xensockctl did not print JSON (" << e.what() << "): " << out << err);
            return {};
        }
    }
};

std::ostream& operator<<(std::ostream& os, const CtlRun& r) {
    return os << "rc=" << r.rc << "\n--- stdout\n" << r.out << "--- stderr\n" << r.err;
}

struct RunOptions {
    std::optional<uid_t> uid;                                // run as this user
    std::vector<std::pair<std::string, std::string>> env;  // set in the child
};

// Runs the program meson names in $`bin_env` with `args`. Output is
// collected from both pipes until it exits.
CtlRun run_binary(const char* bin_env, const std::vector<std::string>& args, const RunOptions& options = {}) {
    const char* bin = std::getenv(bin_env);
    REQUIRE_MESSAGE(bin, bin_env << " is not set (meson sets it for tests)");
    int out[2], err[2];
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(err, O_CLOEXEC) == 0);
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        ::dup2(out[1], 1);
        ::dup2(err[1], 2);
        // Only the arguments (and options.env) choose the daemon and xenstore.
        ::unsetenv("XENSOCK_CONTROL");
        ::unsetenv("XENSOCK_SIM_DIR");
        for (const auto& [k, v] : options.env) ::setenv(k.c_str(), v.c_str(), 1);
        // Opened before dropping privileges: another user may not be able to
        // reach the build tree (a checkout under a 0700 directory), and the
        // test is about the control socket, not about the path to the binary.
        const int exe = ::open(bin, O_PATH | O_CLOEXEC);
        if (exe < 0) _exit(127);
        if (options.uid && (::setgid(*options.uid) != 0 || ::setuid(*options.uid) != 0)) _exit(126);
        std::vector<std::string> argv_s{bin};
        argv_s.insert(argv_s.end(), args.begin(), args.end());
        std::vector<char*> argv;
        for (auto& a : argv_s) argv.push_back(a.data());
        argv.push_back(nullptr);
        ::fexecve(exe, argv.data(), environ);
        _exit(127);
    }
    ::close(out[1]);
    ::close(err[1]);
    CtlRun r;
    pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    std::string* sinks[2] = {&r.out, &r.err};
    int open = 2;
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (open > 0 && std::chrono::steady_clock::now() < deadline) {
        if (::poll(fds, 2, 1000) <= 0) continue;
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP))) continue;
            char buf[4096];
            const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
            if (n > 0) {
                sinks[i]->append(buf, static_cast<size_t>(n));
            } else {
                ::close(fds[i].fd);
                fds[i].fd = -1;
                --open;
            }
        }
    }
    for (auto& f : fds)
        if (f.fd >= 0) ::close(f.fd);
    r.rc = SimEnv::wait_child(pid, 10s);
    return r;
}

// The real xensockctl.
CtlRun run_ctl(const std::vector<std::string>& args, const RunOptions& options = {}) {
    return run_binary("XENSOCK_XENSOCKCTL", args, options);
}

CtlRun ctl(SimEnv& env, std::vector<std::string> args) {
    args.insert(args.begin(), {"--sim", env.root()});
    auto r = run_ctl(args);
    // XENSOCK_TEST_SHOW=1 prints every command and its output (for docs).
    if (std::getenv("XENSOCK_TEST_SHOW"))
        std::fprintf(stderr, "$ xensockctl %s\n%s%s[exit %d]\n", fmt::format("{}", fmt::join(args, " ")).c_str(),
                     r.out.c_str(), r.err.c_str(), r.rc);
    return r;
}

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) out.push_back(line);
    return out;
}

// A table whose last column is right-aligned has lines of one length.
void check_aligned(const std::string& table) {
    const auto lines = lines_of(table);
    REQUIRE(lines.size() >= 2);
    for (const auto& l : lines) CHECK_MESSAGE(l.size() == lines[0].size(), table);
}

// ---------------------------------------------------------------- guests
#define GCHECK(cond)                                                                                  \
    do {                                                                                              \
        if (!(cond)) {                                                                                \
            std::fprintf(stderr, "guest check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond);     \
            co_return 1;                                                                              \
        }                                                                                             \
    } while (0)
#define GCHECK_EQ(a, b)                                                                                    \
    do {                                                                                                   \
        const auto va_ = (a);                                                                              \
        const auto vb_ = (b);                                                                              \
        if (!(va_ == vb_)) {                                                                               \
            std::fprintf(stderr, "guest check failed at %s:%d: %s == %s (%lld vs %lld)\n", __FILE__, __LINE__, \
                         #a, #b, static_cast<long long>(va_), static_cast<long long>(vb_));               \
            co_return 1;                                                                                   \
        }                                                                                                  \
    } while (0)

using GuestBody = std::function<rt::Task<int>(Guest&, rt::Reactor&)>;

rt::Task<int> guest_main(rt::Reactor& reactor, platform::Platform& platform, frontend::GuestOptions options,
                         const GuestBody& body) {
    auto guest = co_await Guest::attach(reactor, platform, options);
    const int rc = co_await body(*guest, reactor);
    co_await guest->close();
    co_return rc;
}

pid_t spawn_guest(SimEnv& env, platform::DomId domid, const wire::ProtocolProfile& profile, GuestBody body) {
    const std::string root = env.root();
    return env.spawn([root, domid, &profile, body]() -> int {
        auto platform = platform::open_sim_platform(root, domid);
        rt::Reactor reactor;
        frontend::GuestOptions options;
        options.profile = &profile;
        return reactor.run_until(guest_main(reactor, *platform, options, body));
    });
}

// One guest domain with both devices: a xensock and a pvcalls Guest in one
// process (one domain), on one reactor.
using PairBody = std::function<rt::Task<int>(Guest& xensock, Guest& pvcalls, rt::Reactor&)>;

rt::Task<int> guest_pair_main(rt::Reactor& reactor, platform::Platform& platform, const PairBody& body) {
    frontend::GuestOptions xo, po;
    xo.profile = &wire::xensock_v3_profile();
    po.profile = &wire::pvcalls_v1_profile();
    auto x = co_await Guest::attach(reactor, platform, xo);
    auto p = co_await Guest::attach(reactor, platform, po);
    const int rc = co_await body(*x, *p, reactor);
    co_await p->close();
    co_await x->close();
    co_return rc;
}

pid_t spawn_guest_pair(SimEnv& env, platform::DomId domid, PairBody body) {
    const std::string root = env.root();
    return env.spawn([root, domid, body]() -> int {
        auto platform = platform::open_sim_platform(root, domid);
        rt::Reactor reactor;
        return reactor.run_until(guest_pair_main(reactor, *platform, body));
    });
}

sockaddr_in loopback(uint16_t port) { return *frontend::ipv4("127.0.0.1", port); }

int host_listen(uint16_t& port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = loopback(port);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0 || ::listen(fd, 64) < 0) {
        ::close(fd);
        return -1;
    }
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
    return fd;
}

uint16_t free_port() {
    uint16_t port = 0;
    ::close(host_listen(port));
    return port;
}

// Test plumbing between the test and its guest processes (files in the
// sim root); the guests talk to xensockd through the sim only.
void mark(const std::string& root, const std::string& name, const std::string& value = "1") {
    std::ofstream(root + "/test-" + name) << value;
}
std::optional<std::string> marked(const std::string& root, const std::string& name) {
    std::ifstream in(root + "/test-" + name);
    if (!in) return std::nullopt;
    std::string v;
    std::getline(in, v);
    return v;
}
rt::Task<bool> wait_mark(rt::Reactor& r, std::string root, std::string name, std::chrono::milliseconds bound = 60s) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    while (!marked(root, name)) {
        if (std::chrono::steady_clock::now() > deadline) co_return false;
        co_await r.sleep_for(5ms);
    }
    co_return true;
}
bool wait_marked(const std::string& root, const std::string& name, std::chrono::milliseconds bound = 60s) {
    return eventually([&] { return marked(root, name).has_value(); }, bound);
}

// The host service: per connection, an 8-byte header [n, m] (u32 each),
// then it reads n bytes, writes m bytes, and echoes everything else until
// EOF. So each connection moves an exact, known number of bytes.
pid_t spawn_script_server(SimEnv& env, int listen_fd) {
    return env.spawn([listen_fd]() -> int {
        while (true) {
            const int c = ::accept(listen_fd, nullptr, nullptr);
            if (c < 0) return 2;
            std::thread([c] {
                auto read_exact = [c](char* p, size_t len) {
                    while (len > 0) {
                        const ssize_t n = ::recv(c, p, len, 0);
                        if (n <= 0) return false;
                        p += n;
                        len -= static_cast<size_t>(n);
                    }
                    return true;
                };
                auto write_all = [c](const char* p, size_t len) {
                    while (len > 0) {
                        const ssize_t n = ::send(c, p, len, MSG_NOSIGNAL);
                        if (n <= 0) return false;
                        p += n;
                        len -= static_cast<size_t>(n);
                    }
                    return true;
                };
                uint32_t header[2];
                std::vector<char> buf(1 << 16);
                if (read_exact(reinterpret_cast<char*>(header), sizeof header)) {
                    bool ok = true;
                    for (uint32_t left = header[0]; ok && left > 0;) {
                        const uint32_t n = std::min<uint32_t>(left, static_cast<uint32_t>(buf.size()));
                        ok = read_exact(buf.data(), n);
                        left -= n;
                    }
                    std::fill(buf.begin(), buf.end(), 'h');
                    for (uint32_t left = header[1]; ok && left > 0;) {
                        const uint32_t n = std::min<uint32_t>(left, static_cast<uint32_t>(buf.size()));
                        ok = write_all(buf.data(), n);
                        left -= n;
                    }
                    while (ok) {
                        const ssize_t n = ::recv(c, buf.data(), buf.size(), 0);
                        ok = n > 0 && write_all(buf.data(), static_cast<size_t>(n));
                    }
                }
                ::close(c);
            }).detach();
        }
    });
}

// Guest side of one scripted exchange: sends 8 + n bytes, receives m.
rt::Task<int> scripted(Guest& g, uint64_t id, uint32_t n, uint32_t m) {
    const uint32_t header[2] = {n, m};
    GCHECK_EQ(co_await g.send_all(id, std::as_bytes(std::span(header)), 30s), static_cast<ssize_t>(sizeof header));
    std::vector<std::byte> out(n, std::byte{'g'});
    GCHECK_EQ(co_await g.send_all(id, out, 30s), static_cast<ssize_t>(n));
    std::vector<std::byte> in(m);
    GCHECK_EQ(co_await g.recv_exact(id, in, 30s), static_cast<ssize_t>(m));
    co_return 0;
}

json session(const json& answer, unsigned domid) {
    if (answer.contains("sessions"))
        for (const auto& s : answer["sessions"])
            if (s["domid"] == domid) return s;
    FAIL("no session for domid " << domid << " in " << answer.dump());
    return {{"sockets", json::array()}};
}

json session_of(const json& answer, unsigned domid, const std::string& protocol) {
    for (const auto& s : answer["sessions"])
        if (s["domid"] == domid && s["protocol"] == protocol) return s;
    FAIL("no " << protocol << " session for domid " << domid << " in " << answer.dump());
    return {{"sockets", json::array()}};
}

// The socket `sockid` of a session (a copy); kind and state "absent" if none.
json socket_of(const json& session, uint64_t sockid) {
    for (const auto& k : session["sockets"])
        if (k["sockid"] == sockid) return k;
    return {{"kind", "absent"}, {"state", "absent"}};
}

}  // namespace

// ------------------------------------------------------------------ tests

TEST_CASE("list, list --sockets and stats show exactly what the guests did") {
    SimEnvOptions options;
    options.workers = 2;  // sessions on both workers: list gathers them all
    SimEnv env(options);
    const std::string root = env.root();
    uint16_t port = 0;
    const int lfd = host_listen(port);
    REQUIRE(lfd >= 0);
    spawn_script_server(env, lfd);
    const uint16_t closed_port = free_port();
    const uint16_t listen5 = free_port(), listen6 = free_port();

    env.attach(5, wire::xensock_v3_profile());
    env.attach(6, wire::pvcalls_v1_profile());
    env.attach(8, wire::xensock_v3_profile());
    const pid_t g5 = spawn_guest(env, 5, wire::xensock_v3_profile(), [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        uint64_t a = 0, b = 0, l = 0, c = 0;
        GCHECK_EQ(co_await g.socket(a), 0);
        GCHECK_EQ(co_await g.connect(a, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(g, a, 1000, 3000), 0);
        GCHECK_EQ(co_await g.socket(b), 0);
        GCHECK_EQ(co_await g.connect(b, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(g, b, 12345, 54321), 0);
        GCHECK_EQ(co_await g.socket(l), 0);
        GCHECK_EQ(co_await g.bind(l, loopback(listen5)), 0);
        GCHECK_EQ(co_await g.listen(l, 8), 0);
        GCHECK_EQ(co_await g.socket(c), 0);
        GCHECK_EQ(co_await g.connect(c, loopback(closed_port)), -ECONNREFUSED);
        mark(root, "ready5", fmt::format("{} {} {}", a, b, l));
        GCHECK(co_await wait_mark(r, root, "done"));
        co_return 0;
    });
    const pid_t g6 = spawn_guest(env, 6, wire::pvcalls_v1_profile(), [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        uint64_t a = 0, l = 0;
        GCHECK_EQ(co_await g.socket(a), 0);
        GCHECK_EQ(co_await g.connect(a, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(g, a, 777, 4096), 0);
        GCHECK_EQ(co_await g.socket(l), 0);
        GCHECK_EQ(co_await g.bind(l, loopback(listen6)), 0);
        GCHECK_EQ(co_await g.listen(l, 8), 0);
        mark(root, "ready6");
        GCHECK(co_await wait_mark(r, root, "done"));
        co_return 0;
    });
    const pid_t g8 = spawn_guest(env, 8, wire::xensock_v3_profile(), [=](Guest&, rt::Reactor& r) -> rt::Task<int> {
        mark(root, "ready8");
        GCHECK(co_await wait_mark(r, root, "done"));
        co_return 0;
    });
    REQUIRE(wait_marked(root, "ready5"));
    REQUIRE(wait_marked(root, "ready6"));
    REQUIRE(wait_marked(root, "ready8"));
    uint64_t a5 = 0, b5 = 0, l5 = 0;
    std::istringstream(*marked(root, "ready5")) >> a5 >> b5 >> l5;

    const uint64_t from5 = 8 + 1000 + 8 + 12345, to5 = 3000 + 54321;
    const uint64_t from6 = 8 + 777, to6 = 4096;

    SUBCASE("list --json") {
        const auto r = ctl(env, {"list", "--json"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        const auto j = r.parsed();
        REQUIRE(j["sessions"].size() == 3);
        const auto& s5 = session(j, 5);
        CHECK(s5["protocol"] == "xensock");
        CHECK(s5["backend_state"] == 4);
        CHECK(s5["frontend_state"] == 4);
        CHECK(s5["active_sockets"] == 2);
        CHECK(s5["passive_sockets"] == 1);
        CHECK(s5["bytes_from_guest"] == from5);
        CHECK(s5["bytes_to_guest"] == to5);
        const auto& s6 = session(j, 6);
        CHECK(s6["protocol"] == "pvcalls");
        CHECK(s6["active_sockets"] == 1);
        CHECK(s6["passive_sockets"] == 1);
        CHECK(s6["bytes_from_guest"] == from6);
        CHECK(s6["bytes_to_guest"] == to6);
        const auto& s8 = session(j, 8);
        CHECK(s8["active_sockets"] == 0);
        CHECK(s8["bytes_to_guest"] == 0);
        CHECK(s8["uptime_seconds"].get<double>() >= 0);
    }
    SUBCASE("list (table)") {
        const auto r = ctl(env, {"list"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        INFO(r.out);
        check_aligned(r.out);
        const auto lines = lines_of(r.out);
        REQUIRE(lines.size() == 4);
        CHECK(lines[0].starts_with("DOMID  PROTOCOL  STATE"));
        // Row for domid 5: every column, in order.
        std::istringstream row(lines[1]);
        std::string domid, proto, state, fe, active, passive, from, to, uptime;
        row >> domid >> proto >> state >> fe >> active >> passive >> from >> to >> uptime;
        CHECK(domid == "5");
        CHECK(proto == "xensock");
        CHECK(state == "Connected");
        CHECK(fe == "Connected");
        CHECK(active == "2");
        CHECK(passive == "1");
        CHECK(from == std::to_string(from5));
        CHECK(to == std::to_string(to5));
        CHECK(lines[2].find("pvcalls") != std::string::npos);
        CHECK(lines[3].starts_with("    8  xensock"));
    }
    SUBCASE("list 6 shows only domid 6") {
        const auto r = ctl(env, {"list", "6", "--json"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        const auto j = r.parsed();
        REQUIRE(j["sessions"].size() == 1);
        CHECK(j["sessions"][0]["domid"] == 6);
    }
    SUBCASE("list --sockets 5: per socket bytes, queues, addresses") {
        auto r = ctl(env, {"list", "--sockets", "5", "--json"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        const json s5 = session(r.parsed(), 5);
        const json& sockets = s5["sockets"];
        auto find = [&](uint64_t id) -> json {
            for (const auto& k : sockets)
                if (k["sockid"] == id) return k;
            FAIL("no socket " << id << " in " << sockets.dump());
            return {};
        };
        const auto a = find(a5), b = find(b5), l = find(l5);
        CHECK(a["kind"] == "active");
        CHECK(a["bytes_from_guest"] == 1008);
        CHECK(a["bytes_to_guest"] == 3000);
        CHECK(a["in_queued"] == 0);
        CHECK(a["out_queued"] == 0);
        CHECK(a["remote"] == fmt::format("127.0.0.1:{}", port));
        CHECK(a["ring_order"].get<unsigned>() >= 1);
        CHECK(b["bytes_from_guest"] == 8 + 12345);
        CHECK(b["bytes_to_guest"] == 54321);
        CHECK(l["kind"] == "passive");
        CHECK(l["local"] == fmt::format("127.0.0.1:{}", listen5));

        r = ctl(env, {"list", "--sockets"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        INFO(r.out);
        check_aligned(r.out);
        CHECK(r.out.starts_with("DOMID  PROTOCOL  SOCKID  KIND"));
        bool saw_b = false;
        for (const auto& line : lines_of(r.out)) {
            std::istringstream row(line);
            std::string domid, proto, sockid, kind, state, local, remote, order, from, to, inq, outq;
            row >> domid >> proto >> sockid >> kind >> state >> local >> remote >> order >> from >> to >> inq >> outq;
            if (domid != "5" || sockid != std::to_string(b5)) continue;
            saw_b = true;
            CHECK(kind == "active");
            CHECK(remote == fmt::format("127.0.0.1:{}", port));
            CHECK(from == "12353");
            CHECK(to == "54321");
            CHECK(inq == "0");
            CHECK(outq == "0");
        }
        CHECK(saw_b);
        // Sockets of domid 6 are there too (pvcalls).
        CHECK(r.out.find(fmt::format("127.0.0.1:{}", listen6)) != std::string::npos);
    }
    SUBCASE("stats: commands by type and result, errors by errno, totals") {
        auto r = ctl(env, {"stats", "5", "--json"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        const auto j = r.parsed();
        const json s5 = session(j, 5);
        const json& c = s5["counters"];
        CHECK(c["commands_socket"] == 4);
        CHECK(c["commands_connect"] == 3);
        CHECK(c["command_errors_connect"] == 1);
        CHECK(c["command_ok_connect"] == 2);
        CHECK(c["command_ok_socket"] == 4);
        CHECK(c["commands_bind"] == 1);
        CHECK(c["commands_listen"] == 1);
        CHECK(c["command_errors_socket"] == 0);
        CHECK(c["errno_111"] == 1);  // ECONNREFUSED
        CHECK(c["notifications_received"].get<uint64_t>() > 0);
        CHECK(c["notifications_sent"].get<uint64_t>() > 0);
        CHECK(j["totals"]["bytes_from_guest"] == from5);
        CHECK(j["daemon"]["pid"] == env.daemon_pid());

        r = ctl(env, {"stats", "--json"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        const auto all = r.parsed();
        CHECK(all["totals"]["sessions"] == 3);
        CHECK(all["totals"]["bytes_from_guest"] == from5 + from6);
        CHECK(all["totals"]["bytes_to_guest"] == to5 + to6);
        CHECK(all["totals"]["active_sockets"] == 3);
        CHECK(all["totals"]["counters"]["commands_socket"] == 4 + 2);

        r = ctl(env, {"stats"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        INFO(r.out);
        CHECK(r.out.find("domid 5 xensock: Connected") != std::string::npos);
        CHECK(r.out.find("domid 6 pvcalls: Connected") != std::string::npos);
        CHECK(r.out.find("ECONNREFUSED") != std::string::npos);
        CHECK(r.out.find("all 3 sessions") != std::string::npos);
    }
    SUBCASE("stats --prometheus parses and carries the same numbers") {
        const auto r = ctl(env, {"stats", "--prometheus"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        INFO(r.out);
        const auto p = prom::parse(r.out);
        REQUIRE_MESSAGE(p.error.empty(), p.error);
        const std::vector<std::pair<std::string, std::string>> d5{{"domid", "5"}, {"protocol", "xensock"}};
        const std::vector<std::pair<std::string, std::string>> d6{{"domid", "6"}, {"protocol", "pvcalls"}};
        auto with = [](auto labels, std::string k, std::string v) {
            labels.emplace_back(std::move(k), std::move(v));
            return labels;
        };
        CHECK(p.value("xensock_sessions", {}) == 3);
        CHECK(p.value("xensock_bytes_from_guest_total", d5) == from5);
        CHECK(p.value("xensock_bytes_to_guest_total", d5) == to5);
        CHECK(p.value("xensock_bytes_from_guest_total", d6) == from6);
        CHECK(p.value("xensock_bytes_to_guest_total", d6) == to6);
        CHECK(p.value("xensock_commands_total", with(d5, "command", "connect")) == 3);
        CHECK(p.types.count("xensock_command_errors_total") == 0);  // command_results_total{result="error"}
        CHECK(p.value("xensock_command_results_total", with(with(d5, "command", "connect"), "result", "ok")) == 2);
        CHECK(p.value("xensock_command_results_total", with(with(d5, "command", "connect"), "result", "error")) ==
              1);
        CHECK(p.value("xensock_errors_total", with(d5, "errno", "ECONNREFUSED")) == 1);
        CHECK(p.value("xensock_sockets_active", d5) == 2);
        CHECK(p.value("xensock_session_backend_state", d6) == 4);
        CHECK(p.types.at("xensock_commands_total") == "counter");
        CHECK(p.types.at("xensock_sockets_active") == "gauge");

        const auto one = ctl(env, {"stats", "6", "--prometheus"});
        REQUIRE_MESSAGE(one.rc == 0, one);
        const auto p6 = prom::parse(one.out);
        REQUIRE_MESSAGE(p6.error.empty(), p6.error);
        CHECK(p6.value("xensock_bytes_to_guest_total", d6) == to6);
        CHECK(!p6.value("xensock_bytes_to_guest_total", d5));
        // The series are filtered; the session gauge still counts all of them.
        CHECK(p6.value("xensock_sessions", {}) == 3);
    }

    mark(root, "done");
    CHECK(SimEnv::wait_child(g5) == 0);
    CHECK(SimEnv::wait_child(g6) == 0);
    CHECK(SimEnv::wait_child(g8) == 0);
    ::close(lfd);
}

TEST_CASE("kill DOMID SOCKID: that socket fails in the guest, the others keep working") {
    SimEnv env;
    const std::string root = env.root();
    uint16_t port = 0;
    const int lfd = host_listen(port);
    spawn_script_server(env, lfd);
    env.attach(7, wire::xensock_v3_profile());
    const uint16_t listen_port = free_port();
    const pid_t guest = spawn_guest(env, 7, wire::xensock_v3_profile(), [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        uint64_t a = 0, b = 0, l = 0;
        GCHECK_EQ(co_await g.socket(a), 0);
        GCHECK_EQ(co_await g.connect(a, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(g, a, 10, 20), 0);
        GCHECK_EQ(co_await g.socket(b), 0);
        GCHECK_EQ(co_await g.connect(b, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(g, b, 30, 40), 0);
        GCHECK_EQ(co_await g.socket(l), 0);
        GCHECK_EQ(co_await g.bind(l, loopback(listen_port)), 0);
        GCHECK_EQ(co_await g.listen(l, 4), 0);
        mark(root, "ready", fmt::format("{} {} {}", a, b, l));
        GCHECK(co_await wait_mark(r, root, "killed"));
        // The killed socket: the error is on its ring.
        std::vector<std::byte> buf(5000, std::byte{'x'});
        const ssize_t got = co_await g.recv(a, buf, 10s);
        if (got != -ECONNRESET) std::fprintf(stderr, "guest: recv on the killed socket gave %zd\n", got);
        GCHECK_EQ(got, -ECONNRESET);
        GCHECK(co_await g.send(a, buf, 10s) < 0);
        // The other socket: a full echo round trip.
        GCHECK_EQ(co_await g.send_all(b, buf, 10s), 5000);
        std::vector<std::byte> echo(5000);
        GCHECK_EQ(co_await g.recv_exact(b, echo, 10s), 5000);
        GCHECK(echo == buf);
        (void)co_await g.release(a);
        GCHECK_EQ(co_await g.release(b), 0);
        (void)co_await g.release(l);
        GCHECK(g.connected());
        co_return 0;
    });
    REQUIRE(wait_marked(root, "ready"));
    uint64_t a = 0, b = 0, l = 0;
    std::istringstream(*marked(root, "ready")) >> a >> b >> l;

    auto r = ctl(env, {"kill", "7", std::to_string(a)});
    CHECK_MESSAGE(r.rc == 0, r);
    CHECK(r.out.find(fmt::format("domid 7 socket {}: closed", a)) != std::string::npos);
    // It shows as killed until the guest releases it; the other is untouched.
    CHECK(eventually([&] {
        const auto l = ctl(env, {"list", "--sockets", "7", "--json"});
        if (l.rc != 0) return false;
        bool killed = false, other_active = false;
        const json s7 = session(l.parsed(), 7);
        for (const auto& k : s7["sockets"]) {
            if (k["sockid"] == a) killed = k["state"] == "killed";
            if (k["sockid"] == b) other_active = k["kind"] == "active" && k["state"] != "killed";
        }
        return killed && other_active;
    }));
    // A killed listening socket is still listed as the passive socket it was.
    r = ctl(env, {"kill", "7", std::to_string(l)});
    CHECK_MESSAGE(r.rc == 0, r);
    CHECK(eventually([&] {
        const auto l7 = ctl(env, {"list", "--sockets", "7", "--json"});
        return l7.rc == 0 && socket_of(session(l7.parsed(), 7), l)["state"] == "killed";
    }));
    {
        const auto l7 = ctl(env, {"list", "--sockets", "7", "--json"});
        REQUIRE_MESSAGE(l7.rc == 0, l7);
        const json s7 = session(l7.parsed(), 7);
        CHECK_MESSAGE(socket_of(s7, l)["kind"] == "passive", s7.dump());
        CHECK(s7["passive_sockets"] == 0);  // nothing listens any more
    }
    // Unknown socket, unknown guest: exit 3 and a message.
    r = ctl(env, {"kill", "7", "424242"});
    CHECK_MESSAGE(r.rc == 3, r);
    CHECK(r.err.find("no socket 424242 in domid 7") != std::string::npos);
    r = ctl(env, {"kill", "77"});
    CHECK_MESSAGE(r.rc == 3, r);

    // The session itself stays connected.
    const auto l7 = ctl(env, {"list", "7", "--json"});
    REQUIRE_MESSAGE(l7.rc == 0, l7);
    CHECK(session(l7.parsed(), 7)["backend_state"] == 4);
    CHECK(session(l7.parsed(), 7)["active_sockets"] == 1);

    mark(root, "killed");
    CHECK(SimEnv::wait_child(guest) == 0);
    ::close(lfd);
}

// Guest exit code: the connection went down but its data rings show no error.
constexpr int kNoRingError = 3;

TEST_CASE("kill DOMID: the guest is disconnected and xensockd keeps no fd or mapping of it") {
    SimEnv env;
    const std::string root = env.root();
    uint16_t port = 0;
    const int lfd = host_listen(port);
    spawn_script_server(env, lfd);
    const uint16_t listen_port = free_port();
    const auto& profile = wire::pvcalls_v1_profile();
    env.attach(9, profile);
    const auto be = env.backend_path(9, profile);
    REQUIRE(env.wait_for(be + "/state", "2"));
    const size_t baseline_fds = env.daemon_fd_count();
    const size_t baseline_sockets = env.daemon_sockets();

    const pid_t guest = spawn_guest(env, 9, profile, [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        uint64_t a = 0, b = 0, l = 0, pending = 0;
        for (uint64_t* id : {&a, &b}) {
            GCHECK_EQ(co_await g.socket(*id), 0);
            GCHECK_EQ(co_await g.connect(*id, loopback(port)), 0);
            GCHECK_EQ(co_await scripted(g, *id, 100, 100), 0);
        }
        GCHECK_EQ(co_await g.socket(l), 0);
        GCHECK_EQ(co_await g.bind(l, loopback(listen_port)), 0);
        GCHECK_EQ(co_await g.listen(l, 4), 0);
        int accept_rc = 1;
        bool accept_done = false;
        auto wait_accept = [](Guest& g, uint64_t l, uint64_t& id, int& rc, bool& done) -> rt::Task<void> {
            rc = co_await g.accept(l, id);
            done = true;
        };
        r.spawn(wait_accept(g, l, pending, accept_rc, accept_done));
        mark(root, "ready");
        // Kill: the backend leaves Connected; everything fails with ENOTCONN.
        const auto deadline = std::chrono::steady_clock::now() + 30s;
        while (g.connected() && std::chrono::steady_clock::now() < deadline) co_await r.sleep_for(5ms);
        GCHECK(!g.connected());
        std::vector<std::byte> buf(16);
        GCHECK(co_await g.recv(a, buf, 5s) < 0);
        for (int i = 0; i < 1000 && !accept_done; ++i) co_await r.sleep_for(5ms);
        GCHECK(accept_done);
        GCHECK(accept_rc < 0);
        // The backend writes Closing only after tearing the connection down,
        // so by now each data ring must carry an error in both halves.
        for (uint64_t id : {a, b}) {
            const auto intf = g.data_intf(id);
            GCHECK(intf.has_value());
            if (intf->in_error() == 0 || intf->out_error() == 0) {
                std::fprintf(stderr, "guest: socket %llu after kill: in_error %d, out_error %d (want both set)\n",
                             static_cast<unsigned long long>(id), intf->in_error(), intf->out_error());
                co_return kNoRingError;
            }
        }
        co_return 0;
    });
    REQUIRE(wait_marked(root, "ready"));
    CHECK(env.daemon_ring_mappings() > 0);
    CHECK(env.daemon_sockets() > baseline_sockets);

    auto r = ctl(env, {"kill", "9"});
    CHECK_MESSAGE(r.rc == 0, r);
    CHECK(r.out.find("domid 9: disconnecting") != std::string::npos);
    // xenbus: the backend goes Closing; the guest closes; no resources left.
    CHECK(eventually([&] {
        const auto s = env.read(be + "/state");
        return s == "5" || s == "6";
    }));
    const int guest_rc = SimEnv::wait_child(guest);
    CHECK_MESSAGE(guest_rc != kNoRingError, "xensockd tore the guest's connection down without setting "
                                            "in_error/out_error on its data rings");
    CHECK(guest_rc == 0);
    CHECK(eventually([&] { return env.daemon_ring_mappings() == 0; }));
    CHECK(eventually([&] { return env.daemon_sockets() <= baseline_sockets; }));
    CHECK(eventually([&] { return env.daemon_fd_count() <= baseline_fds; }));
    r = ctl(env, {"list", "9", "--json"});
    CHECK_MESSAGE(r.rc == 0, r);
    if (r.rc == 0) CHECK(session(r.parsed(), 9)["active_sockets"] == 0);

    // The toolstack removes the device; then the session is gone: exit 3.
    r = ctl(env, {"detach", "--domid", "9"});
    CHECK_MESSAGE(r.rc == 0, r);
    CHECK(r.out.find("detached domid 9 (pvcalls") != std::string::npos);
    CHECK(eventually([&] { return ctl(env, {"list", "9"}).rc == 3; }));
    CHECK(env.read(be + "/state").empty());
    CHECK(eventually([&] { return env.daemon_fd_count() <= baseline_fds; }));
    CHECK(env.daemon_ring_mappings() == 0);
    CHECK(env.daemon_alive());
    ::close(lfd);
}

TEST_CASE("kill with a guest that has a xensock and a pvcalls device: a SOCKID in both needs --protocol") {
    SimEnv env;
    const std::string root = env.root();
    uint16_t port = 0;
    const int lfd = host_listen(port);
    REQUIRE(lfd >= 0);
    spawn_script_server(env, lfd);
    env.attach(5, wire::xensock_v3_profile());
    env.attach(5, wire::pvcalls_v1_profile());
    const auto xs_state = env.backend_path(5, wire::xensock_v3_profile()) + "/state";
    const auto pv_state = env.backend_path(5, wire::pvcalls_v1_profile()) + "/state";
    const pid_t guest = spawn_guest_pair(env, 5, [=](Guest& x, Guest& p, rt::Reactor& r) -> rt::Task<int> {
        uint64_t xa = 0, pa = 0;
        GCHECK_EQ(co_await x.socket(xa), 0);
        GCHECK_EQ(co_await x.connect(xa, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(x, xa, 10, 20), 0);
        GCHECK_EQ(co_await p.socket(pa), 0);
        GCHECK_EQ(co_await p.connect(pa, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(p, pa, 30, 40), 0);
        mark(root, "ready", fmt::format("{} {}", xa, pa));
        GCHECK(co_await wait_mark(r, root, "socket-killed"));
        // Only the xensock device's socket was closed...
        std::vector<std::byte> buf(100, std::byte{'x'});
        GCHECK_EQ(co_await x.recv(xa, buf, 10s), -ECONNRESET);
        // ...the pvcalls one with the same sockid still echoes.
        GCHECK_EQ(co_await p.send_all(pa, buf, 10s), 100);
        std::vector<std::byte> echo(100);
        GCHECK_EQ(co_await p.recv_exact(pa, echo, 10s), 100);
        GCHECK(echo == buf);
        mark(root, "checked");
        GCHECK(co_await wait_mark(r, root, "pvcalls-killed"));
        auto deadline = std::chrono::steady_clock::now() + 30s;
        while (p.connected() && std::chrono::steady_clock::now() < deadline) co_await r.sleep_for(5ms);
        GCHECK(!p.connected());
        GCHECK(x.connected());
        // The xensock device still works.
        uint64_t xb = 0;
        GCHECK_EQ(co_await x.socket(xb), 0);
        GCHECK_EQ(co_await x.connect(xb, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(x, xb, 5, 6), 0);
        mark(root, "pvcalls-checked");
        GCHECK(co_await wait_mark(r, root, "all-killed"));
        deadline = std::chrono::steady_clock::now() + 30s;
        while (x.connected() && std::chrono::steady_clock::now() < deadline) co_await r.sleep_for(5ms);
        GCHECK(!x.connected());
        co_return 0;
    });
    REQUIRE(wait_marked(root, "ready"));
    uint64_t xa = 0, pa = 0;
    std::istringstream(*marked(root, "ready")) >> xa >> pa;
    // Each Guest numbers its sockets from 1: the same sockid in both sessions.
    REQUIRE_MESSAGE(xa == pa, "the frontend no longer gives both devices' first socket the same id");
    const std::string id = std::to_string(xa);

    // list --sockets: both sockets, told apart by the PROTOCOL column.
    auto r = ctl(env, {"list", "--sockets", "5"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    std::set<std::string> protocols;
    for (const auto& line : lines_of(r.out)) {
        std::istringstream row(line);
        std::string domid, proto, sockid;
        row >> domid >> proto >> sockid;
        if (domid == "5" && sockid == id) protocols.insert(proto);
    }
    CHECK(protocols == std::set<std::string>{"pvcalls", "xensock"});

    // Ambiguous: refused with the usage exit code, naming the choices.
    r = ctl(env, {"kill", "5", id});
    CHECK_MESSAGE(r.rc == 2, r);
    CHECK(r.err.find(fmt::format("domid 5 has a socket {} in more than one session; nothing was closed", id)) !=
          std::string::npos);
    CHECK(r.err.find(fmt::format("xensockctl kill 5 {} --protocol xensock", id)) != std::string::npos);
    CHECK(r.err.find(fmt::format("xensockctl kill 5 {} --protocol pvcalls", id)) != std::string::npos);
    r = ctl(env, {"kill", "5", id, "--json"});
    CHECK_MESSAGE(r.rc == 2, r);
    CHECK(r.parsed()["exit_code"] == 2);
    r = ctl(env, {"list", "--sockets", "5", "--json"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    CHECK(socket_of(session_of(r.parsed(), 5, "xensock"), xa)["state"] == "connected");
    CHECK(socket_of(session_of(r.parsed(), 5, "pvcalls"), pa)["state"] == "connected");

    // A selector that matches nothing: not found.
    r = ctl(env, {"kill", "5", id, "--protocol", "pvcalls", "--devid", "1"});
    CHECK_MESSAGE(r.rc == 3, r);
    CHECK(r.err.find(fmt::format("no socket {} in domid 5 (pvcalls devid 1)", id)) != std::string::npos);
    CHECK(ctl(env, {"kill", "5", id, "--protocol", "udp"}).rc == 2);

    // --protocol picks one.
    r = ctl(env, {"kill", "5", id, "--protocol", "xensock"});
    CHECK_MESSAGE(r.rc == 0, r);
    CHECK(r.out.find(fmt::format("domid 5 socket {}: closed (xensock)", id)) != std::string::npos);
    CHECK(eventually([&] {
        const auto l = ctl(env, {"list", "--sockets", "5", "--json"});
        return l.rc == 0 && socket_of(session_of(l.parsed(), 5, "xensock"), xa)["state"] == "killed";
    }));
    r = ctl(env, {"list", "--sockets", "5", "--json"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    CHECK(socket_of(session_of(r.parsed(), 5, "pvcalls"), pa)["state"] == "connected");
    mark(root, "socket-killed");
    REQUIRE(wait_marked(root, "checked"));

    // kill DOMID --protocol: that session only.
    r = ctl(env, {"kill", "5", "--protocol", "pvcalls", "--json"});
    CHECK_MESSAGE(r.rc == 0, r);
    REQUIRE(r.parsed()["sessions"].size() == 1);
    CHECK(r.parsed()["sessions"][0]["protocol"] == "pvcalls");
    CHECK(eventually([&] {
        const auto st = env.read(pv_state);
        return st == "5" || st == "6";
    }));
    CHECK(env.read(xs_state) == "4");
    mark(root, "pvcalls-killed");
    REQUIRE(wait_marked(root, "pvcalls-checked"));

    // kill DOMID: every session of the guest.
    r = ctl(env, {"kill", "5"});
    CHECK_MESSAGE(r.rc == 0, r);
    CHECK(r.out.find("domid 5: disconnecting 2 sessions (pvcalls, xensock)") != std::string::npos);
    CHECK(eventually([&] {
        const auto st = env.read(xs_state);
        return st == "5" || st == "6";
    }));
    mark(root, "all-killed");
    CHECK(SimEnv::wait_child(guest) == 0);
    ::close(lfd);
}

TEST_CASE("kill DOMID: the other guests keep working and their counters do not move") {
    SimEnv env;
    const std::string root = env.root();
    uint16_t port = 0;
    const int lfd = host_listen(port);
    REQUIRE(lfd >= 0);
    spawn_script_server(env, lfd);
    env.attach(9, wire::xensock_v3_profile());
    env.attach(10, wire::xensock_v3_profile());
    const pid_t victim = spawn_guest(env, 9, wire::xensock_v3_profile(), [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        uint64_t a = 0;
        GCHECK_EQ(co_await g.socket(a), 0);
        GCHECK_EQ(co_await g.connect(a, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(g, a, 100, 200), 0);
        mark(root, "ready9");
        const auto deadline = std::chrono::steady_clock::now() + 30s;
        while (g.connected() && std::chrono::steady_clock::now() < deadline) co_await r.sleep_for(5ms);
        GCHECK(!g.connected());
        co_return 0;
    });
    const pid_t other = spawn_guest(env, 10, wire::xensock_v3_profile(), [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        uint64_t a = 0;
        GCHECK_EQ(co_await g.socket(a), 0);
        GCHECK_EQ(co_await g.connect(a, loopback(port)), 0);
        GCHECK_EQ(co_await scripted(g, a, 300, 400), 0);
        mark(root, "ready10");
        GCHECK(co_await wait_mark(r, root, "go"));
        // After the other guest was killed: a full round trip on the old socket.
        std::vector<std::byte> buf(5000, std::byte{'o'});
        GCHECK_EQ(co_await g.send_all(a, buf, 10s), 5000);
        std::vector<std::byte> echo(5000);
        GCHECK_EQ(co_await g.recv_exact(a, echo, 10s), 5000);
        GCHECK(echo == buf);
        GCHECK(g.connected());
        mark(root, "done10");
        GCHECK(co_await wait_mark(r, root, "end"));
        co_return 0;
    });
    REQUIRE(wait_marked(root, "ready9"));
    REQUIRE(wait_marked(root, "ready10"));
    auto snapshot = [&] {
        const auto r = ctl(env, {"stats", "10", "--json"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        json s = session(r.parsed(), 10);
        s.erase("uptime_seconds");
        return s;
    };
    const json before = snapshot();
    CHECK(before["bytes_from_guest"] == 8 + 300);
    CHECK(before["bytes_to_guest"] == 400);

    auto r = ctl(env, {"kill", "9"});
    CHECK_MESSAGE(r.rc == 0, r);
    CHECK(SimEnv::wait_child(victim) == 0);
    CHECK(eventually([&] {
        const auto st = env.read(env.backend_path(9, wire::xensock_v3_profile()) + "/state");
        return st == "5" || st == "6";
    }));
    // The killed guest's teardown left the other session exactly as it was.
    const json after = snapshot();
    CHECK_MESSAGE(after == before, "before: " << before.dump() << "\nafter:  " << after.dump());
    CHECK(after["backend_state"] == 4);

    mark(root, "go");
    REQUIRE(wait_marked(root, "done10"));
    const json later = snapshot();
    CHECK(later["bytes_from_guest"] == 8 + 300 + 5000);
    CHECK(later["bytes_to_guest"] == 400 + 5000);
    CHECK(later["active_sockets"] == 1);
    mark(root, "end");
    CHECK(SimEnv::wait_child(other) == 0);
    ::close(lfd);
}

TEST_CASE("stats: data ring errors by errno, after a peer reset and an orderly shutdown") {
    SimEnv env;
    const std::string root = env.root();
    uint16_t port = 0;
    const int lfd = host_listen(port);
    REQUIRE(lfd >= 0);
    // The peer: reads the guest's one byte on each connection, then resets
    // the first (SO_LINGER 0: RST) and shuts the second down (FIN).
    env.spawn([lfd]() -> int {
        for (int i = 0; i < 2; ++i) {
            const int c = ::accept(lfd, nullptr, nullptr);
            if (c < 0) return 2;
            char byte;
            if (::recv(c, &byte, 1, MSG_WAITALL) != 1) return 3;
            if (i == 0) {
                const linger reset{1, 0};
                ::setsockopt(c, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
            }
            ::close(c);
        }
        ::pause();
        return 0;
    });
    env.attach(5, wire::xensock_v3_profile());
    const pid_t guest = spawn_guest(env, 5, wire::xensock_v3_profile(), [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        const std::byte one[1] = {std::byte{'1'}};
        std::vector<std::byte> buf(64);
        uint64_t a = 0, b = 0;
        GCHECK_EQ(co_await g.socket(a), 0);
        GCHECK_EQ(co_await g.connect(a, loopback(port)), 0);
        GCHECK_EQ(co_await g.send_all(a, one, 10s), 1);
        GCHECK_EQ(co_await g.recv(a, buf, 10s), -ECONNRESET);
        // Sending on the reset socket: the host send fails, EPIPE in out_error.
        (void)co_await g.send(a, buf, 10s);
        for (int i = 0; i < 2000 && g.data_intf(a)->out_error() == 0; ++i) co_await r.sleep_for(5ms);
        GCHECK_EQ(g.data_intf(a)->out_error(), -EPIPE);
        GCHECK_EQ(co_await g.socket(b), 0);
        GCHECK_EQ(co_await g.connect(b, loopback(port)), 0);
        GCHECK_EQ(co_await g.send_all(b, one, 10s), 1);
        GCHECK_EQ(co_await g.recv(b, buf, 10s), 0);  // orderly: in_error ENOTCONN
        GCHECK_EQ(g.data_intf(b)->in_error(), -ENOTCONN);
        mark(root, "ready");
        GCHECK(co_await wait_mark(r, root, "done"));
        co_return 0;
    });
    REQUIRE(wait_marked(root, "ready"));

    auto r = ctl(env, {"stats", "5", "--json"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    const json c = session(r.parsed(), 5)["counters"];
    CHECK_MESSAGE(c.value("ring_errors_in_errno_104", 0) == 1, c.dump());  // ECONNRESET
    CHECK(c.value("ring_errors_in_errno_107", 0) == 1);                     // ENOTCONN
    CHECK(c.value("ring_errors_out_errno_32", 0) == 1);                     // EPIPE
    size_t ring_error_keys = 0;
    for (const auto& [name, value] : c.items()) ring_error_keys += name.starts_with("ring_errors_");
    CHECK_MESSAGE(ring_error_keys == 3, c.dump());
    CHECK(!c.contains("errno_104"));  // not command errors

    r = ctl(env, {"stats", "5", "--prometheus"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    const auto p = prom::parse(r.out);
    REQUIRE_MESSAGE(p.error.empty(), p.error);
    using Labels = std::vector<std::pair<std::string, std::string>>;
    auto ring = [](std::string half, std::string err) {
        return Labels{{"domid", "5"}, {"protocol", "xensock"}, {"half", std::move(half)}, {"errno", std::move(err)}};
    };
    CHECK(p.value("xensock_ring_errors_total", ring("in", "ECONNRESET")) == 1);
    CHECK(p.value("xensock_ring_errors_total", ring("in", "ENOTCONN")) == 1);
    CHECK(p.value("xensock_ring_errors_total", ring("out", "EPIPE")) == 1);

    r = ctl(env, {"stats", "5"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    INFO(r.out);
    CHECK(r.out.find("ECONNRESET  in        1  Connection reset by peer") != std::string::npos);
    CHECK(r.out.find("EPIPE       out       1  Broken pipe") != std::string::npos);
    mark(root, "done");
    CHECK(SimEnv::wait_child(guest) == 0);
    ::close(lfd);
}

TEST_CASE("quota: --max-sockets-per-guest refuses with EMFILE and counts the refusals") {
    SimEnvOptions options;
    options.extra_args = {"--max-sockets-per-guest", "2"};
    SimEnv env(options);
    const std::string root = env.root();
    const uint16_t listen_port = free_port();
    env.attach(5, wire::xensock_v3_profile());
    const pid_t guest = spawn_guest(env, 5, wire::xensock_v3_profile(), [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        uint64_t l = 0, a = 0, c = 0, accepted = 0;
        GCHECK_EQ(co_await g.socket(l), 0);
        GCHECK_EQ(co_await g.bind(l, loopback(listen_port)), 0);
        GCHECK_EQ(co_await g.listen(l, 4), 0);
        GCHECK_EQ(co_await g.socket(a), 0);
        // At the limit: SOCKET and ACCEPT are refused, nothing else changes.
        GCHECK_EQ(co_await g.socket(c), -EMFILE);
        GCHECK_EQ(co_await g.accept(l, accepted), -EMFILE);
        // The quota counts what is held: after a RELEASE there is room again.
        GCHECK_EQ(co_await g.release(a), 0);
        GCHECK_EQ(co_await g.socket(c), 0);
        mark(root, "ready");
        GCHECK(co_await wait_mark(r, root, "done"));
        co_return 0;
    });
    REQUIRE(wait_marked(root, "ready"));
    auto r = ctl(env, {"stats", "5", "--json"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    const json c = session(r.parsed(), 5)["counters"];
    CHECK(c["quota_refusals"] == 2);
    CHECK(c["errno_24"] == 2);  // EMFILE
    CHECK(c["command_errors_socket"] == 1);
    CHECK(c["command_errors_accept"] == 1);
    CHECK(c["command_ok_socket"] == 3);

    r = ctl(env, {"stats", "5", "--prometheus"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    const auto p = prom::parse(r.out);
    REQUIRE_MESSAGE(p.error.empty(), p.error);
    const std::vector<std::pair<std::string, std::string>> d5{{"domid", "5"}, {"protocol", "xensock"}};
    CHECK(p.value("xensock_quota_refusals_total", d5) == 2);
    auto with = [&](std::string k, std::string v) {
        auto l = d5;
        l.emplace_back(std::move(k), std::move(v));
        return l;
    };
    CHECK(p.value("xensock_errors_total", with("errno", "EMFILE")) == 2);
    r = ctl(env, {"stats", "5"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    bool shown = false;
    for (const auto& line : lines_of(r.out))
        if (line.find("quota refusals") != std::string::npos) shown = line.ends_with(" 2");
    CHECK_MESSAGE(shown, r.out);
    mark(root, "done");
    CHECK(SimEnv::wait_child(guest) == 0);
}

TEST_CASE("stats: ring-full stalls and ring-empty waits, notifications bounded by the bytes") {
    SimEnv env;
    const std::string root = env.root();
    uint16_t port = 0;
    const int lfd = host_listen(port);
    REQUIRE(lfd >= 0);
    spawn_script_server(env, lfd);
    constexpr unsigned kOrder = 1;
    constexpr uint32_t kRing = wire::ring_bytes_per_direction(kOrder);  // 4096 per half
    constexpr uint32_t kBytes = 16 * kRing;
    env.attach(5, wire::xensock_v3_profile());
    const pid_t guest = spawn_guest(env, 5, wire::xensock_v3_profile(), [=](Guest& g, rt::Reactor& r) -> rt::Task<int> {
        frontend::RingOptions small;
        small.order = kOrder;
        uint64_t a = 0, idle = 0;
        GCHECK_EQ(co_await g.socket(idle), 0);
        GCHECK_EQ(co_await g.connect(idle, loopback(port), small), 0);
        GCHECK_EQ(co_await g.socket(a), 0);
        GCHECK_EQ(co_await g.connect(a, loopback(port), small), 0);
        const uint32_t header[2] = {0, kBytes};
        GCHECK_EQ(co_await g.send_all(a, std::as_bytes(std::span(header)), 10s), 8);
        // Read nothing until the backend has filled the in half.
        bool full = false;
        for (int i = 0; i < 6000 && !full; ++i) {
            const auto intf = g.data_intf(a);
            full = intf && intf->in_prod() - intf->in_cons() == kRing;
            if (!full) co_await r.sleep_for(5ms);
        }
        GCHECK(full);
        mark(root, "full");
        GCHECK(co_await wait_mark(r, root, "drain"));
        std::vector<std::byte> in(kBytes);
        GCHECK_EQ(co_await g.recv_exact(a, in, 30s), static_cast<ssize_t>(kBytes));
        mark(root, "drained");
        GCHECK(co_await wait_mark(r, root, "done"));
        co_return 0;
    });
    auto counters = [&] {
        const auto r = ctl(env, {"stats", "5", "--json"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        return session(r.parsed(), 5);
    };
    REQUIRE(wait_marked(root, "full"));
    // The guest holds the ring full while the peer has more to send: the
    // backend must stop reading the socket.
    CHECK(eventually([&] { return counters()["counters"]["ring_full_stalls"].get<uint64_t>() >= 1; }));
    mark(root, "drain");
    REQUIRE(wait_marked(root, "drained"));
    // Both sockets' out halves were empty after the guest's last byte.
    CHECK(eventually([&] { return counters()["counters"]["ring_empty_waits"].get<uint64_t>() >= 2; }));

    const json s = counters();
    const json& c = s["counters"];
    INFO(s.dump());
    CHECK(s["bytes_to_guest"] == kBytes);
    CHECK(s["bytes_from_guest"] == 8);
    CHECK(c["ring_full_stalls"].get<uint64_t>() >= 1);
    // Every publish into a ring notifies and moves at most a ring's worth (and
    // at least a byte); every command answer notifies at most once.
    uint64_t commands = 0;
    for (const auto& [name, value] : c.items())
        if (name.starts_with("commands_")) commands += value.get<uint64_t>();
    const uint64_t sent = c["notifications_sent"].get<uint64_t>();
    CHECK(sent >= kBytes / kRing + 1);  // kBytes to the guest, and the 8-byte header out
    CHECK(sent <= kBytes + 8 + commands);
    CHECK(c["notifications_received"].get<uint64_t>() >= 1);

    const auto r = ctl(env, {"stats", "5", "--prometheus"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    const auto p = prom::parse(r.out);
    REQUIRE_MESSAGE(p.error.empty(), p.error);
    const std::vector<std::pair<std::string, std::string>> d5{{"domid", "5"}, {"protocol", "xensock"}};
    CHECK(p.value("xensock_ring_full_stalls_total", d5) >= 1);
    CHECK(p.value("xensock_ring_empty_waits_total", d5) >= 2);
    mark(root, "done");
    CHECK(SimEnv::wait_child(guest) == 0);
    ::close(lfd);
}

TEST_CASE("a second xensockd on the same control socket refuses to start; a stale socket file is replaced") {
    SimEnv env;
    const std::string root = env.root();
    env.attach(5, wire::xensock_v3_profile());
    const auto be_state = env.backend_path(5, wire::xensock_v3_profile()) + "/state";
    REQUIRE(env.wait_for(be_state, "2"));

    auto r = run_binary("XENSOCK_XENSOCKD", {"--sim", root, "--log-level", "info"});
    CHECK_MESSAGE(r.rc == 4, r);
    CHECK(r.err.find(fmt::format("another xensockd (pid {}) is already serving {}", env.daemon_pid(),
                                 env.control_path())) != std::string::npos);
    // It stopped before its engine started: it never served ("serving PROTOCOLS"
    // is what the engine logs at start), so it cannot have touched a guest.
    CHECK_MESSAGE(r.err.find("serving xensock,pvcalls on") == std::string::npos, r);
    // The first one is untouched: still serving, its socket still there, the
    // guest's device as it left it.
    CHECK(env.daemon_alive());
    CHECK(ctl(env, {"list", "5"}).rc == 0);
    CHECK(env.read(be_state) == "2");

    // Something that is not a socket at the path: refused, left alone.
    const std::string odd = root + "/not-a-socket";
    std::ofstream(odd) << "precious\n";
    r = run_binary("XENSOCK_XENSOCKD", {"--sim", root, "--control", odd});
    CHECK_MESSAGE(r.rc == 1, r);
    CHECK(r.err.find(odd + " exists and is not a socket") != std::string::npos);
    {
        std::ifstream in(odd);
        std::string text;
        std::getline(in, text);
        CHECK(text == "precious");
    }

    // A daemon that died left its socket file: the next one replaces it.
    REQUIRE(env.stop_daemon() == 0);
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, env.control_path().c_str(), sizeof addr.sun_path - 1);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    ::close(fd);
    REQUIRE(ctl(env, {"list"}).rc == 4);  // stale: nothing listens
    env.start_daemon();
    r = ctl(env, {"list", "5"});
    CHECK_MESSAGE(r.rc == 0, r);
}

TEST_CASE("xensockd whose engine cannot start exits 1 and leaves no control socket behind") {
    // The control socket is bound before the engine starts; here the engine
    // cannot reach xenstored, so the socket must be closed again (and, under
    // ASan, without touching the control server after it is gone).
    char dir[] = "/dev/shm/xs-noxs-XXXXXX";
    REQUIRE(::mkdtemp(dir));
    const std::string root = dir;
    const auto r = run_binary("XENSOCK_XENSOCKD", {"--sim", root});
    CHECK_MESSAGE(r.rc == 1, r);
    CHECK(r.err.find("cannot connect to xenstored") != std::string::npos);
    CHECK_MESSAGE(r.err.find("AddressSanitizer") == std::string::npos, r);  // ASan also exits 1
    CHECK(::access((root + "/control").c_str(), F_OK) != 0);
    std::error_code ec;
    std::filesystem::remove_all(root, ec);
}

TEST_CASE("SIGHUP does not stop xensockd") {
    SimEnv env;
    env.attach(5, wire::xensock_v3_profile());
    REQUIRE(env.wait_for(env.backend_path(5, wire::xensock_v3_profile()) + "/state", "2"));
    for (int i = 0; i < 2; ++i) {
        REQUIRE(::kill(env.daemon_pid(), SIGHUP) == 0);
        const auto r = ctl(env, {"list", "5"});
        CHECK_MESSAGE(r.rc == 0, r);
    }
    // A daemon that took SIGHUP for a stop would be gone by now (it stops in
    // milliseconds); this wait can only miss a bug, never invent one.
    CHECK_FALSE(eventually([&] { return !env.daemon_alive(); }, 1s));
    CHECK(ctl(env, {"list", "5"}).rc == 0);
    CHECK(env.stop_daemon() == 0);  // SIGTERM still stops it, cleanly
}

TEST_CASE("attach and detach play the toolstack; xensockd picks the device up") {
    SimEnv env;
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        const std::string proto(profile->name());
        auto r = ctl(env, {"attach", "--domid", "12", "--protocol", proto, "--json"});
        REQUIRE_MESSAGE(r.rc == 0, r);
        const auto j = r.parsed();
        CHECK(j["frontend"] == toolstack::frontend_dir(*profile, 12));
        CHECK(j["backend"] == toolstack::backend_dir(*profile, 12));
        CHECK(env.read(toolstack::frontend_dir(*profile, 12) + "/backend-id") == "0");
        CHECK(env.read(toolstack::backend_dir(*profile, 12) + "/frontend-id") == "12");
        // xensockd answers the new device with InitWait.
        CHECK(env.wait_for(toolstack::backend_dir(*profile, 12) + "/state", "2"));
        CHECK(eventually([&] { return ctl(env, {"list", "12"}).rc == 0; }));

        // Twice: refused, with the way out in the message.
        r = ctl(env, {"attach", "--domid", "12", "--protocol", proto});
        CHECK_MESSAGE(r.rc == 1, r);
        CHECK(r.err.find("already has a " + proto + " device") != std::string::npos);
        CHECK(r.err.find("xensockctl detach --domid 12") != std::string::npos);

        r = ctl(env, {"detach", "--domid", "12", "--protocol", proto});
        CHECK_MESSAGE(r.rc == 0, r);
        CHECK(env.read(toolstack::frontend_dir(*profile, 12) + "/state").empty());
        CHECK(env.read(toolstack::backend_dir(*profile, 12) + "/state").empty());
        r = ctl(env, {"detach", "--domid", "12", "--protocol", proto});
        CHECK_MESSAGE(r.rc == 3, r);
    }
    // detach without --protocol removes whatever the guest has.
    REQUIRE(ctl(env, {"attach", "--domid", "13"}).rc == 0);
    REQUIRE(ctl(env, {"attach", "--domid", "13", "--protocol", "pvcalls"}).rc == 0);
    const auto r = ctl(env, {"detach", "--domid", "13", "--json"});
    REQUIRE_MESSAGE(r.rc == 0, r);
    CHECK(r.parsed()["detached"].size() == 2);
    CHECK(ctl(env, {"detach", "--domid", "13"}).rc == 3);
    // The guest may not be its own backend.
    CHECK(ctl(env, {"attach", "--domid", "0"}).rc == 2);
}

TEST_CASE("exit codes: usage, not found, daemon not reachable") {
    SimEnv env;
    SUBCASE("usage errors exit 2") {
        for (const std::vector<std::string>& args :
             {std::vector<std::string>{}, {"frobnicate"}, {"list", "--bogus"}, {"list", "abc"}, {"list", "99999"},
              {"kill"}, {"kill", "5", "notanumber"}, {"stats", "-1"}, {"attach"}, {"attach", "--domid", "5", "--protocol", "udp"},
              {"detach"}, {"--timeout", "0", "list"}}) {
            CAPTURE(fmt::format("{}", fmt::join(args, " ")));
            const auto r = ctl(env, args);
            CHECK_MESSAGE(r.rc == 2, r);
            CHECK(!r.err.empty());
        }
    }
    SUBCASE("--help for every subcommand explains and exits 0") {
        for (const std::string sub : {"list", "stats", "kill", "attach", "detach"}) {
            CAPTURE(sub);
            const auto r = ctl(env, {sub, "--help"});
            CHECK_MESSAGE(r.rc == 0, r);
            CHECK(r.out.find("Examples:") != std::string::npos);
            CHECK(r.out.find("xensockctl " + sub) != std::string::npos);
            for (const char* code : {"Exit codes: 0 success", "1 runtime error", "2 usage", "3 not found", "4 not reachable"})
                CHECK_MESSAGE(r.out.find(code) != std::string::npos, code);
        }
        // kill's selectors are explained where they are needed.
        const auto k = ctl(env, {"kill", "--help"});
        CHECK(k.out.find("--protocol") != std::string::npos);
        CHECK(k.out.find("--devid") != std::string::npos);
        CHECK(k.out.find("xensockctl kill 5 3 --protocol xensock") != std::string::npos);
        const auto r = run_ctl({"--help"});
        CHECK(r.rc == 0);
        CHECK(r.out.find("4 not reachable") != std::string::npos);
    }
    SUBCASE("unknown domid exits 3") {
        for (const std::vector<std::string>& args :
             {std::vector<std::string>{"list", "42"}, {"list", "--sockets", "42"}, {"stats", "42"}, {"kill", "42"},
              {"kill", "42", "1"}, {"detach", "--domid", "42"}}) {
            CAPTURE(fmt::format("{}", fmt::join(args, " ")));
            const auto r = ctl(env, args);
            CHECK_MESSAGE(r.rc == 3, r);
        }
        const auto r = ctl(env, {"list", "42", "--json"});
        CHECK(r.rc == 3);
        CHECK(r.parsed()["exit_code"] == 3);
    }
    SUBCASE("no daemon exits 4 and says so") {
        REQUIRE(env.stop_daemon() == 0);
        auto r = ctl(env, {"list"});
        CHECK_MESSAGE(r.rc == 4, r);
        CHECK(r.err.find("xensockd is not running (no " + env.control_path() + ")") != std::string::npos);
        r = ctl(env, {"stats", "--prometheus"});
        CHECK_MESSAGE(r.rc == 4, r);
        CHECK(r.out.empty());
        r = run_ctl({"--control", "/nonexistent/xensock/control", "kill", "5"});
        CHECK_MESSAGE(r.rc == 4, r);
        CHECK(r.err.find("no /nonexistent/xensock/control") != std::string::npos);

        // A socket file nobody listens on (a daemon that died).
        const std::string stale = env.root() + "/stale-control";
        const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::strncpy(addr.sun_path, stale.c_str(), sizeof addr.sun_path - 1);
        REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
        ::close(fd);
        r = run_ctl({"--control", stale, "list"});
        CHECK_MESSAGE(r.rc == 4, r);
        CHECK(r.err.find("nothing listens") != std::string::npos);

    }
    SUBCASE("the control socket: --control, then XENSOCK_CONTROL, then --sim / XENSOCK_SIM_DIR") {
        auto r = run_ctl({"list"}, {.uid = std::nullopt, .env = {{"XENSOCK_SIM_DIR", env.root()}}});
        CHECK_MESSAGE(r.rc == 0, r);
        r = run_ctl({"--sim", env.root(), "list"}, {.uid = std::nullopt, .env = {{"XENSOCK_CONTROL", "/nonexistent/control"}}});
        CHECK_MESSAGE(r.rc == 4, r);
        CHECK(r.err.find("no /nonexistent/control") != std::string::npos);
        r = run_ctl({"--control", env.control_path(), "list"}, {.uid = std::nullopt, .env = {{"XENSOCK_CONTROL", "/nonexistent/control"}}});
        CHECK_MESSAGE(r.rc == 0, r);
    }
    SUBCASE("the control socket is owner-only") {
        struct stat st{};
        REQUIRE(::stat(env.control_path().c_str(), &st) == 0);
        CHECK(S_ISSOCK(st.st_mode));
        CHECK((st.st_mode & 07777) == 0600);  // read-write for the owner, nothing for group or others
        CHECK(st.st_uid == ::geteuid());      // xensockd runs as we do
        if (::geteuid() == 0) {
            const passwd* nobody = ::getpwnam("nobody");
            REQUIRE(nobody);
            auto r = run_ctl({"--control", env.control_path(), "list"}, {.uid = nobody->pw_uid, .env = {}});
            CHECK_MESSAGE(r.rc == 4, r);
            CHECK(r.err.find("permission denied") != std::string::npos);

            // Even if the file mode were opened up, xensockd checks the peer's
            // uid (SO_PEERCRED) and turns away anyone but root and itself.
            // (The sim root is 0700: let nobody through it for this one call.)
            struct stat dir{};
            REQUIRE(::stat(env.root().c_str(), &dir) == 0);
            REQUIRE(::chmod(env.root().c_str(), (dir.st_mode & 07777) | 0711) == 0);
            REQUIRE(::chmod(env.control_path().c_str(), 0666) == 0);
            r = run_ctl({"--control", env.control_path(), "list"}, {.uid = nobody->pw_uid, .env = {}});
            REQUIRE(::chmod(env.control_path().c_str(), 0600) == 0);
            REQUIRE(::chmod(env.root().c_str(), dir.st_mode & 07777) == 0);
            CHECK_MESSAGE(r.rc == 4, r);
            CHECK_MESSAGE(r.err.find(fmt::format("xensockd: xensockd serves only root and uid {}, not uid {}: run "
                                                 "xensockctl as root or as the user xensockd runs as",
                                                 ::geteuid(), nobody->pw_uid)) != std::string::npos,
                          r);
            CHECK(r.out.empty());
            // Root still gets its answers.
            r = ctl(env, {"list"});
            CHECK_MESSAGE(r.rc == 0, r);
        } else {
            MESSAGE("not root: the uid check of the control socket is not exercised");
        }
    }
    SUBCASE("xenstored not reachable for attach exits 4") {
        const auto r = run_ctl({"--sim", "/nonexistent-sim", "attach", "--domid", "5"});
        CHECK_MESSAGE(r.rc == 4, r);
        CHECK(r.err.find("xenstored") != std::string::npos);
    }
}
