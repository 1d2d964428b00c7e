#include "xensock/runtime/reactor.hpp"

#include "xensock/util/log.hpp"
#include "xensock/util/result.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace xensock::rt {
namespace {
thread_local Reactor* t_current = nullptr;

// user_data for SQEs whose completion nobody waits for (cancel requests,
// linked timeouts). IoOp pointers are aligned, so 0 and 1 are never ops.
constexpr uint64_t kIgnoredCompletion = 0;
// The reactor's own poll on its eventfd (post(), stop() from other threads).
constexpr uint64_t kWakeCompletion = 1;

// Shutdown gives up on operations the kernel has not completed this long
// after being told to cancel them (a hung device, not a socket).
constexpr std::chrono::milliseconds kShutdownWait{2000};
// ...and on coroutines that keep submitting new operations after each
// cancellation instead of unwinding.
constexpr int kShutdownRounds = 1000;

// XENSOCK_BUSY_POLL_US: the default busy-poll time of every reactor of this
// process (see Reactor::set_busy_poll). Malformed or negative values are 0.
std::chrono::nanoseconds default_busy_poll() {
    static const std::chrono::nanoseconds value = [] {
        const char* text = std::getenv("XENSOCK_BUSY_POLL_US");
        if (text == nullptr || *text == '\0') return std::chrono::nanoseconds(0);
        char* end = nullptr;
        const long long us = std::strtoll(text, &end, 10);
        if (*end != '\0' || us <= 0 || us > 1000000) return std::chrono::nanoseconds(0);
        return std::chrono::nanoseconds(std::chrono::microseconds(us));
    }();
    return value;
}

__kernel_timespec to_timespec(std::chrono::nanoseconds d) {
    if (d.count() < 0) d = std::chrono::nanoseconds(0);
    __kernel_timespec ts{};
    ts.tv_sec = static_cast<long long>(d.count() / 1000000000);
    ts.tv_nsec = static_cast<long long>(d.count() % 1000000000);
    return ts;
}

struct CurrentScope {
    explicit CurrentScope(Reactor* r) noexcept : previous(std::exchange(t_current, r)) {}
    ~CurrentScope() { t_current = previous; }
    CurrentScope(const CurrentScope&) = delete;
    CurrentScope& operator=(const CurrentScope&) = delete;
    Reactor* previous;
};
}  // namespace

// ---------------------------------------------------------------- IoAwaitable

IoAwaitable::IoAwaitable(IoAwaitable&& o) noexcept
    : reactor_(o.reactor_),
      token_(o.token_),
      has_timeout_(o.has_timeout_),
      is_sleep_(o.is_sleep_),
      deadline_(o.deadline_),
      prep_(o.prep_),
      fd_(o.fd_),
      ptr_(o.ptr_),
      len_(o.len_),
      arg_(o.arg_),
      flags_(o.flags_),
      ts_(o.ts_) {
    // Once submitted, the kernel and the cancel callback point at `o`.
    assert(!o.op_.waiter && "moving an awaitable that is being awaited");
}

IoAwaitable& IoAwaitable::timeout(std::chrono::nanoseconds d) & noexcept {
    has_timeout_ = true;
    deadline_ = to_timespec(d);
    return *this;
}

void IoAwaitable::await_suspend(std::coroutine_handle<> h) {
    // The op and its linked timeout must reach the kernel in one submission.
    io_uring_sqe* sqe = reactor_->get_sqe(has_timeout_ ? 2 : 1);
    prep_(sqe, *this);
    io_uring_sqe_set_data(sqe, &op_);
    if (has_timeout_) {
        sqe->flags |= IOSQE_IO_LINK;
        io_uring_sqe* tsqe = io_uring_get_sqe(&reactor_->ring_);  // reserved above
        io_uring_prep_link_timeout(tsqe, &deadline_, 0);
        io_uring_sqe_set_data64(tsqe, kIgnoredCompletion);
    }
    op_.waiter = h;
    ++reactor_->in_flight_;
    on_cancel_.attach(token_, [this] {
        // Completed but not yet resumed: nothing left to cancel, and the
        // result (say -ETIMEDOUT) stands.
        if (op_.completed) return;
        cancel_requested_ = true;
        reactor_->submit_cancel(&op_);
    });
}

