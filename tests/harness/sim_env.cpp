#include "sim_env.hpp"

#include "xensock/toolstack/toolstack.hpp"

#include <dirent.h>
#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace xensock::testing {

bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds bound) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    while (true) {
        if (pred()) return true;
        if (std::chrono::steady_clock::now() > deadline) return false;
        std::this_thread::sleep_for(10ms);
    }
}

SimEnv::SimEnv(SimEnvOptions options) : options_(std::move(options)) {
    char templ[] = "/dev/shm/xs-XXXXXX";
    if (!mkdtemp(templ)) throw std::runtime_error("mkdtemp /dev/shm/xs-XXXXXX failed");
    root_ = templ;
    xenstored_.emplace(platform::sim::XenstoredProcess::start(root_, platform::sim::default_xenstored_paths()));
    xs_ = std::make_unique<platform::XenStore>(root_ + "/xenstored.sock");
    if (options_.start_daemon) start_daemon();
}

SimEnv::~SimEnv() {
    for (pid_t p : children_) {
        if (::kill(p, 0) == 0) {
            ::kill(p, SIGKILL);
            ::waitpid(p, nullptr, 0);
        }
    }
    if (daemon_pid_ > 0) stop_daemon();
    xs_.reset();
    xenstored_.reset();
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
}

void SimEnv::start_daemon() {
    const char* bin = std::getenv("XENSOCK_XENSOCKD");
    if (!bin) throw std::runtime_error("XENSOCK_XENSOCKD is not set (meson sets it for tests)");
    const std::string pid_file = root_ + "/xensockd.pid";
    ::unlink(pid_file.c_str());
    std::vector<std::string> args{bin,
                                  "--sim",
                                  root_,
                                  "--max-ring-order",
                                  std::to_string(options_.max_ring_order),
                                  "--workers",
                                  std::to_string(options_.workers),
                                  "--pid-file",
                                  pid_file,
                                  "--log-level",
                                  std::getenv("XENSOCK_TEST_LOG") ? std::getenv("XENSOCK_TEST_LOG") : "warn"};
    for (const auto& a : options_.extra_args) args.push_back(a);
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        ::execv(bin, argv.data());
        _exit(127);
    }
    daemon_pid_ = pid;
    // Ready when the pid file exists (written after the engine started).
    const bool ready = eventually([&] { return ::access(pid_file.c_str(), F_OK) == 0 || !daemon_alive(); }, 10s);
    if (!ready || !daemon_alive()) throw std::runtime_error("xensockd did not start (see its log above)");
}

bool SimEnv::daemon_alive() const {
    if (daemon_pid_ <= 0) return false;
    int status;
    return ::waitpid(daemon_pid_, &status, WNOHANG) == 0;
}

int SimEnv::stop_daemon(std::chrono::milliseconds bound) {
    if (daemon_pid_ <= 0) return -1;
    ::kill(daemon_pid_, SIGTERM);
    const int rc = wait_child(daemon_pid_, bound);
    daemon_pid_ = -1;
    return rc;
}

namespace {
size_t count_fds(pid_t pid, bool sockets_only) {
    const std::string dir = fmt::format("/proc/{}/fd", pid);
    size_t n = 0;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        if (!sockets_only) {
            ++n;
            continue;
        }
        std::error_code ec;
        auto target = std::filesystem::read_symlink(entry.path(), ec);
        if (!ec && target.string().rfind("socket:", 0) == 0) ++n;
    }
    return n;
}
}  // namespace

size_t SimEnv::daemon_fd_count() const { return count_fds(daemon_pid_, false); }
size_t SimEnv::daemon_sockets() const { return count_fds(daemon_pid_, true); }

size_t SimEnv::daemon_ring_mappings() const {
    std::ifstream maps(fmt::format("/proc/{}/maps", daemon_pid_));
    size_t n = 0;
    std::string line;
    while (std::getline(maps, line)) {
        if (line.find(root_ + "/dom") != std::string::npos && line.find("/mem") != std::string::npos) ++n;
    }
    return n;
}

