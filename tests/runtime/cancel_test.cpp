// Cancellation: every kind of operation cancelled while it sits in the kernel
// returns -ECANCELED promptly and its coroutine unwinds; parents cancel
// children; an already-cancelled token submits nothing; a reactor destroyed
// with operations in flight finishes them first.
#include "support.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>

#include <functional>
#include <vector>

namespace xensock::rt::test {
namespace {

// Lets the operation reach the kernel and wait there before cancelling. The
// delay is not synchronisation: a shorter one cancels earlier, same result.
Task<void> cancel_after(Reactor& r, CancelSource& src, std::chrono::milliseconds delay) {
    const int rc = co_await r.sleep_for(delay);
    CHECK(rc == 0);
    src.cancel();
}

// Set by a coroutine on its way out, after the cancelled await.
struct Trace {
    bool after = false;
    int unwound = 0;  // DtorCounter in the frame
};

Task<int> recv_op(Reactor& r, int fd, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    char buf[32];
    const int rc = co_await r.recv(fd, buf, sizeof buf, 0, t);
    tr.after = true;
    co_return rc;
}

Task<int> recv_deadline_op(Reactor& r, int fd, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    char buf[32];
    const int rc = co_await r.recv(fd, buf, sizeof buf, 0, t).timeout(10s);
    tr.after = true;
    co_return rc;
}

Task<int> accept_op(Reactor& r, int fd, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.accept(fd, nullptr, nullptr, SOCK_CLOEXEC, t);
    if (rc >= 0) ::close(rc);
    tr.after = true;
    co_return rc;
}

Task<int> connect_op(Reactor& r, int fd, sockaddr_in to, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof to, t);
    tr.after = true;
    co_return rc;
}

Task<int> poll_op(Reactor& r, int fd, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.poll(fd, POLLIN, t);
    tr.after = true;
    co_return rc;
}

Task<int> sleep_op(Reactor& r, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.sleep_for(std::chrono::hours(1), t);
    tr.after = true;
    co_return rc;
}

Task<int> event_op(Event& ev, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const bool fired = co_await ev.wait(t);
    tr.after = true;
    co_return fired ? 1 : -ECANCELED;
}

// Runs the operation made by `make`, cancels it mid-way, and checks the
// outcome: -ECANCELED, promptly, with the coroutine unwound and nothing left
// in flight.
void expect_cancelled_mid_op(const std::function<Task<int>(Reactor&, CancelToken, Trace&)>& make) {
    Watchdog wd;
    Reactor r;
    CancelSource src;
    Trace tr;
    r.spawn(cancel_after(r, src, 30ms));
    const auto t0 = Clock::now();
    const int rc = r.run_until(make(r, src.token(), tr));
    const auto elapsed = Clock::now() - t0;
    CHECK(rc == -ECANCELED);
    CHECK(elapsed >= 30ms);  // it really waited for the cancel
    CHECK(elapsed < 2s);     // and the cancel was prompt
    CHECK(tr.after);
    CHECK(tr.unwound == 1);
    CHECK(r.in_flight() == 0);
    CHECK(r.live_tasks() == 0);
}

Task<void> record_recv(Reactor& r, int fd, CancelToken t, int& out, Latch& latch) {
    char buf[8];
    out = co_await r.recv(fd, buf, sizeof buf, 0, t);
    latch.count_down();
}

Task<void> record_poll(Reactor& r, int fd, CancelToken t, int& out, Latch& latch) {
    out = co_await r.poll(fd, POLLIN, t);
    latch.count_down();
}

Task<void> parent_cancels_children(Reactor& r, int fd, int pipe_fd) {
    CancelSource parent;
    CancelSource child(parent.token());
    CancelSource grandchild(child.token());
    CancelSource unrelated;
    int rc_child = 1, rc_grandchild = 1, rc_parent = 1, rc_unrelated = 1;
    Latch latch(r, 3);
    r.spawn(record_recv(r, fd, child.token(), rc_child, latch));
    r.spawn(record_recv(r, fd, grandchild.token(), rc_grandchild, latch));
    r.spawn(record_poll(r, pipe_fd, parent.token(), rc_parent, latch));
    Latch other(r, 1);
    r.spawn(record_poll(r, pipe_fd, unrelated.token(), rc_unrelated, other));
    co_await cancel_after(r, parent, 20ms);
    CHECK(child.cancelled());
    CHECK(grandchild.cancelled());
    const bool all = co_await latch.zero.wait();
    CHECK(all);
    CHECK(rc_child == -ECANCELED);
    CHECK(rc_grandchild == -ECANCELED);
    CHECK(rc_parent == -ECANCELED);
    CHECK(rc_unrelated == 1);  // still waiting
    CHECK_FALSE(unrelated.cancelled());
    CHECK(r.in_flight() == 1);
    unrelated.cancel();
    const bool done = co_await other.zero.wait();
    CHECK(done);
    CHECK(rc_unrelated == -ECANCELED);
}

Task<void> child_of_cancelled_parent(Reactor& r, int fd) {
    CancelSource parent;
    parent.cancel();
    CancelSource child(parent.token());  // born cancelled
    CHECK(child.cancelled());
    char buf[4];
    const int rc = co_await r.recv(fd, buf, sizeof buf, 0, child.token());
    CHECK(rc == -ECANCELED);
}

Task<void> all_ops_with_cancelled_token(Reactor& r, CancelToken t, int sock, int listen_fd, int pipe_fd,
                                        sockaddr_in to, Event& ev, int& steps) {
    char buf[8];
    iovec iov{buf, sizeof buf};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    int rc = co_await r.recv(sock, buf, sizeof buf, 0, t);
    CHECK(rc == -ECANCELED);
    CHECK(r.in_flight() == 0);
    rc = co_await r.send(sock, buf, sizeof buf, 0, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.readv(sock, &iov, 1, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.writev(sock, &iov, 1, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.recvmsg(sock, &msg, 0, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.sendmsg(sock, &msg, 0, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.accept(listen_fd, nullptr, nullptr, 0, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.connect(sock, reinterpret_cast<const sockaddr*>(&to), sizeof to, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.poll(pipe_fd, POLLIN, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.sleep_for(1ms, t);
    CHECK(rc == -ECANCELED);
    rc = co_await r.recv(sock, buf, sizeof buf, 0, t).timeout(1ms);
    CHECK(rc == -ECANCELED);  // cancelled, not timed out: it never started
    // A set event is not consumed by a cancelled wait: cancellation wins.
    ev.set();
    const bool fired = co_await ev.wait(t);
    CHECK_FALSE(fired);
    CHECK(ev.is_set());
    CHECK(r.in_flight() == 0);
    steps = 1;
}

Task<void> noop() { co_return; }

// Blocks in recv until cancelled, then (on its way out) counts.
Task<void> blocked_recv(Reactor& r, int fd, CancelToken t, int& resumed, int& unwound, int& result) {
    DtorCounter guard(unwound);
    char buf[16];
    result = co_await r.recv(fd, buf, sizeof buf, 0, t);
    ++resumed;
}

// Cleans up with a further operation after being cancelled, as a session
// closing its socket politely would.
Task<void> cleanup_after_cancel(Reactor& r, int fd, CancelToken t, int& resumed, int& unwound) {
    DtorCounter guard(unwound);
    char buf[16];
    const int rc = co_await r.recv(fd, buf, sizeof buf, 0, t);
    CHECK(rc == -ECANCELED);
    const int rc2 = co_await r.sleep_for(std::chrono::hours(1));  // no token
    CHECK(rc2 == -ECANCELED);  // the dying reactor cancels it too
    ++resumed;
}

// The shape of the engine's pumps: a member coroutine polling, in a loop,
// under one named token. With the token taken by value, GCC 12 -O2 read the
// argument's copy from a stale stack slot on every other iteration (wrong
// -ECANCELED, corrupted cancel list, then a crash); the makers take it by
// const reference since. A temporary token is exercised as well.
struct Pump {
    Reactor* reactor;
    CancelSource stop;
    int ready_fd;
    int idle_fd;
    int polls_ok = 0;

    Task<void> run() {
        const auto token = stop.token();
        while (true) {
            const int a = co_await reactor->poll(ready_fd, POLLIN, token);
            if (a == -ECANCELED) co_return;
            const int b = co_await reactor->poll(ready_fd, POLLIN, stop.token());
            if (b == -ECANCELED) co_return;
            if ((a & POLLIN) && (b & POLLIN)) ++polls_ok;
            if (polls_ok == 500) break;
        }
        CHECK(reactor->in_flight() == 0);
        // The cancel list is intact: a later wait under the token is
        // cancelled, once.
        reactor->spawn(cancel_after(*reactor, stop, 10ms));
        const int rc = co_await reactor->poll(idle_fd, POLLIN, token);
        CHECK(rc == -ECANCELED);
    }
};

}  // namespace

TEST_SUITE("cancel") {

TEST_CASE("a recv cancelled mid-operation returns -ECANCELED") {
    auto [a, b] = tcp_pair();
    expect_cancelled_mid_op([fd = b.get()](Reactor& r, CancelToken t, Trace& tr) { return recv_op(r, fd, t, tr); });
}

TEST_CASE("a recv with a deadline cancelled before it returns -ECANCELED, not -ETIMEDOUT") {
    auto [a, b] = tcp_pair();
    expect_cancelled_mid_op(
        [fd = b.get()](Reactor& r, CancelToken t, Trace& tr) { return recv_deadline_op(r, fd, t, tr); });
}

TEST_CASE("an accept cancelled mid-operation returns -ECANCELED") {
    Listener l = listen_loopback();
    expect_cancelled_mid_op(
        [fd = l.fd.get()](Reactor& r, CancelToken t, Trace& tr) { return accept_op(r, fd, t, tr); });
}

TEST_CASE("a connect cancelled mid-operation returns -ECANCELED") {
    // Backlog 0 admits one connection; while it sits unaccepted the kernel
    // drops further SYNs, so the next connect stays in SYN_SENT (loopback only).
    Listener l = listen_loopback(0);
    Fd first = tcp_socket();
    REQUIRE(::connect(first.get(), reinterpret_cast<const sockaddr*>(&l.addr), sizeof l.addr) == 0);
    Fd second = tcp_socket();
    expect_cancelled_mid_op([fd = second.get(), to = l.addr](Reactor& r, CancelToken t, Trace& tr) {
        return connect_op(r, fd, to, t, tr);
    });
}

TEST_CASE("a poll cancelled mid-operation returns -ECANCELED") {
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
    Fd rd(p[0]), wr(p[1]);
    expect_cancelled_mid_op([fd = rd.get()](Reactor& r, CancelToken t, Trace& tr) { return poll_op(r, fd, t, tr); });
}

TEST_CASE("a sleep cancelled mid-operation returns -ECANCELED") {
    expect_cancelled_mid_op([](Reactor& r, CancelToken t, Trace& tr) { return sleep_op(r, t, tr); });
}

TEST_CASE("an Event wait cancelled mid-operation returns not-fired") {
    Reactor* owner = nullptr;
    std::unique_ptr<Event> ev;
    expect_cancelled_mid_op([&](Reactor& r, CancelToken t, Trace& tr) {
        owner = &r;
        ev = std::make_unique<Event>(r);
        return event_op(*ev, t, tr);
    });
    // Still usable, with no stale waiter left behind: a set now is stored.
    REQUIRE(ev);
    ev->set();
    CHECK(ev->is_set());
    ev.reset();
    (void)owner;
}

TEST_CASE("cancelling a parent source cancels its children and grandchildren") {
    Watchdog wd;
    Reactor r;
    auto [a, b] = tcp_pair();
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
    Fd rd(p[0]), wr(p[1]);
    r.run_until(parent_cancels_children(r, b.get(), rd.get()));
    r.run_until(child_of_cancelled_parent(r, b.get()));
    CHECK(r.in_flight() == 0);
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("one token handed to awaitables in a loop stays intact") {
    Watchdog wd;
    Reactor r;
    Fd ready(::eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK));  // always readable
    REQUIRE(ready.get() >= 0);
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
    Fd rd(p[0]), wr(p[1]);
    Pump pump{&r, {}, ready.get(), rd.get()};
    r.run_until(pump.run());
    CHECK(pump.polls_ok == 500);
    CHECK(r.in_flight() == 0);
}

TEST_CASE("a child source destroyed before its parent is cancelled is unlinked") {
    CancelSource parent;
    {
        CancelSource child(parent.token());
        CancelSource child2(parent.token());
    }
    parent.cancel();  // must not touch the destroyed children (ASan)
    CHECK(parent.cancelled());
}

TEST_CASE("an already-cancelled token returns -ECANCELED without submitting") {
    Watchdog wd;
    Reactor r;
    auto [a, b] = tcp_pair();
    Listener l = listen_loopback();
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
    Fd rd(p[0]), wr(p[1]);
    Event ev(r);
    r.run_until(noop());  // settle whatever the reactor submits for itself
    CancelSource src;
    src.cancel();
    const uint64_t submitted = r.stats().submitted;
    int steps = 0;
    r.run_until(all_ops_with_cancelled_token(r, src.token(), b.get(), l.fd.get(), rd.get(), l.addr, ev, steps));
    CHECK(steps == 1);
    CHECK(r.in_flight() == 0);
    CHECK(r.stats().submitted == submitted);
}

TEST_CASE("a reactor destroyed with cancelled operations in flight finishes them first") {
    Watchdog wd;
    auto [a, b] = tcp_pair();
    CancelSource src;
    constexpr int kTasks = 8;
    int resumed = 0, unwound = 0;
    std::vector<int> results(kTasks, 1);
    {
        Reactor r;
        for (int i = 0; i < kTasks; ++i) r.spawn(blocked_recv(r, b.get(), src.token(), resumed, unwound, results[i]));
        r.run_until(noop());  // they all start and submit their recv
        CHECK(r.in_flight() == kTasks);
        CHECK(r.live_tasks() == kTasks);
        src.cancel();  // cancel requests queued, reactor not run again
    }
    // Everything unwound inside the destructor; nothing can run after it
    // (ASan: no frame leaked, no completion into freed memory).
    CHECK(resumed == kTasks);
    CHECK(unwound == kTasks);
    for (int rc : results) CHECK(rc == -ECANCELED);
}

TEST_CASE("a reactor destroyed with uncancelled operations in flight cancels them") {
    Watchdog wd;
    auto [a, b] = tcp_pair();
    CancelSource src;
    int resumed = 0, unwound = 0, result = 1;
    int cleanup_resumed = 0, cleanup_unwound = 0;
    CancelSource cleanup_src;
    {
        Reactor r;
        r.spawn(blocked_recv(r, b.get(), src.token(), resumed, unwound, result));
        r.spawn(cleanup_after_cancel(r, b.get(), cleanup_src.token(), cleanup_resumed, cleanup_unwound));
        r.run_until(noop());
        CHECK(r.in_flight() == 2);
        cleanup_src.cancel();
    }
    CHECK(resumed == 1);
    CHECK(unwound == 1);
    CHECK(result == -ECANCELED);
    CHECK(cleanup_resumed == 1);
    CHECK(cleanup_unwound == 1);
}

TEST_CASE("a spawned task that never ran is finished by the reactor's destructor") {
    Watchdog wd;
    auto [a, b] = tcp_pair();
    CancelSource src;
    int resumed = 0, unwound = 0, result = 1;
    {
        Reactor r;
        r.spawn(blocked_recv(r, b.get(), src.token(), resumed, unwound, result));
    }
    CHECK(resumed == 1);
    CHECK(unwound == 1);
    CHECK(result == -ECANCELED);
}

}  // TEST_SUITE
}  // namespace xensock::rt::test
