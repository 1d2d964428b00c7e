// xensockd: the driver-domain service for paravirtualized sockets.
//
// Exit codes: 0 clean stop (SIGTERM/SIGINT), 1 runtime failure, 2 usage
// error, 3 platform unavailable (no Xen and no --sim), 4 another xensockd
// already answers on the control socket. SIGHUP is logged and ignored.
#include "xensock/engine/engine.hpp"
#include "xensock/platform/platform.hpp"
#include "xensock/util/log.hpp"
#include "xensock/wire/profile.hpp"
#include "xensock/wire/pvcalls_v1.hpp"

#include "control.hpp"

#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <thread>

using namespace xensock;

namespace {
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;
constexpr int kExitNoPlatform = 3;
constexpr int kExitAlreadyRunning = 4;

// Every guest socket is a descriptor of ours (on sim one more: its event
// channel's socket), so take all the descriptors we are allowed:
// the soft limit up to the hard one, as servers do.
void raise_descriptor_limit() {
    rlimit lim{};
    if (::getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur >= lim.rlim_max) return;
    const rlim_t before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &lim) == 0)
        log::debug("descriptor limit raised from {} to {}", before, lim.rlim_cur);
    else
        log::warn("cannot raise the descriptor limit from {} to {}: {}", before, lim.rlim_max, std::strerror(errno));
}

std::vector<std::string> split_list(const std::string& text) {
    std::vector<std::string> out;
    size_t start = 0;
    while (start <= text.size()) {
        size_t end = text.find(',', start);
        if (end == std::string::npos) end = text.size();
        if (end > start) out.push_back(text.substr(start, end - start));
        start = end + 1;
    }
    return out;
}
}  // namespace

