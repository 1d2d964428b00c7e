// The guest: xenbus handshake, command ring, data rings, dispatch of
// event-channel notifications. See frontend.hpp for the contract.
//
// Rule for every coroutine here: after a co_await, check the Guest's cancel
// token before touching the Guest. A cancelled Guest may already be gone
// (destroyed without close()); the frame then returns touching only what it
// owns.
#include "xensock/frontend/frontend.hpp"

#include "xensock/toolstack/toolstack.hpp"
#include "xensock/util/log.hpp"

#include <fmt/core.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

namespace xensock::frontend {
namespace {

using Clock = std::chrono::steady_clock;
using toolstack::XenbusState;

// A one-shot timer that cancels `target` when it expires. Disarmed when
// destroyed; the timer coroutine then finishes on its own without touching
// anything but its shared state.
class Deadline {
public:
    Deadline(rt::Reactor& reactor, std::chrono::nanoseconds after, rt::CancelSource& target) {
        if (after.count() <= 0) return;
        state_ = std::make_shared<State>(&target);
        reactor.spawn(run(reactor, after, state_, timer_.token()));
    }
    ~Deadline() {
        if (!state_) return;
        state_->target = nullptr;
        timer_.cancel();
    }
    Deadline(const Deadline&) = delete;
    Deadline& operator=(const Deadline&) = delete;
    bool expired() const noexcept { return state_ && state_->expired; }

private:
    struct State {
        explicit State(rt::CancelSource* t) : target(t) {}
        rt::CancelSource* target;
        bool expired = false;
    };
    static rt::Task<void> run(rt::Reactor& reactor, std::chrono::nanoseconds after, std::shared_ptr<State> state,
                              rt::CancelToken token) {
        const int rc = co_await reactor.sleep_for(after, token);
        // An expired io_uring timeout completes with -ETIME (0 accepted too).
        if ((rc == 0 || rc == -ETIME) && state->target) {
            state->expired = true;
            state->target->cancel();
        }
    }
    rt::CancelSource timer_;
    std::shared_ptr<State> state_;
};

// A xenbus state node: nullopt if missing, 0 (Unknown) if garbage.
std::optional<int> parse_state(const std::optional<std::string>& text) {
    if (!text) return std::nullopt;
    auto v = wire::parse_u32(*text);
    if (!v || *v > XenbusState::kReconfigured) return XenbusState::kUnknown;
    return static_cast<int>(*v);
}

std::string show(const std::optional<std::string>& v) { return v ? fmt::format("'{:.40}'", *v) : "(missing)"; }

// A command's ret as a negative errno (0 on success). Backends answer with
// negative errnos; accept a positive one, refuse absurd values.
int normalize_ret(int32_t ret) {
    if (ret <= 0 && ret >= -4095) return ret;
    if (ret > 0 && ret <= 4095) return -ret;
    return -EIO;
}

wire::Request make_request(wire::Command cmd, uint64_t sockid) {
    wire::Request req;
    req.cmd = cmd;
    req.raw_cmd = static_cast<uint32_t>(cmd);
    req.sockid = sockid;
    return req;
}

std::string describe_error(int rc) {
    switch (rc) {
        case -ENOTCONN: return "the backend left Connected";
        case -ECANCELED: return "the guest is closing";
        case -ETIMEDOUT: return "timed out";
        default: return errno_text(-rc);
    }
}

}  // namespace

// ------------------------------------------------------------ private types

struct Guest::Pending {
    explicit Pending(rt::Reactor& r) : done(r) {}
    rt::Event done;
    std::optional<wire::Response> rsp;
    int error = 0;  // set instead of rsp when failed without an answer
};

// One data ring: its pages and port, released in reverse order (port first).
struct Guest::DataRing {
    platform::SharedPages intf;
    platform::SharedPages pages;
    platform::BoundPort port;
    unsigned order = 0;
    RingHalves halves;
};

struct Guest::Socket {
    Socket(rt::Reactor& r, uint64_t sockid, SocketState s, const rt::CancelToken& guest)
        : id(sockid), state(s), event(r), cancel(guest) {}
    uint64_t id;
    SocketState state;
    rt::Event event;           // the data ring's port fired
    rt::CancelSource cancel;   // cancelled by release (and by the Guest's)
    std::unique_ptr<DataRing> ring;
    uint64_t bytes_sent = 0, bytes_received = 0;
    bool shut_rd = false, shut_wr = false;  // shutdown(): local only
};

namespace {
// Consumes (and drops) whatever the in half holds: a socket shut for
// reading must not stall the peer. Returns whether anything was consumed.
bool discard_in(RingHalves ring) noexcept {
    std::byte scratch[16384];
    bool any = false;
    while (consume_in(ring, scratch) > 0) any = true;
    return any;
}
}  // namespace

// Counts the background loops; close() waits for them to finish. Shared with
// the loops so that they can finish after the Guest is gone.
struct Guest::LoopLatch {
    explicit LoopLatch(rt::Reactor& r) : done(r) {}
    int running = 0;
    rt::Event done;
    void leave() {
        if (--running == 0) done.set();
    }
};

// ---------------------------------------------------------------- attach

Guest::Guest(rt::Reactor& reactor, platform::Platform& platform, GuestOptions options)
    : reactor_(&reactor), options_(options), slot_freed_(reactor), backend_state_changed_(reactor) {
    if (!options_.profile) throw std::invalid_argument("frontend::GuestOptions: profile is required");
    domid_ = platform.self_domid();
    xs_ = std::make_unique<platform::XenStore>(platform.xenstored_path());
    evtchn_ = platform.open_event_channel();
    sharer_ = platform.open_grant_sharer();
    frontend_path_ = toolstack::frontend_dir(*options_.profile, domid_);
    watch_token_ = fmt::format("xensock-frontend:{}:{}", options_.profile->name(), static_cast<const void*>(this));
    loops_ = std::make_shared<LoopLatch>(reactor);
}

rt::Task<std::unique_ptr<Guest>> Guest::attach(rt::Reactor& reactor, platform::Platform& platform,
                                               GuestOptions options) {
    std::unique_ptr<Guest> guest(new Guest(reactor, platform, options));
    co_await guest->handshake();  // throws; the Guest's RAII then releases everything
    co_return guest;
}

template <typename Pred>
rt::Task<std::pair<bool, std::optional<std::string>>> Guest::wait_node(const std::string& path_ref, Pred pred,
                                                                        Clock::time_point deadline) {
    const std::string path = path_ref;
    const platform::Watch watch(*xs_, path, watch_token_);
    if (!watch) throw std::runtime_error(fmt::format("cannot watch {}: {}", path, errno_text(watch.status().error())));
    std::optional<std::string> value;
    bool ok = false;
    while (true) {
        // Drain first, then read: an event arriving after this read makes
        // the fd readable again, so nothing is missed.
        while (xs_->read_watch()) {
        }
        value = xs_->read(path);
        if (pred(value)) {
            ok = true;
            break;
        }
        const auto left = deadline - Clock::now();
        if (left <= Clock::duration::zero()) break;
        auto op = reactor_->poll(xs_->fd(), POLLIN, cancel_.token());
        op.timeout(left);
        const int rc = co_await op;
        if (rc == -ECANCELED) break;
    }
    co_return std::pair{ok, value};
}

rt::Task<void> Guest::handshake() {
    const auto& profile = *options_.profile;
    const auto deadline = Clock::now() + options_.connect_timeout;
    const auto ms = options_.connect_timeout.count();
    const auto fail = [&](const std::string& what) {
        return std::runtime_error(fmt::format("dom{} {} frontend: {}", domid_, profile.name(), what));
    };

    // 1. The device directory the toolstack writes (it may be on its way).
    auto [have_dir, backend] = co_await wait_node(
        frontend_path_ + "/backend", [](const std::optional<std::string>& v) { return v && !v->empty(); },
        deadline);
    if (!have_dir)
        throw fail(fmt::format("no device directory {} (node 'backend') after {} ms: attach the guest first "
                               "(toolstack attach)",
                               frontend_path_, ms));
    backend_path_ = *backend;
    const auto backend_id = xs_->read(frontend_path_ + "/backend-id");
    const auto parsed_id = backend_id ? wire::parse_u32(*backend_id) : std::nullopt;
    if (!parsed_id || *parsed_id != options_.backend)
        throw fail(fmt::format("{}/backend-id is {}, expected backend domain {}", frontend_path_, show(backend_id),
                               options_.backend));

    // 2. A freshly booted domain: whatever state a previous incarnation left,
    // start from Initialising (the backend then resets its side too).
    if (parse_state(xs_->read(frontend_path_ + "/state")) != XenbusState::kInitialising) {
        if (Status st = xs_->write(frontend_path_ + "/state", std::to_string(XenbusState::kInitialising)); !st)
            throw fail(fmt::format("cannot write {}/state: {}", frontend_path_, errno_text(st.error())));
    }

    // 3. The backend publishes its nodes and says InitWait.
    auto [init_wait, seen] = co_await wait_node(
        backend_path_ + "/state",
        [](const std::optional<std::string>& v) { return parse_state(v) == XenbusState::kInitWait; }, deadline);
    if (!init_wait)
        throw fail(fmt::format("backend {} did not reach InitWait (2) within {} ms (its state: {}); is the backend "
                               "(xensockd) running and serving {}?",
                               backend_path_, ms, show(seen), profile.name()));

    // 4. Its parameters.
    std::string why;
    auto reader = [&](std::string_view node) { return xs_->read(backend_path_ + "/" + std::string(node)); };
    auto params = profile.read_backend(reader, why);
    if (!params) throw fail(fmt::format("backend {}: {}", backend_path_, why));
    backend_max_order_ = params->max_ring_order;
    const unsigned min_order = profile.min_ring_order();
    const unsigned max_order = std::min(backend_max_order_, wire::kHardMaxRingOrder);
    if (max_order < min_order)
        throw fail(fmt::format("backend allows data ring order at most {}, {} needs at least {}", backend_max_order_,
                               profile.name(), min_order));
    if (options_.ring_order == 0) {
        ring_order_ = std::max(min_order, std::min(max_order, 6u));
    } else if (options_.ring_order < min_order || options_.ring_order > max_order) {
        throw fail(fmt::format("ring order {} requested, the backend allows {}..{}", options_.ring_order, min_order,
                               max_order));
    } else {
        ring_order_ = options_.ring_order;
    }

    // 5. The command ring (one page) and its event channel.
    auto page = sharer_->share(options_.backend, 1, /*writable=*/true);
    if (!page) throw fail(fmt::format("cannot share the command ring page: {}", errno_text(page.error())));
    cmd_page_ = std::move(page.value());
    ring_ = wire::FrontRing(cmd_page_.data());
    auto port = evtchn_->bind_unbound(options_.backend);
    if (!port) throw fail(fmt::format("cannot allocate an event channel: {}", errno_text(port.error())));
    cmd_port_ = std::move(port.value());

    // 6. Publish the transport parameters and Initialised, atomically.
    const auto nodes = profile.frontend_nodes({cmd_page_.refs().at(0), cmd_port_.port()});
    std::string failed;
    Status st = xs_->transaction([&](platform::XenStore& t) {
        for (const auto& [node, value] : nodes) {
            if (Status w = t.write(frontend_path_ + "/" + node, value); !w) {
                failed = fmt::format("write {}/{}: {}", frontend_path_, node, errno_text(w.error()));
                return false;
            }
        }
        return t.write(frontend_path_ + "/state", std::to_string(XenbusState::kInitialised)).ok();
    });
    if (!st) throw fail(failed.empty() ? fmt::format("cannot publish frontend nodes: {}", errno_text(st.error()))
                                       : failed);

    // 7. The backend maps the ring, binds the port, says Connected.
    auto [answered, last] = co_await wait_node(
        backend_path_ + "/state",
        [](const std::optional<std::string>& v) {
            const auto s = parse_state(v);
            return !s || *s == XenbusState::kConnected || *s >= XenbusState::kClosing;
        },
        deadline);
    const auto state = parse_state(last);
    if (!answered || !state || *state != XenbusState::kConnected) {
        // Tell the backend we gave up before our pages go away.
        (void)xs_->write(frontend_path_ + "/state", std::to_string(XenbusState::kClosed));
        if (!answered)
            throw fail(fmt::format("backend {} did not reach Connected (4) within {} ms (its state: {})",
                                   backend_path_, ms, show(last)));
        if (!state) throw fail(fmt::format("backend directory {} vanished during the handshake", backend_path_));
        const auto error = xs_->read(backend_path_ + "/error");
        throw fail(fmt::format("backend {} refused the connection (state {}){}{}", backend_path_, *state,
                               error ? ": " : "", error.value_or("")));
    }
    if (Status w = xs_->write(frontend_path_ + "/state", std::to_string(XenbusState::kConnected)); !w)
        throw fail(fmt::format("cannot write {}/state: {}", frontend_path_, errno_text(w.error())));
    state_ = State::connected;
    backend_state_ = XenbusState::kConnected;
    start_loops();
    log::debug("dom{} {}: connected to {} (ring order {}, max {})", domid_, profile.name(), backend_path_,
               ring_order_, backend_max_order_);
}

// ------------------------------------------------------- background loops

void Guest::start_loops() {
    const std::string path = backend_path_ + "/state";
    Status w = xs_->watch(path, watch_token_);
    if (!w) log::warn("dom{}: cannot watch {}: {}; backend shutdown will go unnoticed", domid_, path, errno_text(w.error()));
    watching_backend_ = w.ok();
    loops_->running = 2;
    reactor_->spawn(event_loop(this, loops_, cancel_.token()));
    reactor_->spawn(xenstore_loop(this, loops_, cancel_.token()));
}

rt::Task<void> Guest::event_loop(Guest* self, std::shared_ptr<LoopLatch> latch, rt::CancelToken token) {
    rt::Reactor& reactor = *self->reactor_;
    const int fd = self->evtchn_->fd();
    while (!token.cancelled()) {
        const int rc = co_await reactor.poll(fd, POLLIN, token);
        if (token.cancelled()) break;  // the Guest may be gone
        if (rc < 0) {
            log::error("dom{}: polling the event channel failed: {}", self->domid_, errno_text(-rc));
            self->on_backend_gone("event channel failed");
            break;
        }
        self->fired_.clear();
        self->evtchn_->pending(self->fired_);
        for (Port port : self->fired_) self->dispatch(port);
    }
    latch->leave();
}

rt::Task<void> Guest::xenstore_loop(Guest* self, std::shared_ptr<LoopLatch> latch, rt::CancelToken token) {
    rt::Reactor& reactor = *self->reactor_;
    const int fd = self->xs_->fd();
    while (!token.cancelled()) {
        const int rc = co_await reactor.poll(fd, POLLIN, token);
        if (token.cancelled()) break;
        if (rc < 0) {
            log::error("dom{}: polling xenstore failed: {}", self->domid_, errno_text(-rc));
            self->on_backend_gone("xenstore connection failed");
            break;
        }
        while (self->xs_->read_watch()) {
        }
        self->check_backend_state();
    }
    latch->leave();
}

void Guest::dispatch(Port port) {
    ++stats_.events;
    if (cmd_port_ && port == cmd_port_.port()) {
        drain_responses();
        return;
    }
    if (auto it = by_port_.find(port); it != by_port_.end()) {
        Socket& sock = *it->second;
        if (sock.shut_rd && sock.ring && discard_in(sock.ring->halves)) {
            ++stats_.data_notifies;
            (void)sock.ring->port.notify();  // room again: the backend reads on
        }
        sock.event.set();
    }
}

void Guest::drain_responses() {
    if (ring_broken_) return;
    bool freed = false;
    do {
        // Read rsp_prod once and check it against what we have outstanding.
        const wire::RingIdx available = ring_.unconsumed_responses();
        const wire::RingIdx outstanding = wire::kCommandRingSize - ring_.free_slots();
        if (available > outstanding) {
            log::error("dom{} {}: backend published {} responses with {} requests outstanding; command ring stopped",
                       domid_, options_.profile->name(), available, outstanding);
            ring_broken_ = true;
            on_backend_gone("broken command ring");
            return;
        }
        for (wire::RingIdx i = 0; i < available; ++i) {
            wire::Slot slot;
            ring_.take_response(slot);  // one copy out of the shared page
            freed = true;
            const wire::Response rsp = options_.profile->decode_response(slot);
            auto it = pending_.find(rsp.req_id);
            if (it == pending_.end()) {
                // Late (its caller timed out) or a backend's invention.
                ++stats_.ignored_responses;
                log::debug("dom{}: ignoring a response with unknown req_id {}", domid_, rsp.req_id);
                continue;
            }
            Pending* p = it->second;
            pending_.erase(it);
            p->rsp = rsp;
            p->done.set();
            ++stats_.responses;
        }
    } while (ring_.final_check_for_responses() != 0);
    if (freed) slot_freed_.set();
}

void Guest::check_backend_state() {
    backend_state_ = parse_state(xs_->read(backend_path_ + "/state")).value_or(XenbusState::kUnknown);
    backend_state_changed_.set();
    if (backend_state_ != XenbusState::kConnected && !backend_gone_)
        on_backend_gone(backend_state_ == XenbusState::kUnknown ? "backend state missing" : "backend left Connected");
}

void Guest::on_backend_gone(const char* why) {
    if (!backend_gone_ && state_ == State::connected)
        log::warn("dom{} {}: {} (state {}): failing pending operations", domid_, options_.profile->name(), why,
                  backend_state_);
    backend_gone_ = true;
    for (auto& [id, p] : pending_) {
        p->error = -ENOTCONN;
        p->done.set();
    }
    pending_.clear();
    slot_freed_.set();
    for (auto& [id, sock] : sockets_) sock->event.set();
}

// ------------------------------------------------------------------ close

rt::Task<void> Guest::close() {
    if (state_ != State::connected) co_return;  // closing, closed, or never connected
    state_ = State::closing;
    (void)xs_->write(frontend_path_ + "/state", std::to_string(XenbusState::kClosing));
    {
        // The backend unmaps everything, then says Closing (or Closed).
        rt::CancelSource wait(cancel_.token());
        Deadline deadline(*reactor_, options_.connect_timeout, wait);
        while (backend_state_ == XenbusState::kConnected) {
            if (!co_await backend_state_changed_.wait(wait.token())) break;
        }
        if (backend_state_ == XenbusState::kConnected)
            log::warn("dom{} {}: backend did not leave Connected within {} ms of Closing; releasing anyway", domid_,
                      options_.profile->name(), options_.connect_timeout.count());
    }
    (void)xs_->write(frontend_path_ + "/state", std::to_string(XenbusState::kClosed));
    cancel_.cancel();
    release_everything();
    if (loops_->running > 0) co_await loops_->done.wait();
    state_ = State::closed;
}

void Guest::release_everything() {
    for (auto& [id, p] : pending_) {
        p->error = -ECANCELED;
        p->done.set();
    }
    pending_.clear();
    // Rings before the sharer and event channel that own them go away.
    for (auto& [id, sock] : sockets_) sock->ring.reset();
    ring_pool_.clear();
    by_port_.clear();
    sockets_.clear();
    if (watching_backend_) {
        (void)xs_->unwatch(backend_path_ + "/state", watch_token_);
        watching_backend_ = false;
    }
    cmd_port_.reset();
    cmd_page_.reset();
    ring_ = wire::FrontRing();
}

Guest::~Guest() {
    if (state_ != State::closed) {
        cancel_.cancel();
        release_everything();
    }
}

// --------------------------------------------------------- command ring

uint32_t Guest::next_req_id() {
    do {
        ++last_req_id_;
    } while (pending_.count(last_req_id_) != 0);
    return last_req_id_;
}

rt::Task<int> Guest::transact(wire::Request& req, wire::Response& out, std::chrono::milliseconds timeout) {
    if (state_ != State::connected) co_return -ECANCELED;
    if (backend_gone_) co_return -ENOTCONN;
    const rt::CancelToken guest = cancel_.token();
    rt::CancelSource wait(guest);
    Deadline deadline(*reactor_, timeout, wait);

    // A free slot: responses free them (accepts and polls may hold some long).
    while (ring_.free_slots() == 0) {
        const bool woken = co_await slot_freed_.wait(wait.token());
        if (guest.cancelled()) co_return -ECANCELED;
        if (backend_gone_) co_return -ENOTCONN;
        if (!woken) co_return -ETIMEDOUT;
    }

    req.req_id = next_req_id();
    Pending pending(*reactor_);
    pending_.emplace(req.req_id, &pending);
    options_.profile->encode_request(ring_.next_request_slot(), req);
    ring_.commit_request();
    ++stats_.requests;
    if (ring_.push_requests()) {
        ++stats_.command_notifies;
        (void)cmd_port_.notify();
    }

    (void)co_await pending.done.wait(wait.token());
    if (pending.rsp) {
        out = *pending.rsp;
        co_return 0;
    }
    if (guest.cancelled()) co_return -ECANCELED;  // release_everything() dropped the entry
    if (auto it = pending_.find(req.req_id); it != pending_.end() && it->second == &pending) pending_.erase(it);
    if (pending.error != 0) co_return pending.error;
    co_return deadline.expired() ? -ETIMEDOUT : -ECANCELED;
}

rt::Task<std::optional<wire::Response>> Guest::try_call(wire::Request req, std::chrono::milliseconds timeout) {
    wire::Response rsp;
    const int rc = co_await transact(req, rsp, timeout);
    if (rc == 0) co_return rsp;
    if (rc == -ETIMEDOUT) co_return std::nullopt;
    throw std::runtime_error(fmt::format(
        "{} request (cmd {}, sockid {}) failed: {}", wire::command_name(req.cmd),
        req.cmd == wire::Command::unknown ? req.raw_cmd : static_cast<uint32_t>(req.cmd), req.sockid,
        describe_error(rc)));
}

rt::Task<wire::Response> Guest::call(wire::Request req, std::chrono::milliseconds timeout) {
    const auto cmd = req.cmd;
    const auto raw = req.raw_cmd;
    auto rsp = co_await try_call(std::move(req), timeout);
    if (!rsp)
        throw CallTimeout(fmt::format("no response to a {} request (cmd {}) within {} ms", wire::command_name(cmd),
                                      cmd == wire::Command::unknown ? raw : static_cast<uint32_t>(cmd),
                                      timeout.count()));
    co_return *rsp;
}

rt::Task<int> Guest::simple_command(wire::Request req) {
    wire::Response rsp;
    const int rc = co_await transact(req, rsp, {});
    co_return rc != 0 ? rc : normalize_ret(rsp.ret);
}

// ---------------------------------------------------------------- sockets

std::shared_ptr<Guest::Socket> Guest::find(uint64_t id) const {
    auto it = sockets_.find(id);
    return it == sockets_.end() ? nullptr : it->second;
}

std::shared_ptr<Guest::Socket> Guest::new_socket(SocketState state) {
    do {
        if (++last_sockid_ >= (uint64_t{1} << 32)) last_sockid_ = 1;
    } while (sockets_.count(last_sockid_) != 0);
    auto sock = std::make_shared<Socket>(*reactor_, last_sockid_, state, cancel_.token());
    sockets_.emplace(sock->id, sock);
    return sock;
}

Result<std::unique_ptr<Guest::DataRing>> Guest::alloc_ring(const RingOptions& opts) {
    const unsigned order = opts.order.value_or(ring_order_);
    const wire::DataIntfLayout& layout = options_.profile->data_layout();
    if (order > wire::kHardMaxRingOrder || (uint32_t{1} << order) > layout.max_refs()) return Errno{EINVAL};

    std::unique_ptr<DataRing> ring;
    const auto pooled = std::find_if(ring_pool_.begin(), ring_pool_.end(),
                                     [order](const std::unique_ptr<DataRing>& r) { return r->order == order; });
    if (pooled != ring_pool_.end()) {
        ring = std::move(*pooled);
        ring_pool_.erase(pooled);
        ++stats_.rings_reused;
    } else {
        ring = std::make_unique<DataRing>();
        auto intf = sharer_->share(options_.backend, 1, /*writable=*/true);
        if (!intf) return Errno{intf.error()};
        ring->intf = std::move(intf.value());
        auto pages = sharer_->share(options_.backend, size_t{1} << order, /*writable=*/true);
        if (!pages) return Errno{pages.error()};
        ring->pages = std::move(pages.value());
        auto port = evtchn_->bind_unbound(options_.backend);
        if (!port) return Errno{port.error()};
        ring->port = std::move(port.value());
        ring->order = order;
    }

    // Fill the interface page before its ref is handed over (the request
    // push is a release store); a pooled ring's page is filled afresh, the
    // previous backend may have left anything in it. Its data pages keep
    // old bytes: only the previous socket's, seen by the same backend, and
    // never read beyond the indexes.
    wire::DataIntfView view(ring->intf.data(), layout);
    view.set_in_cons(opts.start_index);
    view.set_in_prod(opts.start_index);
    view.set_out_cons(opts.start_index);
    view.set_out_prod(opts.start_index);
    view.set_in_error(0);
    view.set_out_error(0);
    view.set_ring_order(order);
    const auto& refs = ring->pages.refs();
    for (uint32_t i = 0; i < refs.size(); ++i) view.set_ref(i, refs[i]);

    const uint32_t size = options_.profile->ring_bytes(order);
    ring->halves = RingHalves{view, ring->pages.bytes(), ring->pages.bytes() + size, size};
    return Result<std::unique_ptr<DataRing>>(std::move(ring));
}

void Guest::attach_ring(Socket& sock, std::unique_ptr<DataRing> ring) {
    by_port_[ring->port.port()] = &sock;
    sock.ring = std::move(ring);
}

void Guest::free_ring(Socket& sock) noexcept {
    if (!sock.ring) return;
    by_port_.erase(sock.ring->port.port());
    sock.ring.reset();
}

bool Guest::pool_has_room() const noexcept {
    return state_ == State::connected && !backend_gone_ && !ring_broken_ && ring_pool_.size() < options_.ring_pool;
}

void Guest::recycle_ring(Socket& sock) noexcept {
    if (!sock.ring) return;
    if (!pool_has_room()) return free_ring(sock);
    by_port_.erase(sock.ring->port.port());
    try {
        ring_pool_.push_back(std::move(sock.ring));
    } catch (...) {
        sock.ring.reset();  // no memory for the pool: free it instead
    }
}

rt::Task<int> Guest::socket(uint64_t& id) {
    const rt::CancelToken guest = cancel_.token();
    auto sock = new_socket(SocketState::created);  // reserves the id
    wire::Request req = make_request(wire::Command::socket, sock->id);
    req.domain = AF_INET;
    req.type = SOCK_STREAM;
    req.protocol = 0;
    const int rc = co_await simple_command(req);
    if (guest.cancelled()) co_return -ECANCELED;
    if (rc != 0) {
        sockets_.erase(sock->id);
        co_return rc;
    }
    id = sock->id;
    co_return 0;
}

rt::Task<int> Guest::connect(uint64_t id, const sockaddr_in& addr, RingOptions ring_options) {
    const rt::CancelToken guest = cancel_.token();
    auto sock = find(id);
    if (!sock) co_return -EBADF;
    switch (sock->state) {
        case SocketState::connected: co_return -EISCONN;
        case SocketState::connecting: co_return -EALREADY;
        case SocketState::listening:
        case SocketState::accepting: co_return -EINVAL;
        case SocketState::releasing: co_return -EBADF;
        case SocketState::created:
        case SocketState::bound: break;
    }
    auto ring = alloc_ring(ring_options);
    if (!ring) co_return -ring.error();

    wire::Request req = make_request(wire::Command::connect, id);
    static_assert(sizeof(sockaddr_in) == 16);
    std::memcpy(req.addr.data(), &addr, sizeof addr);
    req.addr_len = sizeof addr;
    req.ref = ring_options.ref_override.value_or(ring.value()->intf.refs().at(0));
    req.evtchn = ring_options.evtchn_override.value_or(ring.value()->port.port());
    attach_ring(*sock, std::move(ring.value()));
    const SocketState before = sock->state;
    sock->state = SocketState::connecting;

    const int rc = co_await simple_command(req);
    if (guest.cancelled()) co_return -ECANCELED;
    if (sock->state == SocketState::releasing) co_return rc != 0 ? rc : -EBADF;  // release() frees the ring
    if (rc != 0) {
        recycle_ring(*sock);  // the backend unmapped it before answering
        sock->state = before;
        co_return rc;
    }
    sock->state = SocketState::connected;
    co_return 0;
}

rt::Task<int> Guest::bind(uint64_t id, const sockaddr_in& addr) {
    const rt::CancelToken guest = cancel_.token();
    auto sock = find(id);
    if (!sock) co_return -EBADF;
    wire::Request req = make_request(wire::Command::bind, id);
    std::memcpy(req.addr.data(), &addr, sizeof addr);
    req.addr_len = sizeof addr;
    const int rc = co_await simple_command(req);
    if (guest.cancelled()) co_return -ECANCELED;
    if (rc == 0 && sock->state == SocketState::created) sock->state = SocketState::bound;
    co_return rc;
}

rt::Task<int> Guest::listen(uint64_t id, uint32_t backlog) {
    const rt::CancelToken guest = cancel_.token();
    auto sock = find(id);
    if (!sock) co_return -EBADF;
    wire::Request req = make_request(wire::Command::listen, id);
    req.backlog = backlog;
    const int rc = co_await simple_command(req);
    if (guest.cancelled()) co_return -ECANCELED;
    if (rc == 0 && sock->state != SocketState::releasing) sock->state = SocketState::listening;
    co_return rc;
}

rt::Task<int> Guest::accept(uint64_t listen_id, uint64_t& new_id, RingOptions ring_options) {
    const rt::CancelToken guest = cancel_.token();
    auto listener = find(listen_id);
    if (!listener || listener->state == SocketState::releasing) co_return -EBADF;
    auto ring = alloc_ring(ring_options);
    if (!ring) co_return -ring.error();

    auto sock = new_socket(SocketState::accepting);
    wire::Request req = make_request(wire::Command::accept, listen_id);
    req.new_sockid = sock->id;
    req.ref = ring_options.ref_override.value_or(ring.value()->intf.refs().at(0));
    req.evtchn = ring_options.evtchn_override.value_or(ring.value()->port.port());
    // Registered now: the backend may produce (and notify) before it answers.
    attach_ring(*sock, std::move(ring.value()));

    const int rc = co_await simple_command(req);
    if (guest.cancelled()) co_return -ECANCELED;
    if (rc != 0) {
        recycle_ring(*sock);  // answered: the backend let go of it
        sockets_.erase(sock->id);
        co_return rc;
    }
    sock->state = SocketState::connected;
    new_id = sock->id;
    co_return 0;
}

rt::Task<int> Guest::poll(uint64_t listen_id) {
    auto sock = find(listen_id);
    if (!sock || sock->state == SocketState::releasing) co_return -EBADF;
    co_return co_await simple_command(make_request(wire::Command::poll, listen_id));
}

rt::Task<int> Guest::release(uint64_t id) {
    const rt::CancelToken guest = cancel_.token();
    auto sock = find(id);
    if (!sock || sock->state == SocketState::releasing) co_return -EBADF;
    sock->state = SocketState::releasing;
    sock->cancel.cancel();  // blocked send()/recv() return -EBADF
    wire::Request req = make_request(wire::Command::release, id);
    req.reuse = sock->ring && pool_has_room();
    const int rc = co_await simple_command(req);
    if (guest.cancelled()) co_return -ECANCELED;
    // The backend has unmapped the ring and unbound its port before answering.
    recycle_ring(*sock);
    sockets_.erase(id);
    co_return rc;
}

int Guest::shutdown(uint64_t id, int how) {
    auto sock = find(id);
    if (!sock || sock->state == SocketState::releasing) return -EBADF;
    if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR) return -EINVAL;
    if (sock->state != SocketState::connected || !sock->ring) return -ENOTCONN;
    if (how != SHUT_WR) {
        sock->shut_rd = true;
        if (discard_in(sock->ring->halves)) {
            ++stats_.data_notifies;
            (void)sock->ring->port.notify();
        }
    }
    if (how != SHUT_RD) sock->shut_wr = true;
    sock->event.set();  // a blocked send()/recv() sees it
    return 0;
}

