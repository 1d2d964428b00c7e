// Event: set before/after wait, several waiters, destruction with waiters,
// and cancellation racing set().
#include "support.hpp"

#include <memory>
#include <vector>

namespace xensock::rt::test {
namespace {

Task<void> wait_and_record(Event& ev, CancelToken t, std::vector<int>& order, int id, std::vector<bool>& results) {
    const bool fired = co_await ev.wait(t);
    results[static_cast<size_t>(id)] = fired;
    order.push_back(id);
}

Task<void> set_before_wait(Event& ev) {
    ev.set();
    CHECK(ev.is_set());
    const bool fired = co_await ev.wait();
    CHECK(fired);
    CHECK_FALSE(ev.is_set());  // consumed
}

Task<void> wait_then_set(Reactor& r, Event& ev) {
    std::vector<int> order;
    std::vector<bool> results(1, false);
    r.spawn(wait_and_record(ev, {}, order, 0, results));
    // Let the waiter run up to its suspension.
    co_await yield(r);
    CHECK(order.empty());
    ev.set();
    CHECK_FALSE(ev.is_set());  // handed to the waiter, not stored
    co_await yield(r);
    REQUIRE(order.size() == 1);
    CHECK(results[0]);
}

Task<void> many_waiters(Reactor& r, Event& ev, Event& done) {
    constexpr int kWaiters = 5;
    std::vector<int> order;
    std::vector<bool> results(kWaiters, false);
    for (int i = 0; i < kWaiters; ++i) r.spawn(wait_and_record(ev, {}, order, i, results));
    co_await yield(r);
    ev.set();
    CHECK_FALSE(ev.is_set());
    co_await yield(r);
    REQUIRE(order.size() == kWaiters);
    for (int i = 0; i < kWaiters; ++i) {
        CHECK(order[static_cast<size_t>(i)] == i);  // woken in the order they waited
        CHECK(results[static_cast<size_t>(i)]);
    }
    // One set() woke them all and left nothing behind for the next wait.
    ev.set();
    CHECK(ev.is_set());
    done.set();
}

Task<void> destroyed_event(Reactor& r) {
    auto ev = std::make_unique<Event>(r);
    std::vector<int> order;
    std::vector<bool> results(3, true);
    for (int i = 0; i < 3; ++i) r.spawn(wait_and_record(*ev, {}, order, i, results));
    co_await yield(r);
    ev.reset();
    co_await yield(r);
    REQUIRE(order.size() == 3);
    for (bool fired : results) CHECK_FALSE(fired);
}

Task<void> reset_clears(Event& ev) {
    ev.set();
    ev.reset();
    CHECK_FALSE(ev.is_set());
    co_return;
}

// A CancelCallback that sets the event, registered on the same token as the
// waiters. The token's callbacks run newest first, so registering it after
// the waiters suspended makes set() run inside cancel() before the waiters'
// own callbacks; registering it before makes it run after them.
Task<void> set_inside_cancel(Reactor& r, bool set_runs_first) {
    Event ev(r);
    CancelSource src;
    std::vector<int> order;
    std::vector<bool> results(2, false);
    std::unique_ptr<CancelCallback> setter;
    if (!set_runs_first) setter = std::make_unique<CancelCallback>(src.token(), [&ev] { ev.set(); });
    r.spawn(wait_and_record(ev, src.token(), order, 0, results));
    r.spawn(wait_and_record(ev, src.token(), order, 1, results));
    co_await yield(r);
    if (set_runs_first) setter = std::make_unique<CancelCallback>(src.token(), [&ev] { ev.set(); });
    src.cancel();
    co_await yield(r);
    // Each waiter resumed exactly once (ASan/this count catch a double resume).
    REQUIRE(order.size() == 2);
    if (set_runs_first) {
        CHECK(results[0]);  // set() won the race: both saw the event
        CHECK(results[1]);
        CHECK_FALSE(ev.is_set());
    } else {
        CHECK_FALSE(results[0]);  // cancelled first; the set() is then stored
        CHECK_FALSE(results[1]);
        CHECK(ev.is_set());
    }
}

}  // namespace

TEST_SUITE("event") {

TEST_CASE("set before wait returns at once and consumes the set state") {
    Watchdog wd;
    Reactor r;
    Event ev(r);
    r.run_until(set_before_wait(ev));
    CHECK(r.in_flight() == 0);
}

TEST_CASE("wait then set wakes the waiter") {
    Watchdog wd;
    Reactor r;
    Event ev(r);
    r.run_until(wait_then_set(r, ev));
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("one set wakes every waiter, in order") {
    Watchdog wd;
    Reactor r;
    Event ev(r), done(r);
    r.run_until(many_waiters(r, ev, done));
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("destroying an event wakes its waiters as not fired") {
    Watchdog wd;
    Reactor r;
    r.run_until(destroyed_event(r));
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("reset clears a stored set") {
    Watchdog wd;
    Reactor r;
    Event ev(r);
    r.run_until(reset_clears(ev));
}

TEST_CASE("a cancel callback that sets the event while waiters are being cancelled") {
    Watchdog wd;
    Reactor r;
    SUBCASE("set runs first") { r.run_until(set_inside_cancel(r, true)); }
    SUBCASE("waiters' cancellation runs first") { r.run_until(set_inside_cancel(r, false)); }
    CHECK(r.live_tasks() == 0);
}

}  // TEST_SUITE
}  // namespace xensock::rt::test
