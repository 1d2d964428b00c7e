// Helpers for end-to-end tests: run a guest body in a forked process, host
// services (echo, sink, source, blackhole) on 127.0.0.1, and checks that turn
// into a guest process's exit code.
#pragma once

#include "sim_env.hpp"

#include "xensock/frontend/frontend.hpp"
#include "xensock/platform/platform.hpp"
#include "xensock/runtime/reactor.hpp"
#include "xensock/toolstack/toolstack.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace xensock::testing {

using frontend::Guest;
using GuestBody = std::function<rt::Task<int>(Guest&, rt::Reactor&)>;

// Inside a guest body: fail the process with a message naming the check.
#define GCHECK(cond)                                                                      \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            std::fprintf(stderr, "guest check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            co_return 1;                                                                  \
        }                                                                                 \
    } while (0)
#define GCHECK_EQ(a, b)                                                                            \
    do {                                                                                           \
        const auto va_ = (a);                                                                      \
        const auto vb_ = (b);                                                                      \
        if (!(va_ == vb_)) {                                                                       \
            std::fprintf(stderr, "guest check failed at %s:%d: %s == %s (%lld vs %lld)\n", __FILE__, __LINE__, #a, \
                         #b, static_cast<long long>(va_), static_cast<long long>(vb_));            \
            co_return 1;                                                                           \
        }                                                                                          \
    } while (0)

inline rt::Task<int> guest_main(rt::Reactor& reactor, platform::Platform& platform, frontend::GuestOptions options,
                                const GuestBody& body) {
    auto guest = co_await Guest::attach(reactor, platform, options);
    const int rc = co_await body(*guest, reactor);
    co_await guest->close();
    co_return rc;
}

// Runs `body` as guest `domid` in a child process; returns its pid.
inline pid_t spawn_guest(SimEnv& env, platform::DomId domid, const wire::ProtocolProfile& profile, GuestBody body,
                         unsigned ring_order = 0) {
    const std::string root = env.root();
    return env.spawn([root, domid, &profile, body, ring_order]() -> int {
        auto platform = platform::open_sim_platform(root, domid);
        rt::Reactor reactor;
        frontend::GuestOptions options;
        options.profile = &profile;
        options.ring_order = ring_order;
        return reactor.run_until(guest_main(reactor, *platform, options, body));
    });
}

// The same with the caller's options (options.profile must be set).
inline pid_t spawn_guest_with(SimEnv& env, platform::DomId domid, frontend::GuestOptions options, GuestBody body) {
    const std::string root = env.root();
    return env.spawn([root, domid, options, body]() -> int {
        auto platform = platform::open_sim_platform(root, domid);
        rt::Reactor reactor;
        return reactor.run_until(guest_main(reactor, *platform, options, body));
    });
}

// A port on 127.0.0.1 that nothing listens on (bound once, then closed).
inline uint16_t free_port();

// Cross-process markers for orchestration between a test and its guests
// (test plumbing only; the guests talk to xensockd through sim alone).
inline void mark(const std::string& root, const std::string& name) { std::ofstream(root + "/test-" + name) << "1"; }
inline bool marked(const std::string& root, const std::string& name) {
    return ::access((root + "/test-" + name).c_str(), F_OK) == 0;
}
inline rt::Task<bool> wait_mark(rt::Reactor& r, std::string root, std::string name,
                                std::chrono::milliseconds bound = std::chrono::seconds(20)) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    while (!marked(root, name)) {
        if (std::chrono::steady_clock::now() > deadline) co_return false;
        co_await r.sleep_for(std::chrono::milliseconds(5));
    }
    co_return true;
}

inline sockaddr_in loopback(uint16_t port) { return *frontend::ipv4("127.0.0.1", port); }

// A listening TCP socket on 127.0.0.1 (port 0 = ephemeral); returns fd.
inline int host_listen(uint16_t& port, int backlog = 128) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = loopback(port);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0 || ::listen(fd, backlog) < 0) {
        ::close(fd);
        return -1;
    }
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
    return fd;
}

inline uint16_t free_port() {
    uint16_t port = 0;
    ::close(host_listen(port));
    return port;
}

