// Launches Debian's xenstored as the sim platform's store; see
// include/xensock/platform/sim_xenstored.hpp and the Xenstore section of
// shared/spec/sim-platform.md.
#include "xensock/platform/sim_xenstored.hpp"

#include <fmt/core.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace xensock::platform::sim {

namespace {

using Clock = std::chrono::steady_clock;

// How long the daemon may take to come up (it starts in milliseconds; the
// bound only matters on a wedged machine) and to exit after SIGTERM.
constexpr auto kStartTimeout = std::chrono::seconds(10);
constexpr int kStopTimeoutMs = 2000;

// Owns one file descriptor.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) noexcept : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }

    int get() const noexcept { return fd_; }
    int release() noexcept { return std::exchange(fd_, -1); }
    void reset() noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

private:
    int fd_ = -1;
};

std::string errno_text(int err) { return std::strerror(err); }

[[noreturn]] void fail(std::string_view what) { throw std::runtime_error(fmt::format("sim xenstored: {}", what)); }

[[noreturn]] void fail_errno(std::string_view what, int err) {
    fail(fmt::format("{}: {}", what, errno_text(err)));
}

std::string describe_status(int status) {
    if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
    if (WIFSIGNALED(status)) {
        const char* name = sigabbrev_np(WTERMSIG(status));
        return fmt::format("was killed by signal {} (SIG{})", WTERMSIG(status), name ? name : "?");
    }
    return fmt::format("ended with wait status {:#x}", status);
}

// The last lines the daemon wrote to its log, to explain a failed start.
std::string log_tail(const std::string& path) {
    constexpr off_t kTail = 2048;
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return {};
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return {};
    const off_t from = std::max<off_t>(0, st.st_size - kTail);
    std::string text(static_cast<size_t>(st.st_size - from), '\0');
    const ssize_t n = ::pread(fd.get(), text.data(), text.size(), from);
    if (n <= 0) return {};
    text.resize(static_cast<size_t>(n));
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    if (text.empty()) return {};
    return fmt::format("; its log {} ends with:\n{}", path, text);
}

sockaddr_un socket_address(const std::string& path) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof(addr.sun_path))
        fail(fmt::format("socket path {} is {} bytes, longer than the {} a Unix socket allows; use a "
                         "shorter sim root such as /dev/shm/xs-XXXXXX",
                         path, path.size(), sizeof(addr.sun_path) - 1));
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    return addr;
}

// True if something listens on the socket (a connect succeeds).
bool socket_accepts(const sockaddr_un& addr) {
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) fail_errno("socket(AF_UNIX)", errno);
    int rc;
    do {
        rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
    } while (rc != 0 && errno == EINTR);
    return rc == 0;
}

// Everything execve needs, built before fork: after fork in a possibly
// multi-threaded process the child may only make async-signal-safe calls.
struct ExecImage {
    std::vector<std::string> strings;
    std::vector<char*> argv;
    std::vector<char*> envp;
};

ExecImage build_exec_image(const std::string& sim_dir, const XenstoredPaths& paths) {
    ExecImage img;
    std::vector<std::string> args = {
        paths.xenstored,
        "--no-fork",                                // stay our child, keep stderr
        "--output-pid",                             // printed once ready: our start signal
        "--pid-file", sim_dir + "/xenstored.pid",
    };
    if (!paths.trace_file.empty()) {
        args.emplace_back("--trace-file");
        args.push_back(paths.trace_file);
    }
    // The database stays in memory (the default, --internal-db), so nothing
    // goes to disk; XENSTORED_RUNDIR keeps its mkdir() away from /var/run.

    auto prepend = [](std::string_view name, const std::string& ours) {
        const char* old = std::getenv(std::string(name).c_str());
        std::string value = ours;
        if (old && *old) value += fmt::format(":{}", old);
        return fmt::format("{}={}", name, value);
    };
    std::vector<std::string> env;
    for (char** e = environ; e && *e; ++e) {
        const std::string_view entry(*e);
        const auto name = entry.substr(0, entry.find('='));
        if (name == "LD_PRELOAD" || name == "LD_LIBRARY_PATH" || name == "XENSTORED_PATH" ||
            name == "XENSTORED_RUNDIR")
            continue;
        env.emplace_back(entry);
    }
    env.push_back(prepend("LD_PRELOAD", paths.shim));
    if (!paths.xen_libdir.empty())
        env.push_back(prepend("LD_LIBRARY_PATH", paths.xen_libdir));
    else if (const char* old = std::getenv("LD_LIBRARY_PATH"))
        env.push_back(fmt::format("LD_LIBRARY_PATH={}", old));
    env.push_back(fmt::format("XENSTORED_PATH={}/xenstored.sock", sim_dir));
    env.push_back(fmt::format("XENSTORED_RUNDIR={}", sim_dir));

    img.strings.reserve(args.size() + env.size());
    for (auto& a : args) img.strings.push_back(std::move(a));
    const size_t nargs = img.strings.size();
    for (auto& e : env) img.strings.push_back(std::move(e));
    for (size_t i = 0; i < img.strings.size(); ++i)
        (i < nargs ? img.argv : img.envp).push_back(img.strings[i].data());
    img.argv.push_back(nullptr);
    img.envp.push_back(nullptr);
    return img;
}