int IoAwaitable::await_resume() noexcept {
    on_cancel_.detach();
    if (!op_.waiter) return -ECANCELED;  // cancelled before it was submitted
    const int res = op_.result;
    if (is_sleep_ && res == -ETIME) return 0;  // the timer ran out: slept
    // -ECANCELED that nobody asked for comes from the linked timeout firing
    // (or from the reactor shutting down, which is a cancellation).
    if (res == -ECANCELED && has_timeout_ && !cancel_requested_ && !reactor_->shutting_down_) return -ETIMEDOUT;
    return res;
}

// ---------------------------------------------------------------------- Event

Event::~Event() {
    // A waiter still linked here would never resume: wake it as not fired.
    while (Awaiter* a = waiters_) {
        unlink(a);
        a->fired = false;
        a->on_cancel.detach();
        reactor_->schedule(a->handle);
    }
}

void Event::set() {
    if (!waiters_) {
        set_ = true;
        return;
    }
    while (Awaiter* a = waiters_) {
        unlink(a);
        a->fired = true;
        a->on_cancel.detach();
        reactor_->schedule(a->handle);
    }
}

void Event::unlink(Awaiter* a) noexcept {
    if (a->prev) a->prev->next = a->next;
    else waiters_ = a->next;
    if (a->next) a->next->prev = a->prev;
    else last_ = a->prev;
    a->next = a->prev = nullptr;
}

void Event::Awaiter::await_suspend(std::coroutine_handle<> h) {
    handle = h;
    prev = event->last_;
    if (prev) prev->next = this;
    else event->waiters_ = this;
    event->last_ = this;
    on_cancel.attach(token, [this] {
        event->unlink(this);
        fired = false;
        event->reactor_->schedule(handle);
    });
}

bool Event::Awaiter::await_resume() noexcept {
    on_cancel.detach();
    if (handle) return fired;  // woken by set(), cancellation or ~Event
    // Did not suspend: cancelled beforehand, or the event was already set.
    if (token.cancelled()) return false;
    event->set_ = false;
    return true;
}

// -------------------------------------------------------------------- Reactor

Reactor::Reactor(unsigned queue_depth) {
    io_uring_params params{};
    // No IORING_SETUP_SINGLE_ISSUER: it binds the ring to the creating
    // thread, so a reactor built on one thread and run on another failed
    // every submission with -EEXIST.
    params.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN;
    int rc = io_uring_queue_init_params(queue_depth, &ring_, &params);
    if (rc == -EINVAL) {  // older kernel: retry without the optional flags
        params = {};
        rc = io_uring_queue_init_params(queue_depth, &ring_, &params);
    }
    if (rc < 0) throw_errno(-rc, "io_uring_queue_init (is io_uring disabled by kernel.io_uring_disabled?)");
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) {
        const int err = errno;
        io_uring_queue_exit(&ring_);
        throw_errno(err, "eventfd for the reactor's wake-up");
    }
    cqe_batch_.reserve(256);
    busy_poll_ = default_busy_poll();
    // Submitted with the first batch. A bare SQE, not a coroutine, so it
    // counts neither as a live task nor as an operation in flight.
    arm_wake();
}

