// `xensockctl stats --prometheus`: the text exposition format (0.0.4), for
// node_exporter's textfile collector or a scrape through a small wrapper.
// https://prometheus.io/docs/instrumenting/exposition_formats/
#include "ctl.hpp"

#include <fmt/core.h>

#include <array>
#include <cmath>
#include <map>

namespace xensock::ctl {
using nlohmann::json;

std::string prometheus_escape_label_value(std::string_view value) {
    std::string out;
    out.reserve(value.size());
    for (const char c : value) {
        switch (c) {
            case '\\': out += "\\\\"; break;
            case '"': out += "\\\""; break;
            case '\n': out += "\\n"; break;
            default: out += c;
        }
    }
    return out;
}

std::string prometheus_escape_help(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (const char c : text) {
        switch (c) {
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            default: out += c;
        }
    }
    return out;
}

bool prometheus_valid_metric_name(std::string_view name) {
    if (name.empty()) return false;
    for (size_t i = 0; i < name.size(); ++i) {
        const char c = name[i];
        const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        const bool digit = c >= '0' && c <= '9';
        if (!alpha && !(digit && i > 0)) return false;
    }
    return true;
}

namespace {
using Labels = std::vector<std::pair<std::string, std::string>>;

struct Family {
    std::string name, type, help;
    std::vector<std::pair<Labels, std::string>> samples;
};

// Families in first-use order, each printed once with all its samples.
class Exposition {
public:
    Family& family(const std::string& name, const char* type, std::string help) {
        if (auto it = index_.find(name); it != index_.end()) return families_[it->second];
        index_.emplace(name, families_.size());
        families_.push_back({name, type, std::move(help), {}});
        return families_.back();
    }
    void add(const std::string& name, const char* type, std::string help, Labels labels, std::string value) {
        family(name, type, std::move(help)).samples.emplace_back(std::move(labels), std::move(value));
    }
    std::string render() const {
        std::string out;
        for (const auto& f : families_) {
            out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", f.name, prometheus_escape_help(f.help), f.name, f.type);
            for (const auto& [labels, value] : f.samples) {
                out += f.name;
                if (!labels.empty()) {
                    out += '{';
                    for (size_t i = 0; i < labels.size(); ++i) {
                        if (i > 0) out += ',';
                        out += fmt::format("{}=\"{}\"", labels[i].first, prometheus_escape_label_value(labels[i].second));
                    }
                    out += '}';
                }
                out += ' ';
                out += value;
                out += '\n';
            }
        }
        return out;
    }

private:
    std::vector<Family> families_;
    std::map<std::string, size_t> index_;
};

std::string number(uint64_t v) { return std::to_string(v); }
std::string number(double v) {
    if (std::isnan(v)) return "NaN";
    if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
    return fmt::format("{}", v);
}
uint64_t u64(const json& j, const char* key) { return j.contains(key) ? counter_value(j[key]) : 0; }
double real(const json& j, const char* key) { return j.contains(key) && j[key].is_number() ? j[key].get<double>() : 0; }
std::string text(const json& j, const char* key) {
    return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : "";
}

// A counter name the engine reports but this tool does not know, as a
// metric name: invalid characters become '_', and "_total" is appended.
std::string metric_for(std::string_view counter) {
    std::string name = "xensock_";
    for (const char c : counter) {
        const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
        name += ok ? c : '_';
    }
    if (!name.ends_with("_total")) name += "_total";
    return name;
}

struct ScalarMetric {
    const char* counter;
    const char* metric;
    const char* help;
};
constexpr std::array<ScalarMetric, 6> kScalarMetrics{{
    {"notifications_sent", "xensock_notifications_sent_total", "Event-channel notifications sent to the guest."},
    {"notifications_received", "xensock_notifications_received_total",
     "Event-channel notifications received from the guest."},
    {"ring_full_stalls", "xensock_ring_full_stalls_total",
     "Times a data ring's in half was full, so reading the host socket paused until the guest consumed."},
    {"ring_empty_waits", "xensock_ring_empty_waits_total",
     "Times a data ring's out half was empty, so the backend waited for the guest to produce."},
    {"guest_protocol_errors", "xensock_guest_protocol_errors_total",
     "Protocol violations by the guest (bad ring indexes, ring orders, grant refs)."},
    {"quota_refusals", "xensock_quota_refusals_total", "Requests refused because the guest reached a quota."},
}};
}  // namespace

std::string render_prometheus(const json& answer) {
    Exposition x;
    static const json kNone = json::array();
    const json& sessions = answer.contains("sessions") && answer["sessions"].is_array() ? answer["sessions"] : kNone;

    // All sessions the daemon serves, also for `stats DOMID` (whose series
    // are filtered): a gauge that changed meaning with a filter would lie.
    const bool have_daemon = answer.contains("daemon") && answer["daemon"].is_object();
    const uint64_t served = have_daemon && answer["daemon"].contains("sessions") ? u64(answer["daemon"], "sessions")
                                                                                : sessions.size();
    x.add("xensock_sessions", "gauge",
          "Guest sessions xensockd serves (one per guest device and protocol), all of them even when the other "
          "series are for one domid.",
          {}, number(served));
    if (have_daemon)
        x.add("xensock_daemon_uptime_seconds", "gauge", "Seconds since xensockd started serving.", {},
              number(real(answer["daemon"], "uptime_seconds")));

    // Declare every per-session family up front, so the output has the same
    // families (HELP/TYPE) whether or not any guest is attached.
    x.family("xensock_session_uptime_seconds", "gauge", "Seconds since the session appeared.");
    x.family("xensock_session_backend_state", "gauge",
             "XenbusState the backend published (1 Initialising, 2 InitWait, 4 Connected, 5 Closing, 6 Closed).");
    x.family("xensock_session_frontend_state", "gauge",
             "XenbusState the guest published (1 Initialising, 3 Initialised, 4 Connected, 5 Closing, 6 Closed).");
    x.family("xensock_sockets_active", "gauge", "Connected sockets of the guest (each with a data ring).");
    x.family("xensock_sockets_passive", "gauge", "Bound or listening sockets of the guest.");
    x.family("xensock_bytes_from_guest_total", "counter",
             "Bytes taken from the guest's data rings and sent on host sockets.");
    x.family("xensock_bytes_to_guest_total", "counter",
             "Bytes received on host sockets and placed in the guest's data rings.");
    x.family("xensock_commands_total", "counter", "Commands received from the guest, by command.");
    x.family("xensock_command_results_total", "counter",
             "Commands answered, by command and result (ok: non-negative return, error: negative errno).");
    x.family("xensock_errors_total", "counter", "Commands answered with an error, by errno.");
    x.family("xensock_ring_errors_total", "counter",
             "Host socket errors passed to the guest on a data ring, by ring half (in: receiving from the peer "
             "failed or it shut down, ENOTCONN; out: sending failed) and errno.");
    for (const auto& m : kScalarMetrics) x.family(m.metric, "counter", m.help);

    for (const auto& s : sessions) {
        Labels base{{"domid", std::to_string(u64(s, "domid"))}, {"protocol", text(s, "protocol")}};
        // devid is always 0 for devices made by attach; label it only when
        // not, so that two devices of one guest never share a series.
        if (const auto devid = u64(s, "devid"); devid != 0) base.emplace_back("devid", std::to_string(devid));
        auto with = [&](const char* name, std::string value) {
            Labels l = base;
            l.emplace_back(name, std::move(value));
            return l;
        };

        x.add("xensock_session_uptime_seconds", "gauge", "", base, number(real(s, "uptime_seconds")));
        x.add("xensock_session_backend_state", "gauge", "", base, number(u64(s, "backend_state")));
        x.add("xensock_session_frontend_state", "gauge", "", base, number(u64(s, "frontend_state")));
        x.add("xensock_sockets_active", "gauge", "", base, number(u64(s, "active_sockets")));
        x.add("xensock_sockets_passive", "gauge", "", base, number(u64(s, "passive_sockets")));
        x.add("xensock_bytes_from_guest_total", "counter", "", base, number(u64(s, "bytes_from_guest")));
        x.add("xensock_bytes_to_guest_total", "counter", "", base, number(u64(s, "bytes_to_guest")));

        const auto c = parse_counters(s.contains("counters") ? s["counters"] : json::object());
        for (const auto& cmd : c.commands) {
            x.add("xensock_commands_total", "counter", "", with("command", cmd.name), number(cmd.received));
            for (const auto& [result, n] : {std::pair{"ok", cmd.ok}, std::pair{"error", cmd.errors}}) {
                Labels l = with("command", cmd.name);
                l.emplace_back("result", result);
                x.add("xensock_command_results_total", "counter", "", l, number(n));
            }
        }
        for (const auto& [err, n] : c.errors_by_errno)
            x.add("xensock_errors_total", "counter", "", with("errno", errno_name(err)), number(n));
        for (const auto& e : c.ring_errors) {
            Labels l = with("half", e.half);
            l.emplace_back("errno", errno_name(e.err));
            x.add("xensock_ring_errors_total", "counter", "", l, number(e.count));
        }
        for (const auto& [name, value] : c.scalars) {
            for (const auto& m : kScalarMetrics)
                if (name == m.counter) x.add(m.metric, "counter", m.help, base, number(value));
        }
        for (const auto& [name, value] : c.other)
            x.add(metric_for(name), "counter", fmt::format("xensockd counter '{}'.", name), base, number(value));
    }
    return x.render();
}

}  // namespace xensock::ctl
