// xensockctl's building blocks, kept out of main.cpp so tests can use them:
// the control-socket client, the table renderer, the Prometheus exposition.
// All rendering takes the daemon's JSON answers as they are (see
// src/daemon/control.hpp for the protocol and docs/xensockctl.md).
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace xensock::ctl {

// Exit codes, documented in --help and docs/xensockctl.md.
enum ExitCode : int {
    kExitOk = 0,
    kExitFailure = 1,      // runtime error (xenstore refused, bad answer, ...)
    kExitUsage = 2,        // bad arguments
    kExitNotFound = 3,     // unknown domid / sockid / device
    kExitUnreachable = 4,  // xensockd (or xenstored) cannot be reached
};

// A failure carrying its exit code and a message that says what to do.
class CtlError : public std::runtime_error {
public:
    CtlError(int exit_code, const std::string& message) : std::runtime_error(message), exit_code_(exit_code) {}
    int exit_code() const noexcept { return exit_code_; }

private:
    int exit_code_;
};

// ------------------------------------------------------------ control client

// The control socket to use: `flag` (--control), else $XENSOCK_CONTROL, else
// SIM/control when a sim root is given (`sim_dir`, else $XENSOCK_SIM_DIR),
// else /run/xensock/control — the same defaults as xensockd.
std::string resolve_control_path(const std::string& flag, const std::string& sim_dir);
// The sim root from --sim or $XENSOCK_SIM_DIR; "" for real Xen.
std::string resolve_sim_dir(const std::string& flag);

// Sends one request and returns the daemon's answer as it came (an object
// with a boolean "ok"). Throws CtlError: kExitUnreachable when the daemon
// cannot be reached or does not answer in time, kExitFailure when the answer
// is not JSON.
nlohmann::json control_request(const std::string& path, const nlohmann::json& request,
                               std::chrono::milliseconds timeout);

// Throws CtlError for an answer with "ok": false, mapping the daemon's
// "code" to an exit code ("not_found" -> 3, "usage" and "ambiguous" -> 2,
// "permission" -> 4, else 1).
void check_answer(const nlohmann::json& answer);

// ------------------------------------------------------------------ tables

// Columns aligned on their widest cell, separated by two spaces; numeric
// columns right-aligned. No trailing spaces.
class Table {
public:
    struct Column {
        std::string header;
        bool right = false;
    };
    explicit Table(std::vector<Column> columns, bool show_header = true);
    void add(std::vector<std::string> row);  // one cell per column
    std::string render(std::string_view indent = "") const;
    bool empty() const noexcept { return rows_.empty(); }

private:
    std::vector<Column> columns_;
    bool show_header_;
    std::vector<std::vector<std::string>> rows_;
};

// "45s", "2m03s", "1h02m", "3d04h".
std::string format_duration(double seconds);
// XenbusState name ("Connected"), or the number for values xenbus lacks.
std::string xenbus_state_name(int state);
// A count from the daemon's JSON (any non-negative number); 0 otherwise.
uint64_t counter_value(const nlohmann::json& value);
// "ECONNREFUSED"; "ENOTSUPP" for Linux's 524; the number if it has no name.
std::string errno_name(int err);

// `xensockctl list`, `list --sockets`, `stats` as text, from the answers of
// the daemon's "list" / "stats" ops.
std::string render_list(const nlohmann::json& answer);
std::string render_sockets(const nlohmann::json& answer);
std::string render_stats(const nlohmann::json& answer);

// ------------------------------------------------------------- Prometheus

// Escapes a label value for the text exposition format: \ -> \\, " -> \",
// newline -> \n; everything else passes through (UTF-8 included).
std::string prometheus_escape_label_value(std::string_view value);
// Escapes HELP text: \ -> \\, newline -> \n.
std::string prometheus_escape_help(std::string_view text);
// [a-zA-Z_:][a-zA-Z0-9_:]*
bool prometheus_valid_metric_name(std::string_view name);

// The answer of the "stats" op in the Prometheus text exposition format
// (version 0.0.4): every family once, with HELP and TYPE, samples grouped.
std::string render_prometheus(const nlohmann::json& answer);

// The counters of one session (its "counters" object), sorted into what
// the engine reports. Names the parser does not know land in `other`, so a
// daemon newer than this tool still shows everything.
struct SessionCounters {
    struct Command {
        std::string name;
        uint64_t received = 0, errors = 0;
        uint64_t ok = 0;  // answered with ret >= 0 (received - ok - errors are in flight)
    };
    std::vector<Command> commands;                        // fixed order, then unknown names
    std::vector<std::pair<int, uint64_t>> errors_by_errno;  // command errors, ascending errno
    struct RingError {
        std::string half;  // "in" (receiving, to the guest) or "out" (sending, from the guest)
        int err = 0;
        uint64_t count = 0;
    };
    std::vector<RingError> ring_errors;  // in before out, ascending errno
    std::vector<std::pair<std::string, uint64_t>> scalars;  // known ones first, fixed order
    std::vector<std::pair<std::string, uint64_t>> other;    // names this tool does not know
};
SessionCounters parse_counters(const nlohmann::json& counters);

}  // namespace xensock::ctl
