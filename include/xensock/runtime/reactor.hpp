// Reactor: one io_uring and one ready queue per worker thread.
//
// GCC 12 at -O2 miscompiles a by-value class argument evaluated inside a
// co_await operand in a loop (the argument's copy is read from a stale stack
// slot on every other iteration). Every maker therefore takes its
// CancelToken by const reference; keep it that way.
//
// Every I/O awaitable returns an int: the operation's result (>= 0) or a
// negative errno. A cancelled operation returns -ECANCELED; one whose
// deadline (.timeout()) expired returns -ETIMEDOUT. Submissions are batched:
// SQEs queue up while coroutines run and go to the kernel in one
// io_uring_submit_and_wait() when the ready queue is empty.
//
// Threads: a reactor is used by one thread at a time. It may be created on
// one thread and run on another (the ring is not bound to its creator), but
// only post() and stop() may be called concurrently with run(). Operations
// are tied to the thread that submitted them: if it exits, the kernel
// cancels them.
#pragma once

#include "xensock/runtime/cancel.hpp"
#include "xensock/runtime/task.hpp"

#include <liburing.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

namespace xensock::rt {

class Reactor;

// State of one in-flight io_uring request; lives in the awaiting coroutine's
// frame, which stays suspended until the completion arrives.
struct IoOp {
    std::coroutine_handle<> waiter;
    int result = 0;
    bool completed = false;  // its CQE has been reaped
};

struct ReactorStats {
    uint64_t submitted = 0;   // SQEs handed to the kernel
    uint64_t completed = 0;   // CQEs reaped
    uint64_t wakeups = 0;     // times the thread blocked and woke
    uint64_t busy_polls = 0;  // times busy polling found a completion (no sleep)
};

class IoAwaitable {
public:
    using Prep = void (*)(io_uring_sqe*, const IoAwaitable&);

    // Give the operation a deadline: on expiry it returns -ETIMEDOUT.
    // Both forms work with GCC 12:
    //   int n = co_await reactor.recv(...).timeout(1s);
    //   auto op = reactor.recv(...); op.timeout(1s); int n = co_await op;
    // (The rvalue form returns a new awaitable by value: GCC 12 copies an
    // awaited xvalue, so returning IoAwaitable&& did not compile.)
    IoAwaitable& timeout(std::chrono::nanoseconds d) & noexcept;
    IoAwaitable timeout(std::chrono::nanoseconds d) && noexcept {
        timeout(d);
        return std::move(*this);
    }

    // Only an awaitable that has not been awaited yet may be moved.
    IoAwaitable(IoAwaitable&& o) noexcept;
    IoAwaitable(const IoAwaitable&) = delete;
    IoAwaitable& operator=(const IoAwaitable&) = delete;
    IoAwaitable& operator=(IoAwaitable&&) = delete;

    // A token cancelled beforehand: complete at once, submit nothing.
    bool await_ready() const noexcept { return token_.cancelled(); }
    void await_suspend(std::coroutine_handle<> h);
    int await_resume() noexcept;

private:
    friend class Reactor;
    IoAwaitable(Reactor& r, const CancelToken& token, Prep prep, int fd, void* ptr, uint64_t len, uint64_t arg, int flags)
        : reactor_(&r), token_(token), prep_(prep), fd_(fd), ptr_(ptr), len_(len), arg_(arg), flags_(flags) {}

    Reactor* reactor_;
    CancelToken token_;
    CancelCallback on_cancel_;
    IoOp op_;
    bool cancel_requested_ = false;
    bool has_timeout_ = false;
    bool is_sleep_ = false;  // a timeout SQE: its -ETIME means "slept"
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
// the coroutine that serves the port. Waiters resume in the order they
// started waiting, from the ready queue (never inside set()).
class Event {
public:
    explicit Event(Reactor& r) : reactor_(&r) {}
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    // Wakes the remaining waiters as not fired.
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
        // true: the event was set; false: cancelled, or the event destroyed.
        // A token cancelled before the wait wins over a pending set, which
        // is then left for the next waiter.
        bool await_resume() noexcept;
    };
    // Consumes the set state when it returns true.
    Awaiter wait(const CancelToken& token = {}) { return Awaiter{this, token, {}, {}}; }

private:
    void unlink(Awaiter* a) noexcept;
    Reactor* reactor_;
    bool set_ = false;
    Awaiter* waiters_ = nullptr;  // FIFO: head
    Awaiter* last_ = nullptr;     // FIFO: tail
};

namespace detail {
template <typename T>
struct RunUntilState {
    std::optional<T> value;
    std::exception_ptr error;
    bool done = false;
};
template <>
struct RunUntilState<void> {
    std::exception_ptr error;
    bool done = false;
};
}  // namespace detail

class Reactor {
public:
    explicit Reactor(unsigned queue_depth = 1024);
    // Finishes whatever is still in flight before the ring goes away: the
    // kernel is asked to cancel every operation, the waiting coroutines
    // resume (-ECANCELED) and unwind, and so does whatever they submit on
    // their way out. Nothing is resumed after the destructor returns. Tasks
    // suspended on something other than I/O (an Event nobody sets) cannot be
    // finished: they are reported and their frames leaked, never destroyed.
    // Functions posted but not run yet are destroyed without running.
    ~Reactor();
    Reactor(const Reactor&) = delete;
    Reactor& operator=(const Reactor&) = delete;

    // The reactor running on this thread (nullptr if none).
    static Reactor* current() noexcept;

