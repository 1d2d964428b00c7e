// The engine: sessions (one per guest device), their commands and data rings.
// It knows no platform and no protocol: it is given a Platform and serves
// every ProtocolProfile it is told about.
#pragma once

#include "xensock/platform/platform.hpp"
#include "xensock/wire/profile.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace xensock::engine {

struct EngineConfig {
    // Largest data ring order a guest may use (published to the frontend).
    unsigned max_ring_order = 6;
    // Worker threads; sessions are sharded over them by domid.
    unsigned workers = 1;
    // Per-guest limits: a guest that reaches one gets an error for the
    // request that would exceed it; nothing else is affected.
    uint32_t max_sockets_per_guest = 4096;
    // How long RELEASE keeps delivering what the guest queued before closing.
    std::chrono::milliseconds linger = std::chrono::seconds(30);
    // How long a control-plane request (list, kill) waits for a worker
    // before it answers that the worker is not responding.
    std::chrono::milliseconds control_timeout = std::chrono::seconds(5);
    // Released sockets still delivering queued bytes, per guest (domid): at
    // most this many, holding at most this many bytes. A RELEASE beyond
    // either resets that connection (RST) instead, counted as a quota
    // refusal: a guest cannot pile up descriptors and copies by churning.
    uint32_t max_lingering_sockets_per_guest = 64;
    uint64_t max_lingering_bytes_per_guest = uint64_t{16} << 20;
    std::vector<const wire::ProtocolProfile*> profiles;
};

// Counters of one guest session, readable from any thread without locks.
struct SessionCounters;

struct SocketInfo {
    uint64_t sockid = 0;
    std::string kind;   // "active", "passive", "new"
    std::string state;  // "connecting", "connected", "listening", "closed", ...
    std::string local, remote;
    unsigned ring_order = 0;
    uint64_t bytes_to_guest = 0, bytes_from_guest = 0;
    uint32_t in_queued = 0, out_queued = 0;
};

struct SessionInfo {
    unsigned domid = 0;
    unsigned devid = 0;
    std::string protocol;
    int backend_state = 0, frontend_state = 0;
    unsigned active_sockets = 0, passive_sockets = 0;
    uint64_t bytes_to_guest = 0, bytes_from_guest = 0;
    double uptime_seconds = 0;
    std::vector<std::pair<std::string, uint64_t>> counters;  // name -> value
    std::vector<SocketInfo> sockets;                          // when requested
};

// A session by what names it: the guest, the protocol, the device id.
struct SessionRef {
    unsigned domid = 0;
    unsigned devid = 0;
    std::string protocol;
};

// What `kill` acts on: every session of `domid`, narrowed to one protocol
// and/or device id when given; with `sockid`, only that socket.
struct KillTarget {
    unsigned domid = 0;
    std::optional<std::string> protocol;
    std::optional<unsigned> devid;
    std::optional<uint64_t> sockid;
};

struct KillResult {
    enum class Outcome {
        done,       // `sessions`: what was killed (or had the socket killed)
        not_found,  // no session (or no socket) matches
        ambiguous,  // `sessions`: more than one has the socket; nothing done
    };
    Outcome outcome = Outcome::not_found;
    std::vector<SessionRef> sessions;
};

// A worker failed or did not answer within EngineConfig::control_timeout;
// the message names it. Thrown by list and kill.
class WorkerUnavailable : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class Engine {
public:
    Engine(platform::Platform& platform, EngineConfig config);
    ~Engine();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    // Starts the workers and watches the backend directories. Throws if the
    // platform or xenstore cannot be reached.
    void start();
    // Tears every session down (guests see Closed) and joins the workers.
    void stop();

    // Snapshot for the control plane; thread-safe; waits for the workers
    // (at most control_timeout, else WorkerUnavailable).
    std::vector<SessionInfo> list(bool with_sockets, int only_domid = -1);
    // Disconnect sessions (all their sockets) or close one socket; see
    // KillTarget. Thread-safe; WorkerUnavailable as for list.
    KillResult kill(const KillTarget& target);

    // Called on the engine's thread when the set of sessions changes (tests).
    size_t session_count() const;

    // Tests only: runs fn on worker `index`'s thread (to stall or stop it).
    // False if that worker is not running.
    bool run_on_worker_for_testing(unsigned index, std::function<void()> fn);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace xensock::engine
