// Engine internals shared by its translation units. Not installed.
//
// Threading: every Session lives on exactly one Worker (sharded by domid) and
// is touched only from that worker's thread, so nothing here takes locks on
// the data path. Counters are single-writer atomics so the control plane can
// read them from another thread.
#pragma once

#include "xensock/engine/engine.hpp"
#include "xensock/platform/platform.hpp"
#include "xensock/platform/xenstore.hpp"
#include "xensock/runtime/reactor.hpp"
#include "xensock/wire/data_ring.hpp"
#include "xensock/wire/profile.hpp"

#include <netinet/in.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>

namespace xensock::engine {

using platform::DomId;
using platform::Port;

// Written by one thread, read by any: relaxed load+store, no locked RMW.
struct Counter {
    std::atomic<uint64_t> value{0};
    void add(uint64_t n = 1) noexcept { value.store(value.load(std::memory_order_relaxed) + n, std::memory_order_relaxed); }
    uint64_t get() const noexcept { return value.load(std::memory_order_relaxed); }
};

// The one owner of a host socket descriptor.
class FileDescriptor {
public:
    FileDescriptor() = default;
    explicit FileDescriptor(int fd) noexcept : fd_(fd) {}
    FileDescriptor(FileDescriptor&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    FileDescriptor& operator=(FileDescriptor&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    ~FileDescriptor() { reset(); }
    void reset() noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }
    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }

private:
    int fd_ = -1;
};

// Counts running child tasks so their owner can wait for all of them to end
// before it frees what they use.
class TaskCounter {
public:
    explicit TaskCounter(rt::Reactor& r) : idle_(r) {}
    void enter() noexcept { ++count_; }
    void leave() {
        if (--count_ == 0) idle_.set();
    }
    size_t count() const noexcept { return count_; }
    rt::Task<void> wait_idle() {
        while (count_ > 0) {
            idle_.reset();
            co_await idle_.wait();
        }
    }

private:
    size_t count_ = 0;
    rt::Event idle_;
};

// Marks a task as using a socket for as long as it is in scope.
class TaskGuard {
public:
    explicit TaskGuard(TaskCounter& c) : counter_(c) { counter_.enter(); }
    ~TaskGuard() { counter_.leave(); }
    TaskGuard(const TaskGuard&) = delete;
    TaskGuard& operator=(const TaskGuard&) = delete;

private:
    TaskCounter& counter_;
};

// Receives the notifications of one local event-channel port.
class PortListener {
public:
    virtual ~PortListener() = default;
    virtual void on_event() = 0;
};

struct Worker;
struct Session;

// ---------------------------------------------------------------- data ring
// One connected socket's shared ring: the interface page, the buffer pages
// (in = first half, out = second half), the event channel, and the private
// copies of the indexes this side produces. See data_path.cpp.
struct DataRing final : PortListener {
    platform::GrantMapping intf_page;
    platform::GrantMapping buffers;
    platform::BoundPort port;
    wire::DataIntfView intf;
    unsigned order = 0;
    uint32_t size = 0;  // bytes per direction
    std::byte* in = nullptr;
    std::byte* out = nullptr;
    uint32_t in_prod = 0;   // ours: the guest cannot make us forget it
    uint32_t out_cons = 0;  // ours
    rt::Event guest_consumed;   // the guest made room in `in`
    rt::Event guest_produced;   // the guest queued data in `out`
    Worker* worker = nullptr;

    Counter bytes_to_guest, bytes_from_guest, notifications_sent, notifications_received;
    Counter in_full_stalls, out_empty_waits;
    SessionCounters* session_counters = nullptr;  // the owning session's totals

    explicit DataRing(rt::Reactor& r) : guest_consumed(r), guest_produced(r) {}
    ~DataRing() override;
    void on_event() override;
    void notify_guest();
};

// ------------------------------------------------------------------ sockets
// failed: the host socket is gone (could not be recreated after a failed
// CONNECT); only RELEASE is left to do.
enum class SocketKind { reserved, fresh, connecting, active, bound, listening, closing, failed };
std::string_view kind_name(SocketKind k);

struct Socket {
    uint64_t id = 0;
    SocketKind kind = SocketKind::fresh;
    FileDescriptor fd;
    rt::CancelSource cancel;  // child of the connection's
    TaskCounter tasks;        // commands and pumps using this socket
    std::unique_ptr<DataRing> ring;
    sockaddr_in local{}, remote{};
    bool killed = false;  // by the operator; only RELEASE is left to do
    SocketKind kind_before_kill = SocketKind::fresh;  // what `list` shows for a killed socket

