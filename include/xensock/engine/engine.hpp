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

    // Snapshot for the control plane; thread-safe; waits for the workers.
    std::vector<SessionInfo> list(bool with_sockets, int only_domid = -1);
    // Disconnect a guest (all sockets) or one socket. ENOENT if unknown.
    Status kill(unsigned domid, std::optional<uint64_t> sockid = std::nullopt);

    // Called on the engine's thread when the set of sessions changes (tests).
    size_t session_count() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace xensock::engine
