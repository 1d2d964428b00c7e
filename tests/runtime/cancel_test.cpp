// Cancellation: every kind of operation cancelled while it sits in the kernel
// returns -ECANCELED promptly and its coroutine unwinds, and nothing resumes
// it afterwards, even when what it waited for then happens; a completion
// reaped in the same turn as the cancel keeps its result; parents cancel
// children; an already-cancelled token submits nothing; a reactor destroyed
// with operations in flight finishes them first, waiting for one that
// cannot be cancelled.
#include "support.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include <thread>

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

// Kept by a coroutine: how often it came back from the cancelled await
// (exactly once, ever), and its frame's unwinding.
struct Trace {
    int resumed = 0;
    int unwound = 0;  // DtorCounter in the frame
};

Task<int> recv_op(Reactor& r, int fd, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    char buf[32];
    const int rc = co_await r.recv(fd, buf, sizeof buf, 0, t);
    ++tr.resumed;
    co_return rc;
}

Task<int> recv_deadline_op(Reactor& r, int fd, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    char buf[32];
    const int rc = co_await r.recv(fd, buf, sizeof buf, 0, t).timeout(10s);
    ++tr.resumed;
    co_return rc;
}

Task<int> accept_op(Reactor& r, int fd, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.accept(fd, nullptr, nullptr, SOCK_CLOEXEC, t);
    if (rc >= 0) ::close(rc);
    ++tr.resumed;
    co_return rc;
}

Task<int> connect_op(Reactor& r, int fd, sockaddr_in to, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof to, t);
    ++tr.resumed;
    co_return rc;
}

Task<int> poll_op(Reactor& r, int fd, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.poll(fd, POLLIN, t);
    ++tr.resumed;
    co_return rc;
}

Task<int> sleep_op(Reactor& r, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.sleep_for(std::chrono::hours(1), t);
    ++tr.resumed;
    co_return rc;
}

// Cancelled at 30 ms, long before it would expire; the test then runs on
// past the expiry.
Task<int> short_sleep_op(Reactor& r, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const int rc = co_await r.sleep_for(150ms, t);
    ++tr.resumed;
    co_return rc;
}

Task<void> settle(Reactor& r, std::chrono::milliseconds d) {
    const int rc = co_await r.sleep_for(d);
    CHECK(rc == 0);
}

Task<int> event_op(Event& ev, CancelToken t, Trace& tr) {
    DtorCounter guard(tr.unwound);
    const bool fired = co_await ev.wait(t);
    ++tr.resumed;
    co_return fired ? 1 : -ECANCELED;
}

// Runs the operation made by `make`, cancels it mid-way, and checks the
// outcome: -ECANCELED, promptly, with the coroutine unwound and nothing left
// in flight. Then `afterwards` makes happen what the operation waited for
// (data, a connection, the event) and the reactor runs on for `run_on`
// (past a timer's expiry): the coroutine must not have come back again.
void expect_cancelled_mid_op(const std::function<Task<int>(Reactor&, CancelToken, Trace&)>& make,
                             const std::function<void()>& afterwards = {},
                             std::chrono::milliseconds run_on = 50ms) {
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
    CHECK(tr.resumed == 1);
    CHECK(tr.unwound == 1);
    CHECK(r.in_flight() == 0);
    CHECK(r.live_tasks() == 0);

    if (afterwards) afterwards();
    r.run_until(settle(r, run_on));
    CHECK(tr.resumed == 1);  // nothing resumed it afterwards
    CHECK(tr.unwound == 1);
    CHECK(r.in_flight() == 0);
    CHECK(r.live_tasks() == 0);
}

// A recv on one socket, with a deadline, under a token of its own; when it
// comes back it cancels the other one's token. Two of these time out in one
// reactor turn (the thread is kept busy meanwhile), so the second to resume
// is cancelled after its completion was reaped but before it ran.
Task<void> recv_then_cancel_other(Reactor& r, int fd, CancelToken mine, CancelSource& other, int& result,
                                  int& resumed) {
    char buf[8];
    auto op = r.recv(fd, buf, sizeof buf, 0, mine);
    op.timeout(5ms);
    result = co_await op;
    ++resumed;
    other.cancel();
}

// Lets every queued SQE reach the kernel, then keeps the thread from reaping
// for a while: completions meanwhile all arrive in the next turn.
Task<void> hold_the_thread(Reactor& r, std::chrono::milliseconds d) {
    co_await r.sleep_for(1ms);
    std::this_thread::sleep_for(d);
}

// A write of `iov` at the file position; cancellation cannot stop it (see
// the test that uses it).
Task<void> write_all(Reactor& r, int fd, const std::vector<iovec>& iov, int& result, int& resumed) {
    result = co_await r.writev(fd, iov.data(), static_cast<unsigned>(iov.size()));
    ++resumed;
}

