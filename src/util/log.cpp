#include "xensock/util/log.hpp"

#include <unistd.h>

#include <array>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <string>

namespace xensock::log {
namespace {
std::atomic<int> g_level{static_cast<int>(Level::info)};
std::mutex g_program_mutex;
std::string g_program = "xensock";

constexpr std::array<std::string_view, 4> kNames{"debug", "info", "warn", "error"};
// sd-daemon(3) priority prefixes, so journald keeps the level.
constexpr std::array<std::string_view, 4> kJournalPrefix{"<7>", "<6>", "<4>", "<3>"};

bool to_journal() {
    static const bool journal = getenv("JOURNAL_STREAM") != nullptr;
    return journal;
}
}  // namespace

void set_level(Level l) noexcept { g_level.store(static_cast<int>(l), std::memory_order_relaxed); }
Level level() noexcept { return static_cast<Level>(g_level.load(std::memory_order_relaxed)); }

bool parse_level(std::string_view text, Level& out) noexcept {
    for (size_t i = 0; i < kNames.size(); ++i) {
        if (text == kNames[i]) {
            out = static_cast<Level>(i);
            return true;
        }
    }
    if (text == "off") {
        out = Level::off;
        return true;
    }
    return false;
}

void set_program(std::string_view name) noexcept {
    std::lock_guard lock(g_program_mutex);
    g_program = std::string(name);
}

void write(Level l, std::string_view message) noexcept {
    const auto idx = static_cast<size_t>(l);
    if (idx >= kNames.size()) return;
    std::string line;
    try {
        std::lock_guard lock(g_program_mutex);
        if (to_journal()) {
            line = fmt::format("{}{}: {}\n", kJournalPrefix[idx], g_program, message);
        } else {
            timespec ts{};
            clock_gettime(CLOCK_REALTIME, &ts);
            tm parts{};
            gmtime_r(&ts.tv_sec, &parts);
            line = fmt::format("{:02}:{:02}:{:02}.{:03} {} {}[{}]: {}\n", parts.tm_hour, parts.tm_min,
                               parts.tm_sec, ts.tv_nsec / 1000000, kNames[idx], g_program, getpid(), message);
        }
    } catch (...) {
        return;
    }
    // One write(2) per line keeps lines from different threads whole.
    const char* p = line.data();
    size_t left = line.size();
    while (left > 0) {
        const ssize_t n = ::write(STDERR_FILENO, p, left);
        if (n <= 0) return;
        p += n;
        left -= static_cast<size_t>(n);
    }
}

}  // namespace xensock::log