Reactor::~Reactor() {
    CurrentScope scope(this);
    shutting_down_ = true;
    try {
        // Posted functions not run yet are dropped, not run: their owners may
        // already have torn down what they would touch.
        for (int round = 0;; ++round) {
            run_ready();
            if (in_flight_ == 0) break;
            if (round == kShutdownRounds) {
                log::error("reactor shutdown: {} operation(s) still submitted after {} rounds; leaking their frames",
                           in_flight_, round);
                break;
            }
            io_uring_sqe* sqe = get_sqe();
            io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
            io_uring_sqe_set_data64(sqe, kIgnoredCompletion);
            // Progress is an operation ending (in_flight_ going down), not
            // just any completion: the cancel request's own completion
            // arrives at once, whether or not anything was cancelled. So
            // wait, up to the limit, until one of them ends.
            const size_t before = in_flight_;
            const auto give_up = std::chrono::steady_clock::now() + kShutdownWait;
            bool failed = false;
            while (in_flight_ == before) {
                const auto left = give_up - std::chrono::steady_clock::now();
                if (left <= std::chrono::steady_clock::duration::zero()) break;
                __kernel_timespec limit = to_timespec(left);
                io_uring_cqe* unused = nullptr;
                const int rc = io_uring_submit_and_wait_timeout(&ring_, &unused, 1, &limit, nullptr);
                if (rc < 0 && rc != -ETIME && rc != -EINTR) {
                    log::error("reactor shutdown: io_uring_submit_and_wait: {}", errno_text(-rc));
                    failed = true;
                    break;
                }
                reap();
            }
            if (failed) break;
            if (in_flight_ == before) {
                log::error("reactor shutdown: {} operation(s) ignore cancellation for {} ms; leaking their frames",
                           in_flight_, std::chrono::milliseconds(kShutdownWait).count());
                break;
            }
        }
    } catch (const std::exception& e) {
        log::error("reactor shutdown: {}", e.what());
    }
    if (live_tasks_ > 0) log::warn("reactor destroyed with {} task(s) still suspended", live_tasks_);
    io_uring_queue_exit(&ring_);
    close(wake_fd_);
}

Reactor* Reactor::current() noexcept { return t_current; }

io_uring_sqe* Reactor::get_sqe(unsigned count) {
    while (io_uring_sq_space_left(&ring_) < count) flush_sq();
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    assert(sqe);
    return sqe;
}

void Reactor::flush_sq() {
    const int rc = io_uring_submit(&ring_);
    if (rc >= 0) {
        stats_.submitted += static_cast<uint64_t>(rc);
        return;
    }
    if (rc == -EINTR) return;
    if (rc == -EAGAIN || rc == -EBUSY) {
        // Out of request memory, or completions backed up: consume what is
        // there (waiters only get queued, nothing runs) and let the kernel
        // flush its overflow list before trying again.
        reap();
        io_uring_get_events(&ring_);
        reap();
        return;
    }
    throw_errno(-rc, "io_uring_submit");
}

void Reactor::submit_cancel(IoOp* op) {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_cancel64(sqe, reinterpret_cast<uintptr_t>(op), 0);
    io_uring_sqe_set_data64(sqe, kIgnoredCompletion);
}

void Reactor::reap() {
    cqe_batch_.clear();
    unsigned head;
    io_uring_cqe* cqe;
    unsigned count = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
        cqe_batch_.push_back(*cqe);
        ++count;
    }
    io_uring_cq_advance(&ring_, count);
    stats_.completed += count;
    for (const io_uring_cqe& c : cqe_batch_) {
        if (c.user_data == kIgnoredCompletion) continue;
        if (c.user_data == kWakeCompletion) {
            wake_fired_ = true;  // handled by the loop, outside reap()
            continue;
        }
        auto* op = reinterpret_cast<IoOp*>(static_cast<uintptr_t>(c.user_data));
        op->result = c.res;
        op->completed = true;
        --in_flight_;
        ready_.push_back(op->waiter);
    }
}

void Reactor::run_ready() {
    // Resume in FIFO order; coroutines may schedule more while we run.
    while (!ready_.empty()) {
        auto h = ready_.front();
        ready_.pop_front();
        h.resume();
    }
}

void Reactor::arm_wake() {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_poll_add(sqe, wake_fd_, POLLIN);
    io_uring_sqe_set_data64(sqe, kWakeCompletion);
}

void Reactor::on_wake() {
    wake_fired_ = false;
    uint64_t value;
    // Reset the counter before re-arming, or the poll fires again at once.
    [[maybe_unused]] ssize_t n = ::read(wake_fd_, &value, sizeof value);
    if (!shutting_down_) arm_wake();
    drain_posted();
}

