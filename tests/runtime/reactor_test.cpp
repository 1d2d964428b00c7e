// The reactor itself: detached tasks, post() from other threads, idling
// without burning CPU, run/run_until/stop, a full submission queue, and a
// reactor created on one thread and run on another.
#include "support.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace xensock::rt::test {
namespace {

Task<void> wait_then_count(Event& go, int& counter, int total, Event& all_done) {
    const bool fired = co_await go.wait();
    CHECK(fired);
    if (++counter == total) all_done.set();
}

Task<void> sleeper_then_count(Reactor& r, int& counter, int total, Event& all_done) {
    const int rc = co_await r.sleep_for(1ms);
    CHECK(rc == 0);
    if (++counter == total) all_done.set();
}

Task<void> release_and_wait(Reactor& r, Event& go, Event& all_done) {
    co_await yield(r);  // every spawned task is now waiting on `go`
    go.set();
    const bool fired = co_await all_done.wait();
    CHECK(fired);
}

Task<void> wait_for(Event& ev) {
    const bool fired = co_await ev.wait();
    CHECK(fired);
}

Task<void> fails_with_std() {
    co_await std::suspend_never{};
    throw std::runtime_error("detached failure for the test");
}

Task<void> fails_with_int() {
    co_await std::suspend_never{};
    throw 42;
}

Task<void> noop() { co_return; }

Task<void> count_up(int& n) {
    ++n;
    co_return;
}

// Redirects stderr (fd 2, where the logger writes) into a memfd for a scope.
class StderrCapture {
public:
    StderrCapture() : mem_(::memfd_create("stderr-capture", MFD_CLOEXEC)), saved_(::dup(STDERR_FILENO)) {
        REQUIRE(mem_.get() >= 0);
        REQUIRE(saved_.get() >= 0);
        REQUIRE(::dup2(mem_.get(), STDERR_FILENO) == STDERR_FILENO);
    }
    StderrCapture(const StderrCapture&) = delete;
    StderrCapture& operator=(const StderrCapture&) = delete;
    ~StderrCapture() { restore(); }
    std::string finish() {
        restore();
        std::string out;
        char buf[4096];
        ssize_t n;
        off_t off = 0;
        while ((n = ::pread(mem_.get(), buf, sizeof buf, off)) > 0) {
            out.append(buf, static_cast<size_t>(n));
            off += n;
        }
        return out;
    }

private:
    void restore() {
        if (saved_.get() >= 0) {
            ::dup2(saved_.get(), STDERR_FILENO);
            saved_.reset();
        }
    }
    Fd mem_;
    Fd saved_;
};

// Signals another thread, with a bounded wait on the other side.
class Flag {
public:
    void raise() {
        {
            std::lock_guard lock(m_);
            up_ = true;
        }
        cv_.notify_all();
    }
    bool wait(std::chrono::milliseconds limit) {
        std::unique_lock lock(m_);
        return cv_.wait_for(lock, limit, [this] { return up_; });
    }

private:
    std::mutex m_;
    std::condition_variable cv_;
    bool up_ = false;
};

struct IdleProbe {
    std::chrono::nanoseconds cpu_before{}, cpu_after{};
    uint64_t wakeups_before = 0, wakeups_after = 0;
    std::thread::id ran_on;
};

Task<void> idle_until_posted(Reactor& r, Event& posted, Flag& idle, IdleProbe& probe) {
    probe.wakeups_before = r.stats().wakeups;
    probe.cpu_before = thread_cpu_time();
    idle.raise();
    const bool fired = co_await posted.wait();
    CHECK(fired);
}

Task<void> stops_midway(Reactor& r, int& after) {
    r.stop();  // a stray stop() must not cut run_until short
    const int rc = co_await r.sleep_for(1ms);
    CHECK(rc == 0);
    after = 1;
}

Task<int> stops_midway_int(Reactor& r) {
    r.stop();
    co_await yield(r);
    co_return 17;
}

Task<void> stop_reactor(Reactor& r, int& ran) {
    ++ran;
    r.stop();
    co_return;
}

Task<void> check_current(Reactor& r) {
    CHECK(Reactor::current() == &r);
    co_return;
}

Task<void> echo_bytes(Reactor& r, int fd, int n) {
    std::vector<char> buf(static_cast<size_t>(n));
    int got = 0;
    while (got < n) {
        const int k = co_await r.recv(fd, buf.data() + got, static_cast<size_t>(n - got));
        REQUIRE(k > 0);
        got += k;
    }
    const int sent = co_await r.send(fd, buf.data(), buf.size(), MSG_NOSIGNAL);
    CHECK(sent == n);
}

Task<std::string> ask(Reactor& r, int fd, std::string what) {
    const int sent = co_await r.send(fd, what.data(), what.size(), MSG_NOSIGNAL);
    REQUIRE(sent == static_cast<int>(what.size()));
    std::string reply(what.size(), '\0');
    size_t got = 0;
    while (got < reply.size()) {
        const int k = co_await r.recv(fd, reply.data() + got, reply.size() - got);
        REQUIRE(k > 0);
        got += static_cast<size_t>(k);
    }
    co_return reply;
}

Task<void> timed_recv(Reactor& r, int fd, int& timed_out, Latch* latch) {
    char buf[8];
    const int rc = co_await r.recv(fd, buf, sizeof buf).timeout(50ms);
    CHECK(rc == -ETIMEDOUT);
    if (rc == -ETIMEDOUT) ++timed_out;
    latch->count_down();
}

Task<void> plain_poll(Reactor& r, int fd, CancelToken t, Latch* latch) {
    const int rc = co_await r.poll(fd, POLLIN, t);
    CHECK(rc == -ECANCELED);
    latch->count_down();
}

Task<void> many_deadlines_on_a_small_ring(Reactor& r, const std::vector<int>& fds, int pipe_fd, int& timed_out) {
    CancelSource src;
    Latch poll_done(r, 1);
    // One single-SQE operation first, so that the two-SQE (op + linked
    // timeout) pairs that follow straddle the end of the 8-entry SQ.
    r.spawn(plain_poll(r, pipe_fd, src.token(), &poll_done));
    Latch latch(r, static_cast<int>(fds.size()));
    for (int fd : fds) r.spawn(timed_recv(r, fd, timed_out, &latch));
    const bool all = co_await latch.zero.wait();
    CHECK(all);
    src.cancel();
    const bool polled = co_await poll_done.zero.wait();
    CHECK(polled);
}

}  // namespace

