// The control socket: one JSON request per line, one JSON answer per line.
// Owner-only (mode 0600, and the peer's uid must be root or ours).
#pragma once

#include "xensock/engine/engine.hpp"
#include "xensock/runtime/reactor.hpp"

#include <nlohmann/json.hpp>

#include <string>

namespace xensock::daemon {

class ControlServer {
public:
    // Throws std::system_error naming the path if it cannot listen.
    ControlServer(rt::Reactor& reactor, engine::Engine& engine, std::string path);
    ~ControlServer();
    void close();

    // The request handler, separate for tests: {"op": "list"|"stats"|"kill", ...}
    static nlohmann::json handle(engine::Engine& engine, const nlohmann::json& request);

private:
    rt::Task<void> accept_loop();
    rt::Task<void> serve_client(int fd);

    rt::Reactor& reactor_;
    engine::Engine& engine_;
    std::string path_;
    int listen_fd_ = -1;
    rt::CancelSource stop_;
    size_t clients_ = 0;
    std::unique_ptr<rt::Event> idle_;
};

}  // namespace xensock::daemon