void Reactor::wake() noexcept {
    uint64_t one = 1;
    // EAGAIN means the counter is already non-zero: a wake-up is pending.
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof one);
}

// Submits what is queued and runs the kernel's pending completion work
// (IORING_SETUP_COOP_TASKRUN defers it until we enter the kernel) in a loop,
// without sleeping, until a completion is there or busy_poll_ has passed.
bool Reactor::poll_for_completions() {
    const auto deadline = std::chrono::steady_clock::now() + busy_poll_;
    while (!stop_requested_.load(std::memory_order_acquire)) {
        const int rc = io_uring_submit_and_get_events(&ring_);
        if (rc > 0) stats_.submitted += static_cast<uint64_t>(rc);
        // Real failures are reported by the blocking wait that follows.
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) return false;
        if (io_uring_cq_ready(&ring_) > 0) return true;
        if (std::chrono::steady_clock::now() >= deadline) return false;
    }
    return false;
}

void Reactor::run() {
    CurrentScope scope(this);
    while (true) {
        run_ready();
        if (stop_requested_.load(std::memory_order_acquire)) break;
        if (busy_poll_.count() > 0) {
            if (poll_for_completions()) {
                ++stats_.busy_polls;
                reap();
                if (wake_fired_) on_wake();
                continue;
            }
            if (stop_requested_.load(std::memory_order_acquire)) break;
        }
        const int rc = io_uring_submit_and_wait(&ring_, 1);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY && rc != -ETIME) {
            // Breaking out would leave every coroutine hanging unnoticed.
            throw_errno(-rc, "io_uring_submit_and_wait");
        }
        if (rc > 0) stats_.submitted += static_cast<uint64_t>(rc);
        ++stats_.wakeups;
        reap();
        if (wake_fired_) on_wake();
    }
    stop_requested_.store(false, std::memory_order_release);
    // Push out SQEs queued by the last coroutines (e.g. cancellations).
    const int rc = io_uring_submit(&ring_);
    if (rc > 0) stats_.submitted += static_cast<uint64_t>(rc);
}

void Reactor::stop() noexcept {
    stop_requested_.store(true, std::memory_order_release);
    // From another thread the reactor may be asleep in the kernel.
    if (t_current != this) wake();
}

namespace {
// The frame of a spawned task: started from the ready queue, destroys itself
// when done, and keeps the reactor's count of live tasks.
struct DetachedFrame {
    struct promise_type {
        DetachedFrame get_return_object() noexcept {
            return {std::coroutine_handle<promise_type>::from_promise(*this)};
        }
        std::suspend_always initial_suspend() const noexcept { return {}; }
        std::suspend_never final_suspend() const noexcept { return {}; }
        void return_void() noexcept {}
        void unhandled_exception() noexcept { std::terminate(); }
    };
    std::coroutine_handle<promise_type> handle;
};

DetachedFrame run_detached(size_t* live_tasks, Task<void> inner) {
    try {
        co_await std::move(inner);
    } catch (const std::exception& e) {
        log::error("a background task failed: {}", e.what());
    } catch (...) {
        log::error("a background task failed with an unknown exception");
    }
    --*live_tasks;
}
}  // namespace

void Reactor::spawn(Task<void> task) {
    ++live_tasks_;
    ready_.push_back(run_detached(&live_tasks_, std::move(task)).handle);
}

void Reactor::post(std::function<void()> fn) {
    {
        std::lock_guard lock(posted_mutex_);
        posted_.push_back(std::move(fn));
    }
    wake();
}

void Reactor::drain_posted() {
    std::vector<std::function<void()>> batch;
    {
        std::lock_guard lock(posted_mutex_);
        batch.swap(posted_);
    }
    for (auto& fn : batch) {
        try {
            fn();
        } catch (const std::exception& e) {
            log::error("a posted function failed: {}", e.what());
        } catch (...) {
            log::error("a posted function failed with an unknown exception");
        }
    }
}

// ---------------------------------------------------------- operation makers

