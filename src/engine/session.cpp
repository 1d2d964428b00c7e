// One guest device: the backend half of the xenbus handshake and the
// command ring.
//
// The handshake is level-triggered: any watch event makes the session re-read
// the frontend state, its own backend state and `online`, and move to where
// those say it should be. Whatever order events arrive in, and however many,
// the session ends in a consistent place: connected with everything mapped,
// or disconnected with nothing held.
#include "internal.hpp"

#include "xensock/util/log.hpp"

namespace xensock::engine {
namespace {
enum XenbusState : int {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
};

std::optional<int> parse_state(const std::optional<std::string>& text) {
    if (!text) return std::nullopt;
    auto v = wire::parse_u32(*text);
    if (!v || *v > 7) return Unknown;  // garbage is no state at all
    return static_cast<int>(*v);
}
}  // namespace

Session::Session(Worker& w, const wire::ProtocolProfile& p, SessionKey k)
    : worker(w), profile(p), key(std::move(k)), xenstore_changed(*w.reactor), life(w.stopping.token()) {
    backend_path = fmt::format("/local/domain/{}/backend/{}/{}/{}", w.shared.self, key.protocol, key.domid, key.devid);
    frontend_path = fmt::format("/local/domain/{}/device/{}/{}", key.domid, key.protocol, key.devid);
    watch_token = fmt::format("s:{}:{}:{}", key.protocol, key.domid, key.devid);
}

Connection::~Connection() {
    if (port) session.worker.port_listeners.erase(port.port());
}

void Connection::on_event() {
    session.counters.notifications_received.add();
    kicked.set();
}

void Session::write_state(int state) {
    backend_state = state;
    auto st = worker.xs->write(backend_path + "/state", std::to_string(state));
    if (!st) log::warn("dom{} {}: cannot write backend state {}: {}", key.domid, key.protocol, state, errno_text(st.error()));
}

void Session::publish_backend_nodes() {
    auto& xs = *worker.xs;
    const auto nodes = profile.backend_nodes(worker.shared.config.max_ring_order);
    auto st = xs.transaction([&](platform::XenStore& t) {
        for (const auto& [node, value] : nodes) (void)t.write(backend_path + "/" + node, value);
        (void)t.write(backend_path + "/state", std::to_string(InitWait));
        return true;
    });
    if (!st) log::warn("dom{} {}: cannot publish backend nodes: {}", key.domid, key.protocol, errno_text(st.error()));
    backend_state = InitWait;
}

rt::Task<void> Session::run() {
    auto& xs = *worker.xs;
    worker.watchers[watch_token] = this;
    // However run() ends (an exception too), the worker stops dispatching to us.
    struct Unlisted {
        Worker& worker;
        const std::string& token;
        ~Unlisted() { worker.watchers.erase(token); }
    } unlisted{worker, watch_token};
    // Watch single nodes, not whole directories: a guest writing junk under
    // its device directory then costs us nothing (XSA-349).
    std::vector<platform::Watch> watches;
    for (const auto& node : {frontend_path + "/state", backend_path + "/state", backend_path + "/online"}) {
        platform::Watch watch(xs, node, watch_token);
        if (!watch) log::warn("dom{}: cannot watch {}: {}", key.domid, node, errno_text(watch.status().error()));
        watches.push_back(std::move(watch));
    }
    log::info("dom{} {}: device {} appeared", key.domid, key.protocol, key.devid);
    // Linux's pvcalls frontend reads our nodes when it probes: publish at once.
    if (parse_state(xs.read(backend_path + "/state")).value_or(Unknown) <= Initialising) publish_backend_nodes();

    bool ended = false;
    while (!ended) {
        co_await reconcile(ended);
        if (ended) break;
        if (!co_await xenstore_changed.wait(life.token())) break;  // daemon stopping or kill
    }
    co_await disconnect();
    if (!ended && xs.read(backend_path + "/state")) write_state(Closed);
    watches.clear();  // unwatched now; `unlisted` takes us off the worker's list
    log::info("dom{} {}: session ended", key.domid, key.protocol);
}

rt::Task<void> Session::reconcile(bool& ended) {
    auto& xs = *worker.xs;
    if (kill_requested) {
        // xensockctl kill: drop everything and tell the frontend to close;
        // it may come back through Initialising like any reset frontend.
        kill_requested = false;
        co_await disconnect();
        write_state(Closing);
        co_return;
    }
    const auto backend = parse_state(xs.read(backend_path + "/state"));
    if (!backend) {  // the toolstack removed the device
        co_await disconnect();
        ended = true;
        co_return;
    }
    backend_state = *backend;
    const bool online = xs.read(backend_path + "/online").value_or("0") == "1";
    const auto frontend = parse_state(xs.read(frontend_path + "/state"));
    frontend_state = frontend.value_or(Unknown);

    if (!frontend) {
        // The frontend directory vanished: the domain is gone.
        co_await disconnect();
        if (*backend != Closed) write_state(Closed);
        co_return;
    }
    if (!online && *backend >= Closing) {
        // Detach / xl destroy: the toolstack wants us Closed, then removes us.
        co_await disconnect();
        if (*backend != Closed) write_state(Closed);
        co_return;
    }

    switch (*frontend) {
        case Initialising:
            // Boot, or a frontend that reset: a fresh connection from scratch.
            co_await disconnect();
            if (*backend != InitWait) publish_backend_nodes();
            break;
        case Initialised:
        case Connected:
            if (!conn && *frontend == Connected && *backend != InitWait) {
                // The frontend believes in a connection we do not have (we
                // restarted, or killed it): make it reset through Closing.
                if (*backend != Closing && *backend != Closed) write_state(Closing);
                break;
            }
            if (!conn && *backend != InitWait) {
                // A frontend that published its ring while we were away:
                // our nodes first, then take it.
                publish_backend_nodes();
            }
            if (!conn) {
                std::string why;
                auto st = co_await connect(why);
                if (st) {
                    write_state(Connected);
                    log::info("dom{} {}: connected", key.domid, key.protocol);
                } else {
                    log::warn("dom{} {}: cannot connect: {}", key.domid, key.protocol, why);
                    (void)xs.write(backend_path + "/error", why);
                    write_state(Closing);
                }
            }
            break;
        case Closing:
            co_await disconnect();
            if (*backend != Closing && *backend != Closed) write_state(Closing);
            break;
        case Closed:
            co_await disconnect();
            if (*backend != Closed) write_state(Closed);
            break;
        default:
            break;  // Unknown/InitWait/Reconfiguring: nothing for a backend to do
    }
}

rt::Task<Status> Session::connect(std::string& why) {
    auto& xs = *worker.xs;
    auto reader = [&](std::string_view node) { return xs.read(frontend_path + "/" + std::string(node)); };
    auto params = profile.read_frontend(reader, why);
    if (!params) co_return Errno{params.error()};

    const platform::GrantRef refs[] = {params->ring_ref};
    auto page = worker.mapper->map(key.domid, refs, /*writable=*/true);
    if (!page) {
        why = fmt::format("cannot map command ring (ring-ref {}): {}", params->ring_ref, errno_text(page.error()));
        co_return Errno{page.error()};
    }
    auto port = co_await worker.evtchn->bind_interdomain(*worker.reactor, key.domid, params->port, life.token());
    if (!port) {
        why = fmt::format("cannot bind event channel (port {}): {}", params->port, errno_text(port.error()));
        co_return Errno{port.error()};
    }
    auto c = std::make_unique<Connection>(*this, *worker.reactor, life.token());
    c->ring_page = std::move(page.value());
    c->ring = wire::BackRing(c->ring_page.data());
    c->port = std::move(port.value());
    worker.port_listeners[c->port.port()] = c.get();
    conn = std::move(c);
    conn->tasks.enter();
    worker.reactor->spawn(serve_commands(*conn));
    co_return Status::success();
}

rt::Task<void> Session::disconnect() {
    if (!conn) co_return;
    // Everything under the connection (commands, sockets, data paths) sees
    // the cancellation, unwinds, and releases what it holds.
    conn->cancel.cancel();
    co_await conn->tasks.wait_idle();
    // Data paths are counted on their socket, not the connection: wait for
    // those too before the sockets (and the rings they use) are freed. No
    // command runs any more, so nothing adds or removes sockets meanwhile.
    bool busy = true;
    while (busy) {
        busy = false;
        for (auto& [id, sock] : conn->sockets) {
            if (sock->tasks.count() > 0) {
                busy = true;
                co_await sock->tasks.wait_idle();
                break;
            }
        }
    }
    // Whoever still looks at a ring (a guest being killed, or one that
    // missed the state change) sees it fail rather than stall. -ECONNRESET,
    // not -ENOTCONN: this is no orderly end of stream.
    for (auto& [id, sock] : conn->sockets) {
        if (!sock->ring) continue;
        wire::DataIntfView& intf = sock->ring->intf;
        if (intf.in_error() == 0) intf.set_in_error(-ECONNRESET);
        if (intf.out_error() == 0) intf.set_out_error(-ECONNRESET);
        sock->ring->notify_guest();
    }
    conn.reset();
    log::info("dom{} {}: disconnected", key.domid, key.protocol);
}

// The command ring: copy each request out once, hand it to its own
// coroutine, go back for more. A slow command never holds up the next.
rt::Task<void> Session::serve_commands(Connection& c) {
    const auto token = c.cancel.token();
    while (!token.cancelled()) {
        const int available = c.ring.final_check_for_requests();
        if (available < 0) {
            log::warn("dom{} {}: frontend put req_prod more than a ring ahead; command ring stopped", key.domid,
                      key.protocol);
            counters.guest_protocol_errors.add();
            c.ring_broken = true;
            break;
        }
        if (available == 0) {
            c.kicked.reset();
            if (c.ring.final_check_for_requests() != 0) continue;
            if (!co_await c.kicked.wait(token)) break;
            continue;
        }
        for (int i = 0; i < available; ++i) {
            wire::Slot slot;
            c.ring.take_request(slot);
            wire::Request req = profile.decode_request(slot);
            c.tasks.enter();
            worker.reactor->spawn(run_command(c, req));
        }
    }
    c.tasks.leave();
}

void Session::respond(Connection& c, const wire::Request& req, int ret, uint64_t sockid) {
    if (c.cancel.cancelled()) return;  // the ring is being torn down
    wire::Response rsp{req.req_id, req.raw_cmd, sockid, ret};
    profile.encode_response(c.ring.next_response_slot(), rsp);
    c.ring.commit_response();
    if (c.ring.push_responses()) {
        counters.notifications_sent.add();
        (void)c.port.notify();
    }
    // A slot was freed: requests we held back for lack of answer room may go.
    c.kicked.set();
}

}  // namespace xensock::engine
