// Engine: starts the workers, and answers the control plane by asking each
// worker for a snapshot on its own thread (no locks on the data path).
#include "internal.hpp"

#include "xensock/util/log.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <future>

namespace xensock::engine {

struct Engine::Impl {
    EngineShared shared;
    bool started = false;
    Impl(platform::Platform& p, EngineConfig c) : shared(p, std::move(c)) {}
};

Engine::Engine(platform::Platform& platform, EngineConfig config)
    : impl_(std::make_unique<Impl>(platform, std::move(config))) {
    auto& cfg = impl_->shared.config;
    if (cfg.max_ring_order > wire::kHardMaxRingOrder)
        throw std::invalid_argument(fmt::format("max ring order {} exceeds the hard maximum {}", cfg.max_ring_order,
                                                wire::kHardMaxRingOrder));
    if (cfg.workers == 0) cfg.workers = 1;
    if (cfg.profiles.empty()) cfg.profiles = wire::all_profiles();
}

Engine::~Engine() { stop(); }

void Engine::start() {
    auto& shared = impl_->shared;
    {
        platform::XenStore xs(shared.platform.xenstored_path());
        shared.self = shared.platform.self_domid();
    }
    for (unsigned i = 0; i < shared.config.workers; ++i) shared.workers.push_back(std::make_unique<Worker>(shared, i));
    for (auto& w : shared.workers) {
        std::promise<void> ready;
        auto started = ready.get_future();
        Worker* worker = w.get();
        w->thread = std::thread([worker, p = std::move(ready)]() mutable { worker->main(std::move(p)); });
        try {
            started.get();  // rethrows the worker's start-up failure
        } catch (...) {
            w->thread.join();
            stop();
            throw;
        }
    }
    impl_->started = true;
    log::info("serving {} on {} with {} worker(s), max ring order {}", [&] {
        std::string names;
        for (const auto* p : shared.config.profiles) names += (names.empty() ? "" : ",") + std::string(p->name());
        return names;
    }(), shared.platform.name(), shared.config.workers, shared.config.max_ring_order);
}

void Engine::stop() {
    auto& shared = impl_->shared;
    for (auto& w : shared.workers) {
        if (!w->thread.joinable()) continue;
        Worker* worker = w.get();
        // A worker that already ended (failed) takes nothing; join it anyway.
        (void)w->post([worker] {
            worker->stopping.cancel();
            worker->reactor->stop();
        });
    }
    for (auto& w : shared.workers)
        if (w->thread.joinable()) w->thread.join();
    shared.workers.clear();
    impl_->started = false;
}

size_t Engine::session_count() const {
    std::lock_guard lock(impl_->shared.mutex);
    return impl_->shared.live.size();
}

namespace {
std::string format_address(const sockaddr_in& a) {
    if (a.sin_family != AF_INET) return "-";
    char text[INET_ADDRSTRLEN] = {};
    inet_ntop(AF_INET, &a.sin_addr, text, sizeof text);
    return fmt::format("{}:{}", text, ntohs(a.sin_port));
}

// A question to one worker, asked from a control thread. The posted closure
// owns the promise and everything fn captured (by value): if we stop
// waiting, the worker may still run it later, or drop it unrun.
template <typename R>
class WorkerCall {
public:
    template <typename Fn>
    WorkerCall(Worker& w, Fn fn) : worker_(w), state_(std::make_shared<State>()) {
        result_ = state_->done.get_future();
        const bool posted = w.post([state = state_, fn = std::move(fn)]() mutable {
            if (state->abandoned.load()) return;  // the control side gave up: do nothing late
            try {
                state->done.set_value(fn());
            } catch (...) {
                state->done.set_exception(std::current_exception());
            }
        });
        if (!posted)
            throw WorkerUnavailable(fmt::format("worker {} is not running (it failed or is stopping; see xensockd's log)",
                                                w.index));
    }

