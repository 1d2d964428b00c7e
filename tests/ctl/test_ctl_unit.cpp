// xensockctl's pieces without a daemon: Prometheus escaping and format,
// tables, value formatting, counter parsing.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "ctl.hpp"
#include "prom_check.hpp"

#include <cerrno>
#include <sstream>

using namespace xensock::ctl;
using nlohmann::json;
namespace prom = xensock::testing::prom;

namespace {
// A stats answer as xensockd sends it, with `protocol` as given.
json stats_answer(const std::string& protocol) {
    json counters = {{"commands_socket", 4},   {"command_errors_socket", 0}, {"commands_connect", 3},
                     {"command_errors_connect", 1}, {"command_ok_connect", 2}, {"commands_unknown", 2},     {"notifications_sent", 17},
                     {"notifications_received", 19}, {"ring_full_stalls", 3},    {"ring_empty_waits", 5},
                     {"guest_protocol_errors", 0},  {"quota_refusals", 0},      {"errno_111", 1},
                     {"errno_524", 2},              {"brand_new-counter", 7},
                     {"ring_errors_in_errno_104", 3}, {"ring_errors_in_errno_107", 1},
                     {"ring_errors_out_errno_32", 2}};
    json session = {{"domid", 5},
                    {"devid", 0},
                    {"protocol", protocol},
                    {"backend_state", 4},
                    {"frontend_state", 4},
                    {"active_sockets", 2},
                    {"passive_sockets", 1},
                    {"bytes_to_guest", 3000},
                    {"bytes_from_guest", 1008},
                    {"uptime_seconds", 12.5},
                    {"counters", counters},
                    {"sockets", json::array()}};
    json other = session;
    other["domid"] = 6;
    other["protocol"] = "pvcalls";
    return {{"ok", true},
            {"sessions", json::array({session, other})},
            {"daemon", {{"pid", 42}, {"uptime_seconds", 99.0}}},
            {"totals", {{"sessions", 2}, {"counters", counters}}}};
}
}  // namespace

TEST_CASE("prometheus: label values escape backslash, quote and newline, nothing else") {
    CHECK(prometheus_escape_label_value("plain") == "plain");
    CHECK(prometheus_escape_label_value("a\"b") == "a\\\"b");
    CHECK(prometheus_escape_label_value("a\\b") == "a\\\\b");
    CHECK(prometheus_escape_label_value("a\nb") == "a\\nb");
    CHECK(prometheus_escape_label_value("\\\"\n") == "\\\\\\\"\\n");
    CHECK(prometheus_escape_label_value("tab\there") == "tab\there");
    CHECK(prometheus_escape_label_value("ünï") == "ünï");
    CHECK(prometheus_escape_label_value("") == "");
    // HELP escapes backslash and newline, but not quotes.
    CHECK(prometheus_escape_help("say \"hi\"\\\n") == "say \"hi\"\\\\\\n");
}

TEST_CASE("prometheus: escaped label values parse back to the original") {
    for (const std::string v : {"x\"y\\z\nw", "\\n", "\"\"", "end\\", "\n\n"}) {
        CAPTURE(v);
        const std::string text = "# HELP xensock_t_total t\n# TYPE xensock_t_total counter\nxensock_t_total{v=\"" +
                                 prometheus_escape_label_value(v) + "\"} 1\n";
        const auto parsed = prom::parse(text);
        REQUIRE_MESSAGE(parsed.error.empty(), parsed.error);
        REQUIRE(parsed.samples.size() == 1);
        CHECK(parsed.samples[0].label("v") == v);
    }
}

