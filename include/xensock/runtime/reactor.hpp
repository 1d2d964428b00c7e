// Reactor: one io_uring and one ready queue per worker thread.
//
// Every I/O awaitable returns an int: the operation's result (>= 0) or a
// negative errno. A cancelled operation returns -ECANCELED; one whose
// deadline (.timeout()) expired returns -ETIMEDOUT. Submissions are batched:
// SQEs queue up while coroutines run and go to the kernel in one
// io_uring_submit_and_wait() when the ready queue is empty.
#pragma once

#include "xensock/runtime/cancel.hpp"
#include "xensock/runtime/task.hpp"

#include <liburing.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <chrono>
#include <coroutine>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <vector>

namespace xensock::rt {

class Reactor;

// State of one in-flight io_uring request; lives in the awaiting coroutine's
// frame, which stays suspended until the completion arrives.
struct IoOp {
    std::coroutine_handle<> waiter;
    int result = 0;
};

struct ReactorStats {
    uint64_t submitted = 0;   // SQEs handed to the kernel
    uint64_t completed = 0;   // CQEs reaped
    uint64_t wakeups = 0;     // times the thread blocked and woke
};

class IoAwaitable {
public:
    using Prep = void (*)(io_uring_sqe*, const IoAwaitable&);

    // Give the operation a deadline: on expiry it returns -ETIMEDOUT.
    // Use on a named awaitable (GCC 12 copies an awaited xvalue):
    //   auto op = reactor.recv(...); op.timeout(1s); int n = co_await op;
    IoAwaitable& timeout(std::chrono::nanoseconds d) & noexcept;

    bool await_ready() const noexcept { return token_.cancelled(); }
    void await_suspend(std::coroutine_handle<> h);
    int await_resume() noexcept;

private:
    friend class Reactor;
    IoAwaitable(Reactor& r, CancelToken token, Prep prep, int fd, void* ptr, uint64_t len, uint64_t arg, int flags)
        : reactor_(&r), token_(std::move(token)), prep_(prep), fd_(fd), ptr_(ptr), len_(len), arg_(arg), flags_(flags) {}
    IoAwaitable(const IoAwaitable&) = delete;
    IoAwaitable& operator=(const IoAwaitable&) = delete;

    Reactor* reactor_;
    CancelToken token_;
    CancelCallback on_cancel_;
    IoOp op_;
    bool cancel_requested_ = false;
    bool has_timeout_ = false;
    __kernel_timespec deadline_{};

public:
    // Parameters, interpreted by prep_ (kept public for the prep functions).
    Prep prep_ = nullptr;
    int fd_ = -1;
    void* ptr_ = nullptr;
    uint64_t len_ = 0;
    uint64_t arg_ = 0;
    int flags_ = 0;
    __kernel_timespec ts_{};
};

// Manual-reset-free event: set() wakes every current waiter, or, with none,
// makes the next wait() return at once. Used to hand evtchn notifications to
// the coroutine that serves the port.
class Event {
public:
    explicit Event(Reactor& r) : reactor_(&r) {}
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    ~Event();

    void set();
    bool is_set() const noexcept { return set_; }
    void reset() noexcept { set_ = false; }

    struct Awaiter {
        Event* event;
        CancelToken token;
        CancelCallback on_cancel;
        std::coroutine_handle<> handle;
        Awaiter* next = nullptr;
        Awaiter* prev = nullptr;
        bool fired = false;

        bool await_ready() const noexcept { return event->set_ || token.cancelled(); }
        void await_suspend(std::coroutine_handle<> h);
        // true: the event was set; false: cancelled.
        bool await_resume() noexcept;
    };
    // Consumes the set state when it returns true.
    Awaiter wait(CancelToken token = {}) { return Awaiter{this, std::move(token), {}, {}}; }

private:
    void unlink(Awaiter* a) noexcept;
    Reactor* reactor_;
    bool set_ = false;
    Awaiter* waiters_ = nullptr;
};

class Reactor {
public:
    explicit Reactor(unsigned queue_depth = 1024);
    ~Reactor();
    Reactor(const Reactor&) = delete;
    Reactor& operator=(const Reactor&) = delete;

