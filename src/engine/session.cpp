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

bool Session::write_backend(const wire::NodeList& nodes, const std::vector<std::string>& remove) {
    if (device_removed) return false;
    bool gone = false;
    std::string failed;
    auto st = worker.xs->transaction([&](platform::XenStore& t) {
        gone = !t.read(backend_path).has_value();
        if (gone) return false;
        for (const auto& node : remove) (void)t.rm(backend_path + "/" + node);  // absent is fine
        for (const auto& [node, value] : nodes) {
            if (Status w = t.write(backend_path + "/" + node, value); !w) {
                failed = fmt::format("{}: {}", node, errno_text(w.error()));
                return false;
            }
        }
        return true;
    });
    if (gone) {
        log::info("dom{} {}: backend directory {} removed; session ends", key.domid, key.protocol, backend_path);
        device_removed = true;
        return false;
    }
    if (!st)
        log::warn("dom{} {}: cannot write backend nodes ({}): {}", key.domid, key.protocol,
                  failed.empty() ? "transaction" : failed, errno_text(st.error()));
    return st.ok();
}

void Session::write_state(int state) {
    if (write_backend({{"state", std::to_string(state)}})) backend_state = state;
}

void Session::publish_backend_nodes() {
    auto nodes = profile.backend_nodes(worker.shared.config.max_ring_order);
    nodes.emplace_back("state", std::to_string(InitWait));
    if (write_backend(nodes)) backend_state = InitWait;
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

    bool ended = device_removed;  // removed before we even started
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
    co_await reconcile_states();
    if (device_removed) {
        co_await disconnect();
        ended = true;
    }
}

namespace {
bool same_params(const wire::FrontendParams& a, const wire::FrontendParams& b) {
    return a.ring_ref == b.ring_ref && a.port == b.port;
}
bool same_params(const std::optional<wire::FrontendParams>& a, const std::optional<wire::FrontendParams>& b) {
    if (!a || !b) return !a && !b;
    return same_params(*a, *b);
}
}  // namespace

rt::Task<void> Session::reconcile_states() {
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
        device_removed = true;
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
    // A failed connect waits for the frontend to move (another state, or a
    // new ring): retrying the same bad ring would loop on our own writes.
    if (connect_failure && connect_failure->frontend_state != *frontend) connect_failure.reset();

    switch (*frontend) {
        case Initialising:
            // Boot, or a frontend that reset: a fresh connection from scratch.
            co_await disconnect();
            if (*backend != InitWait) publish_backend_nodes();
            break;
        case Initialised:
        case Connected: {
            if (!conn && *frontend == Connected && *backend != InitWait) {
                // The frontend believes in a connection we do not have (we
                // restarted, or killed it): make it reset through Closing.
                if (*backend != Closing && *backend != Closed) write_state(Closing);
                break;
            }
            std::string why;
            auto reader = [&](std::string_view node) { return xs.read(frontend_path + "/" + std::string(node)); };
            auto params = profile.read_frontend(reader, why);
            const std::optional<wire::FrontendParams> seen =
                params ? std::optional<wire::FrontendParams>(*params) : std::nullopt;
            if (conn) {
                if (*frontend == Connected) conn->frontend_was_connected = true;
                // A frontend back at Initialised after Connected, or with
                // another ring, reset while we looked away (its Closing ..
                // Initialising events coalesced): serve the new ring, not
                // the old one. (A new incarnation may well reuse the old
                // ref and port numbers: the state tells it then.)
                const bool reset = (*frontend == Initialised && conn->frontend_was_connected) ||
                                   (seen && !same_params(*seen, conn_params));
                if (!reset) {
                    if (conn->ring_broken) {
                        // serve_commands gave up on a corrupted command ring:
                        // nothing of this connection can be trusted. Tear it
                        // down (every data ring gets -ECONNRESET) and send the
                        // frontend through Closing. (A frontend that reset is
                        // served anew instead: its old ring may read as garbage
                        // because its memory is gone.)
                        co_await disconnect();
                        fail_connection(*frontend, conn_params,
                                        "frontend put req_prod more than a ring ahead: command ring broken");
                    }
                    break;  // still the ring we serve
                }
                log::info("dom{} {}: frontend reset while connected (state {}, ring-ref {}, port {}); reconnecting",
                          key.domid, key.protocol, *frontend, seen ? seen->ring_ref : 0, seen ? seen->port : 0);
                co_await disconnect();
                if (device_removed) break;
            }
            if (connect_failure && same_params(connect_failure->params, seen)) break;  // stay Closing
            connect_failure.reset();
            if (*backend != InitWait && *backend != Connected) {
                // A frontend that published its ring while we were away:
                // our nodes first, then take it.
                publish_backend_nodes();
                if (device_removed) break;
            }
            if (!seen) {
                fail_connection(*frontend, seen, why);
                break;
            }
            if (auto st = co_await connect(*seen, why); st) {
                // A success clears an earlier failure's explanation.
                if (write_backend({{"state", std::to_string(Connected)}}, {"error"})) backend_state = Connected;
                log::info("dom{} {}: connected", key.domid, key.protocol);
            } else {
                fail_connection(*frontend, seen, why);
            }
            break;
        }
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

void Session::fail_connection(int frontend_state_seen, std::optional<wire::FrontendParams> params,
                              const std::string& why) {
    log::warn("dom{} {}: cannot connect: {}", key.domid, key.protocol, why);
    connect_failure = ConnectFailure{frontend_state_seen, params};
    if (write_backend({{"error", why}, {"state", std::to_string(Closing)}})) backend_state = Closing;
}

rt::Task<Status> Session::connect(const wire::FrontendParams& params, std::string& why) {
    const platform::GrantRef refs[] = {params.ring_ref};
    auto page = worker.mapper->map(key.domid, refs, /*writable=*/true);
    if (!page) {
        why = fmt::format("cannot map command ring (ring-ref {}): {}", params.ring_ref, errno_text(page.error()));
        co_return Errno{page.error()};
    }
    auto port = co_await worker.evtchn->bind_interdomain(*worker.reactor, key.domid, params.port, life.token());
    if (!port) {
        why = fmt::format("cannot bind event channel (port {}): {}", params.port, errno_text(port.error()));
        co_return Errno{port.error()};
    }
    auto c = std::make_unique<Connection>(*this, *worker.reactor, life.token());
    c->ring_page = std::move(page.value());
    c->ring = wire::BackRing(c->ring_page.data());
    c->port = std::move(port.value());
    worker.port_listeners[c->port.port()] = c.get();
    conn = std::move(c);
    conn_params = params;
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
            xenstore_changed.set();  // the session tears the connection down
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
