// xensockctl: see and steer a running xensockd, and play the toolstack
// (attach/detach a guest's device in xenstore). docs/xensockctl.md.
#include "ctl.hpp"

#include "xensock/platform/xenstore.hpp"
#include "xensock/toolstack/toolstack.hpp"
#include "xensock/wire/profile.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <cstdio>
#include <iostream>
#include <optional>

using namespace xensock;
using namespace xensock::ctl;
using nlohmann::json;

namespace {

constexpr const char* kExitCodes =
    "Exit codes: 0 success, 1 runtime error (e.g. a xensockd worker not responding), 2 usage\n"
    "error (bad arguments, or a kill SOCKID that needs --protocol), 3 not found (unknown domid,\n"
    "sockid or device), 4 not reachable (xensockd's control socket, or xenstored for\n"
    "attach/detach; also a uid xensockd does not serve).";
// Largest ordinary domain id (DOMID_FIRST_RESERVED - 1).
constexpr unsigned kMaxDomid = 0x7FEF;

struct Globals {
    std::string control;
    std::string sim;
    bool json = false;
    double timeout_seconds = 10;
};

std::string footer(const std::string& examples) { return "Examples:\n" + examples + "\n" + kExitCodes; }

void print(const std::string& text) {
    std::fwrite(text.data(), 1, text.size(), stdout);
}
void print_json(const json& j) { print(j.dump(2, ' ', false, json::error_handler_t::replace) + "\n"); }

json ask(const Globals& g, const json& request) {
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(g.timeout_seconds * 1000));
    json answer = control_request(resolve_control_path(g.control, g.sim), request, timeout);
    check_answer(answer);
    return answer;
}

int cmd_list(const Globals& g, std::optional<unsigned> domid, bool sockets) {
    json request{{"op", "list"}, {"sockets", sockets}};
    if (domid) request["domid"] = *domid;
    const json answer = ask(g, request);
    if (g.json) print_json(answer);
    else print(sockets ? render_sockets(answer) : render_list(answer));
    return kExitOk;
}

int cmd_stats(const Globals& g, std::optional<unsigned> domid, bool prometheus) {
    json request{{"op", "stats"}};
    if (domid) request["domid"] = *domid;
    const json answer = ask(g, request);
    if (prometheus) print(render_prometheus(answer));
    else if (g.json) print_json(answer);
    else print(render_stats(answer));
    return kExitOk;
}

struct KillArgs {
    unsigned domid = 0;
    std::optional<uint64_t> sockid;
    std::optional<std::string> protocol;
    std::optional<unsigned> devid;
};

// "xensock", "pvcalls devid 1": a session as `--protocol P [--devid V]` names it.
std::string session_name(const json& s) {
    const auto devid = s.value("devid", 0u);
    return devid == 0 ? s.value("protocol", std::string("?"))
                      : fmt::format("{} devid {}", s.value("protocol", std::string("?")), devid);
}

int cmd_kill(const Globals& g, const KillArgs& k) {
    json request{{"op", "kill"}, {"domid", k.domid}};
    if (k.sockid) request["sockid"] = *k.sockid;
    if (k.protocol) request["protocol"] = *k.protocol;
    if (k.devid) request["devid"] = *k.devid;
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(g.timeout_seconds * 1000));
    const json answer = control_request(resolve_control_path(g.control, g.sim), request, timeout);
    if (k.sockid && answer.value("code", std::string()) == "ambiguous" && answer.contains("sessions") &&
        answer["sessions"].is_array()) {
        // A sockid is only unique within a session: say which to pick, in flags.
        std::string choices;
        for (const auto& s : answer["sessions"]) {
            choices += fmt::format("\n  xensockctl kill {} {} --protocol {}", k.domid, *k.sockid,
                                   s.value("protocol", std::string("?")));
            if (s.value("devid", 0u) != 0 || k.devid) choices += fmt::format(" --devid {}", s.value("devid", 0u));
        }
        throw CtlError(kExitUsage, fmt::format("domid {} has a socket {} in more than one session; nothing was "
                                               "closed. Say which with --protocol (and --devid):{}",
                                               k.domid, *k.sockid, choices));
    }
    check_answer(answer);
    std::vector<std::string> names;
    if (answer.contains("sessions") && answer["sessions"].is_array())
        for (const auto& s : answer["sessions"]) names.push_back(session_name(s));
    std::string joined;
    for (const auto& n : names) joined += (joined.empty() ? "" : ", ") + n;
    if (g.json) {
        json out{{"ok", true}, {"domid", k.domid}, {"sessions", answer.value("sessions", json::array())}};
        if (k.sockid) out["sockid"] = *k.sockid;
        print_json(out);
    } else if (k.sockid) {
        print(fmt::format("domid {} socket {}: closed ({}); the guest sees ECONNRESET on its data ring and must "
                          "release the socket\n",
                          k.domid, *k.sockid, joined));
    } else {
        print(fmt::format("domid {}: disconnecting {} session{} ({}); their sockets are closed and the backend "
                          "goes Closing. The guest may reconnect; `xensockctl detach --domid {}` removes its "
                          "device.\n",
                          k.domid, names.size(), names.size() == 1 ? "" : "s", joined, k.domid));
    }
    return kExitOk;
}