// -------------------------------------------------------------- data path

rt::Task<ssize_t> Guest::send(uint64_t id, std::span<const std::byte> data, std::chrono::milliseconds timeout) {
    const rt::CancelToken guest = cancel_.token();
    auto sock = find(id);
    if (!sock) co_return -EBADF;
    if (data.empty()) co_return 0;
    rt::CancelSource op(sock->cancel.token());
    Deadline deadline(*reactor_, timeout, op);
    while (true) {
        if (guest.cancelled()) co_return -ECANCELED;
        if (sock->state == SocketState::releasing) co_return -EBADF;
        if (sock->shut_wr) co_return -EPIPE;
        if (!sock->ring) co_return -ENOTCONN;
        if (backend_gone_) co_return -ENOTCONN;  // nobody would ever consume it
        const ssize_t n = produce_out(sock->ring->halves, data);
        if (n > 0) {
            ++stats_.data_notifies;
            (void)sock->ring->port.notify();
            stats_.bytes_sent += static_cast<uint64_t>(n);
            sock->bytes_sent += static_cast<uint64_t>(n);
            co_return n;
        }
        if (n != -EAGAIN) co_return n;
        if (!co_await sock->event.wait(op.token())) {
            if (guest.cancelled()) co_return -ECANCELED;
            if (sock->state == SocketState::releasing) co_return -EBADF;
            co_return -ETIMEDOUT;
        }
    }
}

