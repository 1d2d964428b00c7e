#include "sim_env.hpp"

#include "xensock/toolstack/toolstack.hpp"

#include <dirent.h>
#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
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