    // Waits until `deadline` at most.
    R get(std::chrono::steady_clock::time_point deadline, std::chrono::milliseconds bound) {
        if (result_.wait_until(deadline) != std::future_status::ready) {
            state_->abandoned = true;
            throw WorkerUnavailable(fmt::format("worker {} is not responding (no answer within {} ms): the guests "
                                                "it serves may be stuck; see xensockd's log",
                                                worker_.index, bound.count()));
        }
        try {
            return result_.get();
        } catch (const std::future_error&) {  // dropped unrun: the worker ended meanwhile
            throw WorkerUnavailable(fmt::format("worker {} stopped before answering (see xensockd's log)",
                                                worker_.index));
        }
    }

private:
    struct State {
        std::promise<R> done;
        std::atomic<bool> abandoned{false};
    };
    Worker& worker_;
    std::shared_ptr<State> state_;
    std::future<R> result_;
};
}  // namespace

SessionInfo Session::info(bool with_sockets) const {
    SessionInfo out;
    out.domid = key.domid;
    out.devid = key.devid;
    out.protocol = key.protocol;
    out.backend_state = backend_state.load();
    out.frontend_state = frontend_state.load();
    out.bytes_to_guest = counters.bytes_to_guest.get();
    out.bytes_from_guest = counters.bytes_from_guest.get();
    out.uptime_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    for (size_t i = 0; i < 7; ++i) {
        const auto name = wire::command_name(static_cast<wire::Command>(i));
        out.counters.emplace_back(fmt::format("commands_{}", name), counters.commands[i].get());
        out.counters.emplace_back(fmt::format("command_errors_{}", name), counters.command_errors[i].get());
        out.counters.emplace_back(fmt::format("command_ok_{}", name), counters.command_ok[i].get());
    }
    out.counters.emplace_back("commands_unknown", counters.commands[7].get());
    out.counters.emplace_back("notifications_sent", counters.notifications_sent.get());
    out.counters.emplace_back("notifications_received", counters.notifications_received.get());
    out.counters.emplace_back("ring_full_stalls", counters.ring_full_stalls.get());
    out.counters.emplace_back("ring_empty_waits", counters.ring_empty_waits.get());
    out.counters.emplace_back("guest_protocol_errors", counters.guest_protocol_errors.get());
    out.counters.emplace_back("quota_refusals", counters.quota_refusals.get());
    {
        std::lock_guard lock(const_cast<SessionCounters&>(counters).errors_mutex);
        for (const auto& [err, n] : counters.errors_by_errno) out.counters.emplace_back(fmt::format("errno_{}", -err), n);
        for (const auto& [err, n] : counters.ring_errors_in)
            out.counters.emplace_back(fmt::format("ring_errors_in_errno_{}", -err), n);
        for (const auto& [err, n] : counters.ring_errors_out)
            out.counters.emplace_back(fmt::format("ring_errors_out_errno_{}", -err), n);
    }
    if (!conn) return out;
    for (const auto& [id, sock] : conn->sockets) {
        const bool active = sock->ring != nullptr;
        auto passive = [](SocketKind k) { return k == SocketKind::listening || k == SocketKind::bound; };
        // A killed socket keeps its ring until the guest releases it, but
        // its host socket is gone: it no longer counts as active (nor as
        // passive: nothing listens any more).
        if (active && !sock->killed) ++out.active_sockets;
        else if (passive(sock->kind)) ++out.passive_sockets;
        if (!with_sockets || sock->kind == SocketKind::reserved) continue;
        SocketInfo si;
        si.sockid = id;
        // A killed socket is `closing` now; show what it was.
        const SocketKind shown = sock->killed ? sock->kind_before_kill : sock->kind;
        si.kind = active ? "active" : passive(shown) ? "passive" : "new";
        si.state = sock->killed ? "killed" : std::string(kind_name(sock->kind));
        si.local = format_address(sock->local);
        si.remote = format_address(sock->remote);
        if (active) {
            DataRing& r = *sock->ring;
            si.ring_order = r.order;
            si.bytes_to_guest = r.bytes_to_guest.get();
            si.bytes_from_guest = r.bytes_from_guest.get();
            const auto in_q = wire::ring_queued(r.in_prod, r.intf.in_cons(), r.size);
            const auto out_q = wire::ring_queued(r.intf.out_prod(), r.out_cons, r.size);
            si.in_queued = in_q < 0 ? 0 : static_cast<uint32_t>(in_q);
            si.out_queued = out_q < 0 ? 0 : static_cast<uint32_t>(out_q);
        }
        out.sockets.push_back(std::move(si));
    }
    return out;
}

std::vector<SessionInfo> Engine::list(bool with_sockets, int only_domid) {
    const auto bound = impl_->shared.config.control_timeout;
    // Ask every worker first, then wait for all of them against one deadline.
    std::vector<WorkerCall<std::vector<SessionInfo>>> calls;
    calls.reserve(impl_->shared.workers.size());
    for (auto& w : impl_->shared.workers) {
        calls.emplace_back(*w, [worker = w.get(), with_sockets, only_domid] {
            std::vector<SessionInfo> v;
            for (const auto& [key, s] : worker->sessions)
                if (only_domid < 0 || static_cast<int>(key.domid) == only_domid) v.push_back(s->info(with_sockets));
            return v;
        });
    }
    const auto deadline = std::chrono::steady_clock::now() + bound;
    std::vector<SessionInfo> all;
    for (auto& call : calls)
        for (auto& s : call.get(deadline, bound)) all.push_back(std::move(s));
    std::sort(all.begin(), all.end(), [](const SessionInfo& a, const SessionInfo& b) {
        return std::tie(a.domid, a.protocol, a.devid) < std::tie(b.domid, b.protocol, b.devid);
    });
    return all;
}

KillResult Engine::kill(const KillTarget& target) {
    auto& shared = impl_->shared;
    if (shared.workers.empty()) return {};
    Worker& w = shared.worker_for(target.domid);
    WorkerCall<KillResult> call(w, [worker = &w, target] {
        KillResult result;
        // The sessions the target names (all of one domid live on one worker).
        std::vector<Session*> matching;
        for (auto& [key, s] : worker->sessions) {
            if (key.domid != target.domid) continue;
            if (target.protocol && key.protocol != *target.protocol) continue;
            if (target.devid && key.devid != *target.devid) continue;
            matching.push_back(s.get());
        }
        auto ref = [](const Session& s) { return SessionRef{s.key.domid, s.key.devid, s.key.protocol}; };
        if (!target.sockid) {
            for (Session* s : matching) {
                s->kill_requested = true;
                s->xenstore_changed.set();
                result.sessions.push_back(ref(*s));
            }
            result.outcome = matching.empty() ? KillResult::Outcome::not_found : KillResult::Outcome::done;
            return result;
        }
        // One socket: it must be in exactly one of the sessions, or the
        // operator has to say which (a sockid is only unique per session).
        std::vector<Session*> having;
        for (Session* s : matching) {
            if (!s->conn) continue;
            auto it = s->conn->sockets.find(*target.sockid);
            if (it != s->conn->sockets.end() && it->second->kind != SocketKind::reserved) having.push_back(s);
        }
        for (Session* s : having) result.sessions.push_back(ref(*s));
        if (having.size() > 1) {
            result.outcome = KillResult::Outcome::ambiguous;
            return result;
        }
        if (having.empty()) return result;  // not_found
        Session& session = *having.front();
        Connection& c = *session.conn;
        c.tasks.enter();
        auto run = [](Session& s, Connection& c, uint64_t id) -> rt::Task<void> {
            co_await s.kill_socket(c, id);
            c.tasks.leave();
        };
        worker->reactor->spawn(run(session, c, *target.sockid));
        result.outcome = KillResult::Outcome::done;
        return result;
    });
    const auto bound = shared.config.control_timeout;
    return call.get(std::chrono::steady_clock::now() + bound, bound);
}

bool Engine::run_on_worker_for_testing(unsigned index, std::function<void()> fn) {
    auto& workers = impl_->shared.workers;
    return index < workers.size() && workers[index]->post(std::move(fn));
}

}  // namespace xensock::engine