rt::Task<ssize_t> Guest::recv(uint64_t id, std::span<std::byte> buf, std::chrono::milliseconds timeout) {
    const rt::CancelToken guest = cancel_.token();
    auto sock = find(id);
    if (!sock) co_return -EBADF;
    if (buf.empty()) co_return 0;
    rt::CancelSource op(sock->cancel.token());
    Deadline deadline(*reactor_, timeout, op);
    while (true) {
        if (guest.cancelled()) co_return -ECANCELED;
        if (sock->state == SocketState::releasing) co_return -EBADF;
        if (sock->shut_rd) co_return 0;  // as recv(2) after shutdown(SHUT_RD)
        if (!sock->ring) co_return -ENOTCONN;
        const ssize_t n = consume_in(sock->ring->halves, buf);
        if (n > 0) {
            // Tell the backend there is room again.
            ++stats_.data_notifies;
            (void)sock->ring->port.notify();
            stats_.bytes_received += static_cast<uint64_t>(n);
            sock->bytes_received += static_cast<uint64_t>(n);
            co_return n;
        }
        if (n != -EAGAIN) co_return n;  // 0: orderly shutdown; or the error
        if (backend_gone_) co_return -ENOTCONN;
        if (!co_await sock->event.wait(op.token())) {
            if (guest.cancelled()) co_return -ECANCELED;
            if (sock->state == SocketState::releasing) co_return -EBADF;
            co_return -ETIMEDOUT;
        }
    }
}

