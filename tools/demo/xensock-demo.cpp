// xensock-demo: a guest on the sim platform making real traffic through
// xensockd.
//
//   xensock-demo --sim DIR [--domid 1] [--protocol xensock|pvcalls]
//
// Before the guest starts, the demo forks a "host services" process: an
// HTTP server and an echo server on 127.0.0.1 (ephemeral ports), plain
// sockets, as any service of the driver domain would be. Then this process
// becomes guest domain DOMID: it attaches through the frontend library (the
// xenbus handshake with xensockd; the toolstack must have created the device,
// e.g. `xensockctl --sim DIR attach --domid 1`) and
//   1. does an HTTP GET to the host's HTTP server and checks the answer,
//   2. sends 1 MiB to the echo server while reading the echo back, and
//      compares checksums,
//   3. listens inside the guest (BIND + LISTEN + ACCEPT on 127.0.0.1) and
//      lets a host client (a plain socket, on a thread of this process)
//      connect to it and exchange a line each way.
// Every step prints PASS or FAIL. Exit code: 0 if every step passed, 1 if
// any failed, 2 on bad usage, 124 if the demo timed out (--timeout).
//
// The guest talks to xensockd through the sim platform only (granted pages,
// event channels, xenstore); everything here stays on 127.0.0.1.
#include "xensock/frontend/frontend.hpp"
#include "xensock/platform/platform.hpp"
#include "xensock/runtime/reactor.hpp"
#include "xensock/runtime/task.hpp"
#include "xensock/util/log.hpp"
#include "xensock/wire/profile.hpp"

#include <CLI/CLI.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

using namespace xensock;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kExitFail = 1;
constexpr int kExitUsage = 2;
constexpr int kExitTimeout = 124;

// ------------------------------------------------------------ host side
// Plain sockets, strictly on 127.0.0.1.

sockaddr_in loopback(uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

// A listening socket on 127.0.0.1:port (0 = ephemeral); fills in the port.
int listen_loopback(uint16_t& port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = loopback(port);
    socklen_t len = sizeof a;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0 || ::listen(fd, 64) < 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) < 0) {
        ::close(fd);
        return -1;
    }
    port = ntohs(a.sin_port);
    return fd;
}

bool write_all(int fd, const void* data, size_t len) {
    auto* p = static_cast<const char*>(data);
    while (len > 0) {
        const ssize_t n = ::send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        p += n;
        len -= static_cast<size_t>(n);
    }
    return true;
}

void set_io_timeout(int fd, std::chrono::seconds t) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(t.count());
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

std::string http_body() {
    std::string body =
        "<!doctype html>\n<html><head><title>xensock demo</title></head><body>\n"
        "<h1>Hello from the host</h1>\n"
        "<p>This page was served on 127.0.0.1 and reached the guest through xensockd.</p>\n";
    while (body.size() < 16 * 1024 - 32) body += "<p>xensock: paravirtualized sockets for Xen guests.</p>\n";
    body += "</body></html>\n";
    return body;
}

// One HTTP/1.1 exchange: reads the request head, answers 200 with a page
// for GET (400 otherwise), closes.
void serve_http(int fd) {
    set_io_timeout(fd, 10s);
    std::string request;
    char buf[4096];
    while (request.find("\r\n\r\n") == std::string::npos && request.size() < 64 * 1024) {
        const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n <= 0) break;
        request.append(buf, static_cast<size_t>(n));
    }
    const bool get = request.rfind("GET ", 0) == 0 && request.find("\r\n\r\n") != std::string::npos;
    const std::string body = get ? http_body() : std::string("bad request\n");
    const std::string head = std::string(get ? "HTTP/1.1 200 OK\r\n" : "HTTP/1.1 400 Bad Request\r\n") +
                             "Server: xensock-demo-host\r\n"
                             "Content-Type: " + (get ? "text/html" : "text/plain") + "\r\n"
                             "Content-Length: " + std::to_string(body.size()) + "\r\n"
                             "Connection: close\r\n\r\n";
    if (write_all(fd, head.data(), head.size())) write_all(fd, body.data(), body.size());
    ::shutdown(fd, SHUT_WR);
    // Drain until the client closes, so our close never resets the
    // connection under data the client has not read yet.
    while (::recv(fd, buf, sizeof buf, 0) > 0) {
    }
    ::close(fd);
}

