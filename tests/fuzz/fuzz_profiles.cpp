// Fuzz target: what both protocol profiles do with guest-controlled bytes.
//
// Input: [profile selector][64-byte request slot][64-byte mask]
//        [response: req_id u32, cmd u32, id u64, ret i32][xenstore values...]
//
// Invariants:
// - decode_request: every decoded field equals the bytes at the offset
//   shared/spec/protocols.md documents for that command; fields the command
//   does not have stay zero;
// - bytes a command does not use (pads, the other union members, PVCalls
//   release.reuse) do not change what is decoded, whatever they hold;
// - encode_request of a decoded request decodes back to it, in a slot that
//   held garbage, and leaves every unused byte zero;
// - encode_response writes each field at its offset, zeroes every other byte
//   of the slot (XSA-216), and decode_response gives the response back;
// - the response the engine builds from a request (req_id, raw cmd, sockid)
//   echoes the request's id bytes exactly;
// - read_frontend / read_backend / parse_u32 accept exactly the strict
//   decimal u32 values (and PVCalls' version "1"), say why otherwise.
#include "fuzz_support.hpp"

#include "xensock/wire/profile.hpp"

#include <cerrno>
#include <map>
#include <optional>
#include <string>
#include <string_view>

namespace {

using namespace xensock;
using fuzz::load_at;

bool same(const wire::Request& a, const wire::Request& b) {
    return a.req_id == b.req_id && a.raw_cmd == b.raw_cmd && a.cmd == b.cmd && a.sockid == b.sockid &&
           a.domain == b.domain && a.type == b.type && a.protocol == b.protocol && a.addr == b.addr &&
           a.addr_len == b.addr_len && a.flags == b.flags && a.ref == b.ref && a.evtchn == b.evtchn &&
           a.backlog == b.backlog && a.new_sockid == b.new_sockid;
}

wire::Command expected_command(uint32_t raw) {
    return raw <= 6 ? static_cast<wire::Command>(raw) : wire::Command::unknown;
}

// The request as shared/spec/protocols.md lays it out: identical payload
// offsets in both protocols (XenSock sockid@8, PVCalls id@8).
wire::Request expected_request(const wire::Slot& s) {
    wire::Request e;
    e.req_id = load_at<uint32_t>(s, 0);
    e.raw_cmd = load_at<uint32_t>(s, 4);
    e.cmd = expected_command(e.raw_cmd);
    e.sockid = load_at<uint64_t>(s, 8);
    switch (e.cmd) {
        case wire::Command::socket:
            e.domain = load_at<uint32_t>(s, 16), e.type = load_at<uint32_t>(s, 20);
            e.protocol = load_at<uint32_t>(s, 24);
            break;
        case wire::Command::connect:
            std::memcpy(e.addr.data(), s + 16, 28);
            e.addr_len = load_at<uint32_t>(s, 44), e.flags = load_at<uint32_t>(s, 48);
            e.ref = load_at<uint32_t>(s, 52), e.evtchn = load_at<uint32_t>(s, 56);
            break;
        case wire::Command::bind:
            std::memcpy(e.addr.data(), s + 16, 28);
            e.addr_len = load_at<uint32_t>(s, 44);
            break;
        case wire::Command::listen: e.backlog = load_at<uint32_t>(s, 16); break;
        case wire::Command::accept:
            e.new_sockid = load_at<uint64_t>(s, 16), e.ref = load_at<uint32_t>(s, 24);
            e.evtchn = load_at<uint32_t>(s, 28);
            break;
        default: break;  // release (reuse is ignored), poll, unknown: ids only
    }
    return e;
}

// One past the last byte a command's fields use; everything after is pad.
size_t used_bytes(wire::Command c) {
    switch (c) {
        case wire::Command::socket: return 28;
        case wire::Command::connect: return 60;
        case wire::Command::bind: return 48;
        case wire::Command::listen: return 20;
        case wire::Command::accept: return 32;
        default: return 16;
    }
}

bool zero_from(const std::byte* p, size_t from, size_t to) {
    for (size_t i = from; i < to; ++i)
        if (p[i] != std::byte{0}) return false;
    return true;
}

// Strict decimal u32, the reference parse_u32 is checked against.
std::optional<uint32_t> reference_u32(std::string_view t) {
    if (t.empty() || t.size() > 10) return std::nullopt;
    uint64_t v = 0;
    for (char ch : t) {
        if (ch < '0' || ch > '9') return std::nullopt;
        v = v * 10 + static_cast<uint64_t>(ch - '0');
    }
    if (v > UINT32_MAX) return std::nullopt;
    return static_cast<uint32_t>(v);
}

void check_requests(const wire::ProtocolProfile& p, const wire::Slot& slot, const uint8_t (&mask)[64]) {
    const wire::Request r = p.decode_request(slot);
    FUZZ_CHECK(same(r, expected_request(slot)));

    // Unused bytes, whatever they are, change nothing.
    const size_t used = used_bytes(r.cmd);
    wire::Slot other;
    std::memcpy(other, slot, sizeof other);
    for (size_t i = used; i < wire::kSlotSize; ++i) other[i] ^= std::byte{mask[i]};
    FUZZ_CHECK(same(p.decode_request(other), r));
    for (size_t i = used; i < wire::kSlotSize; ++i) other[i] = std::byte{0xFF};
    FUZZ_CHECK(same(p.decode_request(other), r));

    // The frontend's encoder: a round trip through a slot full of garbage.
    wire::Slot encoded;
    std::memset(encoded, 0xAA, sizeof encoded);
    p.encode_request(encoded, r);
    FUZZ_CHECK(same(p.decode_request(encoded), r));
    FUZZ_CHECK(std::memcmp(encoded, slot, used) == 0);
    FUZZ_CHECK(zero_from(encoded, used, wire::kSlotSize));

    // What the engine answers: ids echoed byte for byte.
    const int32_t ret = -static_cast<int32_t>(load_at<uint8_t>(mask, 0));
    wire::Slot answer;
    std::memset(answer, 0x5A, sizeof answer);
    p.encode_response(answer, wire::Response{r.req_id, r.raw_cmd, r.sockid, ret});
    FUZZ_CHECK(std::memcmp(answer, slot, 8) == 0);  // req_id, cmd
    const size_t id_at = p.name() == "pvcalls" ? 16 : 8;
    FUZZ_CHECK(std::memcmp(answer + id_at, slot + 8, 8) == 0);
}

void check_response(const wire::ProtocolProfile& p, fuzz::Input& in) {
    wire::Response rsp;
    rsp.req_id = in.u32();
    rsp.raw_cmd = in.u32();
    rsp.sockid = in.u64();
    rsp.ret = in.get<int32_t>();
    wire::Slot slot;
    std::memset(slot, 0xA5, sizeof slot);
    p.encode_response(slot, rsp);
    FUZZ_CHECK(load_at<uint32_t>(slot, 0) == rsp.req_id);
    FUZZ_CHECK(load_at<uint32_t>(slot, 4) == rsp.raw_cmd);
    if (p.name() == "pvcalls") {  // req_id@0 cmd@4 ret@8 pad@12 id@16
        FUZZ_CHECK(load_at<int32_t>(slot, 8) == rsp.ret);
        FUZZ_CHECK(load_at<uint32_t>(slot, 12) == 0u);
        FUZZ_CHECK(load_at<uint64_t>(slot, 16) == rsp.sockid);
    } else {  // id@0 cmd@4 sockid@8 ret@16, tail padding to 24
        FUZZ_CHECK(load_at<uint64_t>(slot, 8) == rsp.sockid);
        FUZZ_CHECK(load_at<int32_t>(slot, 16) == rsp.ret);
        FUZZ_CHECK(zero_from(slot, 20, 24));
    }
    FUZZ_CHECK(zero_from(slot, 24, wire::kSlotSize));
    const wire::Response back = p.decode_response(slot);
    FUZZ_CHECK(back.req_id == rsp.req_id && back.raw_cmd == rsp.raw_cmd && back.sockid == rsp.sockid &&
               back.ret == rsp.ret);
}

// The rest of the input as xenstore node values: NUL-separated; an empty
// value with the first byte 0x01 stands for a missing node.
void check_nodes(const wire::ProtocolProfile& p, fuzz::Input& in) {
    std::string rest(in.remaining(), '\0');
    in.bytes(rest.data(), rest.size());
    std::vector<std::optional<std::string>> values;
    size_t start = 0;
    while (values.size() < 4) {
        const size_t end = std::min(rest.find('\0', start), rest.size());
        std::string v = start <= rest.size() ? rest.substr(start, end - start) : std::string();
        if (v == "\x01") values.emplace_back(std::nullopt);
        else values.emplace_back(std::move(v));
        start = end + 1;
    }
    for (const auto& v : values)
        if (v) FUZZ_CHECK(wire::parse_u32(*v) == reference_u32(*v));

    const bool pv = p.name() == "pvcalls";
    // Frontend nodes (guest-written): [version], ring-ref, port.
    std::map<std::string, std::optional<std::string>, std::less<>> nodes{
        {"version", values[0]}, {"ring-ref", values[1]}, {"port", values[2]}};
    const wire::NodeReader read = [&](std::string_view node) -> std::optional<std::string> {
        auto it = nodes.find(node);
        return it == nodes.end() ? std::nullopt : it->second;
    };
    std::string why;
    auto fe = p.read_frontend(read, why);
    const bool version_ok = !pv || values[0] == std::optional<std::string>("1");
    const auto ring_ref = values[1] ? reference_u32(*values[1]) : std::nullopt;
    const auto port = values[2] ? reference_u32(*values[2]) : std::nullopt;
    if (version_ok && ring_ref && port) {
        FUZZ_CHECK(fe.ok());
        FUZZ_CHECK(fe->ring_ref == *ring_ref && fe->port == *port);
    } else {
        FUZZ_CHECK(!fe.ok());
        FUZZ_CHECK(!why.empty());
        // The first bad node decides the errno: missing ENOENT, malformed EINVAL.
        int want = EINVAL;
        if (version_ok) {
            const auto& first_bad = ring_ref ? values[2] : values[1];
            want = first_bad ? EINVAL : ENOENT;
        }
        FUZZ_CHECK(fe.error() == want);
    }

    // Backend nodes, as the guest library reads them.
    nodes = {{"versions", values[0]}, {"max-page-order", values[3]}, {"max-dataring-page-order", values[3]}};
    why.clear();
    auto be = p.read_backend(read, why);
    const auto order = values[3] ? reference_u32(*values[3]) : std::nullopt;
    if (version_ok && order) {
        FUZZ_CHECK(be.ok() && be->max_ring_order == *order);
    } else {
        FUZZ_CHECK(!be.ok() && !why.empty());
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::Input in(data, size);
    const wire::ProtocolProfile& p = (in.u8() & 1) ? wire::pvcalls_v1_profile() : wire::xensock_v3_profile();
    wire::Slot slot;
    in.bytes(slot, sizeof slot);
    uint8_t mask[64];
    in.bytes(mask, sizeof mask);
    check_requests(p, slot, mask);
    check_response(p, in);
    check_nodes(p, in);
    return 0;
}