// Connects to xenstore the way xensockd does: the sim's socket, or libxenstore's default.
std::unique_ptr<platform::XenStore> open_xenstore(const Globals& g) {
    const std::string sim = resolve_sim_dir(g.sim);
    try {
        return std::make_unique<platform::XenStore>(sim.empty() ? "" : sim + "/xenstored.sock");
    } catch (const std::exception& e) {
        throw CtlError(kExitUnreachable, e.what());
    }
}

int cmd_attach(const Globals& g, unsigned domid, unsigned backend, const std::string& protocol) {
    const auto* profile = wire::find_profile(protocol);
    if (!profile) throw CtlError(kExitUsage, fmt::format("unknown protocol '{}': use xensock or pvcalls", protocol));
    auto xs = open_xenstore(g);
    std::string why;
    const auto st = toolstack::attach(*xs, *profile, domid, backend, &why);
    if (!st) {
        if (st.error() == EEXIST)
            throw CtlError(kExitFailure, fmt::format("{}; detach it first: xensockctl detach --domid {} --protocol {}",
                                                     why, domid, protocol));
        if (st.error() == EINVAL) throw CtlError(kExitUsage, why);
        throw CtlError(kExitFailure, fmt::format("attach domid {} failed: {}", domid, why));
    }
    const auto fe = toolstack::frontend_dir(*profile, domid);
    const auto be = toolstack::backend_dir(*profile, domid, backend);
    if (g.json) {
        print_json({{"ok", true},
                    {"domid", domid},
                    {"backend_domid", backend},
                    {"protocol", protocol},
                    {"frontend", fe},
                    {"backend", be}});
    } else {
        print(fmt::format("attached domid {} ({}, backend domid {}): {} and {}\n", domid, protocol, backend, fe, be));
    }
    return kExitOk;
}