// Echoes everything back until EOF.
void serve_echo(int fd) {
    set_io_timeout(fd, 30s);
    std::vector<char> buf(64 * 1024);
    while (true) {
        const ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
        if (n <= 0) break;
        if (!write_all(fd, buf.data(), static_cast<size_t>(n))) break;
    }
    ::close(fd);
}

// The host services process: serves both listening sockets, one thread per
// connection, until SIGTERM (or the demo dies: PR_SET_PDEATHSIG).
[[noreturn]] void host_services(int http_fd, int echo_fd) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() == 1) ::_exit(0);
    while (true) {
        pollfd fds[2] = {{http_fd, POLLIN, 0}, {echo_fd, POLLIN, 0}};
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            ::_exit(1);
        }
        for (int i = 0; i < 2; ++i) {
            if (!fds[i].revents) continue;
            const int c = ::accept4(fds[i].fd, nullptr, nullptr, SOCK_CLOEXEC);
            if (c < 0) continue;
            std::thread(i == 0 ? serve_http : serve_echo, c).detach();
        }
    }
}

// ----------------------------------------------------------- watchdog

class Watchdog {
public:
    explicit Watchdog(std::chrono::seconds limit) : thread_([this, limit] { run(limit); }) {}
    ~Watchdog() {
        {
            std::lock_guard lock(mu_);
            done_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }
    void step(std::string name) {
        std::lock_guard lock(mu_);
        step_ = std::move(name);
    }

private:
    void run(std::chrono::seconds limit) {
        std::unique_lock lock(mu_);
        if (cv_.wait_for(lock, limit, [this] { return done_; })) return;
        std::fprintf(stderr, "xensock-demo: timed out after %llds during: %s\n",
                     static_cast<long long>(limit.count()), step_.c_str());
        std::fflush(stdout);
        ::_exit(kExitTimeout);
    }
    std::mutex mu_;
    std::condition_variable cv_;
    bool done_ = false;
    std::string step_ = "start-up";
    std::thread thread_;
};

// ---------------------------------------------------------- guest side

struct Config {
    std::string sim_dir;
    platform::DomId domid = 1;
    const wire::ProtocolProfile* profile = nullptr;
    uint16_t http_port = 0, echo_port = 0, guest_port = 0;
    size_t echo_bytes = 1 << 20;
    Watchdog* watchdog = nullptr;
};

struct Tally {
    int passed = 0, failed = 0;
    void report(int step, int steps, bool ok, const std::string& what) {
        std::printf("[%d/%d] %-4s %s\n", step, steps, ok ? "PASS" : "FAIL", what.c_str());
        std::fflush(stdout);
        (ok ? passed : failed)++;
    }
};

constexpr int kSteps = 4;

std::string errno_name(int rc) { return rc < 0 ? std::string(std::strerror(-rc)) : std::to_string(rc); }

std::span<const std::byte> as_bytes(const std::string& s) {
    return std::as_bytes(std::span(s.data(), s.size()));
}

// FNV-1a, to compare what was sent with what came back.
struct Checksum {
    uint64_t h = 1469598103934665603ull;
    void add(std::span<const std::byte> data) {
        for (const std::byte b : data) h = (h ^ static_cast<uint8_t>(b)) * 1099511628211ull;
    }
};

void fill_pattern(std::span<std::byte> buf, uint64_t offset) {
    for (size_t i = 0; i < buf.size(); ++i) {
        uint64_t x = (offset + i) * 0x9E3779B97F4A7C15ull;
        x ^= x >> 29;
        buf[i] = static_cast<std::byte>(x & 0xFF);
    }
}

// Step 2: HTTP GET through xensockd.
rt::Task<bool> http_get(frontend::Guest& g, const Config& cfg, std::string& what) {
    what = "HTTP GET http://127.0.0.1:" + std::to_string(cfg.http_port) + "/ from the guest: ";
    uint64_t s = 0;
    int rc = co_await g.socket(s);
    if (rc < 0) {
        what += "SOCKET failed: " + errno_name(rc);
        co_return false;
    }
    rc = co_await g.connect(s, loopback(cfg.http_port));
    if (rc < 0) {
        co_await g.release(s);
        what += "CONNECT failed: " + errno_name(rc);
        co_return false;
    }
    const std::string request = "GET / HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(cfg.http_port) +
                                "\r\nUser-Agent: xensock-demo\r\nConnection: close\r\n\r\n";
    const ssize_t sent = co_await g.send_all(s, as_bytes(request), 10s);
    if (sent != static_cast<ssize_t>(request.size())) {
        co_await g.release(s);
        what += "send failed: " + errno_name(static_cast<int>(sent));
        co_return false;
    }
    std::string response;
    std::vector<std::byte> buf(16 * 1024);
    while (response.size() < (4u << 20)) {
        const ssize_t n = co_await g.recv(s, buf, 10s);
        if (n == 0) break;  // the server closed: the whole response is here
        if (n < 0) {
            co_await g.release(s);
            what += "recv failed: " + errno_name(static_cast<int>(n));
            co_return false;
        }
        response.append(reinterpret_cast<const char*>(buf.data()), static_cast<size_t>(n));
    }
    co_await g.release(s);

    const size_t line_end = response.find("\r\n");
    const size_t head_end = response.find("\r\n\r\n");
    if (line_end == std::string::npos || head_end == std::string::npos) {
        what += "no complete HTTP response (" + std::to_string(response.size()) + " bytes)";
        co_return false;
    }
    const std::string status = response.substr(0, line_end);
    const size_t body_size = response.size() - (head_end + 4);
    std::optional<size_t> content_length;
    const std::string head = response.substr(0, head_end + 2);
    if (const size_t p = head.find("\r\nContent-Length: "); p != std::string::npos)
        content_length = std::strtoull(head.c_str() + p + 18, nullptr, 10);
    what += "\"" + status + "\", body " + std::to_string(body_size) + " bytes";
    if (status.rfind("HTTP/1.1 200 ", 0) != 0) co_return false;
    if (!content_length || *content_length != body_size) {
        what += content_length ? " (Content-Length says " + std::to_string(*content_length) + ")"
                               : " (no Content-Length)";
        co_return false;
    }
    co_return true;
}

rt::Task<void> echo_sender(frontend::Guest& g, uint64_t s, size_t total, Checksum& sum, ssize_t& rc,
                           rt::Event& done) {
    std::vector<std::byte> chunk(64 * 1024);
    rc = 0;
    for (size_t off = 0; off < total; off += chunk.size()) {
        const auto piece = std::span(chunk.data(), std::min(chunk.size(), total - off));
        fill_pattern(piece, off);
        sum.add(piece);
        const ssize_t n = co_await g.send_all(s, piece, 20s);
        if (n != static_cast<ssize_t>(piece.size())) {
            rc = n < 0 ? n : -EIO;
            break;
        }
    }
    done.set();
}

// Step 3: bytes to the echo server and back, both directions at once.
rt::Task<bool> echo_round_trip(frontend::Guest& g, rt::Reactor& reactor, const Config& cfg, std::string& what) {
    what = "echo via 127.0.0.1:" + std::to_string(cfg.echo_port) + ": ";
    uint64_t s = 0;
    int rc = co_await g.socket(s);
    if (rc < 0) {
        what += "SOCKET failed: " + errno_name(rc);
        co_return false;
    }
    rc = co_await g.connect(s, loopback(cfg.echo_port));
    if (rc < 0) {
        co_await g.release(s);
        what += "CONNECT failed: " + errno_name(rc);
        co_return false;
    }
    const auto start = Clock::now();
    Checksum sent_sum, got_sum;
    ssize_t send_rc = 0;
    rt::Event sent(reactor);
    reactor.spawn(echo_sender(g, s, cfg.echo_bytes, sent_sum, send_rc, sent));
    std::vector<std::byte> buf(64 * 1024);
    size_t got = 0;
    ssize_t recv_rc = 0;
    while (got < cfg.echo_bytes) {
        const ssize_t n = co_await g.recv(s, std::span(buf.data(), std::min(buf.size(), cfg.echo_bytes - got)), 20s);
        if (n <= 0) {
            recv_rc = n == 0 ? -ECONNRESET : n;
            break;
        }
        got_sum.add(std::span(buf.data(), static_cast<size_t>(n)));
        got += static_cast<size_t>(n);
    }
    co_await sent.wait();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    co_await g.release(s);

    char line[200];
    std::snprintf(line, sizeof line, "%zu bytes sent, %zu echoed back in %.1f ms, checksum %016llx %s %016llx",
                  cfg.echo_bytes, got, ms, static_cast<unsigned long long>(sent_sum.h),
                  sent_sum.h == got_sum.h ? "==" : "!=", static_cast<unsigned long long>(got_sum.h));
    what += line;
    if (send_rc < 0) what += "; send failed: " + errno_name(static_cast<int>(send_rc));
    if (recv_rc < 0) what += "; recv failed: " + errno_name(static_cast<int>(recv_rc));
    co_return send_rc == 0 && recv_rc == 0 && got == cfg.echo_bytes && sent_sum.h == got_sum.h;
}

// The host client of step 4: a plain socket connecting to what the guest
// listens on.
struct HostClientResult {
    bool connected = false;
    std::string reply;
    std::string error;
};

void host_client(uint16_t port, const std::string& message, HostClientResult& out) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        out.error = std::string("socket: ") + std::strerror(errno);
        return;
    }
    set_io_timeout(fd, 10s);
    sockaddr_in a = loopback(port);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) {
        out.error = std::string("connect: ") + std::strerror(errno);
        ::close(fd);
        return;
    }
    out.connected = true;
    if (!write_all(fd, message.data(), message.size())) {
        out.error = std::string("send: ") + std::strerror(errno);
        ::close(fd);
        return;
    }
    char buf[1024];
    while (out.reply.size() < 64 * 1024) {
        const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n == 0) break;
        if (n < 0) {
            out.error = std::string("recv: ") + std::strerror(errno);
            break;
        }
        out.reply.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
}