void check_file(const std::string& path, int mode, std::string_view what, std::string_view hint) {
    if (path.empty()) fail(fmt::format("no path given for {} ({})", what, hint));
    if (::access(path.c_str(), mode) != 0)
        fail(fmt::format("{} {} is not usable: {} ({})", what, path, errno_text(errno), hint));
}

// In the child: report `err` to the parent and give up.
[[noreturn]] void child_fail(int err_fd, int err) {
    [[maybe_unused]] ssize_t n = ::write(err_fd, &err, sizeof(err));
    ::_exit(127);
}

// Child side of fork(): wire up fds and exec. Reports an exec failure's
// errno through `err_fd` (close-on-exec, so a successful exec closes it).
[[noreturn]] void exec_child(const ExecImage& img, const std::string& sim_dir, pid_t parent, int out_fd,
                             int log_fd, int err_fd) {
    auto die = [err_fd](int err) { child_fail(err_fd, err); };
    // Never outlive the launcher, even if it is SIGKILLed.
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die(errno);
    if (::getppid() != parent) ::_exit(127);
    // Own process group: a terminal's ^C reaches the launcher, which then
    // stops the daemon in order.
    ::setpgid(0, 0);
    // A launcher that blocks or ignores signals (xensock-sim uses signalfd)
    // must not hand that on: xenstored relies on SIGTERM's default action.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGQUIT}) ::signal(sig, SIG_DFL);

    int null_fd = ::open("/dev/null", O_RDONLY);
    if (null_fd < 0) die(errno);
    if (::dup2(null_fd, STDIN_FILENO) < 0 || ::dup2(out_fd, STDOUT_FILENO) < 0 ||
        ::dup2(log_fd, STDERR_FILENO) < 0)
        die(errno);
    // The daemon closes nothing it inherits: drop every other fd of ours
    // (but keep err_fd, which exec closes).
    for (int fd = STDERR_FILENO + 1; fd < err_fd; ++fd) ::close(fd);
    ::close_range(static_cast<unsigned>(err_fd) + 1, ~0U, 0);
    if (::chdir(sim_dir.c_str()) != 0) die(errno);
    ::execve(img.argv[0], img.argv.data(), img.envp.data());
    child_fail(err_fd, errno);
}

int open_pidfd(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

}  // namespace

XenstoredPaths default_xenstored_paths() {
    auto need = [](const char* name, std::string_view what) {
        const char* v = std::getenv(name);
        if (!v || !*v)
            fail(fmt::format("environment variable {} is not set; it must name {} (meson sets it for "
                             "tests; scripts/fetch-xen-tools.sh unpacks xenstored)",
                             name, what));
        return std::string(v);
    };
    auto opt = [](const char* name) {
        const char* v = std::getenv(name);
        return std::string(v ? v : "");
    };
    XenstoredPaths p;
    p.xenstored = need("XENSOCK_XENSTORED", "the xenstored binary from xen-utils-4.17");
    p.shim = need("XENSOCK_XENSTORED_SHIM", "the shim libxensock-sim-xenstored-shim.so");
    p.xen_libdir = opt("XENSOCK_XEN_LIBDIR");
    p.trace_file = opt("XENSOCK_XENSTORED_TRACE");
    return p;
}