namespace {
// Time left until `end`, at least 1 ms (0 would mean "no timeout").
std::chrono::milliseconds left_until(Clock::time_point end) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
    return std::max(left, std::chrono::milliseconds(1));
}
}  // namespace

rt::Task<ssize_t> Guest::send_all(uint64_t id, std::span<const std::byte> data, std::chrono::milliseconds timeout) {
    const auto end = Clock::now() + timeout;
    size_t done = 0;
    while (done < data.size()) {
        if (timeout.count() > 0 && Clock::now() >= end) co_return -ETIMEDOUT;
        const ssize_t n = co_await send(id, data.subspan(done), timeout.count() > 0 ? left_until(end) : timeout);
        if (n < 0) co_return n;
        done += static_cast<size_t>(n);
    }
    co_return static_cast<ssize_t>(done);
}

rt::Task<ssize_t> Guest::recv_exact(uint64_t id, std::span<std::byte> buf, std::chrono::milliseconds timeout) {
    const auto end = Clock::now() + timeout;
    size_t done = 0;
    while (done < buf.size()) {
        if (timeout.count() > 0 && Clock::now() >= end) co_return -ETIMEDOUT;
        const ssize_t n = co_await recv(id, buf.subspan(done), timeout.count() > 0 ? left_until(end) : timeout);
        if (n < 0) co_return n;
        if (n == 0) break;  // end of stream
        done += static_cast<size_t>(n);
    }
    co_return static_cast<ssize_t>(done);
}