TEST_CASE("prometheus: the checker rejects what the format forbids") {
    const std::string head = "# HELP xensock_a_total a\n# TYPE xensock_a_total counter\n";
    CHECK(prom::parse(head + "xensock_a_total 1\n").error.empty());
    CHECK(!prom::parse(head + "xensock_a_total{l=\"a\"b\"} 1\n").error.empty());   // raw quote
    CHECK(!prom::parse(head + "xensock_a_total{l=\"a\\tb\"} 1\n").error.empty());  // bad escape
    CHECK(!prom::parse(head + "xensock_a_total{l=\"a} 1\n").error.empty());        // unterminated
    CHECK(!prom::parse(head + "xensock_a_total one\n").error.empty());             // value
    CHECK(!prom::parse(head + "xensock_a_total 1\nxensock_a_total 2\n").error.empty());  // duplicate
    CHECK(!prom::parse(head + "xensock_a_total 1").error.empty());                // no final newline
    CHECK(!prom::parse("# TYPE xensock_b_total counter\nxensock_b_total 1\n").error.empty());  // no HELP
    CHECK(!prom::parse("# HELP xensock_c c\n# TYPE xensock_c counter\nxensock_c 1\n").error.empty());  // _total
    CHECK(!prom::parse("# HELP xensock_d d\n# TYPE xensock_d gaug\nxensock_d 1\n").error.empty());
    CHECK(!prom::parse("xensock_e 1\n").error.empty());  // no TYPE
    CHECK(!prom::parse("# HELP 1bad x\n").error.empty());
}

TEST_CASE("prometheus: rendered stats parse, with types, help, and escaped hostile labels") {
    const std::string hostile = "x\"y\\z\nw";
    const std::string text = render_prometheus(stats_answer(hostile));
    const auto p = prom::parse(text);
    INFO(text);
    REQUIRE_MESSAGE(p.error.empty(), p.error);
    CHECK(text.find("protocol=\"x\\\"y\\\\z\\nw\"") != std::string::npos);

    const std::vector<std::pair<std::string, std::string>> dom5{{"domid", "5"}, {"protocol", hostile}};
    CHECK(p.types.at("xensock_sessions") == "gauge");
    CHECK(p.value("xensock_sessions", {}) == 2);
    CHECK(p.value("xensock_daemon_uptime_seconds", {}) == 99);
    CHECK(p.value("xensock_bytes_from_guest_total", dom5) == 1008);
    CHECK(p.value("xensock_bytes_to_guest_total", dom5) == 3000);
    CHECK(p.value("xensock_sockets_active", dom5) == 2);
    CHECK(p.value("xensock_sockets_passive", dom5) == 1);
    CHECK(p.value("xensock_session_backend_state", dom5) == 4);
    auto with = [&](std::string k, std::string v) {
        auto l = dom5;
        l.emplace_back(std::move(k), std::move(v));
        return l;
    };
    CHECK(p.value("xensock_commands_total", with("command", "socket")) == 4);
    CHECK(p.value("xensock_commands_total", with("command", "connect")) == 3);
    // One family for command results: no second one repeating result="error".
    CHECK(p.types.count("xensock_command_errors_total") == 0);
    auto result = [&](std::string v) {
        auto l = with("command", "connect");
        l.emplace_back("result", std::move(v));
        return l;
    };
    CHECK(p.value("xensock_command_results_total", result("ok")) == 2);
    CHECK(p.value("xensock_command_results_total", result("error")) == 1);
    CHECK(p.types.at("xensock_command_results_total") == "counter");
    CHECK(p.value("xensock_commands_total", with("command", "unknown")) == 2);
    CHECK(p.value("xensock_commands_total", with("command", "poll")) == 0);  // absent counters are 0
    CHECK(p.value("xensock_errors_total", with("errno", "ECONNREFUSED")) == 1);
    CHECK(p.value("xensock_errors_total", with("errno", "ENOTSUPP")) == 2);
    CHECK(p.value("xensock_notifications_sent_total", dom5) == 17);
    CHECK(p.value("xensock_ring_full_stalls_total", dom5) == 3);
    CHECK(p.value("xensock_ring_empty_waits_total", dom5) == 5);
    // Data ring errors, by half and errno; none leaks into the "other" counters.
    auto ring = [&](std::string half, std::string err) {
        auto l = with("half", std::move(half));
        l.emplace_back("errno", std::move(err));
        return l;
    };
    CHECK(p.types.at("xensock_ring_errors_total") == "counter");
    CHECK(p.value("xensock_ring_errors_total", ring("in", "ECONNRESET")) == 3);
    CHECK(p.value("xensock_ring_errors_total", ring("in", "ENOTCONN")) == 1);
    CHECK(p.value("xensock_ring_errors_total", ring("out", "EPIPE")) == 2);
    CHECK(!p.value("xensock_ring_errors_total", ring("out", "ECONNRESET")));
    CHECK(text.find("xensock_ring_errors_in") == std::string::npos);
    // A counter this tool does not know still comes out, as a valid name.
    CHECK(p.value("xensock_brand_new_counter_total", dom5) == 7);
    CHECK(p.value("xensock_bytes_from_guest_total", {{"domid", "6"}, {"protocol", "pvcalls"}}) == 1008);
    for (const auto& [name, type] : p.types) CHECK_MESSAGE(prometheus_valid_metric_name(name), name);
}

