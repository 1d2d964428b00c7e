// The control socket: one JSON request per line, one JSON answer per line
// (one request per connection). Owner-only (mode 0600, and the peer's uid
// must be root or ours). docs/xensockctl.md describes the protocol.
//
// Requests:  {"op": "list",  ["domid": D], ["sockets": true]}
//            {"op": "stats", ["domid": D]}   list + "totals" + "daemon"
//            {"op": "kill",  "domid": D, ["protocol": P], ["devid": V], ["sockid": S]}
// Answers:   {"ok": true, ...} or {"ok": false, "error": TEXT, "code": CODE}
//            with CODE "usage" (malformed request), "not_found",
//            "ambiguous" (kill: the sockid is in several sessions; "sessions"
//            lists them), "permission" (the client's uid is neither root nor
//            ours; sent without reading the request) or "internal" (e.g. a
//            worker is not responding).
#pragma once

#include "xensock/engine/engine.hpp"
#include "xensock/runtime/reactor.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <stdexcept>
#include <string>

namespace xensock::daemon {

// Another xensockd answers on the control socket: this one must not start.
class ControlSocketInUse : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class ControlServer {
public:
    // Throws ControlSocketInUse if a daemon already answers on `path` (a
    // stale socket file nobody listens on is replaced), std::system_error
    // or std::runtime_error naming the path if it cannot listen.
    ControlServer(rt::Reactor& reactor, engine::Engine& engine, std::string path);
    ~ControlServer();
    void close();

    // The request handler, separate for tests. `started` is when the daemon
    // started serving (stats reports its uptime).
    static nlohmann::json handle(engine::Engine& engine, const nlohmann::json& request,
                                 std::chrono::steady_clock::time_point started);

private:
    rt::Task<void> accept_loop();
    rt::Task<void> serve_client(int fd);

    rt::Reactor& reactor_;
    engine::Engine& engine_;
    std::string path_;
    int listen_fd_ = -1;
    rt::CancelSource stop_;
    size_t clients_ = 0;
    std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
    std::unique_ptr<rt::Event> idle_;
};

}  // namespace xensock::daemon