double SimEnv::daemon_cpu_seconds() const {
    std::ifstream stat(fmt::format("/proc/{}/stat", daemon_pid_));
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    const auto close_paren = text.rfind(')');
    if (close_paren == std::string::npos) throw std::runtime_error("cannot parse /proc/<xensockd>/stat");
    std::istringstream fields(text.substr(close_paren + 2));
    std::string field;
    unsigned long long utime = 0, stime = 0;
    for (int i = 3; i <= 15 && fields >> field; ++i) {
        if (i == 14) utime = std::stoull(field);
        if (i == 15) stime = std::stoull(field);
    }
    return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

nlohmann::json SimEnv::control(const nlohmann::json& request) const {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw std::runtime_error("socket(AF_UNIX) failed");
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    const std::string path = control_path();
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) {
        ::close(fd);
        throw std::runtime_error(fmt::format("cannot connect to {}: {}", path, std::strerror(errno)));
    }
    const std::string line = request.dump() + "\n";
    std::string answer;
    bool ok = ::send(fd, line.data(), line.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(line.size());
    char buf[65536];
    while (ok && answer.find('\n') == std::string::npos) {
        const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n <= 0) break;
        answer.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
    if (answer.find('\n') == std::string::npos)
        throw std::runtime_error(fmt::format("no answer on {} to {}", path, request.dump()));
    return nlohmann::json::parse(answer.substr(0, answer.find('\n')));
}

uint64_t SimEnv::counter(const std::string& name, int domid) const {
    nlohmann::json request{{"op", "stats"}};
    if (domid >= 0) request["domid"] = domid;
    const auto answer = control(request);
    uint64_t total = 0;
    if (!answer.value("ok", false)) return 0;  // no session (any more)
    for (const auto& s : answer["sessions"]) {
        const auto& counters = s["counters"];
        if (counters.contains(name)) total += counters[name].get<uint64_t>();
    }
    return total;
}

size_t SimEnv::session_count(int domid) const {
    nlohmann::json request{{"op", "list"}};
    if (domid >= 0) request["domid"] = domid;
    const auto answer = control(request);
    if (!answer.value("ok", false)) return 0;
    return answer["sessions"].size();
}

std::string SimEnv::backend_path(platform::DomId guest, const wire::ProtocolProfile& profile) const {
    return toolstack::backend_dir(profile, guest);
}
std::string SimEnv::frontend_path(platform::DomId guest, const wire::ProtocolProfile& profile) const {
    return toolstack::frontend_dir(profile, guest);
}

void SimEnv::attach(platform::DomId guest, const wire::ProtocolProfile& profile) {
    std::string why;
    auto st = toolstack::attach(*xs_, profile, guest, 0, &why);
    if (!st) throw std::runtime_error(fmt::format("attach dom{}: {}", guest, why));
}

Status SimEnv::detach(platform::DomId guest, const wire::ProtocolProfile& profile, std::chrono::milliseconds wait) {
    return toolstack::detach(*xs_, profile, guest, 0, wait);
}

std::string SimEnv::read(const std::string& path) { return xs_->read(path).value_or(""); }

bool SimEnv::wait_for(const std::string& path, const std::string& value, std::chrono::milliseconds bound) {
    return eventually([&] { return read(path) == value; }, bound);
}

pid_t SimEnv::spawn(std::function<int()> body) {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        int rc = 99;
        try {
            rc = body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "guest process failed: %s\n", e.what());
            rc = 98;
        }
        std::fflush(nullptr);
        _exit(rc);
    }
    children_.push_back(pid);
    return pid;
}

int SimEnv::wait_child(pid_t pid, std::chrono::milliseconds bound) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    int status = 0;
    while (true) {
        const pid_t r = ::waitpid(pid, &status, WNOHANG);
        if (r == pid) break;
        if (r < 0) return -1;
        if (std::chrono::steady_clock::now() > deadline) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
            return -1;
        }
        std::this_thread::sleep_for(5ms);
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return -1;
}

}  // namespace xensock::testing