// Step 4: a server inside the guest, a client on the host.
rt::Task<bool> guest_server(frontend::Guest& g, const Config& cfg, std::string& what) {
    what = "guest listens on 127.0.0.1:" + std::to_string(cfg.guest_port) + ": ";
    uint64_t l = 0;
    int rc = co_await g.socket(l);
    if (rc < 0) {
        what += "SOCKET failed: " + errno_name(rc);
        co_return false;
    }
    if ((rc = co_await g.bind(l, loopback(cfg.guest_port))) < 0) {
        co_await g.release(l);
        what += "BIND failed: " + errno_name(rc);
        co_return false;
    }
    if ((rc = co_await g.listen(l, 16)) < 0) {
        co_await g.release(l);
        what += "LISTEN failed: " + errno_name(rc);
        co_return false;
    }
    // Listening for real on the host now: the client may connect.
    const std::string hello = "hello guest, this is the host\n";
    const std::string answer = "hello host, this is guest " + std::to_string(cfg.domid) + "\n";
    HostClientResult client;
    std::thread client_thread(host_client, cfg.guest_port, hello, std::ref(client));

    uint64_t c = 0;
    bool ok = true;
    std::string got;
    rc = co_await g.accept(l, c);
    if (rc < 0) {
        what += "ACCEPT failed: " + errno_name(rc);
        ok = false;
    } else {
        std::vector<std::byte> buf(1024);
        while (got.find('\n') == std::string::npos && got.size() < 4096) {
            const ssize_t n = co_await g.recv(c, buf, 10s);
            if (n <= 0) {
                what += "recv failed: " + (n == 0 ? std::string("end of stream") : errno_name(static_cast<int>(n)));
                ok = false;
                break;
            }
            got.append(reinterpret_cast<const char*>(buf.data()), static_cast<size_t>(n));
        }
        if (ok) {
            const ssize_t n = co_await g.send_all(c, as_bytes(answer), 10s);
            if (n != static_cast<ssize_t>(answer.size())) {
                what += "send failed: " + errno_name(static_cast<int>(n));
                ok = false;
            }
        }
        // RELEASE still delivers what was queued, then the host sees EOF.
        co_await g.release(c);
    }
    co_await g.release(l);
    client_thread.join();

    auto trim = [](std::string s) {
        while (!s.empty() && s.back() == '\n') s.pop_back();
        return s;
    };
    if (ok) {
        what += "host client connected; guest got \"" + trim(got) + "\", host got \"" + trim(client.reply) + "\"";
    }
    if (!client.error.empty()) what += "; host client: " + client.error;
    co_return ok && client.connected && got == hello && client.reply == answer;
}