Task<void> stop_after(Reactor& r, std::chrono::milliseconds d) {
    co_await r.sleep_for(d);
    r.stop();
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

// Data sent after the cancel is still there afterwards: the cancelled recv
// took none of it.
void expect_unread(int fd) {
    char buf[8];
    CHECK(::recv(fd, buf, sizeof buf, MSG_DONTWAIT) == 4);
}

TEST_CASE("a recv cancelled mid-operation returns -ECANCELED, and data arriving later does not resume it") {
    auto [a, b] = tcp_pair();
    expect_cancelled_mid_op([fd = b.get()](Reactor& r, CancelToken t, Trace& tr) { return recv_op(r, fd, t, tr); },
                            [fd = a.get()] { REQUIRE(::send(fd, "late", 4, MSG_NOSIGNAL) == 4); });
    expect_unread(b.get());
}

TEST_CASE("a recv with a deadline cancelled before it returns -ECANCELED, not -ETIMEDOUT, and nothing later") {
    auto [a, b] = tcp_pair();
    // Running on past the deadline (10 s) is not needed: the linked timeout
    // went with the recv.
    expect_cancelled_mid_op(
        [fd = b.get()](Reactor& r, CancelToken t, Trace& tr) { return recv_deadline_op(r, fd, t, tr); },
        [fd = a.get()] { REQUIRE(::send(fd, "late", 4, MSG_NOSIGNAL) == 4); });
    expect_unread(b.get());
}

TEST_CASE("an accept cancelled mid-operation returns -ECANCELED, and a later connection does not resume it") {
    Listener l = listen_loopback();
    Fd client = tcp_socket();
    expect_cancelled_mid_op(
        [fd = l.fd.get()](Reactor& r, CancelToken t, Trace& tr) { return accept_op(r, fd, t, tr); },
        [&] {
            REQUIRE(::connect(client.get(), reinterpret_cast<const sockaddr*>(&l.addr), sizeof l.addr) == 0);
        });
    // Still queued: the cancelled accept took nothing.
    Fd accepted(::accept4(l.fd.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    CHECK(accepted.get() >= 0);
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

TEST_CASE("a poll cancelled mid-operation returns -ECANCELED, and the fd turning readable does not resume it") {
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
    Fd rd(p[0]), wr(p[1]);
    expect_cancelled_mid_op([fd = rd.get()](Reactor& r, CancelToken t, Trace& tr) { return poll_op(r, fd, t, tr); },
                            [fd = wr.get()] { REQUIRE(::write(fd, "x", 1) == 1); });
}

TEST_CASE("a sleep cancelled mid-operation returns -ECANCELED") {
    expect_cancelled_mid_op([](Reactor& r, CancelToken t, Trace& tr) { return sleep_op(r, t, tr); });
}

TEST_CASE("a sleep cancelled mid-operation is not resumed when its time would have come") {
    // Cancelled at 30 ms; the reactor then runs until well past 150 ms.
    expect_cancelled_mid_op([](Reactor& r, CancelToken t, Trace& tr) { return short_sleep_op(r, t, tr); }, {},
                            200ms);
}

TEST_CASE("an Event wait cancelled mid-operation returns not-fired, and a later set does not resume it") {
    Reactor* owner = nullptr;
    std::unique_ptr<Event> ev;
    expect_cancelled_mid_op(
        [&](Reactor& r, CancelToken t, Trace& tr) {
            owner = &r;
            ev = std::make_unique<Event>(r);
            return event_op(*ev, t, tr);
        },
        [&] { ev->set(); });
    // No stale waiter took the set: it is stored for the next wait.
    REQUIRE(ev);
    CHECK(ev->is_set());
    ev.reset();
    (void)owner;
}

TEST_CASE("an operation cancelled after its completion was reaped, before it resumed, keeps its result") {
    Watchdog wd;
    Reactor r;
    auto [a1, b1] = tcp_pair();
    auto [a2, b2] = tcp_pair();
    CancelSource first, second;
    int result1 = 1, result2 = 1, resumed1 = 0, resumed2 = 0;
    // Both deadlines (5 ms) pass while the thread is held (100 ms): both
    // completions are reaped in one turn, and whichever resumes first
    // cancels the other, which must still see its own result.
    r.spawn(recv_then_cancel_other(r, b1.get(), first.token(), second, result1, resumed1));
    r.spawn(recv_then_cancel_other(r, b2.get(), second.token(), first, result2, resumed2));
    r.spawn(hold_the_thread(r, 100ms));
    r.run_until(settle(r, 150ms));
    CHECK(result1 == -ETIMEDOUT);
    CHECK(result2 == -ETIMEDOUT);
    CHECK(resumed1 == 1);
    CHECK(resumed2 == 1);
    CHECK(r.in_flight() == 0);
    CHECK(r.live_tasks() == 0);
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

TEST_CASE("a reactor destroyed while an operation ignores cancellation waits for it to end") {
    Watchdog wd;
    // A large buffered write to a tmpfs file runs in io_uring's worker
    // thread, where a cancellation only stops it at a fatal signal: it goes
    // on to the end (a few hundred ms). The destructor must wait for it (up
    // to its limit), not count its own cancel request's completion as
    // progress and give up after a burst of immediate rounds.
    Fd file(::memfd_create("xensock-cancel-test", MFD_CLOEXEC));
    REQUIRE(file.get() >= 0);
    std::vector<char> chunk(1 << 20, 'x');
    const std::vector<iovec> iov(512, iovec{chunk.data(), chunk.size()});
    int result = 1, resumed = 0;
    {
        Reactor r;
        r.spawn(write_all(r, file.get(), iov, result, resumed));
        r.spawn(stop_after(r, 20ms));
        r.run();
        REQUIRE(r.in_flight() == 1);  // still writing
    }
    CHECK(resumed == 1);  // finished inside the destructor, frame not leaked
    CHECK(result == 512 << 20);
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