#define XS_OP(name, prep_body)                                                         \
    static void prep_##name(io_uring_sqe* sqe, const IoAwaitable& a) { prep_body; }

// Offset -1: the file position, as readv(2)/writev(2) use (0 re-read the
// start of a regular file on every call).
constexpr uint64_t kFilePosition = static_cast<uint64_t>(-1);

XS_OP(recv, io_uring_prep_recv(sqe, a.fd_, a.ptr_, a.len_, a.flags_))
XS_OP(send, io_uring_prep_send(sqe, a.fd_, a.ptr_, a.len_, a.flags_))
XS_OP(readv, io_uring_prep_readv(sqe, a.fd_, static_cast<const iovec*>(a.ptr_), static_cast<unsigned>(a.len_),
                                 kFilePosition))
XS_OP(writev, io_uring_prep_writev(sqe, a.fd_, static_cast<const iovec*>(a.ptr_), static_cast<unsigned>(a.len_),
                                   kFilePosition))
XS_OP(recvmsg, io_uring_prep_recvmsg(sqe, a.fd_, static_cast<msghdr*>(a.ptr_), static_cast<unsigned>(a.flags_)))
XS_OP(sendmsg, io_uring_prep_sendmsg(sqe, a.fd_, static_cast<const msghdr*>(a.ptr_), static_cast<unsigned>(a.flags_)))
XS_OP(accept, io_uring_prep_accept(sqe, a.fd_, static_cast<sockaddr*>(a.ptr_),
                                   reinterpret_cast<socklen_t*>(static_cast<uintptr_t>(a.arg_)), a.flags_))
XS_OP(connect, io_uring_prep_connect(sqe, a.fd_, static_cast<const sockaddr*>(a.ptr_), static_cast<socklen_t>(a.len_)))
XS_OP(poll, io_uring_prep_poll_add(sqe, a.fd_, static_cast<unsigned>(a.arg_)))
// The timespec lives in the awaitable, which outlives the submission.
XS_OP(sleep, io_uring_prep_timeout(sqe, const_cast<__kernel_timespec*>(&a.ts_), 0, 0))
#undef XS_OP

IoAwaitable Reactor::recv(int fd, void* buf, size_t len, int flags, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_recv, fd, buf, len, 0, flags);
}
IoAwaitable Reactor::send(int fd, const void* buf, size_t len, int flags, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_send, fd, const_cast<void*>(buf), len, 0, flags);
}
IoAwaitable Reactor::readv(int fd, const iovec* iov, unsigned n, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_readv, fd, const_cast<iovec*>(iov), n, 0, 0);
}
IoAwaitable Reactor::writev(int fd, const iovec* iov, unsigned n, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_writev, fd, const_cast<iovec*>(iov), n, 0, 0);
}
IoAwaitable Reactor::recvmsg(int fd, msghdr* msg, int flags, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_recvmsg, fd, msg, 0, 0, flags);
}
IoAwaitable Reactor::sendmsg(int fd, const msghdr* msg, int flags, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_sendmsg, fd, const_cast<msghdr*>(msg), 0, 0, flags);
}
IoAwaitable Reactor::accept(int fd, sockaddr* addr, socklen_t* len, int flags, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_accept, fd, addr, 0, reinterpret_cast<uintptr_t>(len), flags);
}
IoAwaitable Reactor::connect(int fd, const sockaddr* addr, socklen_t len, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_connect, fd, const_cast<sockaddr*>(addr), len, 0, 0);
}
IoAwaitable Reactor::poll(int fd, unsigned events, const CancelToken& t) {
    return IoAwaitable(*this, t, prep_poll, fd, nullptr, 0, events, 0);
}
IoAwaitable Reactor::sleep_for(std::chrono::nanoseconds d, const CancelToken& t) {
    IoAwaitable a(*this, t, prep_sleep, -1, nullptr, 0, 0, 0);
    a.ts_ = to_timespec(d);
    a.is_sleep_ = true;
    return a;
}

}  // namespace xensock::rt
