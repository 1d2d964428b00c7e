#include "control.hpp"

#include "xensock/util/log.hpp"
#include "xensock/util/result.hpp"
#include "xensock/wire/profile.hpp"

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

json sessions_json(const std::vector<engine::SessionRef>& refs) {
    json out = json::array();
    for (const auto& r : refs) out.push_back({{"domid", r.domid}, {"protocol", r.protocol}, {"devid", r.devid}});
    return out;
}

// "domid 5 (pvcalls devid 1)": the target as the operator named it.
std::string target_text(const engine::KillTarget& t) {
    std::string out = fmt::format("domid {}", t.domid);
    if (t.protocol && t.devid) out += fmt::format(" ({} devid {})", *t.protocol, *t.devid);
    else if (t.protocol) out += fmt::format(" ({})", *t.protocol);
    else if (t.devid) out += fmt::format(" (devid {})", *t.devid);
    return out;
}

json kill_answer(engine::Engine& engine, const engine::KillTarget& target) {
    const auto result = engine.kill(target);
    using Outcome = engine::KillResult::Outcome;
    switch (result.outcome) {
        case Outcome::done: {
            json answer{{"ok", true}, {"sessions", sessions_json(result.sessions)}};
            if (target.sockid) answer["sockid"] = *target.sockid;
            return answer;
        }
        case Outcome::not_found:
            return error_answer("not_found", target.sockid
                                                 ? fmt::format("no socket {} in {}", *target.sockid, target_text(target))
                                                 : fmt::format("no session for {}", target_text(target)));
        case Outcome::ambiguous: {
            std::string names;
            for (const auto& r : result.sessions)
                names += fmt::format("{}{} devid {}", names.empty() ? "" : ", ", r.protocol, r.devid);
            json answer = error_answer(
                "ambiguous", fmt::format("socket {} is in more than one session of {}: {}; name one with \"protocol\" "
                                         "(and \"devid\")",
                                         *target.sockid, target_text(target), names));
            answer["sessions"] = sessions_json(result.sessions);
            return answer;
        }
    }
    return error_answer("internal", "unknown kill outcome");
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

namespace {
json handle_request(engine::Engine& engine, const json& request, std::chrono::steady_clock::time_point started) {
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
            // "sessions": every session served, also when `domid` filtered them.
            answer["daemon"] = {
                {"pid", ::getpid()},
                {"sessions", engine.session_count()},
                {"uptime_seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count()}};
        }
        return answer;
    }
    if (op == "kill") {
        if (domid < 0) return error_answer("usage", "kill needs 'domid'");
        engine::KillTarget target;
        target.domid = static_cast<unsigned>(domid);
        if (request.contains("sockid")) {
            if (!request["sockid"].is_number_unsigned())
                return error_answer("usage", "'sockid' must be an unsigned number");
            target.sockid = request["sockid"].get<uint64_t>();
        }
        if (request.contains("protocol")) {
            const auto& p = request["protocol"];
            if (!p.is_string() || !wire::find_profile(p.get<std::string>()))
                return error_answer("usage", "'protocol' must be \"xensock\" or \"pvcalls\"");
            target.protocol = p.get<std::string>();
        }
        if (request.contains("devid")) {
            const auto& v = request["devid"];
            if (!v.is_number_unsigned() || v.get<uint64_t>() > UINT32_MAX)
                return error_answer("usage", "'devid' must be an unsigned 32-bit number");
            target.devid = v.get<unsigned>();
        }
        return kill_answer(engine, target);
    }
    return error_answer("usage", fmt::format("unknown op '{}' (known: list, stats, kill)", op));
}
}  // namespace

json ControlServer::handle(engine::Engine& engine, const json& request,
                           std::chrono::steady_clock::time_point started) {
    try {
        return handle_request(engine, request, started);
    } catch (const engine::WorkerUnavailable& e) {
        log::error("control: {}", e.what());
        return error_answer("internal", e.what());
    }
}

namespace {
// Before binding `path`: if a daemon answers there, refuse to take its place;
// if the file is a socket nobody listens on (a daemon that died), remove it.
void replace_stale_socket(const std::string& path, const sockaddr_un& addr) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) {
        if (errno == ENOENT) return;
        throw_errno(errno, fmt::format("control socket {}", path));
    }
    if (!S_ISSOCK(st.st_mode))
        throw std::runtime_error(
            fmt::format("control socket path {} exists and is not a socket: remove it or choose another --control",
                        path));
    const int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) throw_errno(errno, "control socket probe");
    const int rc = ::connect(probe, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
    const int err = errno;
    ucred cred{};
    socklen_t len = sizeof cred;
    const bool have_pid = rc == 0 && ::getsockopt(probe, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0;
    ::close(probe);
    if (rc == 0) {
        throw ControlSocketInUse(fmt::format(
            "another xensockd{} is already serving {}: stop it first (systemctl stop xensockd), or give this one "
            "another --control path",
            have_pid ? fmt::format(" (pid {})", cred.pid) : std::string(), path));
    }
    if (err != ECONNREFUSED)
        throw std::runtime_error(fmt::format("cannot tell whether another xensockd serves {}: connect: {}", path,
                                             std::strerror(err)));
    log::info("removing stale control socket {} (nothing listens on it)", path);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) throw_errno(errno, fmt::format("unlink {}", path));
}
}  // namespace

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
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path_.c_str(), path_.size());
    replace_stale_socket(path_, addr);
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) throw_errno(errno, "control socket");
    // Owner-only from the first instant: no window where others may connect.
    const mode_t old_mask = ::umask(0177);
    const int rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    ::umask(old_mask);
    if (rc < 0 || ::listen(listen_fd_, 16) < 0) {
        const int err = errno;
        ::close(listen_fd_);
        throw_errno(err, fmt::format("cannot listen on control socket {}", path_));
    }
    // Counted from now, not from its first step: close() may come before
    // the reactor ever ran it (the engine failed to start).
    ++clients_;
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
            // Say why, without waiting for its request: closing alone would
            // reach it as a bare "connection reset" (its request is unread).
            const std::string refusal =
                error_answer("permission", fmt::format("xensockd serves only root and uid {}, not uid {}",
                                                       ::geteuid(), cred.uid))
                    .dump() +
                "\n";
            (void)::send(fd, refusal.data(), refusal.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
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