    // The reactor running on this thread (nullptr if none).
    static Reactor* current() noexcept;

    // Runs until stop() is requested. Spawned tasks still alive then stay
    // suspended; the owner must cancel and finish them (run again) before
    // destroying the reactor.
    void run();
    // Runs until `task` completes, then returns its result (tests, tools).
    template <typename T>
    T run_until(Task<T> task);
    void stop() noexcept { stop_requested_ = true; }
    bool stop_requested() const noexcept { return stop_requested_; }

    // Starts a detached task; it is counted until it finishes. An exception
    // escaping it is logged, not lost.
    void spawn(Task<void> task);
    size_t live_tasks() const noexcept { return live_tasks_; }
    // Resumes h from the ready queue (never inline).
    void schedule(std::coroutine_handle<> h) { ready_.push_back(h); }
    // Thread-safe: runs fn on this reactor's thread.
    void post(std::function<void()> fn);

    IoAwaitable recv(int fd, void* buf, size_t len, int flags = 0, CancelToken t = {});
    IoAwaitable send(int fd, const void* buf, size_t len, int flags = 0, CancelToken t = {});
    IoAwaitable readv(int fd, const iovec* iov, unsigned n, CancelToken t = {});
    IoAwaitable writev(int fd, const iovec* iov, unsigned n, CancelToken t = {});
    IoAwaitable recvmsg(int fd, msghdr* msg, int flags = 0, CancelToken t = {});
    IoAwaitable sendmsg(int fd, const msghdr* msg, int flags = 0, CancelToken t = {});
    IoAwaitable accept(int fd, sockaddr* addr, socklen_t* len, int flags = 0, CancelToken t = {});
    IoAwaitable connect(int fd, const sockaddr* addr, socklen_t len, CancelToken t = {});
    // Returns the ready poll mask (POLLIN...), or a negative errno.
    IoAwaitable poll(int fd, unsigned events, CancelToken t = {});
    // Returns 0 when the time has passed, -ECANCELED if cancelled first.
    IoAwaitable sleep_for(std::chrono::nanoseconds d, CancelToken t = {});

    const ReactorStats& stats() const noexcept { return stats_; }
    // In-flight io_uring requests (for leak checks in tests).
    size_t in_flight() const noexcept { return in_flight_; }

private:
    friend class IoAwaitable;
    io_uring_sqe* get_sqe();
    void submit_cancel(IoOp* op);
    void reap();
    void run_ready();
    void drain_posted();
    Task<void> wake_loop();

    io_uring ring_{};
    std::deque<std::coroutine_handle<>> ready_;
    bool stop_requested_ = false;
    size_t live_tasks_ = 0;
    size_t in_flight_ = 0;
    ReactorStats stats_;

    int wake_fd_ = -1;
    uint64_t wake_buf_ = 0;
    std::mutex posted_mutex_;
    std::vector<std::function<void()>> posted_;
    CancelSource internal_;
    std::vector<io_uring_cqe> cqe_batch_;
};

template <typename T>
T Reactor::run_until(Task<T> task) {
    std::optional<T> out;
    std::exception_ptr error;
    auto wrapper = [](Task<T> t, std::optional<T>& o, std::exception_ptr& e, Reactor& r) -> Task<void> {
        try {
            o.emplace(co_await std::move(t));
        } catch (...) {
            e = std::current_exception();
        }
        r.stop();
    };
    stop_requested_ = false;
    spawn(wrapper(std::move(task), out, error, *this));
    run();
    if (error) std::rethrow_exception(error);
    return std::move(*out);
}

template <>
inline void Reactor::run_until(Task<void> task) {
    std::exception_ptr error;
    auto wrapper = [](Task<void> t, std::exception_ptr& e, Reactor& r) -> Task<void> {
        try {
            co_await std::move(t);
        } catch (...) {
            e = std::current_exception();
        }
        r.stop();
    };
    stop_requested_ = false;
    spawn(wrapper(std::move(task), error, *this));
    run();
    if (error) std::rethrow_exception(error);
}

}  // namespace xensock::rt
