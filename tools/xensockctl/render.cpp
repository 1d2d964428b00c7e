// Text output of xensockctl: aligned tables from the daemon's answers.
#include "ctl.hpp"

#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstring>
#include <map>

namespace xensock::ctl {
using nlohmann::json;

// ---------------------------------------------------------------- table
Table::Table(std::vector<Column> columns, bool show_header) : columns_(std::move(columns)), show_header_(show_header) {}

void Table::add(std::vector<std::string> row) {
    row.resize(columns_.size());
    rows_.push_back(std::move(row));
}

std::string Table::render(std::string_view indent) const {
    std::vector<size_t> width(columns_.size(), 0);
    for (size_t c = 0; c < columns_.size(); ++c) {
        if (show_header_) width[c] = columns_[c].header.size();
        for (const auto& row : rows_) width[c] = std::max(width[c], row[c].size());
    }
    std::string out;
    auto emit = [&](const std::vector<std::string>& cells) {
        std::string line(indent);
        for (size_t c = 0; c < cells.size(); ++c) {
            if (c > 0) line += "  ";
            const size_t pad = width[c] - cells[c].size();
            if (columns_[c].right) line.append(pad, ' ');
            line += cells[c];
            if (!columns_[c].right) line.append(pad, ' ');
        }
        while (!line.empty() && line.back() == ' ') line.pop_back();
        out += line;
        out += '\n';
    };
    if (show_header_) {
        std::vector<std::string> headers;
        for (const auto& col : columns_) headers.push_back(col.header);
        emit(headers);
    }
    for (const auto& row : rows_) emit(row);
    return out;
}

// --------------------------------------------------------------- values
std::string format_duration(double seconds) {
    if (!(seconds >= 0)) seconds = 0;  // also NaN
    const auto s = static_cast<uint64_t>(seconds);
    if (s < 60) return fmt::format("{}s", s);
    if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
    if (s < 86400) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
    return fmt::format("{}d{:02}h", s / 86400, (s % 86400) / 3600);
}

std::string xenbus_state_name(int state) {
    static constexpr std::array<const char*, 9> names{"Unknown",   "Initialising", "InitWait",
                                                       "Initialised", "Connected", "Closing",
                                                       "Closed",    "Reconfiguring", "Reconfigured"};
    if (state >= 0 && static_cast<size_t>(state) < names.size()) return names[static_cast<size_t>(state)];
    return std::to_string(state);
}

uint64_t counter_value(const json& v) {
    if (v.is_number_unsigned()) return v.get<uint64_t>();
    if (v.is_number_integer()) return v.get<int64_t>() < 0 ? 0 : static_cast<uint64_t>(v.get<int64_t>());
    if (v.is_number_float()) return v.get<double>() < 0 ? 0 : static_cast<uint64_t>(v.get<double>());
    return 0;
}

std::string errno_name(int err) {
    if (err == 524) return "ENOTSUPP";  // Linux kernel-internal; both protocols use it
    if (const char* name = ::strerrorname_np(err)) return name;
    return std::to_string(err);
}

namespace {
std::string errno_description(int err) {
    if (err == 524) return "Operation not supported (unknown command)";
    return std::strerror(err);
}

uint64_t u64(const json& j, const char* key) { return j.contains(key) ? counter_value(j[key]) : 0; }
int integer(const json& j, const char* key) { return j.contains(key) && j[key].is_number() ? j[key].get<int>() : 0; }
std::string text(const json& j, const char* key) {
    return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : "-";
}
double seconds(const json& j, const char* key) {
    return j.contains(key) && j[key].is_number() ? j[key].get<double>() : 0.0;
}
const json& sessions_of(const json& answer) {
    static const json empty = json::array();
    return answer.contains("sessions") && answer["sessions"].is_array() ? answer["sessions"] : empty;
}

constexpr std::array<const char*, 8> kCommandOrder{"socket", "connect", "release", "bind",
                                                   "listen", "accept",  "poll",    "unknown"};
// Scalar counters in display order, with their human names.
constexpr std::array<std::pair<const char*, const char*>, 6> kScalars{{
    {"notifications_sent", "notifications sent"},
    {"notifications_received", "notifications received"},
    {"ring_full_stalls", "ring-full stalls"},
    {"ring_empty_waits", "ring-empty waits"},
    {"guest_protocol_errors", "guest protocol errors"},
    {"quota_refusals", "quota refusals"},
}};

bool parse_int(std::string_view s, int& out) {
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
    return ec == std::errc() && end == s.data() + s.size();
}
}  // namespace

SessionCounters parse_counters(const json& counters) {
    SessionCounters out;
    std::map<std::string, SessionCounters::Command> commands;
    std::map<std::string, uint64_t> scalars;
    std::map<int, uint64_t> errors;
    std::map<std::pair<std::string, int>, uint64_t> ring_errors;
    if (counters.is_object()) {
        for (const auto& [name, value] : counters.items()) {
            if (!value.is_number()) continue;
            const uint64_t n = counter_value(value);
            const std::string_view key = name;
            int err = 0;
            if (key.starts_with("ring_errors_in_errno_") && parse_int(key.substr(21), err)) {
                ring_errors[{"in", err}] = n;
            } else if (key.starts_with("ring_errors_out_errno_") && parse_int(key.substr(22), err)) {
                ring_errors[{"out", err}] = n;
            } else if (key.starts_with("command_errors_")) {
                commands[std::string(key.substr(15))].errors = n;
            } else if (key.starts_with("command_ok_")) {
                commands[std::string(key.substr(11))].ok = n;
            } else if (key.starts_with("commands_")) {
                commands[std::string(key.substr(9))].received = n;
            } else if (key.starts_with("errno_") && parse_int(key.substr(6), err)) {
                errors[err] = n;
            } else {
                scalars[name] = n;
            }
        }
    }
    for (const char* name : kCommandOrder) {
        auto it = commands.find(name);
        SessionCounters::Command c{name, 0, 0, 0};
        if (it != commands.end()) {
            c.received = it->second.received;
            c.errors = it->second.errors;
            c.ok = it->second.ok;
            commands.erase(it);
        }
        out.commands.push_back(c);
    }
    for (auto& [name, c] : commands) out.commands.push_back({name, c.received, c.errors, c.ok});
    for (const auto& [name, _] : kScalars) {
        auto it = scalars.find(name);
        out.scalars.emplace_back(name, it == scalars.end() ? 0 : it->second);
        if (it != scalars.end()) scalars.erase(it);
    }
    out.other.assign(scalars.begin(), scalars.end());
    out.errors_by_errno.assign(errors.begin(), errors.end());
    for (const auto& [key, n] : ring_errors) out.ring_errors.push_back({key.first, key.second, n});
    return out;
}

// ---------------------------------------------------------------- list
namespace {
// "5", or "5/1" for a device id other than 0 (several devices of one guest).
std::string session_cell(const json& s) {
    std::string domid = std::to_string(u64(s, "domid"));
    if (const auto devid = u64(s, "devid"); devid != 0) domid += fmt::format("/{}", devid);
    return domid;
}
}  // namespace

std::string render_list(const json& answer) {
    const auto& sessions = sessions_of(answer);
    if (sessions.empty()) return "no guest sessions (a guest appears once its device is attached: xensockctl attach --domid D)\n";
    Table t({{"DOMID", true},
             {"PROTOCOL"},
             {"STATE"},
             {"FRONTEND"},
             {"ACTIVE", true},
             {"PASSIVE", true},
             {"FROM-GUEST", true},
             {"TO-GUEST", true},
             {"UPTIME", true}});
    for (const auto& s : sessions) {
        t.add({session_cell(s), text(s, "protocol"), xenbus_state_name(integer(s, "backend_state")),
               xenbus_state_name(integer(s, "frontend_state")), std::to_string(u64(s, "active_sockets")),
               std::to_string(u64(s, "passive_sockets")), std::to_string(u64(s, "bytes_from_guest")),
               std::to_string(u64(s, "bytes_to_guest")), format_duration(seconds(s, "uptime_seconds"))});
    }
    return t.render();
}

std::string render_sockets(const json& answer) {
    Table t({{"DOMID", true},
             {"PROTOCOL"},
             {"SOCKID", true},
             {"KIND"},
             {"STATE"},
             {"LOCAL"},
             {"REMOTE"},
             {"ORDER", true},
             {"FROM-GUEST", true},
             {"TO-GUEST", true},
             {"IN-QUEUED", true},
             {"OUT-QUEUED", true}});
    for (const auto& s : sessions_of(answer)) {
        if (!s.contains("sockets") || !s["sockets"].is_array()) continue;
        for (const auto& k : s["sockets"]) {
            // Only a connected socket has a data ring; show "-" rather than 0s.
            const bool ring = text(k, "kind") == "active";
            auto ring_value = [&](const char* key) { return ring ? std::to_string(u64(k, key)) : std::string("-"); };
            t.add({session_cell(s), text(s, "protocol"), std::to_string(u64(k, "sockid")),
                   text(k, "kind"), text(k, "state"), text(k, "local"), text(k, "remote"), ring_value("ring_order"),
                   std::to_string(u64(k, "bytes_from_guest")), std::to_string(u64(k, "bytes_to_guest")),
                   ring_value("in_queued"), ring_value("out_queued")});
        }
    }
    if (t.empty()) return "no sockets\n";
    return t.render();
}

// --------------------------------------------------------------- stats
namespace {
void render_counter_block(std::string& out, const json& block, const std::string& indent) {
    const auto c = parse_counters(block.contains("counters") ? block["counters"] : json::object());
    Table commands({{"COMMAND"}, {"RECEIVED", true}, {"OK", true}, {"ERRORS", true}});
    for (const auto& cmd : c.commands)
        commands.add({cmd.name, std::to_string(cmd.received), std::to_string(cmd.ok), std::to_string(cmd.errors)});
    out += commands.render(indent);

    Table scalars({{""}, {"", true}}, false);
    scalars.add({"bytes from guest", std::to_string(u64(block, "bytes_from_guest"))});
    scalars.add({"bytes to guest", std::to_string(u64(block, "bytes_to_guest"))});
    for (const auto& [name, value] : c.scalars) {
        const auto it = std::find_if(kScalars.begin(), kScalars.end(),
                                     [&](const auto& s) { return name == s.first; });
        scalars.add({it != kScalars.end() ? it->second : name, std::to_string(value)});
    }
    for (const auto& [name, value] : c.other) scalars.add({name, std::to_string(value)});
    out += scalars.render(indent);

    if (c.errors_by_errno.empty()) {
        out += indent + "no command errors\n";
    } else {
        Table errors({{"COMMAND ERRNO"}, {"COUNT", true}, {"MEANING"}});
        for (const auto& [err, n] : c.errors_by_errno) errors.add({errno_name(err), std::to_string(n), errno_description(err)});
        out += errors.render(indent);
    }
    if (c.ring_errors.empty()) {
        out += indent + "no data ring errors\n";
    } else {
        // in: receiving from the peer failed or ended; out: sending failed.
        Table errors({{"RING ERRNO"}, {"HALF"}, {"COUNT", true}, {"MEANING"}});
        for (const auto& e : c.ring_errors)
            errors.add({errno_name(e.err), e.half, std::to_string(e.count), errno_description(e.err)});
        out += errors.render(indent);
    }
}
}  // namespace

std::string render_stats(const json& answer) {
    std::string out;
    const auto& sessions = sessions_of(answer);
    if (answer.contains("daemon") && answer["daemon"].is_object()) {
        const auto& d = answer["daemon"];
        // The daemon's count: `stats DOMID` shows fewer sessions than it serves.
        const uint64_t served = d.contains("sessions") ? u64(d, "sessions") : sessions.size();
        out += fmt::format("xensockd pid {}, up {}, {} guest session{}\n", u64(d, "pid"),
                           format_duration(seconds(d, "uptime_seconds")), served, served == 1 ? "" : "s");
    }
    for (const auto& s : sessions) {
        out += fmt::format("\ndomid {} {}{}: {} (frontend {}), up {}, {} active / {} passive socket(s)\n",
                           u64(s, "domid"), text(s, "protocol"),
                           u64(s, "devid") != 0 ? fmt::format(" devid {}", u64(s, "devid")) : std::string(),
                           xenbus_state_name(integer(s, "backend_state")),
                           xenbus_state_name(integer(s, "frontend_state")),
                           format_duration(seconds(s, "uptime_seconds")), u64(s, "active_sockets"),
                           u64(s, "passive_sockets"));
        render_counter_block(out, s, "  ");
    }
    // Totals only add information when there is more than one session.
    if (sessions.size() > 1 && answer.contains("totals") && answer["totals"].is_object()) {
        out += fmt::format("\nall {} sessions:\n", sessions.size());
        render_counter_block(out, answer["totals"], "  ");
    }
    if (sessions.empty()) out += "no guest sessions\n";
    return out;
}

}  // namespace xensock::ctl