rt::Task<int> run_guest(rt::Reactor& reactor, platform::Platform& platform, const Config& cfg) {
    Tally tally;
    std::unique_ptr<frontend::Guest> guest;
    std::string attach_error;
    cfg.watchdog->step("attach (xenbus handshake with xensockd)");
    frontend::GuestOptions options;
    options.profile = cfg.profile;
    try {
        guest = co_await frontend::Guest::attach(reactor, platform, options);
    } catch (const std::exception& e) {
        attach_error = e.what();
    }
    if (!guest) {
        tally.report(1, kSteps, false, "attach as domid " + std::to_string(cfg.domid) + ": " + attach_error);
        std::printf("summary: %d passed, %d failed (the remaining steps need a connected guest)\n", tally.passed,
                    tally.failed + kSteps - 1);
        co_return kExitFail;
    }
    tally.report(1, kSteps, guest->connected(),
                 "attach: domid " + std::to_string(guest->domid()) + " connected to backend domid " +
                     std::to_string(guest->backend_id()) + " (" + std::string(guest->profile().name()) +
                     ", backend allows ring order " + std::to_string(guest->max_ring_order()) + ")");

    std::string what;
    cfg.watchdog->step("HTTP GET");
    tally.report(2, kSteps, co_await http_get(*guest, cfg, what), what);
    cfg.watchdog->step("echo round trip");
    tally.report(3, kSteps, co_await echo_round_trip(*guest, reactor, cfg, what), what);
    cfg.watchdog->step("guest server with a host client");
    tally.report(4, kSteps, co_await guest_server(*guest, cfg, what), what);

    const auto& st = guest->stats();
    std::printf("guest: %llu commands, %llu bytes sent, %llu received, %llu notifications to the backend\n",
                static_cast<unsigned long long>(st.requests), static_cast<unsigned long long>(st.bytes_sent),
                static_cast<unsigned long long>(st.bytes_received),
                static_cast<unsigned long long>(st.command_notifies + st.data_notifies));
    cfg.watchdog->step("close (xenbus Closing/Closed)");
    co_await guest->close();
    std::printf("summary: %d passed, %d failed\n", tally.passed, tally.failed);
    co_return tally.failed == 0 ? 0 : kExitFail;
}

}  // namespace

