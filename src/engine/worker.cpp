// A worker thread: one reactor, one event-channel handle, one grant mapper,
// one xenstore connection, and the sessions sharded onto it. Worker 0 also
// watches the backend directories and hands new devices out.
#include "internal.hpp"

#include "xensock/util/log.hpp"

#include <poll.h>

#include <future>

namespace xensock::engine {

namespace {
// Publishes the worker's reactor to other threads for as long as it exists:
// destroyed before the reactor, also when main() leaves by an exception.
class PublishedReactor {
public:
    PublishedReactor(Worker& w, rt::Reactor& r) : worker_(w) {
        std::lock_guard lock(worker_.reactor_mutex);
        worker_.reactor = &r;
    }
    ~PublishedReactor() {
        std::lock_guard lock(worker_.reactor_mutex);
        worker_.reactor = nullptr;
    }
    PublishedReactor(const PublishedReactor&) = delete;
    PublishedReactor& operator=(const PublishedReactor&) = delete;

private:
    Worker& worker_;
};
}  // namespace

bool Worker::post(std::function<void()> fn) {
    std::lock_guard lock(reactor_mutex);
    if (!reactor) return false;
    reactor->post(std::move(fn));
    return true;
}

void Worker::main(std::promise<void> ready) {
    try {
        rt::Reactor reactor;
        PublishedReactor published(*this, reactor);
        evtchn = shared.platform.open_event_channel();
        mapper = shared.platform.open_grant_mapper();
        xs = std::make_unique<platform::XenStore>(shared.platform.xenstored_path());
        TaskCounter sessions_running(reactor);
        session_tasks = &sessions_running;
        rescan = std::make_unique<rt::Event>(reactor);

        TaskCounter pumps_running(reactor);
        auto counted = [](TaskCounter& count, rt::Task<void> task) -> rt::Task<void> {
            co_await std::move(task);
            count.leave();
        };
        pumps_running.enter();
        reactor.spawn(counted(pumps_running, event_channel_pump()));
        pumps_running.enter();
        reactor.spawn(counted(pumps_running, xenstore_pump()));
        if (index == 0) reactor.spawn(watch_backend_roots());
        ready.set_value();
        reactor.run();  // until stop(): `stopping` was cancelled

        // Sessions see `stopping` and tear down (guests see Closed) while the
        // pumps still deliver their events; then the pumps stop.
        auto drain = [](TaskCounter& c) -> rt::Task<void> { co_await c.wait_idle(); };
        reactor.run_until(drain(sessions_running));
        pumps_stop.cancel();
        reactor.run_until(drain(pumps_running));
        sessions.clear();
        port_listeners.clear();
        xs.reset();
        mapper.reset();
        evtchn.reset();
        session_tasks = nullptr;
        rescan.reset();
    } catch (const std::exception& e) {
        try {
            ready.set_exception(std::current_exception());
        } catch (const std::future_error&) {
            // Already started: nobody waits on the promise any more.
            log::error("worker {} failed: {}", index, e.what());
        }
    }
}

// Event channels: one fd for every port bound on this worker. Each fired
// port's listener is told; the listener only sets events, so a storm of
// notifications costs a flag write each, never a wakeup per notification.
rt::Task<void> Worker::event_channel_pump() {
    std::vector<Port> fired;
    const rt::CancelToken token = pumps_stop.token();
    while (true) {
        const int rc = co_await reactor->poll(evtchn->fd(), POLLIN, token);
        if (rc == -ECANCELED) co_return;
        if (rc < 0) {
            log::error("event channel poll failed: {}", errno_text(-rc));
            co_return;
        }
        fired.clear();
        evtchn->pending(fired);
        for (Port p : fired) {
            auto it = port_listeners.find(p);
            if (it != port_listeners.end()) it->second->on_event();
        }
    }
}

// Xenstore watches: dispatch by token; sessions re-read what they watch
// (level-triggered), so any number of events for one session costs one pass.
rt::Task<void> Worker::xenstore_pump() {
    const rt::CancelToken token = pumps_stop.token();
    while (true) {
        const int rc = co_await reactor->poll(xs->fd(), POLLIN, token);
        if (rc == -ECANCELED) co_return;
        if (rc < 0) {
            log::error("xenstore watch poll failed: {}", errno_text(-rc));
            co_return;
        }
        dispatch_watch_events();
    }
}

// Drains every queued watch event (never blocks).
void Worker::dispatch_watch_events() {
    while (true) {
        std::optional<platform::WatchEvent> event = xs->read_watch();
        if (!event) return;
        if (event->token == "root") {
            if (rescan) rescan->set();
            continue;
        }
        auto it = watchers.find(event->token);
        if (it != watchers.end()) it->second->xenstore_changed.set();
    }
}

// Worker 0: every <domid>/<devid> under backend/<proto> becomes a session.
rt::Task<void> Worker::watch_backend_roots() {
    const auto root = fmt::format("/local/domain/{}/backend", shared.self);
    for (const auto* profile : shared.config.profiles) {
        auto st = xs->watch(fmt::format("{}/{}", root, profile->name()), "root");
        if (!st) log::error("cannot watch {}/{}: {}", root, profile->name(), errno_text(st.error()));
    }
    auto token = stopping.token();
    while (!token.cancelled()) {
        for (const auto* profile : shared.config.profiles) {
            const auto proto_dir = fmt::format("{}/{}", root, profile->name());
            auto domids = xs->directory(proto_dir);
            if (!domids) continue;
            for (const auto& dom_text : *domids) {
                auto domid = wire::parse_u32(dom_text);
                if (!domid || *domid == 0 || *domid >= 0x7FF0) continue;  // DOMID_FIRST_RESERVED
                auto devids = xs->directory(fmt::format("{}/{}", proto_dir, dom_text));
                if (!devids) continue;
                for (const auto& dev_text : *devids) {
                    auto devid = wire::parse_u32(dev_text);
                    if (!devid) continue;
                    SessionKey key{std::string(profile->name()), *domid, *devid};
                    {
                        std::lock_guard lock(shared.mutex);
                        if (!shared.live.insert(key).second) continue;
                    }
                    Worker& owner = shared.worker_for(*domid);
                    const unsigned d = *domid, v = *devid;
                    if (&owner == this) {
                        start_session(*profile, d, v);
                    } else {
                        if (!owner.post([&owner, profile, d, v] { owner.start_session(*profile, d, v); })) {
                            log::error("dom{} {}: worker {} is not running; the device is not served", d,
                                       profile->name(), owner.index);
                            std::lock_guard lock(shared.mutex);
                            shared.live.erase(key);
                        }
                    }
                }
            }
        }
        rescan->reset();
        if (!co_await rescan->wait(token)) break;
    }
}

void Worker::start_session(const wire::ProtocolProfile& p, unsigned domid, unsigned devid) {
    SessionKey key{std::string(p.name()), domid, devid};
    auto session = std::make_unique<Session>(*this, p, key);
    Session& s = *session;
    sessions[key] = std::move(session);
    session_tasks->enter();
    reactor->spawn(run_session(s));
}

rt::Task<void> Worker::run_session(Session& s) {
    try {
        co_await s.run();
    } catch (const std::exception& e) {
        log::error("dom{} {}: session failed: {}", s.key.domid, s.key.protocol, e.what());
    }
    const SessionKey key = s.key;
    sessions.erase(key);  // destroys the session: nothing of it is in use now
    {
        std::lock_guard lock(shared.mutex);
        shared.live.erase(key);
    }
    session_tasks->leave();
    // The device may already be back (toolstack re-attached): look again.
    Worker& root = *shared.workers[0];
    if (&root == this) {
        if (rescan) rescan->set();
    } else {
        (void)root.post([&root] {
            if (root.rescan) root.rescan->set();
        });
    }
}

}  // namespace xensock::engine
