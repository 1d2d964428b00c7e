#include "xensock/runtime/reactor.hpp"

#include "xensock/util/log.hpp"
#include "xensock/util/result.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>

namespace xensock::rt {
namespace {
thread_local Reactor* t_current = nullptr;

// user_data for SQEs whose completion nobody waits for (cancel requests,
// linked timeouts).
constexpr uint64_t kIgnoredCompletion = 0;

__kernel_timespec to_timespec(std::chrono::nanoseconds d) {
    if (d.count() < 0) d = std::chrono::nanoseconds(0);
    __kernel_timespec ts{};
    ts.tv_sec = static_cast<long long>(d.count() / 1000000000);
    ts.tv_nsec = static_cast<long long>(d.count() % 1000000000);
    return ts;
}
}  // namespace

// ---------------------------------------------------------------- IoAwaitable

IoAwaitable& IoAwaitable::timeout(std::chrono::nanoseconds d) & noexcept {
    has_timeout_ = true;
    deadline_ = to_timespec(d);
    return *this;
}

void IoAwaitable::await_suspend(std::coroutine_handle<> h) {
    op_.waiter = h;
    io_uring_sqe* sqe = reactor_->get_sqe();
    prep_(sqe, *this);
    io_uring_sqe_set_data(sqe, &op_);
    if (has_timeout_) {
        sqe->flags |= IOSQE_IO_LINK;
        io_uring_sqe* tsqe = reactor_->get_sqe();
        io_uring_prep_link_timeout(tsqe, &deadline_, 0);
        io_uring_sqe_set_data64(tsqe, kIgnoredCompletion);
    }
    ++reactor_->in_flight_;
    on_cancel_.attach(token_, [this] {
        cancel_requested_ = true;
        reactor_->submit_cancel(&op_);
    });
}

int IoAwaitable::await_resume() noexcept {
    on_cancel_.detach();
    if (!op_.waiter) return -ECANCELED;  // cancelled before it was submitted
    int res = op_.result;
    if (res == -ECANCELED && has_timeout_ && !cancel_requested_) return -ETIMEDOUT;
    return res;
}

// ---------------------------------------------------------------------- Event

Event::~Event() {
    // A waiter still linked here would never resume: wake it as cancelled.
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
    a->next = a->prev = nullptr;
}

void Event::Awaiter::await_suspend(std::coroutine_handle<> h) {
    handle = h;
    next = event->waiters_;
    if (next) next->prev = this;
    event->waiters_ = this;
    on_cancel.attach(token, [this] {
        event->unlink(this);
        fired = false;
        event->reactor_->schedule(handle);
    });
}

bool Event::Awaiter::await_resume() noexcept {
    on_cancel.detach();
    if (!handle) {  // did not suspend
        if (event->set_) {
            event->set_ = false;
            return true;
        }
        return false;
    }
    return fired;
}

// -------------------------------------------------------------------- Reactor

Reactor::Reactor(unsigned queue_depth) {
    io_uring_params params{};
    // One submitter thread per ring; let the kernel skip cross-thread checks.
    params.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER;
    int rc = io_uring_queue_init_params(queue_depth, &ring_, &params);
    if (rc == -EINVAL) {  // older kernel: retry without the optional flags
        params = {};
        rc = io_uring_queue_init_params(queue_depth, &ring_, &params);
    }
    if (rc < 0) throw_errno(-rc, "io_uring_queue_init (is io_uring disabled by kernel.io_uring_disabled?)");
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) {
        int err = errno;
        io_uring_queue_exit(&ring_);
        throw_errno(err, "eventfd for the reactor's wake-up");
    }
    cqe_batch_.reserve(256);
    Reactor* previous = t_current;
    t_current = this;
    spawn(wake_loop());
    run_ready();
    t_current = previous;
}

Reactor::~Reactor() {
    Reactor* previous = t_current;
    t_current = this;
    internal_.cancel();
    // Let everything that was cancelled finish: no completion may outlive us.
    while (in_flight_ > 0 || !ready_.empty()) {
        run_ready();
        if (in_flight_ == 0) break;
        int rc = io_uring_submit_and_wait(&ring_, 1);
        if (rc < 0 && rc != -EINTR) break;
        reap();
    }
    run_ready();
    if (live_tasks_ > 0) log::warn("reactor destroyed with {} task(s) still suspended", live_tasks_);
    close(wake_fd_);
    io_uring_queue_exit(&ring_);
    t_current = previous;
}

Reactor* Reactor::current() noexcept { return t_current; }

io_uring_sqe* Reactor::get_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (!sqe) {
        // SQ ring full: hand what we have to the kernel and try again.
        int rc = io_uring_submit(&ring_);
        if (rc > 0) stats_.submitted += static_cast<uint64_t>(rc);
        sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
}

