// Task<T>: a lazily started coroutine that owns its frame. Awaiting it starts
// it inline; if it finishes without suspending, the awaiter just continues
// (no suspension, no stack growth however many such awaits run in a row);
// if it suspends, its completion later resumes the awaiter by symmetric
// transfer (no scheduler hop). Exceptions propagate to the awaiter.
//
// Why not start the task by symmetric transfer as well: GCC 12 emits the
// transfer as a tail call only when optimising without sanitizers, so under
// ASan or -O0 every ready await nested two frames and a loop of 100k awaits
// overflowed the stack. The rendezvous flag below needs no tail calls.
//
// GCC 12 pitfall: a brace-initialised aggregate temporary passed by value to
// a coroutine inside a co_await operand, `co_await f(Agg{x})`, is released
// twice (a shared_ptr member's count is corrupted; clang is fine). Build such
// an argument, or the Task, in a statement of its own.
//
// Ownership rule of the whole project: a suspended coroutine is never
// destroyed from outside. Teardown is cooperative: cancel (CancelSource), and
// every awaitable then completes with -ECANCELED so the frame unwinds normally
// and releases what it owns (RAII). That is what makes cancellation safe with
// io_uring, whose completions would otherwise point into freed frames.
#pragma once

#include <cassert>
#include <coroutine>
#include <exception>
#include <optional>
#include <utility>

namespace xensock::rt {

template <typename T = void>
class Task;

namespace detail {

struct FinalAwaiter {
    bool await_ready() const noexcept { return false; }
    template <typename Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> self) noexcept {
        auto& p = self.promise();
        // Second to arrive: the awaiter has suspended, so resume it.
        // First: we are still inside the awaiter's await_suspend, which
        // will see the flag and continue without suspending.
        if (std::exchange(p.rendezvous, true)) return p.continuation;
        return std::noop_coroutine();
    }
    void await_resume() const noexcept {}
};

struct PromiseBase {
    std::coroutine_handle<> continuation;
    std::exception_ptr exception;
    // Set by whichever comes first: the task reaching final_suspend, or its
    // awaiter finishing await_suspend after starting it (single-threaded).
    bool rendezvous = false;

    std::suspend_always initial_suspend() const noexcept { return {}; }
    FinalAwaiter final_suspend() const noexcept { return {}; }
    void unhandled_exception() noexcept { exception = std::current_exception(); }
};

template <typename T>
struct Promise : PromiseBase {
    std::optional<T> value;
    Task<T> get_return_object() noexcept;
    template <typename U>
    void return_value(U&& v) {
        value.emplace(std::forward<U>(v));
    }
    T take() {
        if (exception) std::rethrow_exception(exception);
        assert(value.has_value());
        return std::move(*value);
    }
};

template <>
struct Promise<void> : PromiseBase {
    Task<void> get_return_object() noexcept;
    void return_void() noexcept {}
    void take() {
        if (exception) std::rethrow_exception(exception);
    }
};

}  // namespace detail

template <typename T>
class [[nodiscard]] Task {
public:
    using promise_type = detail::Promise<T>;
    using Handle = std::coroutine_handle<promise_type>;

    Task() noexcept = default;
    explicit Task(Handle h) noexcept : handle_(h) {}
    Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
    Task& operator=(Task&& other) noexcept {
        if (this != &other) {
            reset();
            handle_ = std::exchange(other.handle_, {});
        }
        return *this;
    }
    Task(const Task&) = delete;
    Task& operator=(const Task&) = delete;
    ~Task() { reset(); }

    bool valid() const noexcept { return static_cast<bool>(handle_); }
    bool done() const noexcept { return handle_ && handle_.done(); }

    auto operator co_await() && noexcept {
        struct Awaiter {
            Handle handle;
            bool await_ready() const noexcept {
                assert(handle && "awaiting an empty Task");
                return handle.done();
            }
            // false: the task already finished, the awaiter continues at once.
            bool await_suspend(std::coroutine_handle<> awaiting) noexcept {
                auto& p = handle.promise();
                p.continuation = awaiting;
                handle.resume();  // runs to its first suspension or to the end
                return !std::exchange(p.rendezvous, true);
            }
            T await_resume() { return handle.promise().take(); }
        };
        return Awaiter{handle_};
    }

    // For the detached runner only: hands over the frame.
    Handle release() noexcept { return std::exchange(handle_, {}); }

private:
    void reset() noexcept {
        // Only a task that never started or has finished may be destroyed;
        // anything else would break the "never destroy a suspended frame" rule.
        if (handle_) {
            assert(!handle_.promise().continuation || handle_.done());
            handle_.destroy();
            handle_ = {};
        }
    }
    Handle handle_;
};

namespace detail {
template <typename T>
Task<T> Promise<T>::get_return_object() noexcept {
    return Task<T>(std::coroutine_handle<Promise<T>>::from_promise(*this));
}
inline Task<void> Promise<void>::get_return_object() noexcept {
    return Task<void>(std::coroutine_handle<Promise<void>>::from_promise(*this));
}
}  // namespace detail

}  // namespace xensock::rt