TEST_CASE("prometheus: xensock_sessions counts what the daemon serves, also when filtered by domid") {
    json answer = stats_answer("xensock");
    answer["sessions"].erase(1);             // `stats 5`: one session shown...
    answer["daemon"]["sessions"] = 7;        // ...of the 7 the daemon serves
    const auto p = prom::parse(render_prometheus(answer));
    REQUIRE_MESSAGE(p.error.empty(), p.error);
    CHECK(p.value("xensock_sessions", {}) == 7);
    CHECK(render_stats(answer).starts_with("xensockd pid 42, up 1m39s, 7 guest sessions\n"));
}

TEST_CASE("prometheus: no sessions still gives a valid exposition") {
    const auto p = prom::parse(render_prometheus({{"ok", true}, {"sessions", json::array()}}));
    REQUIRE_MESSAGE(p.error.empty(), p.error);
    CHECK(p.value("xensock_sessions", {}) == 0);
    CHECK(p.types.count("xensock_bytes_to_guest_total") == 1);
}

TEST_CASE("prometheus: metric names") {
    CHECK(prometheus_valid_metric_name("xensock_a:b_1"));
    CHECK(!prometheus_valid_metric_name("1a"));
    CHECK(!prometheus_valid_metric_name("a-b"));
    CHECK(!prometheus_valid_metric_name(""));
}

TEST_CASE("tables align columns, numbers to the right, without trailing spaces") {
    Table t({{"NAME"}, {"COUNT", true}, {"NOTE"}});
    t.add({"a", "1", "x"});
    t.add({"longer", "12345", ""});
    CHECK(t.render() ==
          "NAME    COUNT  NOTE\n"
          "a           1  x\n"
          "longer  12345\n");
    CHECK(t.render("  ").starts_with("  NAME"));
    Table bare({{""}, {"", true}}, false);
    bare.add({"k", "1"});
    CHECK(bare.render() == "k  1\n");
}

TEST_CASE("values: durations, xenbus states, errno names") {
    CHECK(format_duration(0) == "0s");
    CHECK(format_duration(59.9) == "59s");
    CHECK(format_duration(123) == "2m03s");
    CHECK(format_duration(3723) == "1h02m");
    CHECK(format_duration(3 * 86400 + 4 * 3600 + 5) == "3d04h");
    CHECK(format_duration(-1) == "0s");
    CHECK(xenbus_state_name(4) == "Connected");
    CHECK(xenbus_state_name(6) == "Closed");
    CHECK(xenbus_state_name(42) == "42");
    CHECK(errno_name(ECONNREFUSED) == "ECONNREFUSED");
    CHECK(errno_name(524) == "ENOTSUPP");
    CHECK(errno_name(100000) == "100000");
}