int cmd_detach(const Globals& g, unsigned domid, unsigned backend, const std::string& protocol, double wait_seconds) {
    std::vector<const wire::ProtocolProfile*> profiles;
    if (protocol.empty()) {
        profiles = wire::all_profiles();  // whichever the guest has
    } else if (const auto* p = wire::find_profile(protocol)) {
        profiles.push_back(p);
    } else {
        throw CtlError(kExitUsage, fmt::format("unknown protocol '{}': use xensock or pvcalls", protocol));
    }
    auto xs = open_xenstore(g);
    const auto wait = std::chrono::milliseconds(static_cast<int64_t>(wait_seconds * 1000));
    json detached = json::array();
    std::string failures;
    for (const auto* p : profiles) {
        std::string why;
        const auto st = toolstack::detach(*xs, *p, domid, backend, wait, &why);
        if (st) {
            detached.push_back(std::string(p->name()));
            continue;
        }
        if (st.error() == ENOENT) continue;  // the guest has no device of this protocol
        if (st.error() == ETIMEDOUT) {
            // The directories are gone anyway; the backend was just slow.
            detached.push_back(std::string(p->name()));
            std::fprintf(stderr, "xensockctl: warning: %s (is xensockd running?)\n", why.c_str());
            continue;
        }
        failures += fmt::format("{}{}: {}", failures.empty() ? "" : "; ", p->name(), why);
    }
    if (!failures.empty()) throw CtlError(kExitFailure, fmt::format("detach domid {} failed: {}", domid, failures));
    if (detached.empty()) {
        throw CtlError(kExitNotFound,
                       protocol.empty()
                           ? fmt::format("domid {} has no xensock or pvcalls device (backend domid {})", domid, backend)
                           : fmt::format("domid {} has no {} device (backend domid {})", domid, protocol, backend));
    }
    if (g.json) {
        print_json({{"ok", true}, {"domid", domid}, {"backend_domid", backend}, {"detached", detached}});
    } else {
        for (const auto& name : detached)
            print(fmt::format("detached domid {} ({}, backend domid {})\n", domid, name.get<std::string>(), backend));
    }
    return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"xensockctl: see and steer a running xensockd (XenSock/PVCalls backend), and attach or detach "
                 "guest devices in xenstore"};
    app.footer(footer("  xensockctl list                   one line per guest session\n"
                      "  xensockctl list --sockets 5       the sockets of domid 5\n"
                      "  xensockctl stats --prometheus     counters for node_exporter's textfile collector\n"
                      "  xensockctl kill 5 3               close socket 3 of domid 5\n"
                      "  xensockctl --sim /dev/shm/xs attach --domid 5\n"
                      "Control socket: --control, else $XENSOCK_CONTROL, else DIR/control with --sim DIR\n"
                      "or $XENSOCK_SIM_DIR, else /run/xensock/control."));
    app.require_subcommand(1);
    app.fallthrough();  // global options may also follow the subcommand

    Globals g;
    app.add_option("--control", g.control, "xensockd's control socket (default: see below)");
    app.add_option("--sim", g.sim, "Sim root DIR: xenstore at DIR/xenstored.sock, control socket DIR/control "
                                   "(or set XENSOCK_SIM_DIR)");
    app.add_flag("--json", g.json, "Print JSON (the daemon's answer) instead of tables, for scripts");
    app.add_option("--timeout", g.timeout_seconds, "Seconds to wait for xensockd's answer")
        ->capture_default_str()
        ->check(CLI::Range(0.1, 3600.0));

    // list
    auto* list = app.add_subcommand("list", "One line per guest session, or per socket with --sockets");
    list->footer(footer("  xensockctl list\n"
                        "  xensockctl list --sockets 5\n"
                        "DOMID is DOMID/DEVID for a device id other than 0 (several devices of one protocol).\n"
                        "Session columns: DOMID PROTOCOL STATE (backend xenbus state) FRONTEND (guest's state)\n"
                        "ACTIVE/PASSIVE (sockets) FROM-GUEST/TO-GUEST (bytes) UPTIME.\n"
                        "Socket columns: ... ORDER (data ring order) IN-QUEUED (bytes waiting for the guest to\n"
                        "read) OUT-QUEUED (bytes the guest queued that are not sent yet)."));
    unsigned list_domid = 0;
    bool list_sockets = false;
    auto* list_domid_opt =
        list->add_option("domid", list_domid, "Only this guest")->check(CLI::Range(0u, kMaxDomid));
    list->add_flag("--sockets", list_sockets, "One line per socket instead of per session");

    // stats
    auto* stats = app.add_subcommand("stats", "Counters per guest session: commands, bytes, notifications, stalls, errors");
    stats->footer(footer("  xensockctl stats\n"
                         "  xensockctl stats 5\n"
                         "  xensockctl stats --prometheus > /var/lib/prometheus/node-exporter/xensock.prom.$$ &&\n"
                         "    mv /var/lib/prometheus/node-exporter/xensock.prom.$$ "
                         "/var/lib/prometheus/node-exporter/xensock.prom"));
    unsigned stats_domid = 0;
    bool prometheus = false;
    auto* stats_domid_opt =
        stats->add_option("domid", stats_domid, "Only this guest")->check(CLI::Range(0u, kMaxDomid));
    stats->add_flag("--prometheus", prometheus, "Print the Prometheus text exposition format");

    // kill
    auto* kill = app.add_subcommand("kill", "Disconnect a guest (all its sockets), or close one of its sockets");
    kill->footer(footer(
        "  xensockctl kill 5                     disconnect domid 5: every session (xensock and pvcalls\n"
        "                                        device alike) has its sockets closed and goes Closing\n"
        "  xensockctl kill 5 --protocol pvcalls  disconnect only domid 5's pvcalls session\n"
        "  xensockctl kill 5 3                   close socket 3 of domid 5; its other sockets keep working\n"
        "  xensockctl kill 5 3 --protocol xensock\n"
        "                                        the same when domid 5 has a socket 3 in two sessions\n"
        "A SOCKID found in more than one session of DOMID is refused (exit 2) until --protocol\n"
        "(and --devid) name one; `xensockctl list --sockets DOMID` shows them."));
    unsigned kill_domid = 0, kill_devid = 0;
    uint64_t kill_sockid = 0;
    std::string kill_protocol;
    kill->add_option("domid", kill_domid, "The guest")->required()->check(CLI::Range(0u, kMaxDomid));
    auto* kill_sockid_opt = kill->add_option("sockid", kill_sockid, "Only this socket (see `list --sockets`)");
    auto* kill_protocol_opt = kill->add_option("--protocol", kill_protocol, "Only the guest's session of this "
                                                                          "protocol: xensock or pvcalls")
                                  ->check(CLI::IsMember({"xensock", "pvcalls"}));
    auto* kill_devid_opt =
        kill->add_option("--devid", kill_devid, "Only the session of this device id (the DOMID/DEVID of `list`)");

    // attach / detach
    auto* attach = app.add_subcommand("attach", "Create a guest's PV-sockets device in xenstore, as libxl does");
    attach->footer(footer("  xensockctl attach --domid 5\n"
                          "  xensockctl attach --domid 7 --protocol pvcalls --backend-domid 2\n"
                          "Writes the frontend and backend directories; xensockd picks the device up."));
    unsigned attach_domid = 0, attach_backend = 0;
    std::string attach_protocol = "xensock";
    attach->add_option("--domid", attach_domid, "The guest")->required()->check(CLI::Range(0u, kMaxDomid));
    attach->add_option("--backend-domid", attach_backend, "Where xensockd runs")
        ->capture_default_str()
        ->check(CLI::Range(0u, kMaxDomid));
    attach->add_option("--protocol", attach_protocol, "xensock or pvcalls")
        ->capture_default_str()
        ->check(CLI::IsMember({"xensock", "pvcalls"}));

    auto* detach = app.add_subcommand("detach", "Remove a guest's PV-sockets device(s) from xenstore, as libxl does");
    detach->footer(footer("  xensockctl detach --domid 5\n"
                          "  xensockctl detach --domid 7 --protocol pvcalls --wait 30\n"
                          "Sets the backend Closing, waits for xensockd to reach Closed, removes both directories."));
    unsigned detach_domid = 0, detach_backend = 0;
    std::string detach_protocol;
    double detach_wait = 10;
    detach->add_option("--domid", detach_domid, "The guest")->required()->check(CLI::Range(0u, kMaxDomid));
    detach->add_option("--backend-domid", detach_backend, "Where xensockd runs")
        ->capture_default_str()
        ->check(CLI::Range(0u, kMaxDomid));
    detach->add_option("--protocol", detach_protocol, "xensock or pvcalls (default: every device the guest has)")
        ->check(CLI::IsMember({"xensock", "pvcalls"}));
    detach->add_option("--wait", detach_wait, "Seconds to wait for the backend to reach Closed")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 3600.0));

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? kExitOk : kExitUsage;
    }

    try {
        if (*list) {
            return cmd_list(g, *list_domid_opt ? std::optional<unsigned>(list_domid) : std::nullopt, list_sockets);
        }
        if (*stats) {
            return cmd_stats(g, *stats_domid_opt ? std::optional<unsigned>(stats_domid) : std::nullopt, prometheus);
        }
        if (*kill) {
            KillArgs k;
            k.domid = kill_domid;
            if (*kill_sockid_opt) k.sockid = kill_sockid;
            if (*kill_protocol_opt) k.protocol = kill_protocol;
            if (*kill_devid_opt) k.devid = kill_devid;
            return cmd_kill(g, k);
        }
        if (*attach) return cmd_attach(g, attach_domid, attach_backend, attach_protocol);
        if (*detach) return cmd_detach(g, detach_domid, detach_backend, detach_protocol, detach_wait);
    } catch (const CtlError& e) {
        std::fprintf(stderr, "xensockctl: %s\n", e.what());
        if (g.json) print_json({{"ok", false}, {"error", e.what()}, {"exit_code", e.exit_code()}});
        return e.exit_code();
    } catch (const json::exception& e) {
        // Fields of the wrong type: a daemon this tool does not understand.
        std::fprintf(stderr, "xensockctl: unexpected answer from xensockd (%s): are xensockctl and xensockd the "
                             "same version?\n",
                     e.what());
        return kExitFailure;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "xensockctl: %s\n", e.what());
        return kExitFailure;
    }
    return kExitUsage;
}