TEST_SUITE("reactor") {

TEST_CASE("many detached tasks run and live_tasks() returns to 0") {
    Watchdog wd(30s);
    Reactor r;
    CHECK(r.live_tasks() == 0);
    CHECK(r.in_flight() == 0);
    constexpr int kTasks = 10000;
    Event go(r), all_done(r);
    int counter = 0;
    for (int i = 0; i < kTasks; ++i) r.spawn(wait_then_count(go, counter, kTasks, all_done));
    CHECK(r.live_tasks() == kTasks);
    r.run_until(release_and_wait(r, go, all_done));
    CHECK(counter == kTasks);
    CHECK(r.live_tasks() == 0);
    CHECK(r.in_flight() == 0);
}

TEST_CASE("thousands of concurrent operations overflow the submission queue safely") {
    Watchdog wd(30s);
    Reactor r(64);  // 64 SQ entries, 3000 concurrent sleeps
    constexpr int kTasks = 3000;
    Event all_done(r);
    int counter = 0;
    for (int i = 0; i < kTasks; ++i) r.spawn(sleeper_then_count(r, counter, kTasks, all_done));
    r.run_until(wait_for(all_done));
    CHECK(counter == kTasks);
    CHECK(r.live_tasks() == 0);
    CHECK(r.in_flight() == 0);
    CHECK(r.stats().submitted >= kTasks);
    CHECK(r.stats().completed >= kTasks);
}

TEST_CASE("operations with deadlines keep their linked timeout when the SQ fills up") {
    Watchdog wd(30s);
    Reactor r(8);
    std::vector<Fd> keep;
    std::vector<int> fds;
    for (int i = 0; i < 12; ++i) {
        auto [a, b] = tcp_pair();
        fds.push_back(b.get());
        keep.push_back(std::move(a));
        keep.push_back(std::move(b));
    }
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
    Fd rd(p[0]), wr(p[1]);
    r.run_until(noop());  // the SQ is empty from here on
    int timed_out = 0;
    r.run_until(many_deadlines_on_a_small_ring(r, fds, rd.get(), timed_out));
    CHECK(timed_out == 12);
    CHECK(r.in_flight() == 0);
}

TEST_CASE("an exception escaping a detached task is logged, not fatal") {
    Watchdog wd;
    Reactor r;
    int n = 0;
    StderrCapture capture;
    r.spawn(fails_with_std());
    r.spawn(fails_with_int());
    r.spawn(count_up(n));
    r.run_until(count_up(n));
    const std::string err = capture.finish();
    CHECK(n == 2);
    CHECK(r.live_tasks() == 0);
    CHECK(err.find("detached failure for the test") != std::string::npos);
    CHECK(err.find("unknown exception") != std::string::npos);
}

TEST_CASE("post from another thread wakes a reactor idle in run(), which burns no CPU meanwhile") {
    Watchdog wd;
    Reactor r;
    Event posted(r);
    Flag idle;
    IdleProbe probe;
    std::thread poster([&] {
        REQUIRE(idle.wait(5s));
        // The idle window being measured, not synchronisation.
        std::this_thread::sleep_for(300ms);
        r.post([&] {
            probe.cpu_after = thread_cpu_time();
            probe.wakeups_after = r.stats().wakeups;
            probe.ran_on = std::this_thread::get_id();
            posted.set();
        });
    });
    r.run_until(idle_until_posted(r, posted, idle, probe));
    poster.join();
    CHECK(probe.ran_on == std::this_thread::get_id());
    const auto idle_cpu = probe.cpu_after - probe.cpu_before;
    MESSAGE("reactor CPU over the idle window: " << idle_cpu.count() / 1000 << " us, wakeups "
                                                 << probe.wakeups_after - probe.wakeups_before);
    CHECK(idle_cpu < 20ms);
    CHECK(probe.wakeups_after - probe.wakeups_before <= 3);
}

TEST_CASE("posts from several threads all run, in order per thread") {
    Watchdog wd(30s);
    Reactor r;
    constexpr int kThreads = 4, kPerThread = 2000;
    Event all_done(r);
    std::vector<std::vector<int>> seen(kThreads);
    int total = 0;
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < kPerThread; ++i) {
                r.post([&, t, i] {
                    seen[static_cast<size_t>(t)].push_back(i);  // reactor thread only: no lock
                    if (++total == kThreads * kPerThread) all_done.set();
                });
            }
        });
    }
    r.run_until(wait_for(all_done));
    for (auto& th : threads) th.join();
    for (const auto& s : seen) {
        REQUIRE(s.size() == kPerThread);
        for (int i = 0; i < kPerThread; ++i) CHECK(s[static_cast<size_t>(i)] == i);
    }
}

