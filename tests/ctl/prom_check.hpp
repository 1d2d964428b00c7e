// A strict checker for the Prometheus text exposition format (0.0.4), so
// the tests do not just trust the renderer: every line must be a HELP or
// TYPE comment or a sample, per the grammar at
// https://prometheus.io/docs/instrumenting/exposition_formats/
// plus xensock's own conventions (xensock_ prefix, HELP and TYPE for every
// family, counters end in _total).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace xensock::testing::prom {

struct Sample {
    std::string name;
    std::vector<std::pair<std::string, std::string>> labels;  // unescaped values
    double value = 0;
    std::string label(std::string_view key) const {
        for (const auto& [k, v] : labels)
            if (k == key) return v;
        return {};
    }
};

struct Parsed {
    std::string error;  // empty when the text is valid
    std::map<std::string, std::string> types, helps;
    std::vector<Sample> samples;
    // The value of `name` whose labels include all of `match`; nullopt if none.
    std::optional<double> value(std::string_view name,
                                const std::vector<std::pair<std::string, std::string>>& match) const {
        for (const auto& s : samples) {
            if (s.name != name) continue;
            bool all = true;
            for (const auto& [k, v] : match) all = all && s.label(k) == v;
            if (all) return s.value;
        }
        return std::nullopt;
    }
};

inline bool metric_name_ok(std::string_view n) {
    if (n.empty()) return false;
    for (size_t i = 0; i < n.size(); ++i) {
        const char c = n[i];
        const bool a = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        if (!a && !(i > 0 && c >= '0' && c <= '9')) return false;
    }
    return true;
}
inline bool label_name_ok(std::string_view n) {
    if (n.empty() || n.starts_with("__")) return false;
    for (size_t i = 0; i < n.size(); ++i) {
        const char c = n[i];
        const bool a = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
        if (!a && !(i > 0 && c >= '0' && c <= '9')) return false;
    }
    return true;
}

// Go's ParseFloat forms that Prometheus accepts, plus NaN and ±Inf.
inline bool parse_value(std::string_view text, double& out) {
    if (text == "NaN") return out = NAN, true;
    if (text == "+Inf" || text == "Inf") return out = INFINITY, true;
    if (text == "-Inf") return out = -INFINITY, true;
    if (text.empty()) return false;
    const std::string s(text);
    char* end = nullptr;
    out = std::strtod(s.c_str(), &end);
    return end == s.c_str() + s.size() && !std::isnan(out) && !std::isinf(out);
}

// Unescapes a HELP text (\\ and \n only); false on any other escape.
inline bool unescape_help(std::string_view in, std::string& out) {
    for (size_t i = 0; i < in.size(); ++i) {
        if (in[i] != '\\') {
            out += in[i];
            continue;
        }
        if (++i == in.size()) return false;
        if (in[i] == '\\') out += '\\';
        else if (in[i] == 'n') out += '\n';
        else return false;
    }
    return true;
}

