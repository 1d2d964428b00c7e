// One logger for every program: levelled, to stderr (or syslog-style prefixes
// for journald), never stdout — stdout belongs to what the user asked for.
#pragma once

#include <fmt/core.h>

#include <atomic>
#include <string_view>

namespace xensock::log {

enum class Level : int { debug = 0, info = 1, warn = 2, error = 3, off = 4 };

void set_level(Level level) noexcept;
Level level() noexcept;
// Parses "debug", "info", "warn", "error", "off"; returns false if unknown.
bool parse_level(std::string_view text, Level& out) noexcept;
// Prefix every line with a program name ("xensockd") so logs are attributable.
void set_program(std::string_view name) noexcept;

void write(Level level, std::string_view message) noexcept;

inline bool enabled(Level l) noexcept { return static_cast<int>(l) >= static_cast<int>(level()); }

template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) {
    if (enabled(Level::debug)) write(Level::debug, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
    if (enabled(Level::info)) write(Level::info, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
    if (enabled(Level::warn)) write(Level::warn, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
    if (enabled(Level::error)) write(Level::error, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace xensock::log
