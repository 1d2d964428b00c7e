// SimEnv: a whole sim installation for one test, all real processes:
// a fresh sim root on /dev/shm, Debian's xenstored under the shim, xensockd
// (the binary under test), and guest processes forked from the test.
// Everything is torn down (and checked for leftovers) when it goes away.
#pragma once

#include "xensock/platform/platform.hpp"
#include "xensock/platform/sim_xenstored.hpp"
#include "xensock/platform/xenstore.hpp"
#include "xensock/wire/profile.hpp"

#include <nlohmann/json.hpp>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace xensock::testing {

using namespace std::chrono_literals;

struct SimEnvOptions {
    unsigned max_ring_order = 6;
    unsigned workers = 1;
    std::vector<std::string> extra_args;
    bool start_daemon = true;
};

class SimEnv {
public:
    explicit SimEnv(SimEnvOptions options = {});
    ~SimEnv();
    SimEnv(const SimEnv&) = delete;
    SimEnv& operator=(const SimEnv&) = delete;

    const std::string& root() const { return root_; }
    std::string control_path() const { return root_ + "/control"; }
    platform::XenStore& xs() { return *xs_; }

    // xensockd under test.
    void start_daemon();
    // SIGTERM and wait; returns the exit status (or -signal).
    int stop_daemon(std::chrono::milliseconds bound = 10s);
    pid_t daemon_pid() const { return daemon_pid_; }
    bool daemon_alive() const;
    // Open fds and grant mappings (mappings of any DIR/dom<D>/mem file) of
    // the daemon, read from /proc: the leak checks.
    size_t daemon_fd_count() const;
    size_t daemon_ring_mappings() const;
    size_t daemon_sockets() const;  // fds that are sockets
    // User + system CPU time the daemon has used, from /proc/<pid>/stat.
    double daemon_cpu_seconds() const;
    // One request on the daemon's control socket (what xensockctl sends),
    // e.g. {"op": "stats", "domid": 3}; the answer, or throws.
    nlohmann::json control(const nlohmann::json& request) const;
    // A counter of guest `domid`'s sessions (summed over its protocols), or
    // of all sessions (domid < 0), from the "stats" answer; 0 if absent.
    uint64_t counter(const std::string& name, int domid = -1) const;
    // Sessions the daemon serves now (the "list" answer).
    size_t session_count(int domid = -1) const;

    // The toolstack role.
    void attach(platform::DomId guest, const wire::ProtocolProfile& profile);
    Status detach(platform::DomId guest, const wire::ProtocolProfile& profile, std::chrono::milliseconds wait = 5s);

    // Reads a node, or "" if absent.
    std::string read(const std::string& path);
    // Waits (bounded) until `path` reads `value`; false on timeout.
    bool wait_for(const std::string& path, const std::string& value, std::chrono::milliseconds bound = 10s);
    std::string backend_path(platform::DomId guest, const wire::ProtocolProfile& profile) const;
    std::string frontend_path(platform::DomId guest, const wire::ProtocolProfile& profile) const;

    // Runs `body` in a forked child process as guest `domid`; the child's
    // exit code is what body returns (0 = pass). The child opens its own sim
    // platform; nothing but the sim's shared files crosses over.
    pid_t spawn(std::function<int()> body);
    // Waits for a child; returns its exit code, 128+signal if killed, or -1
    // on timeout (the child is then killed).
    static int wait_child(pid_t pid, std::chrono::milliseconds bound = 60s);

private:
    SimEnvOptions options_;
    std::string root_;
    std::optional<platform::sim::XenstoredProcess> xenstored_;
    std::unique_ptr<platform::XenStore> xs_;
    pid_t daemon_pid_ = -1;
    std::vector<pid_t> children_;
};

// Polls `pred` until true or the bound passes (for cross-process state
// that has no event to wait on, e.g. /proc contents).
bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds bound = 10s);

}  // namespace xensock::testing