    // Runs until stop() is requested; the request is consumed, so run() can
    // be called again. Spawned tasks still alive then stay suspended; the
    // owner should cancel and finish them (run again) before destroying the
    // reactor. Throws std::system_error if the ring itself fails.
    void run();
    // Runs until `task` completes, then returns its result or rethrows its
    // exception (tests, tools). A stop() meanwhile does not end it early.
    template <typename T>
    T run_until(Task<T> task);
    // Thread-safe; wakes the reactor if it is blocked in the kernel.
    void stop() noexcept;
    bool stop_requested() const noexcept { return stop_requested_.load(std::memory_order_acquire); }

    // Starts a detached task; it is counted until it finishes. An exception
    // escaping it is logged, not lost.
    void spawn(Task<void> task);
    size_t live_tasks() const noexcept { return live_tasks_; }
    // Resumes h from the ready queue (never inline).
    void schedule(std::coroutine_handle<> h) { ready_.push_back(h); }
    // Thread-safe: runs fn on this reactor's thread (an exception escaping
    // fn is logged).
    void post(std::function<void()> fn);

    IoAwaitable recv(int fd, void* buf, size_t len, int flags = 0, const CancelToken& t = {});
    IoAwaitable send(int fd, const void* buf, size_t len, int flags = 0, const CancelToken& t = {});
    // At the file position, like readv(2)/writev(2) (sockets have none).
    IoAwaitable readv(int fd, const iovec* iov, unsigned n, const CancelToken& t = {});
    IoAwaitable writev(int fd, const iovec* iov, unsigned n, const CancelToken& t = {});
    IoAwaitable recvmsg(int fd, msghdr* msg, int flags = 0, const CancelToken& t = {});
    IoAwaitable sendmsg(int fd, const msghdr* msg, int flags = 0, const CancelToken& t = {});
    IoAwaitable accept(int fd, sockaddr* addr, socklen_t* len, int flags = 0, const CancelToken& t = {});
    IoAwaitable connect(int fd, const sockaddr* addr, socklen_t len, const CancelToken& t = {});
    // Returns the ready poll mask (POLLIN...), or a negative errno.
    IoAwaitable poll(int fd, unsigned events, const CancelToken& t = {});
    // Returns 0 when the time has passed, -ECANCELED if cancelled first.
    IoAwaitable sleep_for(std::chrono::nanoseconds d, const CancelToken& t = {});

    const ReactorStats& stats() const noexcept { return stats_; }

    // Busy polling (off by default): once the ready queue is empty, keep
    // collecting completions for up to `d` before blocking in the kernel.
    // A completion that arrives meanwhile is handled without the thread
    // going to sleep and being woken, which on a virtual machine is most of
    // a round trip's latency (docs/performance.md); the price is CPU spent
    // spinning after every burst of work. An idle reactor still sleeps: the
    // spin starts afresh only after something ran. The default comes from
    // the environment, XENSOCK_BUSY_POLL_US (microseconds, read once per
    // process), so that a deployment can turn it on for xensockd without
    // code changes. Call from the reactor's own thread (or before run()).
    void set_busy_poll(std::chrono::nanoseconds d) noexcept { busy_poll_ = d; }
    std::chrono::nanoseconds busy_poll() const noexcept { return busy_poll_; }
    // In-flight io_uring requests of coroutines (the reactor's own wake-up
    // poll is not counted), for leak checks in tests.
    size_t in_flight() const noexcept { return in_flight_; }

private:
    friend class IoAwaitable;
    // Room for `count` SQEs in one submission (a linked pair must not be
    // split across two), then the first of them.
    io_uring_sqe* get_sqe(unsigned count = 1);
    void flush_sq();
    void submit_cancel(IoOp* op);
    void reap();
    void run_ready();
    void arm_wake();
    void on_wake();
    void drain_posted();
    void wake() noexcept;
    // Busy polling: true if a completion turned up within busy_poll_.
    bool poll_for_completions();

    template <typename T>
    static Task<void> run_until_body(Reactor* self, Task<T> task, detail::RunUntilState<T>* state);

    io_uring ring_{};
    std::deque<std::coroutine_handle<>> ready_;
    std::atomic<bool> stop_requested_{false};
    bool shutting_down_ = false;
    bool wake_fired_ = false;
    size_t live_tasks_ = 0;
    size_t in_flight_ = 0;
    ReactorStats stats_;
    std::chrono::nanoseconds busy_poll_{0};

    int wake_fd_ = -1;
    std::mutex posted_mutex_;
    std::vector<std::function<void()>> posted_;
    std::vector<io_uring_cqe> cqe_batch_;
};

// A static member template rather than a coroutine lambda: keeps GCC 12's
// lambda-coroutine code generation out of a path every test and tool uses.
template <typename T>
Task<void> Reactor::run_until_body(Reactor* self, Task<T> task, detail::RunUntilState<T>* state) {
    try {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(task);
        } else {
            state->value.emplace(co_await std::move(task));
        }
    } catch (...) {
        state->error = std::current_exception();
    }
    state->done = true;
    self->stop();
}

template <typename T>
T Reactor::run_until(Task<T> task) {
    detail::RunUntilState<T> state;
    spawn(run_until_body(this, std::move(task), &state));
    // A stop() from elsewhere ends one pass of run(), not the wait.
    while (!state.done) run();
    if (state.error) std::rethrow_exception(state.error);
    if constexpr (!std::is_void_v<T>) return std::move(*state.value);
}

}  // namespace xensock::rt
