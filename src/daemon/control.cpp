#include "control.hpp"

#include "xensock/util/log.hpp"
#include "xensock/util/result.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>

namespace xensock::daemon {
using nlohmann::json;

namespace {
constexpr size_t kMaxRequest = 64 * 1024;
// Largest ordinary domain id (DOMID_FIRST_RESERVED - 1).
constexpr uint64_t kMaxDomid = 0x7FEF;

json session_json(const engine::SessionInfo& s) {
    json j{{"domid", s.domid},
           {"devid", s.devid},
           {"protocol", s.protocol},
           {"backend_state", s.backend_state},
           {"frontend_state", s.frontend_state},
           {"active_sockets", s.active_sockets},
           {"passive_sockets", s.passive_sockets},
           {"bytes_to_guest", s.bytes_to_guest},
           {"bytes_from_guest", s.bytes_from_guest},
           {"uptime_seconds", s.uptime_seconds}};
    json counters = json::object();
    for (const auto& [name, value] : s.counters) counters[name] = value;
    j["counters"] = counters;
    json sockets = json::array();
    for (const auto& k : s.sockets) {
        sockets.push_back({{"sockid", k.sockid},
                           {"kind", k.kind},
                           {"state", k.state},
                           {"local", k.local},
                           {"remote", k.remote},
                           {"ring_order", k.ring_order},
                           {"bytes_to_guest", k.bytes_to_guest},
                           {"bytes_from_guest", k.bytes_from_guest},
                           {"in_queued", k.in_queued},
                           {"out_queued", k.out_queued}});
    }
    // The engine keeps sockets in a hash map: give scripts a stable order.
    std::sort(sockets.begin(), sockets.end(),
              [](const json& a, const json& b) { return a["sockid"].get<uint64_t>() < b["sockid"].get<uint64_t>(); });
    j["sockets"] = sockets;
    return j;
}

json error_answer(std::string_view code, std::string text) {
    return {{"ok", false}, {"error", std::move(text)}, {"code", code}};
}

// Daemon-wide sums over the sessions in `sessions` (counters by name).
json totals_json(const json& sessions) {
    uint64_t active = 0, passive = 0, to_guest = 0, from_guest = 0;
    std::map<std::string, uint64_t> counters;
    for (const auto& s : sessions) {
        active += s["active_sockets"].get<uint64_t>();
        passive += s["passive_sockets"].get<uint64_t>();
        to_guest += s["bytes_to_guest"].get<uint64_t>();
        from_guest += s["bytes_from_guest"].get<uint64_t>();
        for (const auto& [name, value] : s["counters"].items()) counters[name] += value.get<uint64_t>();
    }
    return {{"sessions", sessions.size()},
            {"active_sockets", active},
            {"passive_sockets", passive},
            {"bytes_to_guest", to_guest},
            {"bytes_from_guest", from_guest},
            {"counters", counters}};
}
}  // namespace

json ControlServer::handle(engine::Engine& engine, const json& request,
                           std::chrono::steady_clock::time_point started) {
    if (!request.is_object() || !request.contains("op") || !request["op"].is_string())
        return error_answer("usage", "request must be a JSON object with a string 'op'");
    const std::string op = request["op"];
    // An optional field that is present must be valid: a typo must not
    // silently widen "kill domid 5" or "list domid 5" to every guest.
    int domid = -1;
    if (request.contains("domid")) {
        const auto& d = request["domid"];
        if (!d.is_number_unsigned() || d.get<uint64_t>() > kMaxDomid)
            return error_answer("usage", fmt::format("'domid' must be a number 0..{}", kMaxDomid));
        domid = d.get<int>();
    }
    if (op == "list" || op == "stats") {
        bool with_sockets = false;
        if (request.contains("sockets")) {
            if (!request["sockets"].is_boolean()) return error_answer("usage", "'sockets' must be true or false");
            with_sockets = request["sockets"].get<bool>();
        }
        json sessions = json::array();
        for (const auto& s : engine.list(with_sockets, domid)) sessions.push_back(session_json(s));
        if (domid >= 0 && sessions.empty())
            return error_answer("not_found", fmt::format("no session for domid {}", domid));
        json answer{{"ok", true}, {"sessions", sessions}};
        if (op == "stats") {
            answer["totals"] = totals_json(sessions);
            answer["daemon"] = {
                {"pid", ::getpid()},
                {"uptime_seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count()}};
        }
        return answer;
    }
    if (op == "kill") {
        if (domid < 0) return error_answer("usage", "kill needs 'domid'");
        std::optional<uint64_t> sockid;
        if (request.contains("sockid")) {
            if (!request["sockid"].is_number_unsigned())
                return error_answer("usage", "'sockid' must be an unsigned number");
            sockid = request["sockid"].get<uint64_t>();
        }
        auto st = engine.kill(static_cast<unsigned>(domid), sockid);
        if (!st) {
            return error_answer("not_found", sockid ? fmt::format("no socket {} in domid {}", *sockid, domid)
                                                    : fmt::format("no session for domid {}", domid));
        }
        return {{"ok", true}};
    }
    return error_answer("usage", fmt::format("unknown op '{}' (known: list, stats, kill)", op));
}

ControlServer::ControlServer(rt::Reactor& reactor, engine::Engine& engine, std::string path)
    : reactor_(reactor), engine_(engine), path_(std::move(path)), idle_(std::make_unique<rt::Event>(reactor)) {
    sockaddr_un addr{};
    if (path_.size() >= sizeof addr.sun_path)
        throw std::runtime_error(fmt::format("control socket path too long ({} bytes): {}", path_.size(), path_));
    const auto dir = std::filesystem::path(path_).parent_path();
    std::error_code ec;
    if (!dir.empty() && !std::filesystem::exists(dir)) {
        std::filesystem::create_directories(dir, ec);
        if (!ec) ::chmod(dir.c_str(), 0700);
    }
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) throw_errno(errno, "control socket");
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path_.c_str(), path_.size());
    ::unlink(path_.c_str());
    // Owner-only from the first instant: no window where others may connect.
    const mode_t old_mask = ::umask(0077);
    const int rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    ::umask(old_mask);
    if (rc < 0 || ::listen(listen_fd_, 16) < 0) {
        const int err = errno;
        ::close(listen_fd_);
        throw_errno(err, fmt::format("cannot listen on control socket {}", path_));
    }
    reactor_.spawn(accept_loop());
    log::info("control socket at {}", path_);
}

ControlServer::~ControlServer() { close(); }

void ControlServer::close() {
    if (listen_fd_ < 0) return;
    stop_.cancel();
    // Let the accept loop and clients see the cancellation.
    auto drain = [](ControlServer& self) -> rt::Task<void> {
        while (self.clients_ > 0) {
            self.idle_->reset();
            co_await self.idle_->wait();
        }
    };
    reactor_.run_until(drain(*this));
    ::close(listen_fd_);
    listen_fd_ = -1;
    ::unlink(path_.c_str());
}

rt::Task<void> ControlServer::accept_loop() {
    ++clients_;
    const auto token = stop_.token();
    while (!token.cancelled()) {
        const int fd = co_await reactor_.accept(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC, token);
        if (fd < 0) {
            if (fd == -ECANCELED) break;
            continue;
        }
        ucred cred{};
        socklen_t len = sizeof cred;
        if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || (cred.uid != 0 && cred.uid != ::geteuid())) {
            log::warn("control: refused a client with uid {}", cred.uid);
            ::close(fd);
            continue;
        }
        ++clients_;
        reactor_.spawn(serve_client(fd));
    }
    if (--clients_ == 0) idle_->set();
}

