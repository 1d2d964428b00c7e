// Cooperative cancellation, single-threaded (one per reactor thread).
// A CancelSource is triggered once; every CancelCallback registered on its
// token runs then (or at once, if registered after). Awaitables register a
// callback that aborts their operation, so the awaiting coroutine resumes
// with -ECANCELED and unwinds normally.
#pragma once

#include <functional>
#include <memory>
#include <utility>

namespace xensock::rt {

class CancelCallback;

namespace detail {
struct CancelState {
    bool cancelled = false;
    CancelCallback* head = nullptr;  // intrusive list of registered callbacks
};
}  // namespace detail

class CancelToken {
public:
    CancelToken() = default;
    bool cancelled() const noexcept { return state_ && state_->cancelled; }
    bool can_be_cancelled() const noexcept { return static_cast<bool>(state_); }

private:
    friend class CancelSource;
    friend class CancelCallback;
    explicit CancelToken(std::shared_ptr<detail::CancelState> s) : state_(std::move(s)) {}
    std::shared_ptr<detail::CancelState> state_;
};

class CancelCallback {
public:
    CancelCallback() = default;
    CancelCallback(const CancelToken& token, std::function<void()> fn) { attach(token, std::move(fn)); }
    CancelCallback(const CancelCallback&) = delete;
    CancelCallback& operator=(const CancelCallback&) = delete;
    ~CancelCallback() { detach(); }

    // Runs fn now if the token is already cancelled.
    void attach(const CancelToken& token, std::function<void()> fn);
    void detach() noexcept;

private:
    friend class CancelSource;
    std::shared_ptr<detail::CancelState> state_;
    std::function<void()> fn_;
    CancelCallback* prev_ = nullptr;
    CancelCallback* next_ = nullptr;
};

class CancelSource {
public:
    CancelSource() : state_(std::make_shared<detail::CancelState>()) {}
    // A child source is cancelled when its parent is (socket inside a session).
    explicit CancelSource(const CancelToken& parent) : CancelSource() {
        parent_link_.attach(parent, [this] { cancel(); });
    }
    CancelSource(const CancelSource&) = delete;
    CancelSource& operator=(const CancelSource&) = delete;

    CancelToken token() const { return CancelToken(state_); }
    bool cancelled() const noexcept { return state_->cancelled; }
    void cancel();

private:
    std::shared_ptr<detail::CancelState> state_;
    CancelCallback parent_link_;
};

inline void CancelCallback::attach(const CancelToken& token, std::function<void()> fn) {
    detach();
    if (!token.state_) return;
    if (token.state_->cancelled) {
        fn();
        return;
    }
    state_ = token.state_;
    fn_ = std::move(fn);
    next_ = state_->head;
    if (next_) next_->prev_ = this;
    state_->head = this;
}

inline void CancelCallback::detach() noexcept {
    if (!state_) return;
    if (prev_) prev_->next_ = next_;
    else if (state_->head == this) state_->head = next_;
    if (next_) next_->prev_ = prev_;
    prev_ = next_ = nullptr;
    state_.reset();
    fn_ = nullptr;
}

inline void CancelSource::cancel() {
    if (state_->cancelled) return;
    state_->cancelled = true;
    // Callbacks may detach themselves or others while we iterate: pop one at a time.
    auto keep_alive = state_;
    while (CancelCallback* cb = keep_alive->head) {
        keep_alive->head = cb->next_;
        if (cb->next_) cb->next_->prev_ = nullptr;
        cb->next_ = cb->prev_ = nullptr;
        auto fn = std::move(cb->fn_);
        cb->state_.reset();
        if (fn) fn();
    }
}

}  // namespace xensock::rt
