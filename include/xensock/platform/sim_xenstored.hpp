// The sim platform's xenstore: Debian's real C xenstored (xen-utils-4.17)
// run as a child process on a Unix socket inside the sim root, with an
// LD_PRELOAD shim standing in for the hypervisor (shared/spec/sim-platform.md,
// section Xenstore). Clients reach it through the real libxenstore with
// XENSTORED_PATH=<sim root>/xenstored.sock (see socket_path()).
//
// Files inside the sim root DIR while it runs:
//   DIR/xenstored.sock   the store's socket (every client is dom0)
//   DIR/xenstored.pid    the daemon's pid
//   DIR/xenstored.log    the daemon's stderr (appended)
// The node database lives in the daemon's memory; nothing is written to /var.
#pragma once

#include <optional>
#include <utility>
#include <string>
#include <sys/types.h>

namespace xensock::platform::sim {

// Where the unpacked daemon and the shim are (scripts/fetch-xen-tools.sh
// unpacks the daemon; meson builds the shim).
struct XenstoredPaths {
    std::string xenstored;   // .../usr/lib/xen-4.17/bin/xenstored
    std::string shim;        // libxensock-sim-xenstored-shim.so
    std::string xen_libdir;  // prepended to LD_LIBRARY_PATH; may be empty
    std::string trace_file;  // if not empty: xenstored -T, logs every request
};

// Reads the paths from the environment, which meson sets for tests:
//   XENSOCK_XENSTORED        path of the xenstored binary (required)
//   XENSOCK_XENSTORED_SHIM   path of the shim shared object (required)
//   XENSOCK_XEN_LIBDIR       extra library directory for xenstored (optional)
//   XENSOCK_XENSTORED_TRACE  trace file for xenstored -T (optional)
// Throws std::runtime_error naming the variable that is missing.
XenstoredPaths default_xenstored_paths();

// A running xenstored for one sim root; stops it when destroyed.
//
// The daemon gets PR_SET_PDEATHSIG(SIGKILL) so that it never outlives a
// crashed launcher. Linux delivers that signal when the *thread* that forked
// exits: call start() from a thread that lives as long as the object (the
// main thread, typically).
class XenstoredProcess {
public:
    // Starts xenstored for sim root `sim_dir` (which must exist) and waits,
    // at most 10 s, until its socket accepts connections. Throws
    // std::runtime_error naming what failed (bad paths, a xenstored already
    // serving sim_dir, the daemon dying, the timeout) and quoting the tail
    // of DIR/xenstored.log when the daemon said why.
    static XenstoredProcess start(const std::string& sim_dir, const XenstoredPaths& paths);

    XenstoredProcess(XenstoredProcess&& other) noexcept;
    XenstoredProcess& operator=(XenstoredProcess&& other) noexcept;
    XenstoredProcess(const XenstoredProcess&) = delete;
    XenstoredProcess& operator=(const XenstoredProcess&) = delete;
    ~XenstoredProcess();

    // SIGTERM, then SIGKILL if it has not exited after a short bound; reaps
    // it and removes the socket and pid files. Idempotent.
    void stop() noexcept;

    // If the daemon has exited on its own: reaps it and returns its wait
    // status (as from waitpid). Otherwise std::nullopt. Never blocks.
    std::optional<int> poll_exit() noexcept;

    // Becomes readable (POLLIN) when the daemon exits: for poll() loops.
    // -1 once stopped or reaped.
    int exit_fd() const noexcept { return pidfd_; }

    pid_t pid() const noexcept { return pid_; }
    const std::string& sim_dir() const noexcept { return sim_dir_; }
    std::string socket_path() const { return sim_dir_ + "/xenstored.sock"; }
    std::string pid_path() const { return sim_dir_ + "/xenstored.pid"; }
    std::string log_path() const { return sim_dir_ + "/xenstored.log"; }

private:
    XenstoredProcess(std::string sim_dir, pid_t pid, int pidfd) noexcept
        : sim_dir_(std::move(sim_dir)), pid_(pid), pidfd_(pidfd) {}
    void release() noexcept;  // close pidfd, forget pid, remove files

    std::string sim_dir_;
    pid_t pid_ = -1;
    int pidfd_ = -1;
};

}  // namespace xensock::platform::sim
