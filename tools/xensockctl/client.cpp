// The control-socket client: one request line out, one answer line back.
#include "ctl.hpp"

#include <fmt/core.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace xensock::ctl {
using nlohmann::json;

namespace {
constexpr const char* kDefaultControl = "/run/xensock/control";
// An answer larger than this is not from xensockd.
constexpr size_t kMaxAnswer = 64 * 1024 * 1024;

std::string env(const char* name) {
    const char* v = std::getenv(name);
    return v ? v : "";
}

class Fd {
public:
    explicit Fd(int fd) : fd_(fd) {}
    ~Fd() {
        if (fd_ >= 0) ::close(fd_);
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    int get() const { return fd_; }

private:
    int fd_;
};

[[noreturn]] void unreachable_after_connect(int err, const std::string& path) {
    if (err == EAGAIN || err == EWOULDBLOCK)
        throw CtlError(kExitUnreachable,
                       fmt::format("xensockd did not answer on {} in time: it may be overloaded or stuck; "
                                   "check its log (journalctl -u xensockd), or retry with a larger --timeout",
                                   path));
    throw CtlError(kExitUnreachable, fmt::format("lost the connection to xensockd on {}: {}", path, std::strerror(err)));
}

void set_timeout(int fd, std::chrono::milliseconds timeout) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
    tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}
}  // namespace

std::string resolve_sim_dir(const std::string& flag) { return !flag.empty() ? flag : env("XENSOCK_SIM_DIR"); }

std::string resolve_control_path(const std::string& flag, const std::string& sim_dir) {
    if (!flag.empty()) return flag;
    if (auto from_env = env("XENSOCK_CONTROL"); !from_env.empty()) return from_env;
    if (auto sim = resolve_sim_dir(sim_dir); !sim.empty()) return sim + "/control";
    return kDefaultControl;
}

json control_request(const std::string& path, const json& request, std::chrono::milliseconds timeout) {
    sockaddr_un addr{};
    if (path.size() >= sizeof addr.sun_path)
        throw CtlError(kExitUsage, fmt::format("control socket path is too long ({} bytes, at most {}): {}",
                                               path.size(), sizeof addr.sun_path - 1, path));
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());

    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) throw CtlError(kExitFailure, fmt::format("socket(AF_UNIX): {}", std::strerror(errno)));
    set_timeout(fd.get(), timeout);
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) < 0) {
        const int err = errno;
        switch (err) {
            case ENOENT:
            case ENOTDIR:
                throw CtlError(kExitUnreachable,
                               fmt::format("xensockd is not running (no {}): start it (systemctl start xensockd), "
                                           "or point --control, XENSOCK_CONTROL or --sim DIR at its control socket",
                                           path));
            case ECONNREFUSED:
                throw CtlError(kExitUnreachable,
                               fmt::format("xensockd is not running ({} exists but nothing listens on it, "
                                           "probably left by a daemon that died): start xensockd",
                                           path));
            case EACCES:
            case EPERM:
                throw CtlError(kExitUnreachable,
                               fmt::format("permission denied on {}: the control socket is owner-only; "
                                           "run xensockctl as root or as the user xensockd runs as",
                                           path));
            default:
                throw CtlError(kExitUnreachable,
                               fmt::format("cannot connect to xensockd at {}: {}", path, std::strerror(err)));
        }
    }

    const std::string line = request.dump() + "\n";
    // The daemon may answer and close before reading (it refuses our uid):
    // then sending fails, but its answer is waiting to be read.
    int send_error = 0;
    for (size_t sent = 0; sent < line.size();) {
        const ssize_t n = ::send(fd.get(), line.data() + sent, line.size() - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EPIPE && errno != ECONNRESET) unreachable_after_connect(errno, path);
            send_error = errno;
            break;
        }
        sent += static_cast<size_t>(n);
    }

    std::string buffer;
    char chunk[16384];
    size_t newline = std::string::npos;
    while (newline == std::string::npos) {
        const ssize_t n = ::recv(fd.get(), chunk, sizeof chunk, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            unreachable_after_connect(send_error != 0 ? send_error : errno, path);
        }
        if (n == 0 && send_error != 0) unreachable_after_connect(send_error, path);
        if (n == 0) {
            // The daemon closes without a word on clients of another uid.
            throw CtlError(kExitUnreachable,
                           fmt::format("xensockd closed {} without answering: it only serves root and its own "
                                       "user, so run xensockctl as one of them (its log names the refused uid)",
                                       path));
        }
        const size_t old = buffer.size();
        buffer.append(chunk, static_cast<size_t>(n));
        if (buffer.size() > kMaxAnswer)
            throw CtlError(kExitFailure, fmt::format("the answer on {} exceeds {} bytes: is that xensockd?", path,
                                                     kMaxAnswer));
        newline = buffer.find('\n', old);
    }
    json answer;
    try {
        answer = json::parse(buffer.substr(0, newline));
    } catch (const json::exception& e) {
        throw CtlError(kExitFailure, fmt::format("xensockd sent an answer that is not JSON ({}): is {} xensockd's "
                                                 "control socket?",
                                                 e.what(), path));
    }
    if (!answer.is_object() || !answer.contains("ok") || !answer["ok"].is_boolean())
        throw CtlError(kExitFailure, fmt::format("xensockd's answer has no boolean 'ok': {}", answer.dump()));
    return answer;
}

void check_answer(const json& answer) {
    if (answer.value("ok", false)) return;
    const std::string code = answer.contains("code") && answer["code"].is_string() ? answer["code"].get<std::string>() : "";
    std::string text = answer.contains("error") && answer["error"].is_string() ? answer["error"].get<std::string>()
                                                                              : "xensockd refused the request";
    if (code == "not_found") throw CtlError(kExitNotFound, text + " (`xensockctl list --sockets` shows what exists)");
    if (code == "permission")
        throw CtlError(kExitUnreachable,
                       "xensockd: " + text + ": run xensockctl as root or as the user xensockd runs as");
    if (code == "usage" || code == "ambiguous") throw CtlError(kExitUsage, "xensockd: " + text);
    throw CtlError(kExitFailure, "xensockd: " + text);
}

}  // namespace xensock::ctl
