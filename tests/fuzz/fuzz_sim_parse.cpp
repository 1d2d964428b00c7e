// Fuzz target: the sim platform's parse of a `<P>.remote` file, which the
// process offering a port writes (shared/spec/sim-platform.md): the only
// guest-written sim input with a pure parser. The event-channel datagram and
// grant-entry checks live inside SimEventChannel / SimGrantMapper and are
// exercised by the sim tests instead.
//
// Invariant: parse_domid accepts exactly one to five ASCII digits ("32751"
// is the longest domid; leading zeros beyond five digits are refused) with at
// most one trailing newline, whose value is at most 32751 (0x7FEF), and
// returns that value.
#include "fuzz_support.hpp"

#include "sim_internal.hpp"

#include <optional>
#include <string_view>

namespace {

std::optional<uint32_t> reference_domid(std::string_view t) {
    if (!t.empty() && t.back() == '\n') t.remove_suffix(1);
    if (t.empty() || t.size() > 5) return std::nullopt;
    uint64_t v = 0;
    for (char c : t) {
        if (c < '0' || c > '9') return std::nullopt;
        v = v * 10 + static_cast<uint64_t>(c - '0');
        if (v > 0x7FEF) return std::nullopt;
    }
    return static_cast<uint32_t>(v);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const auto got = xensock::platform::sim::parse_domid(text);
    const auto want = reference_domid(text);
    FUZZ_CHECK(got == want);
    if (got) FUZZ_CHECK(*got <= xensock::platform::sim::kMaxDomId);
    return 0;
}