XenstoredProcess XenstoredProcess::start(const std::string& sim_dir, const XenstoredPaths& paths) {
    check_file(paths.xenstored, X_OK, "xenstored binary", "set XENSOCK_XENSTORED");
    check_file(paths.shim, R_OK, "xenstored shim", "set XENSOCK_XENSTORED_SHIM");
    struct stat st {};
    if (::stat(sim_dir.c_str(), &st) != 0) fail_errno(fmt::format("sim root {}", sim_dir), errno);
    if (!S_ISDIR(st.st_mode)) fail(fmt::format("sim root {} is not a directory", sim_dir));

    const std::string sock_path = sim_dir + "/xenstored.sock";
    const sockaddr_un addr = socket_address(sock_path);
    // xenstored unlinks the socket it finds: never steal a live one.
    if (socket_accepts(addr)) fail(fmt::format("a xenstore already serves {} (sim root {})", sock_path, sim_dir));

    const ExecImage img = build_exec_image(sim_dir, paths);
    const std::string log_path = sim_dir + "/xenstored.log";
    Fd log_fd(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    if (log_fd.get() < 0) fail_errno(fmt::format("cannot open log {}", log_path), errno);
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0) fail_errno("pipe2", errno);
    Fd out_r(out[0]), out_w(out[1]);
    if (::pipe2(err, O_CLOEXEC) != 0) fail_errno("pipe2", errno);
    Fd err_r(err[0]), err_w(err[1]);

    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) fail_errno("fork", errno);
    if (pid == 0) exec_child(img, sim_dir, parent, out_w.get(), log_fd.get(), err_w.get());

    // From here on `proc` owns the child: any throw stops and reaps it.
    XenstoredProcess proc(sim_dir, pid, -1);
    out_w.reset();
    err_w.reset();
    log_fd.reset();

    int exec_errno = 0;
    ssize_t n;
    do {
        n = ::read(err_r.get(), &exec_errno, sizeof(exec_errno));
    } while (n < 0 && errno == EINTR);
    if (n > 0) fail_errno(fmt::format("cannot execute {}", paths.xenstored), exec_errno);

    proc.pidfd_ = open_pidfd(pid);
    if (proc.pidfd_ < 0) fail_errno("pidfd_open (needs Linux >= 5.3)", errno);

    // The daemon prints its pid (--output-pid) only after it has bound the
    // socket and set up dom0 and the database: wait for that line or death.
    const auto deadline = Clock::now() + kStartTimeout;
    std::string line;
    bool out_open = true;  // until EOF; then only the pidfd tells us more
    for (;;) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0)
            fail(fmt::format("xenstored (pid {}) not ready after {} s{}", pid, kStartTimeout.count(),
                             log_tail(log_path)));
        pollfd fds[2] = {{proc.pidfd_, POLLIN, 0}, {out_open ? out_r.get() : -1, POLLIN, 0}};
        if (::poll(fds, 2, static_cast<int>(left)) < 0) {
            if (errno == EINTR) continue;
            fail_errno("poll", errno);
        }
        if (fds[1].revents) {
            char buf[64];
            n = ::read(out_r.get(), buf, sizeof(buf));
            if (n < 0 && errno == EINTR) continue;
            if (n > 0) {
                line.append(buf, static_cast<size_t>(n));
                if (line.find('\n') != std::string::npos) break;
            } else {
                out_open = false;
            }
            continue;
        }
        if (fds[0].revents) {
            int status = 0;
            while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
            proc.release();
            fail(fmt::format("xenstored {} (socket {}, preload {}) {} before becoming ready{}",
                             paths.xenstored, sock_path, paths.shim, describe_status(status),
                             log_tail(log_path)));
        }
    }

    if (!socket_accepts(addr))
        fail(fmt::format("xenstored (pid {}) reported ready but {} refuses connections{}", pid, sock_path,
                         log_tail(log_path)));
    return proc;
}

XenstoredProcess::XenstoredProcess(XenstoredProcess&& other) noexcept
    : sim_dir_(std::move(other.sim_dir_)),
      pid_(std::exchange(other.pid_, -1)),
      pidfd_(std::exchange(other.pidfd_, -1)) {}

XenstoredProcess& XenstoredProcess::operator=(XenstoredProcess&& other) noexcept {
    if (this != &other) {
        stop();
        sim_dir_ = std::move(other.sim_dir_);
        pid_ = std::exchange(other.pid_, -1);
        pidfd_ = std::exchange(other.pidfd_, -1);
    }
    return *this;
}

XenstoredProcess::~XenstoredProcess() { stop(); }

void XenstoredProcess::stop() noexcept {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    // Bounded wait for the exit without polling in a loop: the pidfd turns
    // readable when the process ends.
    bool exited = false;
    if (pidfd_ >= 0) {
        pollfd pfd{pidfd_, POLLIN, 0};
        const auto deadline = Clock::now() + std::chrono::milliseconds(kStopTimeoutMs);
        for (;;) {
            const auto left =
                std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
            if (left <= 0) break;
            const int rc = ::poll(&pfd, 1, static_cast<int>(left));
            if (rc > 0) {
                exited = true;
                break;
            }
            if (rc == 0 || errno != EINTR) break;
        }
    }
    if (!exited) ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    release();
}

std::optional<int> XenstoredProcess::poll_exit() noexcept {
    if (pid_ <= 0) return std::nullopt;
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r != pid_) return std::nullopt;
    release();
    return status;
}

void XenstoredProcess::release() noexcept {
    if (pidfd_ >= 0) ::close(pidfd_);
    pidfd_ = -1;
    pid_ = -1;
    // The daemon leaves both behind (it has no SIGTERM handler); a stale
    // socket would only refuse connections, but clean up our sim root.
    ::unlink((sim_dir_ + "/xenstored.sock").c_str());
    ::unlink((sim_dir_ + "/xenstored.pid").c_str());
}

}  // namespace xensock::platform::sim