inline Parsed parse(std::string_view text) {
    Parsed p;
    auto fail = [&](size_t line_no, std::string_view line, const std::string& why) {
        p.error = "line " + std::to_string(line_no) + ": " + why + ": " + std::string(line);
        return p;
    };
    if (!text.empty() && text.back() != '\n') return fail(0, "", "output does not end in a newline");
    std::set<std::string> closed;  // families whose block ended
    std::string current;           // family of the last line
    std::set<std::string> series;  // name + labels, for duplicates
    size_t line_no = 0;
    size_t start = 0;
    while (start < text.size()) {
        const size_t end = text.find('\n', start);
        const std::string_view line = text.substr(start, end - start);
        start = end + 1;
        ++line_no;
        if (line.empty()) return fail(line_no, line, "empty line");
        auto enter_family = [&](const std::string& family) -> bool {
            if (family == current) return true;
            if (closed.count(family)) return false;  // its lines must be contiguous
            if (!current.empty()) closed.insert(current);
            current = family;
            return true;
        };
        if (line[0] == '#') {
            if (!line.starts_with("# HELP ") && !line.starts_with("# TYPE ")) continue;  // plain comment
            const bool help = line[2] == 'H';
            const std::string_view rest = line.substr(7);
            const size_t sp = rest.find(' ');
            if (sp == std::string_view::npos) return fail(line_no, line, "HELP/TYPE without text");
            const std::string name(rest.substr(0, sp));
            const std::string_view body = rest.substr(sp + 1);
            if (!metric_name_ok(name)) return fail(line_no, line, "bad metric name");
            if (!enter_family(name)) return fail(line_no, line, "family lines not contiguous");
            if (help) {
                std::string h;
                if (!unescape_help(body, h)) return fail(line_no, line, "bad escape in HELP");
                if (p.helps.count(name)) return fail(line_no, line, "second HELP");
                p.helps[name] = h;
            } else {
                if (body != "counter" && body != "gauge" && body != "histogram" && body != "summary" &&
                    body != "untyped")
                    return fail(line_no, line, "unknown TYPE");
                if (p.types.count(name)) return fail(line_no, line, "second TYPE");
                for (const auto& s : p.samples)
                    if (s.name == name) return fail(line_no, line, "TYPE after samples");
                p.types[name] = std::string(body);
            }
            continue;
        }
        // Sample: name [ "{" label="value" { "," label="value" } [","] "}" ] value [ timestamp ]
        Sample s;
        size_t i = 0;
        while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
        s.name = std::string(line.substr(0, i));
        if (!metric_name_ok(s.name)) return fail(line_no, line, "bad metric name");
        if (i < line.size() && line[i] == '{') {
            ++i;
            while (true) {
                if (i < line.size() && line[i] == '}') {
                    ++i;
                    break;
                }
                const size_t eq = line.find('=', i);
                if (eq == std::string_view::npos) return fail(line_no, line, "label without '='");
                const std::string key(line.substr(i, eq - i));
                if (!label_name_ok(key)) return fail(line_no, line, "bad label name '" + key + "'");
                i = eq + 1;
                if (i >= line.size() || line[i] != '"') return fail(line_no, line, "label value not quoted");
                ++i;
                std::string value;
                bool closed_quote = false;
                while (i < line.size()) {
                    const char c = line[i++];
                    if (c == '"') {
                        closed_quote = true;
                        break;
                    }
                    if (c != '\\') {
                        value += c;
                        continue;
                    }
                    if (i >= line.size()) break;
                    const char e = line[i++];
                    if (e == '\\') value += '\\';
                    else if (e == '"') value += '"';
                    else if (e == 'n') value += '\n';
                    else return fail(line_no, line, "bad escape in label value");
                }
                if (!closed_quote) return fail(line_no, line, "unterminated label value");
                for (const auto& [k, _] : s.labels)
                    if (k == key) return fail(line_no, line, "label '" + key + "' twice");
                s.labels.emplace_back(key, value);
                if (i < line.size() && line[i] == ',') ++i;
                else if (i < line.size() && line[i] == '}') continue;
                else return fail(line_no, line, "expected ',' or '}' after a label");
            }
        }
        if (i >= line.size() || line[i] != ' ') return fail(line_no, line, "no value");
        const std::string_view rest = line.substr(i + 1);
        const size_t sp = rest.find(' ');
        if (!parse_value(rest.substr(0, sp), s.value)) return fail(line_no, line, "bad value");
        if (sp != std::string_view::npos) {
            const std::string ts(rest.substr(sp + 1));
            char* e = nullptr;
            (void)std::strtoll(ts.c_str(), &e, 10);
            if (ts.empty() || *e != '\0') return fail(line_no, line, "bad timestamp");
        }
        // For our counters and gauges the family is the sample name.
        if (!enter_family(s.name)) return fail(line_no, line, "family lines not contiguous");
        std::string key = s.name;
        auto sorted = s.labels;
        std::sort(sorted.begin(), sorted.end());
        for (const auto& [k, v] : sorted) key += "\x1f" + k + "=" + v;
        if (!series.insert(key).second) return fail(line_no, line, "duplicate series");
        p.samples.push_back(std::move(s));
    }
    // xensock's conventions on top of the format.
    for (const auto& [name, type] : p.types) {
        if (!name.starts_with("xensock_")) return p.error = "metric without xensock_ prefix: " + name, p;
        if (!p.helps.count(name)) return p.error = "no HELP for " + name, p;
        if (type == "counter" && !name.ends_with("_total")) return p.error = "counter not ending in _total: " + name, p;
        if (type != "counter" && name.ends_with("_total")) return p.error = "non-counter ending in _total: " + name, p;
    }
    for (const auto& s : p.samples) {
        if (!p.types.count(s.name)) return p.error = "sample without TYPE: " + s.name, p;
        const auto& type = p.types[s.name];
        if (type == "counter" && (s.value < 0 || s.value != std::floor(s.value)))
            return p.error = "counter with a negative or fractional value: " + s.name, p;
    }
    return p;
}

}  // namespace xensock::testing::prom