    Socket(rt::Reactor& r, uint64_t sockid, const rt::CancelToken& parent) : id(sockid), cancel(parent), tasks(r) {}
};

// ---------------------------------------------------------------- counters
struct SessionCounters {
    std::array<Counter, 8> commands{};       // by wire::Command, on receipt
    std::array<Counter, 8> command_ok{};      // answered with ret >= 0
    std::array<Counter, 8> command_errors{};  // answered with a negative errno
    Counter bytes_to_guest, bytes_from_guest;
    Counter notifications_sent, notifications_received;
    Counter ring_full_stalls, ring_empty_waits;
    Counter guest_protocol_errors;  // bad indexes, bad ring orders, bad refs
    Counter quota_refusals;
    std::mutex errors_mutex;        // guards the maps below; cold path only
    std::map<int, uint64_t> errors_by_errno;  // command errors: errno -> count
    // Host socket errors passed to the guest in a data ring's in_error
    // (receiving) or out_error (sending): errno -> count.
    std::map<int, uint64_t> ring_errors_in, ring_errors_out;
    void count_error(int negative_errno) {
        std::lock_guard lock(errors_mutex);
        ++errors_by_errno[negative_errno];
    }
    enum class RingHalf { in, out };
    void count_ring_error(RingHalf half, int negative_errno) {
        std::lock_guard lock(errors_mutex);
        ++(half == RingHalf::in ? ring_errors_in : ring_errors_out)[negative_errno];
    }
};

inline void DataRing::on_event() {
    notifications_received.add();
    if (session_counters) session_counters->notifications_received.add();
    guest_consumed.set();
    guest_produced.set();
}
inline void DataRing::notify_guest() {
    notifications_sent.add();
    if (session_counters) session_counters->notifications_sent.add();
    (void)port.notify();
}

// --------------------------------------------------------------- connection
// What exists while the frontend is connected: the mapped command ring, its
// port, and the guest's sockets. Destroying it releases all of them.
struct Connection final : PortListener {
    Session& session;
    platform::GrantMapping ring_page;
    platform::BoundPort port;
    wire::BackRing ring;
    rt::Event kicked;
    rt::CancelSource cancel;
    TaskCounter tasks;
    std::unordered_map<uint64_t, std::unique_ptr<Socket>> sockets;
    // The frontend corrupted the command ring: serve_commands stopped, and
    // the session tears the whole connection down (see reconcile).
    bool ring_broken = false;
    // The frontend was seen Connected on this connection: seeing it at
    // Initialised again means it reset (whatever its new ring looks like).
    bool frontend_was_connected = false;

    Connection(Session& s, rt::Reactor& r, const rt::CancelToken& parent)
        : session(s), kicked(r), cancel(parent), tasks(r) {}
    ~Connection() override;
    void on_event() override;
};

// ------------------------------------------------------------------ session
struct SessionKey {
    std::string protocol;
    unsigned domid;
    unsigned devid;
    auto operator<=>(const SessionKey&) const = default;
};

// A connect attempt that failed, and what the frontend said when it did: the
// session stays Closing (with its `error` node) until the frontend moves.
struct ConnectFailure {
    int frontend_state = 0;
    std::optional<wire::FrontendParams> params;  // nullopt: they were unreadable
};

struct Session {
    Worker& worker;
    const wire::ProtocolProfile& profile;
    SessionKey key;
    std::string backend_path, frontend_path, watch_token;
    rt::Event xenstore_changed;
    rt::CancelSource life;  // cancelled by `kill` or daemon stop
    bool kill_requested = false;
    std::unique_ptr<Connection> conn;
    wire::FrontendParams conn_params;             // what `conn` was made from
    std::optional<ConnectFailure> connect_failure;
    // The toolstack removed our directory: a backend write found it gone
    // (and did not recreate it). The session ends.
    bool device_removed = false;
    std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
    std::atomic<int> backend_state{0}, frontend_state{0};
    SessionCounters counters;

    Session(Worker& w, const wire::ProtocolProfile& p, SessionKey k);
    rt::Task<void> run();