int main(int argc, char** argv) {
    log::set_program("xensockd");
    CLI::App app{"xensockd: serves XenSock and PVCalls sockets for Xen guests from this driver domain"};
    app.footer(
        "Examples:\n"
        "  xensockd --sim /dev/shm/xs-demo         serve guests of a sim root\n"
        "  xensockd --protocols pvcalls --workers 2 serve PVCalls on real Xen\n"
        "Exit codes: 0 stopped by SIGTERM or SIGINT, 1 failure, 2 usage, 3 no Xen platform,\n"
        "4 another xensockd already serves the control socket. SIGHUP is logged and ignored\n"
        "(there is no configuration file to reload).");
    std::string sim_dir;
    std::string protocols = "xensock,pvcalls";
    unsigned max_ring_order = 6;
    unsigned workers = std::max(1u, std::min(4u, std::thread::hardware_concurrency()));
    uint32_t max_sockets = 4096;
    uint32_t max_lingering_sockets = 64;
    uint64_t max_lingering_bytes = uint64_t{16} << 20;
    std::string control_path;
    std::string pid_file;
    std::string level_text = "info";
    app.add_option("--sim", sim_dir, "Run on the sim platform rooted at DIR (or set XENSOCK_SIM_DIR)");
    app.add_option("--protocols", protocols, "Comma-separated protocols to serve: xensock, pvcalls")
        ->capture_default_str();
    app.add_option("--max-ring-order", max_ring_order,
                   "Largest data ring order a guest may use (0..9; PVCalls needs 1 or more, Linux's pvcalls-front 4 "
                   "or more)")
        ->capture_default_str()
        ->check(CLI::Range(0u, wire::kHardMaxRingOrder));
    app.add_option("--workers", workers, "Worker threads (guests are sharded by domid)")
        ->capture_default_str()
        ->check(CLI::Range(1u, 64u));
    app.add_option("--max-sockets-per-guest", max_sockets, "Sockets one guest may hold at once")
        ->capture_default_str()
        ->check(CLI::Range(1u, 1u << 20));
    app.add_option("--max-lingering-sockets-per-guest", max_lingering_sockets,
                   "Released sockets of one guest still delivering queued bytes; beyond, RELEASE resets")
        ->capture_default_str()
        ->check(CLI::Range(0u, 1u << 20));
    app.add_option("--max-lingering-bytes-per-guest", max_lingering_bytes,
                   "Queued bytes one guest's released sockets may still hold; beyond, RELEASE resets")
        ->capture_default_str();
    app.add_option("--control", control_path,
                   "Control socket path (default /run/xensock/control; on sim DIR/control)");
    app.add_option("--pid-file", pid_file, "Write the pid here once serving");
    app.add_option("--log-level", level_text, "debug, info, warn, error")->capture_default_str();
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : kExitUsage;
    }
    log::Level level;
    if (!log::parse_level(level_text, level)) {
        log::error("unknown --log-level '{}': use debug, info, warn or error", level_text);
        return kExitUsage;
    }
    log::set_level(level);

    engine::EngineConfig config;
    config.max_ring_order = max_ring_order;
    config.workers = workers;
    config.max_sockets_per_guest = max_sockets;
    config.max_lingering_sockets_per_guest = max_lingering_sockets;
    config.max_lingering_bytes_per_guest = max_lingering_bytes;
    for (const auto& name : split_list(protocols)) {
        const auto* profile = wire::find_profile(name);
        if (!profile) {
            log::error("unknown protocol '{}' in --protocols: use xensock and/or pvcalls", name);
            return kExitUsage;
        }
        config.profiles.push_back(profile);
    }
    if (config.profiles.empty()) {
        log::error("--protocols names no protocol");
        return kExitUsage;
    }
    for (const auto* profile : config.profiles) {
        // A maximum below the protocol's minimum leaves its guests no usable
        // ring order: every CONNECT and ACCEPT would fail.
        if (max_ring_order < profile->min_ring_order()) {
            log::error("--max-ring-order {} leaves {} guests no data ring ({} needs ring order {} or more): "
                       "raise --max-ring-order or leave {} out of --protocols",
                       max_ring_order, profile->name(), profile->name(), profile->min_ring_order(), profile->name());
            return kExitUsage;
        }
    }
    const auto serves = [&](const wire::ProtocolProfile& p) {
        return std::find(config.profiles.begin(), config.profiles.end(), &p) != config.profiles.end();
    };
    if (serves(wire::pvcalls_v1_profile()) && max_ring_order < wire::pvcalls_v1::kLinuxFrontMinMaxPageOrder)
        log::warn("--max-ring-order {} is below {}: Linux's pvcalls-front refuses a backend whose max-page-order "
                  "is less than {}, so only other PVCalls frontends can use this one",
                  max_ring_order, wire::pvcalls_v1::kLinuxFrontMinMaxPageOrder,
                  wire::pvcalls_v1::kLinuxFrontMinMaxPageOrder);

    // Signals are taken synchronously through a signalfd on the main thread;
    // block them before any thread starts so none inherits them unblocked.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    signal(SIGPIPE, SIG_IGN);
    raise_descriptor_limit();

    std::unique_ptr<platform::Platform> platform;
    try {
        platform::PlatformOptions options;
        options.sim_dir = sim_dir;
        platform = platform::open_platform(options);
    } catch (const std::exception& e) {
        log::error("{}", e.what());
        return kExitNoPlatform;
    }
    if (control_path.empty()) {
        const char* env_sim = std::getenv("XENSOCK_SIM_DIR");
        const std::string root = !sim_dir.empty() ? sim_dir : (env_sim ? env_sim : "");
        control_path = root.empty() ? "/run/xensock/control" : root + "/control";
    }

    try {
        engine::Engine engine(*platform, config);
        rt::Reactor reactor;
        // The control socket first: a second xensockd must stop here, before
        // its engine touches the guests the first one serves. Requests wait
        // in the backlog until the reactor runs.
        daemon::ControlServer control(reactor, engine, control_path);
        engine.start();
        if (!pid_file.empty()) {
            std::ofstream(pid_file) << getpid() << "\n";
        }
        const int sfd = signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK);
        if (sfd < 0) throw std::system_error(errno, std::generic_category(), "signalfd");
        auto wait_signal = [](rt::Reactor& r, int fd) -> rt::Task<void> {
            while (true) {
                int rc = co_await r.poll(fd, POLLIN);
                if (rc < 0) co_return;
                signalfd_siginfo info{};
                if (::read(fd, &info, sizeof info) == sizeof info) {
                    if (info.ssi_signo == SIGHUP) {
                        // Operators (and `systemctl reload`) send it expecting
                        // a reload, not a stop; options live on the command line.
                        log::info("SIGHUP: nothing to reload (xensockd has no configuration file); still serving");
                        continue;
                    }
                    log::info("signal {}: stopping", strsignal(static_cast<int>(info.ssi_signo)));
                    co_return;
                }
            }
        };
        reactor.run_until(wait_signal(reactor, sfd));
        ::close(sfd);
        control.close();
        engine.stop();
        if (!pid_file.empty()) ::unlink(pid_file.c_str());
    } catch (const daemon::ControlSocketInUse& e) {
        log::error("{}", e.what());
        return kExitAlreadyRunning;
    } catch (const std::exception& e) {
        log::error("{}", e.what());
        return kExitFailure;
    }
    return 0;
}
