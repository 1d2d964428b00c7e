// xensock-sim up DIR
//
// Starts the sim platform's xenstore (Debian's xenstored with the sim shim)
// for sim root DIR, creating DIR if needed, and stays in the foreground
// until SIGTERM or SIGINT, then stops it. Prints nothing when all goes well;
// the daemon's pid is in DIR/xenstored.pid and its socket is
// DIR/xenstored.sock (clients: XENSTORED_PATH=DIR/xenstored.sock).
//
// Paths come from XENSOCK_XENSTORED, XENSOCK_XENSTORED_SHIM and
// XENSOCK_XEN_LIBDIR; unset ones default to those of the build tree.
//
// Exit status: 0 after a requested stop (a signal to us, or SIGTERM to the
// daemon itself), 1 if the daemon failed to start or died, 2 on bad usage.
#include "xensock/platform/sim_xenstored.hpp"

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <string_view>

#include <poll.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

namespace sim = xensock::platform::sim;

int usage(const char* argv0) {
    std::fprintf(stderr,
                 "usage: %s up DIR\n"
                 "  Run the sim xenstore for sim root DIR until SIGTERM/SIGINT.\n"
                 "  Environment: XENSOCK_XENSTORED, XENSOCK_XENSTORED_SHIM, XENSOCK_XEN_LIBDIR\n"
                 "  (default: this build tree), XENSOCK_XENSTORED_TRACE (optional trace file).\n",
                 argv0);
    return 2;
}

void default_env(const char* name, const char* value) {
    if (value && *value) ::setenv(name, value, 0);
}

int run(const std::string& dir) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
        std::fprintf(stderr, "xensock-sim: cannot create sim root %s: %s\n", dir.c_str(), ec.message().c_str());
        return 1;
    }

    default_env("XENSOCK_XENSTORED", XENSOCK_SIM_BUILD_XENSTORED);
    default_env("XENSOCK_XENSTORED_SHIM", XENSOCK_SIM_BUILD_SHIM);
    default_env("XENSOCK_XEN_LIBDIR", XENSOCK_SIM_BUILD_XEN_LIBDIR);

    // Take SIGTERM/SIGINT as readable events rather than async handlers, so
    // teardown runs in normal context. Blocked before the daemon is started;
    // XenstoredProcess unblocks them again in the child.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    if (::sigprocmask(SIG_BLOCK, &stop_signals, nullptr) != 0) {
        std::perror("xensock-sim: sigprocmask");
        return 1;
    }
    const int sig_fd = ::signalfd(-1, &stop_signals, SFD_CLOEXEC);
    if (sig_fd < 0) {
        std::perror("xensock-sim: signalfd");
        return 1;
    }

    auto proc = sim::XenstoredProcess::start(dir, sim::default_xenstored_paths());

    for (;;) {
        pollfd fds[2] = {{sig_fd, POLLIN, 0}, {proc.exit_fd(), POLLIN, 0}};
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            std::perror("xensock-sim: poll");
            return 1;  // proc's destructor stops the daemon
        }
        if (fds[0].revents) {
            proc.stop();
            return 0;
        }
        if (fds[1].revents) {
            const auto status = proc.poll_exit();
            if (!status) continue;
            if (WIFSIGNALED(*status) && WTERMSIG(*status) == SIGTERM) return 0;
            if (WIFEXITED(*status))
                std::fprintf(stderr, "xensock-sim: xenstored exited with status %d; see %s/xenstored.log\n",
                             WEXITSTATUS(*status), dir.c_str());
            else
                std::fprintf(stderr, "xensock-sim: xenstored ended (wait status %#x); see %s/xenstored.log\n",
                             *status, dir.c_str());
            return 1;
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3 || std::string_view(argv[1]) != "up") return usage(argc > 0 ? argv[0] : "xensock-sim");
    try {
        return run(argv[2]);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "xensock-sim: %s\n", e.what());
        return 1;
    }
}