inline int host_connect(uint16_t port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a = loopback(port);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

inline bool write_all(int fd, const void* data, size_t len) {
    auto* p = static_cast<const char*>(data);
    while (len > 0) {
        const ssize_t n = ::send(fd, p, len, MSG_NOSIGNAL);
        if (n <= 0) return false;
        p += n;
        len -= static_cast<size_t>(n);
    }
    return true;
}

// FNV-1a over a stream, to compare what was sent with what arrived.
struct Checksum {
    uint64_t h = 1469598103934665603ull;
    uint64_t bytes = 0;
    void add(const void* data, size_t len) {
        auto* p = static_cast<const unsigned char*>(data);
        for (size_t i = 0; i < len; ++i) h = (h ^ p[i]) * 1099511628211ull;
        bytes += len;
    }
};

// Deterministic pseudo-random bytes: position i of stream `seed`.
inline void fill_pattern(std::byte* buf, size_t len, uint64_t offset, uint64_t seed) {
    for (size_t i = 0; i < len; ++i) {
        uint64_t x = (offset + i) * 0x9E3779B97F4A7C15ull ^ seed;
        x ^= x >> 29;
        buf[i] = static_cast<std::byte>(x & 0xFF);
    }
}

// Host service in a child process: accepts connections on `listen_fd` and
// echoes each back until EOF (one connection at a time is enough for the
// tests that use it; `connections` bounds how many it serves).
inline pid_t spawn_echo_server(SimEnv& env, int listen_fd, int connections) {
    return env.spawn([listen_fd, connections]() -> int {
        std::vector<char> buf(1 << 16);
        for (int i = 0; i < connections; ++i) {
            const int c = ::accept(listen_fd, nullptr, nullptr);
            if (c < 0) return 2;
            while (true) {
                const ssize_t n = ::recv(c, buf.data(), buf.size(), 0);
                if (n <= 0) break;
                if (!write_all(c, buf.data(), static_cast<size_t>(n))) break;
            }
            ::close(c);
        }
        return 0;
    });
}

// A frontend built by hand, synchronous, for xenbus orderings and ring
// abuse the Guest library never produces. Runs inside a guest process.
class RawFrontend {
public:
    RawFrontend(const std::string& root, platform::DomId domid, const wire::ProtocolProfile& profile)
        : profile_(profile),
          platform_(platform::open_sim_platform(root, domid)),
          xs_(std::make_unique<platform::XenStore>(platform_->xenstored_path())),
          evtchn_(platform_->open_event_channel()),
          sharer_(platform_->open_grant_sharer()),
          fe_(toolstack::frontend_dir(profile, domid)) {}

    platform::XenStore& xs() { return *xs_; }
    const std::string& frontend_path() const { return fe_; }

    // A fresh command ring page and port, allocated before the old ones are
    // released (so their numbers differ from the previous ones).
    bool make_ring() {
        auto page = sharer_->share(0, 1, /*writable=*/true);
        auto port = evtchn_->bind_unbound(0);
        if (!page || !port) return false;
        page_ = std::move(page.value());
        port_ = std::move(port.value());
        ring_ = wire::FrontRing(page_.data());
        return true;
    }
    uint32_t ring_ref() const { return page_ ? page_.refs().at(0) : 0; }
    platform::Port port() const { return port_ ? port_.port() : 0; }

    // Writes the transport nodes and `state` in one transaction.
    bool publish(int state, std::optional<wire::FrontendParams> params = std::nullopt) {
        const auto nodes = profile_.frontend_nodes(params.value_or(wire::FrontendParams{ring_ref(), port()}));
        return xs_->transaction([&](platform::XenStore& t) {
                       for (const auto& [node, value] : nodes)
                           if (!t.write(fe_ + "/" + node, value).ok()) return false;
                       return t.write(fe_ + "/state", std::to_string(state)).ok();
                   })
            .ok();
    }

    // Sends `req` and waits (bounded) for the response with its req_id,
    // kicking the backend now and then (it may bind our port only later).
    std::optional<wire::Response> call(wire::Request req, std::chrono::milliseconds bound) {
        req.req_id = ++last_req_id_;
        profile_.encode_request(ring_.next_request_slot(), req);
        ring_.commit_request();
        (void)ring_.push_requests();
        const auto deadline = std::chrono::steady_clock::now() + bound;
        auto next_kick = std::chrono::steady_clock::now();
        std::vector<platform::Port> fired;
        while (std::chrono::steady_clock::now() < deadline) {
            fired.clear();
            evtchn_->pending(fired);  // also learns the backend's BIND
            while (ring_.final_check_for_responses() != 0) {
                wire::Slot slot;
                ring_.take_response(slot);
                const auto rsp = profile_.decode_response(slot);
                if (rsp.req_id == req.req_id) return rsp;
            }
            if (std::chrono::steady_clock::now() >= next_kick) {
                (void)port_.notify();
                next_kick = std::chrono::steady_clock::now() + 100ms;
            }
            pollfd pfd{evtchn_->fd(), POLLIN, 0};
            (void)::poll(&pfd, 1, 20);
        }
        return std::nullopt;
    }

private:
    const wire::ProtocolProfile& profile_;
    std::unique_ptr<platform::Platform> platform_;
    std::unique_ptr<platform::XenStore> xs_;
    std::unique_ptr<platform::EventChannel> evtchn_;
    std::unique_ptr<platform::GrantSharer> sharer_;
    std::string fe_;
    platform::SharedPages page_;
    platform::BoundPort port_;
    wire::FrontRing ring_;
    uint32_t last_req_id_ = 0;
};

}  // namespace xensock::testing