// ---------------------------------------------------------- introspection

uint32_t Guest::command_ring_ref() const { return cmd_page_ ? cmd_page_.refs().at(0) : 0; }

std::optional<SocketInfo> Guest::socket_info(uint64_t id) const {
    auto sock = find(id);
    if (!sock) return std::nullopt;
    SocketInfo info;
    info.id = sock->id;
    info.state = sock->state;
    info.bytes_sent = sock->bytes_sent;
    info.bytes_received = sock->bytes_received;
    if (sock->ring) {
        info.has_ring = true;
        info.ring_order = sock->ring->order;
        info.port = sock->ring->port.port();
        info.intf_ref = sock->ring->intf.refs().at(0);
    }
    return info;
}

std::optional<wire::DataIntfView> Guest::data_intf(uint64_t id) const {
    auto sock = find(id);
    if (!sock || !sock->ring) return std::nullopt;
    return sock->ring->halves.intf;
}

std::optional<RingHalves> Guest::data_ring(uint64_t id) const {
    auto sock = find(id);
    if (!sock || !sock->ring) return std::nullopt;
    return sock->ring->halves;
}

wire::SringHeader* Guest::command_ring_header() const noexcept {
    return cmd_page_ ? static_cast<wire::SringHeader*>(cmd_page_.data()) : nullptr;
}

Status Guest::notify_command_ring() {
    if (!cmd_port_) return Errno{ENOTCONN};
    ++stats_.command_notifies;
    return cmd_port_.notify();
}

Status Guest::notify_socket(uint64_t id) {
    auto sock = find(id);
    if (!sock || !sock->ring) return Errno{EBADF};
    ++stats_.data_notifies;
    return sock->ring->port.notify();
}

}  // namespace xensock::frontend