rt::Task<void> ControlServer::serve_client(int fd) {
    std::string buffer;
    char chunk[4096];
    const auto token = stop_.token();
    while (!token.cancelled()) {
        auto op = reactor_.recv(fd, chunk, sizeof chunk, 0, token);
        op.timeout(std::chrono::seconds(30));
        const int n = co_await op;
        if (n <= 0) break;
        buffer.append(chunk, static_cast<size_t>(n));
        if (buffer.size() > kMaxRequest) break;
        const auto newline = buffer.find('\n');
        if (newline == std::string::npos) continue;
        json answer;
        try {
            answer = handle(engine_, json::parse(buffer.substr(0, newline)), started_);
        } catch (const json::exception& e) {
            answer = error_answer("usage", fmt::format("bad request: {}", e.what()));
        } catch (const std::exception& e) {
            log::error("control: {}", e.what());
            answer = error_answer("internal", fmt::format("xensockd failed to answer: {}", e.what()));
        }
        // Replace rather than throw on invalid UTF-8 in any string we report.
        const std::string out = answer.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
        size_t sent = 0;
        while (sent < out.size()) {
            const int w = co_await reactor_.send(fd, out.data() + sent, out.size() - sent, MSG_NOSIGNAL, token);
            if (w <= 0) break;
            sent += static_cast<size_t>(w);
        }
        break;  // one request per connection
    }
    ::close(fd);
    if (--clients_ == 0) idle_->set();
}

}  // namespace xensock::daemon
