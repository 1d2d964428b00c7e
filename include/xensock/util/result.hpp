// Result<T>: a value or a positive errno. Used where failure is an expected
// outcome of guest-controlled input (a bad grant ref, a refused bind), so the
// caller must look at it; start-up failures throw std::system_error instead.
#pragma once

#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>
#include <utility>
#include <variant>

namespace xensock {

struct Errno {
    int value;  // positive errno
};

template <typename T>
class [[nodiscard]] Result {
public:
    Result(T value) : state_(std::move(value)) {}
    Result(Errno e) : state_(e) {}

    bool ok() const noexcept { return std::holds_alternative<T>(state_); }
    explicit operator bool() const noexcept { return ok(); }
    int error() const noexcept { return ok() ? 0 : std::get<Errno>(state_).value; }

    T& value() & { return std::get<T>(state_); }
    T&& value() && { return std::get<T>(std::move(state_)); }
    T* operator->() { return &std::get<T>(state_); }
    T& operator*() & { return std::get<T>(state_); }

private:
    std::variant<T, Errno> state_;
};

// Result<void> equivalent: 0 or positive errno.
class [[nodiscard]] Status {
public:
    Status() = default;
    Status(Errno e) : error_(e.value) {}
    static Status success() { return {}; }
    bool ok() const noexcept { return error_ == 0; }
    explicit operator bool() const noexcept { return ok(); }
    int error() const noexcept { return error_; }

private:
    int error_ = 0;
};

inline Errno last_errno() noexcept { return Errno{errno ? errno : EIO}; }

// "what: strerror" — for messages that name what failed.
inline std::string errno_text(int err) { return std::strerror(err); }

[[noreturn]] inline void throw_errno(int err, const std::string& what) {
    throw std::system_error(err, std::generic_category(), what);
}

}  // namespace xensock
