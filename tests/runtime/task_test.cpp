// Task<T>: values, void, nesting, exceptions, and symmetric transfer (long
// chains must not grow the stack).
#include "support.hpp"

#include <memory>
#include <stdexcept>
#include <string>

namespace xensock::rt::test {
namespace {

Task<int> value_of(int v) { co_return v; }

Task<void> bump(int& counter) {
    ++counter;
    co_return;
}

Task<std::string> concat(std::string a, std::string b) { co_return a + b; }

Task<int> nested_three() {
    const int a = co_await value_of(1);
    const std::string s = co_await concat("x", std::to_string(a));
    int count = 0;
    co_await bump(count);
    co_await bump(count);
    co_return a + static_cast<int>(s.size()) + count;  // 1 + 2 + 2
}

Task<std::unique_ptr<int>> move_only(int v) { co_return std::make_unique<int>(v); }

Task<int> throws_after_await() {
    co_await value_of(0);
    throw std::runtime_error("boom");
}

Task<int> passes_through() {
    const int v = co_await throws_after_await();  // must throw here
    co_return v + 1;
}

Task<std::string> catches() {
    try {
        co_await passes_through();
    } catch (const std::runtime_error& e) {
        co_return std::string("caught ") + e.what();
    }
    co_return "not thrown";
}

Task<void> void_throws() {
    throw std::logic_error("void boom");
    co_return;
}

Task<int> one() { co_return 1; }

Task<long> sequential_chain(int n) {
    long sum = 0;
    for (int i = 0; i < n; ++i) sum += co_await one();
    co_return sum;
}

Task<void> sequential_void_chain(int n, int& counter) {
    for (int i = 0; i < n; ++i) co_await bump(counter);
}

Task<int> recursive_depth(int n) {
    if (n == 0) co_return 0;
    co_return 1 + co_await recursive_depth(n - 1);
}

Task<void> holds(DtorCounter) { co_return; }

}  // namespace

TEST_SUITE("task") {

TEST_CASE("value and void tasks") {
    Watchdog wd;
    Reactor r;
    CHECK(r.run_until(value_of(42)) == 42);
    int counter = 0;
    r.run_until(bump(counter));
    CHECK(counter == 1);
    CHECK(r.run_until(concat("ab", "cd")) == "abcd");
    auto p = r.run_until(move_only(7));
    REQUIRE(p);
    CHECK(*p == 7);
}

TEST_CASE("nested awaits") {
    Watchdog wd;
    Reactor r;
    CHECK(r.run_until(nested_three()) == 5);
}

TEST_CASE("exceptions propagate to the awaiter and out of run_until") {
    Watchdog wd;
    Reactor r;
    CHECK(r.run_until(catches()) == "caught boom");
    CHECK_THROWS_AS(r.run_until(passes_through()), std::runtime_error);
    CHECK_THROWS_AS(r.run_until(void_throws()), std::logic_error);
    // The reactor is still usable after a task threw through run_until.
    CHECK(r.run_until(value_of(3)) == 3);
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("100k sequential awaits of ready tasks do not grow the stack") {
    Watchdog wd(30s);
    // 256 KiB: without symmetric transfer each await would nest a resume()
    // frame and this overflows within a few thousand iterations.
    run_on_small_stack(256 * 1024, [] {
        Reactor r;
        CHECK(r.run_until(sequential_chain(100000)) == 100000);
        int counter = 0;
        r.run_until(sequential_void_chain(100000, counter));
        CHECK(counter == 100000);
    });
}

TEST_CASE("recursive awaits nest like ordinary calls") {
    // A task that awaits a task that awaits... uses stack in proportion to
    // the nesting depth, like ordinary recursion (sequential awaits use
    // none: see above). Moderate depth, default stack.
    Watchdog wd;
    Reactor r;
    CHECK(r.run_until(recursive_depth(2000)) == 2000);
}

TEST_CASE("a task that never started is destroyed with its parameters") {
    int destroyed = 0;
    {
        Task<void> t = holds(DtorCounter(destroyed));
        CHECK(t.valid());
        CHECK_FALSE(t.done());
    }
    CHECK(destroyed == 1);
}

TEST_CASE("moving a task transfers the frame") {
    Watchdog wd;
    Reactor r;
    Task<int> a = value_of(9);
    Task<int> b = std::move(a);
    CHECK_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): checking the moved-from state
    CHECK(b.valid());
    Task<int> c;
    c = std::move(b);
    CHECK(r.run_until(std::move(c)) == 9);
}

}  // TEST_SUITE
}  // namespace xensock::rt::test
