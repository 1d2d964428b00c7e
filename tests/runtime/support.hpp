// Helpers for the runtime tests: RAII descriptors, loopback sockets (127.0.0.1,
// ephemeral ports only), a watchdog that turns a hang into a named failure,
// and per-thread CPU time.
#pragma once

#include "xensock/runtime/reactor.hpp"

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

namespace xensock::rt::test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) noexcept : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }
    int get() const noexcept { return fd_; }
    void reset() noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

private:
    int fd_ = -1;
};

inline Fd tcp_socket() {
    Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(s.get() >= 0);
    return s;
}

struct Listener {
    Fd fd;
    sockaddr_in addr{};  // 127.0.0.1 and the port the kernel picked
};

inline Listener listen_loopback(int backlog = 16) {
    Listener l{tcp_socket(), {}};
    l.addr.sin_family = AF_INET;
    l.addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    l.addr.sin_port = 0;
    REQUIRE(::bind(l.fd.get(), reinterpret_cast<sockaddr*>(&l.addr), sizeof l.addr) == 0);
    REQUIRE(::listen(l.fd.get(), backlog) == 0);
    socklen_t len = sizeof l.addr;
    REQUIRE(::getsockname(l.fd.get(), reinterpret_cast<sockaddr*>(&l.addr), &len) == 0);
    return l;
}

// A connected loopback TCP pair made with plain blocking calls, for tests
// whose subject is not accept/connect. (Loopback connect completes in the
// kernel without the listener accepting.)
inline std::pair<Fd, Fd> tcp_pair() {
    Listener l = listen_loopback(1);
    Fd client = tcp_socket();
    REQUIRE(::connect(client.get(), reinterpret_cast<const sockaddr*>(&l.addr), sizeof l.addr) == 0);
    Fd server(::accept4(l.fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
    REQUIRE(server.get() >= 0);
    int one = 1;
    ::setsockopt(client.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(server.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return {std::move(client), std::move(server)};
}

inline std::chrono::nanoseconds thread_cpu_time() {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
}

// Aborts if the scope is still running after `limit`. doctest's signal
// handler then names the test case that hung; without this a hang would only
// show up as the whole suite hitting meson's timeout.
class Watchdog {
public:
    explicit Watchdog(std::chrono::milliseconds limit = 10s)
        : thread_([this, limit] {
              std::unique_lock lock(mutex_);
              if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
                  std::fprintf(stderr, "runtime test: watchdog expired after %lld ms\n",
                               static_cast<long long>(limit.count()));
                  std::abort();
              }
          }) {}
    Watchdog(const Watchdog&) = delete;
    Watchdog& operator=(const Watchdog&) = delete;
    ~Watchdog() {
        {
            std::lock_guard lock(mutex_);
            done_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    bool done_ = false;
    std::thread thread_;  // last: starts once the members it uses exist
};

// Runs fn on a thread with a small stack, so unbounded recursion in the
// coroutine machinery overflows quickly instead of passing by luck.
inline void run_on_small_stack(size_t stack_bytes, std::function<void()> fn) {
    struct Ctx {
        std::function<void()> fn;
        std::exception_ptr error;
    } ctx{std::move(fn), nullptr};
    pthread_attr_t attr;
    REQUIRE(::pthread_attr_init(&attr) == 0);
    REQUIRE(::pthread_attr_setstacksize(&attr, stack_bytes) == 0);
    pthread_t tid;
    const int rc = ::pthread_create(
        &tid, &attr,
        [](void* p) -> void* {
            auto* c = static_cast<Ctx*>(p);
            try {
                c->fn();
            } catch (...) {
                c->error = std::current_exception();
            }
            return nullptr;
        },
        &ctx);
    ::pthread_attr_destroy(&attr);
    REQUIRE(rc == 0);
    ::pthread_join(tid, nullptr);
    if (ctx.error) std::rethrow_exception(ctx.error);
}

// Requeues the caller behind everything already ready: a deterministic "let
// the other coroutines run up to their next suspension".
struct Yield {
    Reactor& reactor;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) { reactor.schedule(h); }
    void await_resume() const noexcept {}
};
inline Yield yield(Reactor& r) { return Yield{r}; }

// A counter that wakes one waiter when it reaches zero.
struct Latch {
    explicit Latch(Reactor& r, int n) : count(n), zero(r) {}
    void count_down() {
        if (--count == 0) zero.set();
    }
    int count;
    Event zero;
};

// Counts destructions: shows that a coroutine frame unwound (its locals ran
// their destructors) rather than being leaked or abandoned.
struct DtorCounter {
    int* count;
    explicit DtorCounter(int& c) : count(&c) {}
    DtorCounter(DtorCounter&& o) noexcept : count(std::exchange(o.count, nullptr)) {}
    DtorCounter(const DtorCounter&) = delete;
    DtorCounter& operator=(const DtorCounter&) = delete;
    DtorCounter& operator=(DtorCounter&&) = delete;
    ~DtorCounter() {
        if (count) ++*count;
    }
};

}  // namespace xensock::rt::test