TEST_CASE("stop() from another thread ends run()") {
    Watchdog wd;
    Reactor r;
    std::atomic<bool> started{false};
    Flag running;
    r.post([&] {
        started = true;
        running.raise();
    });
    std::thread stopper([&] {
        REQUIRE(running.wait(5s));
        r.stop();
    });
    r.run();
    stopper.join();
    CHECK(started);
}

TEST_CASE("run_until returns values, and stop() inside the task does not cut it short") {
    Watchdog wd;
    Reactor r;
    int after = 0;
    r.run_until(stops_midway(r, after));
    CHECK(after == 1);
    CHECK(r.run_until(stops_midway_int(r)) == 17);
    CHECK(r.in_flight() == 0);
    r.run_until(check_current(r));
    CHECK(Reactor::current() == nullptr);  // only set while running
}

TEST_CASE("run() returns after stop() from a task, and can be run again") {
    Watchdog wd;
    Reactor r;
    int ran = 0;
    r.spawn(stop_reactor(r, ran));
    r.run();
    CHECK(ran == 1);
    r.spawn(stop_reactor(r, ran));
    r.run();  // the earlier stop was consumed; this one runs the new task
    CHECK(ran == 2);
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("stop() before run() makes run() return at once") {
    Watchdog wd;
    Reactor r;
    r.stop();
    r.run();
    CHECK(r.stop_requested() == false);
}

TEST_CASE("a reactor created on one thread can be run on another") {
    Watchdog wd;
    auto r = std::make_unique<Reactor>();
    auto [a, b] = tcp_pair();
    r->spawn(echo_bytes(*r, b.get(), 5));
    std::string reply;
    std::exception_ptr error;
    std::thread worker([&] {
        try {
            reply = r->run_until(ask(*r, a.get(), "howdy"));
        } catch (...) {
            error = std::current_exception();
        }
    });
    worker.join();
    if (error) std::rethrow_exception(error);
    CHECK(reply == "howdy");
    r.reset();  // destroyed on a third (the creating) thread
}

}  // TEST_SUITE
}  // namespace xensock::rt::test