TEST_CASE("counters: sorted into commands, errnos, known and unknown scalars") {
    const auto c = parse_counters(stats_answer("xensock")["sessions"][0]["counters"]);
    REQUIRE(c.commands.size() == 8);
    CHECK(c.commands[0].name == "socket");
    CHECK(c.commands[1].name == "connect");
    CHECK(c.commands[1].received == 3);
    CHECK(c.commands[1].errors == 1);
    CHECK(c.commands[7].name == "unknown");
    REQUIRE(c.errors_by_errno.size() == 2);
    CHECK(c.errors_by_errno[0] == std::pair<int, uint64_t>{111, 1});
    REQUIRE(c.scalars.size() == 6);
    CHECK(c.scalars[0] == std::pair<std::string, uint64_t>{"notifications_sent", 17});
    REQUIRE(c.other.size() == 1);
    CHECK(c.other[0].first == "brand_new-counter");
    REQUIRE(c.ring_errors.size() == 3);
    CHECK(c.ring_errors[0].half == "in");
    CHECK(c.ring_errors[0].err == 104);
    CHECK(c.ring_errors[0].count == 3);
    CHECK(c.ring_errors[1].err == 107);
    CHECK(c.ring_errors[2].half == "out");
    CHECK(c.ring_errors[2].err == 32);
    CHECK(c.ring_errors[2].count == 2);
}

TEST_CASE("text: list and stats render every session") {
    const auto answer = stats_answer("xensock");
    const auto list = render_list(answer);
    CHECK(list.starts_with("DOMID  PROTOCOL"));
    CHECK(list.find("Connected") != std::string::npos);
    std::istringstream lines(list);
    std::string line;
    size_t width = 0, n = 0;
    while (std::getline(lines, line)) {
        if (width == 0) width = line.size();
        CHECK(line.size() == width);  // last column right-aligned: equal lengths
        ++n;
    }
    CHECK(n == 3);
    const auto stats = render_stats(answer);
    CHECK(stats.find("domid 5 xensock: Connected") != std::string::npos);
    CHECK(stats.find("ECONNREFUSED") != std::string::npos);
    CHECK(stats.find("all 2 sessions") != std::string::npos);
    CHECK(stats.find("ECONNRESET  in        3  Connection reset by peer") != std::string::npos);
    CHECK(stats.find("EPIPE       out       2  Broken pipe") != std::string::npos);
    CHECK(render_list({{"ok", true}, {"sessions", json::array()}}).starts_with("no guest sessions"));
    CHECK(render_sockets({{"ok", true}, {"sessions", json::array()}}) == "no sockets\n");
}

TEST_CASE("text: list --sockets tells the sockets of two devices of one guest apart") {
    json session = {{"domid", 5}, {"protocol", "xensock"}, {"devid", 0}, {"backend_state", 4},
                    {"sockets", json::array({{{"sockid", 3}, {"kind", "passive"}, {"state", "listening"}}})}};
    json second = session;
    second["devid"] = 1;
    json third = session;
    third["protocol"] = "pvcalls";
    const auto text = render_sockets({{"ok", true}, {"sessions", json::array({session, second, third})}});
    INFO(text);
    std::istringstream lines(text);
    std::vector<std::pair<std::string, std::string>> rows;  // DOMID cell, PROTOCOL
    for (std::string line; std::getline(lines, line);) {
        std::istringstream row(line);
        std::string domid, protocol;
        row >> domid >> protocol;
        rows.emplace_back(domid, protocol);
    }
    REQUIRE(rows.size() == 4);
    CHECK(rows[1] == std::pair<std::string, std::string>{"5", "xensock"});
    CHECK(rows[2] == std::pair<std::string, std::string>{"5/1", "xensock"});
    CHECK(rows[3] == std::pair<std::string, std::string>{"5", "pvcalls"});
}
