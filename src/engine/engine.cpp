// Engine: starts the workers, and answers the control plane by asking each
// worker for a snapshot on its own thread (no locks on the data path).
#include "internal.hpp"

#include "xensock/util/log.hpp"

#include <arpa/inet.h>

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
        if (w->thread.joinable() && w->reactor) {
            Worker* worker = w.get();
            w->reactor->post([worker] {
                worker->stopping.cancel();
                worker->reactor->stop();
            });
        }
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

// Runs fn on the worker's thread and waits for its result.
template <typename Fn>
auto on_worker(Worker& w, Fn fn) -> decltype(fn()) {
    using R = decltype(fn());
    std::promise<R> done;
    auto result = done.get_future();
    w.reactor->post([&] {
        try {
            done.set_value(fn());
        } catch (...) {
            done.set_exception(std::current_exception());
        }
    });
    return result.get();
}
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
    }
    if (!conn) return out;
    for (const auto& [id, sock] : conn->sockets) {
        const bool active = sock->ring != nullptr;
        // A killed socket keeps its ring until the guest releases it, but
        // its host socket is gone: it no longer counts as active.
        if (active && !sock->killed) ++out.active_sockets;
        else if (sock->kind == SocketKind::listening || sock->kind == SocketKind::bound) ++out.passive_sockets;
        if (!with_sockets || sock->kind == SocketKind::reserved) continue;
        SocketInfo si;
        si.sockid = id;
        si.kind = active ? "active" : (sock->kind == SocketKind::listening || sock->kind == SocketKind::bound) ? "passive" : "new";
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
    std::vector<SessionInfo> all;
    for (auto& w : impl_->shared.workers) {
        if (!w->reactor) continue;
        auto part = on_worker(*w, [&] {
            std::vector<SessionInfo> v;
            for (const auto& [key, s] : w->sessions)
                if (only_domid < 0 || static_cast<int>(key.domid) == only_domid) v.push_back(s->info(with_sockets));
            return v;
        });
        for (auto& s : part) all.push_back(std::move(s));
    }
    std::sort(all.begin(), all.end(), [](const SessionInfo& a, const SessionInfo& b) {
        return std::tie(a.domid, a.protocol, a.devid) < std::tie(b.domid, b.protocol, b.devid);
    });
    return all;
}

Status Engine::kill(unsigned domid, std::optional<uint64_t> sockid) {
    auto& shared = impl_->shared;
    if (shared.workers.empty()) return Errno{ENOENT};
    Worker& w = shared.worker_for(domid);
    const int rc = on_worker(w, [&]() -> int {
        int found = ENOENT;
        for (auto& [key, s] : w.sessions) {
            if (key.domid != domid) continue;
            Session& session = *s;
            if (!sockid) {
                session.kill_requested = true;
                session.xenstore_changed.set();
                found = 0;
                continue;
            }
            if (!session.conn) continue;
            auto it = session.conn->sockets.find(*sockid);
            if (it == session.conn->sockets.end() || it->second->kind == SocketKind::reserved) continue;
            Connection& c = *session.conn;
            c.tasks.enter();
            auto run = [](Session& s, Connection& c, uint64_t id) -> rt::Task<void> {
                co_await s.kill_socket(c, id);
                c.tasks.leave();
            };
            w.reactor->spawn(run(session, c, *sockid));
            found = 0;
        }
        return found;
    });
    if (rc != 0) return Errno{rc};
    return {};
}

}  // namespace xensock::engine