    // session.cpp
    rt::Task<void> reconcile(bool& ended);
    rt::Task<void> reconcile_states();
    rt::Task<void> disconnect();
    rt::Task<Status> connect(const wire::FrontendParams& params, std::string& why);
    void fail_connection(int frontend_state, std::optional<wire::FrontendParams> params, const std::string& why);
    // Every backend write goes through here: one transaction that first
    // checks that backend_path still exists, so that a write racing with the
    // toolstack's removal never recreates the directory. Returns false (and
    // sets device_removed) if it is gone.
    bool write_backend(const wire::NodeList& nodes, const std::vector<std::string>& remove = {});
    void publish_backend_nodes();
    void write_state(int state);
    rt::Task<void> serve_commands(Connection& c);
    void respond(Connection& c, const wire::Request& req, int ret, uint64_t sockid);
    void respond(Connection& c, const wire::Request& req, int ret) { respond(c, req, ret, req.sockid); }

    // commands.cpp
    rt::Task<void> run_command(Connection& c, wire::Request req);
    rt::Task<int> cmd_socket(Connection& c, const wire::Request& req);
    rt::Task<int> cmd_connect(Connection& c, const wire::Request& req);
    rt::Task<int> cmd_release(Connection& c, const wire::Request& req);
    rt::Task<int> cmd_bind(Connection& c, const wire::Request& req);
    rt::Task<int> cmd_listen(Connection& c, const wire::Request& req);
    rt::Task<int> cmd_accept(Connection& c, const wire::Request& req);
    rt::Task<int> cmd_poll(Connection& c, const wire::Request& req);
    rt::Task<void> kill_socket(Connection& c, uint64_t sockid);
    SessionInfo info(bool with_sockets) const;
};

// ------------------------------------------------------------------- worker
struct EngineShared;

struct Worker {
    EngineShared& shared;
    unsigned index;
    std::thread thread;
    // Lives on the worker's stack while it runs. The worker's own thread
    // uses it freely; other threads go through post(), which holds
    // reactor_mutex, and the worker clears it under that lock before the
    // reactor goes away (on every way out of main).
    rt::Reactor* reactor = nullptr;
    std::mutex reactor_mutex;
    std::unique_ptr<platform::EventChannel> evtchn;
    std::unique_ptr<platform::GrantMapper> mapper;
    std::unique_ptr<platform::XenStore> xs;
    std::unordered_map<Port, PortListener*> port_listeners;
    std::unordered_map<std::string, Session*> watchers;  // watch token -> session
    std::map<SessionKey, std::unique_ptr<Session>> sessions;
    rt::CancelSource stopping;    // sessions and the root watch end
    rt::CancelSource pumps_stop;  // then the event pumps
    TaskCounter* session_tasks = nullptr;
    std::unique_ptr<rt::Event> rescan;  // worker 0: re-read the backend directories
    // Released sockets still delivering their queued bytes, by guest. Per
    // worker is per guest: a guest's sessions all live on one worker.
    struct Lingering {
        uint32_t sockets = 0;
        uint64_t bytes = 0;
    };
    std::unordered_map<DomId, Lingering> lingering;

    Worker(EngineShared& s, unsigned i) : shared(s), index(i) {}
    void main(std::promise<void> ready);
    // Any thread: runs fn on this worker's thread. False (fn dropped) if the
    // worker is not running: not started yet, stopped, or failed.
    bool post(std::function<void()> fn);
    rt::Task<void> event_channel_pump();
    rt::Task<void> xenstore_pump();
    void dispatch_watch_events();
    rt::Task<void> watch_backend_roots();
    void start_session(const wire::ProtocolProfile& p, unsigned domid, unsigned devid);
    rt::Task<void> run_session(Session& s);
};

// State shared by the workers; guarded by `mutex` where noted.
struct EngineShared {
    EngineShared(platform::Platform& p, EngineConfig c) : platform(p), config(std::move(c)) {}
    platform::Platform& platform;
    EngineConfig config;
    DomId self = 0;
    std::vector<std::unique_ptr<Worker>> workers;
    std::mutex mutex;
    std::set<SessionKey> live;  // guarded by mutex: sessions anywhere
    Worker& worker_for(unsigned domid) { return *workers[domid % workers.size()]; }
};

// data_path.cpp
Result<std::unique_ptr<DataRing>> map_data_ring(Worker& w, const wire::ProtocolProfile& profile, DomId domid,
                                                 uint32_t intf_ref, unsigned max_order, std::string& why);
rt::Task<void> serve_data_ring(rt::Reactor& reactor, DataRing& ring, int fd, rt::CancelToken token,
                               SessionCounters& counters);
// Bytes the guest queued in `out` but we have not sent, copied out of the
// shared pages (used by RELEASE to deliver them after the reply).
std::vector<std::byte> take_unsent(DataRing& ring);

}  // namespace xensock::engine