int main(int argc, char** argv) {
    log::set_program("xensock-demo");
    CLI::App app{"xensock-demo: a guest on the sim platform making real traffic through xensockd"};
    app.footer(
        "Needs a running sim xenstored (xensock-sim up DIR), xensockd --sim DIR, and the guest's device\n"
        "(xensockctl --sim DIR attach --domid N). scripts/demo.sh does all of that.\n"
        "Exit codes: 0 all steps passed, 1 a step failed, 2 usage, 124 timed out.");
    Config cfg;
    std::string protocol = "xensock";
    unsigned domid = 1;
    unsigned timeout_s = 60;
    std::string level_text = "warn";
    const char* env_sim = std::getenv("XENSOCK_SIM_DIR");
    if (env_sim) cfg.sim_dir = env_sim;
    app.add_option("--sim", cfg.sim_dir, "Sim root DIR (or set XENSOCK_SIM_DIR)");
    app.add_option("--domid", domid, "This guest's domain id")->capture_default_str()->check(CLI::Range(1u, 32751u));
    app.add_option("--protocol", protocol, "xensock or pvcalls")
        ->capture_default_str()
        ->check(CLI::IsMember({"xensock", "pvcalls"}));
    app.add_option("--echo-bytes", cfg.echo_bytes, "Bytes for the echo round trip")
        ->capture_default_str()
        ->check(CLI::Range(size_t{1}, size_t{1} << 30));
    app.add_option("--timeout", timeout_s, "Give up after this many seconds")
        ->capture_default_str()
        ->check(CLI::Range(1u, 3600u));
    app.add_option("--log-level", level_text, "debug, info, warn, error")->capture_default_str();
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : kExitUsage;
    }
    if (cfg.sim_dir.empty()) {
        std::fprintf(stderr, "xensock-demo: --sim DIR (or XENSOCK_SIM_DIR) is required\n");
        return kExitUsage;
    }
    log::Level level;
    if (!log::parse_level(level_text, level)) {
        std::fprintf(stderr, "xensock-demo: unknown --log-level '%s'\n", level_text.c_str());
        return kExitUsage;
    }
    log::set_level(level);
    cfg.domid = static_cast<platform::DomId>(domid);
    cfg.profile = wire::find_profile(protocol);
    if (!cfg.profile) {
        std::fprintf(stderr, "xensock-demo: unknown protocol '%s'\n", protocol.c_str());
        return kExitUsage;
    }
    signal(SIGPIPE, SIG_IGN);

    // Host services first, while this process still has one thread.
    const int http_fd = listen_loopback(cfg.http_port);
    const int echo_fd = listen_loopback(cfg.echo_port);
    // A free port for the guest's own server: bound and closed again here;
    // the guest binds it through xensockd.
    const int probe_fd = listen_loopback(cfg.guest_port);
    if (http_fd < 0 || echo_fd < 0 || probe_fd < 0) {
        std::fprintf(stderr, "xensock-demo: cannot listen on 127.0.0.1: %s\n", std::strerror(errno));
        return kExitFail;
    }
    ::close(probe_fd);
    std::fflush(stdout);
    const pid_t services = ::fork();
    if (services < 0) {
        std::fprintf(stderr, "xensock-demo: fork: %s\n", std::strerror(errno));
        return kExitFail;
    }
    if (services == 0) host_services(http_fd, echo_fd);
    ::close(http_fd);
    ::close(echo_fd);

    std::printf("xensock demo: guest domid %u on sim root %s, protocol %s\n", domid, cfg.sim_dir.c_str(),
                protocol.c_str());
    std::printf("host services (pid %d): HTTP server on 127.0.0.1:%u, echo server on 127.0.0.1:%u\n",
                static_cast<int>(services), cfg.http_port, cfg.echo_port);
    std::fflush(stdout);

    int rc = kExitFail;
    {
        Watchdog watchdog{std::chrono::seconds(timeout_s)};
        cfg.watchdog = &watchdog;
        try {
            auto platform = platform::open_sim_platform(cfg.sim_dir, cfg.domid);
            rt::Reactor reactor;
            rc = reactor.run_until(run_guest(reactor, *platform, cfg));
        } catch (const std::exception& e) {
            std::fprintf(stderr, "xensock-demo: %s\n", e.what());
            rc = kExitFail;
        }
    }
    ::kill(services, SIGTERM);
    ::waitpid(services, nullptr, 0);
    std::fflush(stdout);
    return rc;
}