void Reactor::submit_cancel(IoOp* op) {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_cancel(sqe, op, 0);
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
        auto* op = reinterpret_cast<IoOp*>(static_cast<uintptr_t>(c.user_data));
        op->result = c.res;
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

void Reactor::run() {
    Reactor* previous = t_current;
    t_current = this;
    while (true) {
        run_ready();
        if (stop_requested_) break;
        int rc = io_uring_submit_and_wait(&ring_, 1);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
            log::error("io_uring_submit_and_wait: {}", errno_text(-rc));
            break;
        }
        if (rc > 0) stats_.submitted += static_cast<uint64_t>(rc);
        ++stats_.wakeups;
        reap();
    }
    // Push out SQEs queued by the last coroutines (e.g. cancellations).
    int rc = io_uring_submit(&ring_);
    if (rc > 0) stats_.submitted += static_cast<uint64_t>(rc);
    t_current = previous;
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
    uint64_t one = 1;
    // EAGAIN means the counter is already non-zero: a wake-up is pending.
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof one);
}

void Reactor::drain_posted() {
    std::vector<std::function<void()>> batch;
    {
        std::lock_guard lock(posted_mutex_);
        batch.swap(posted_);
    }
    for (auto& fn : batch) fn();
}

Task<void> Reactor::wake_loop() {
    auto token = internal_.token();
    while (!token.cancelled()) {
        int rc = co_await poll(wake_fd_, POLLIN, token);
        if (rc < 0) break;
        uint64_t value;
        [[maybe_unused]] ssize_t n = ::read(wake_fd_, &value, sizeof value);
        drain_posted();
    }
}

// ---------------------------------------------------------- operation makers

#define XS_OP(name, prep_body)                                                         \
    static void prep_##name(io_uring_sqe* sqe, const IoAwaitable& a) { prep_body; }

XS_OP(recv, io_uring_prep_recv(sqe, a.fd_, a.ptr_, a.len_, a.flags_))
XS_OP(send, io_uring_prep_send(sqe, a.fd_, a.ptr_, a.len_, a.flags_))
XS_OP(readv, io_uring_prep_readv(sqe, a.fd_, static_cast<const iovec*>(a.ptr_), static_cast<unsigned>(a.len_), 0))
XS_OP(writev, io_uring_prep_writev(sqe, a.fd_, static_cast<const iovec*>(a.ptr_), static_cast<unsigned>(a.len_), 0))
XS_OP(recvmsg, io_uring_prep_recvmsg(sqe, a.fd_, static_cast<msghdr*>(a.ptr_), static_cast<unsigned>(a.flags_)))
XS_OP(sendmsg, io_uring_prep_sendmsg(sqe, a.fd_, static_cast<const msghdr*>(a.ptr_), static_cast<unsigned>(a.flags_)))
XS_OP(accept, io_uring_prep_accept(sqe, a.fd_, static_cast<sockaddr*>(a.ptr_),
                                   reinterpret_cast<socklen_t*>(static_cast<uintptr_t>(a.arg_)), a.flags_))
XS_OP(connect, io_uring_prep_connect(sqe, a.fd_, static_cast<const sockaddr*>(a.ptr_), static_cast<socklen_t>(a.len_)))
XS_OP(poll, io_uring_prep_poll_add(sqe, a.fd_, static_cast<unsigned>(a.arg_)))
// The timespec lives in the awaitable, which outlives the submission.
XS_OP(sleep, auto& ts = const_cast<__kernel_timespec&>(a.ts_); ts = to_timespec(std::chrono::nanoseconds(a.len_));
      io_uring_prep_timeout(sqe, &ts, 0, 0))
#undef XS_OP

IoAwaitable Reactor::recv(int fd, void* buf, size_t len, int flags, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_recv, fd, buf, len, 0, flags);
}
IoAwaitable Reactor::send(int fd, const void* buf, size_t len, int flags, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_send, fd, const_cast<void*>(buf), len, 0, flags);
}
IoAwaitable Reactor::readv(int fd, const iovec* iov, unsigned n, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_readv, fd, const_cast<iovec*>(iov), n, 0, 0);
}
IoAwaitable Reactor::writev(int fd, const iovec* iov, unsigned n, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_writev, fd, const_cast<iovec*>(iov), n, 0, 0);
}
IoAwaitable Reactor::recvmsg(int fd, msghdr* msg, int flags, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_recvmsg, fd, msg, 0, 0, flags);
}
IoAwaitable Reactor::sendmsg(int fd, const msghdr* msg, int flags, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_sendmsg, fd, const_cast<msghdr*>(msg), 0, 0, flags);
}
IoAwaitable Reactor::accept(int fd, sockaddr* addr, socklen_t* len, int flags, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_accept, fd, addr, 0, reinterpret_cast<uintptr_t>(len), flags);
}
IoAwaitable Reactor::connect(int fd, const sockaddr* addr, socklen_t len, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_connect, fd, const_cast<sockaddr*>(addr), len, 0, 0);
}
IoAwaitable Reactor::poll(int fd, unsigned events, CancelToken t) {
    return IoAwaitable(*this, std::move(t), prep_poll, fd, nullptr, 0, events, 0);
}
IoAwaitable Reactor::sleep_for(std::chrono::nanoseconds d, CancelToken t) {
    const auto ns = static_cast<uint64_t>(std::max<int64_t>(0, d.count()));
    return IoAwaitable(*this, std::move(t), prep_sleep, -1, nullptr, ns, 0, 0);
}

}  // namespace xensock::rt
