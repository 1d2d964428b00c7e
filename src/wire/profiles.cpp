// The two protocol profiles. Decoding copies each field out of a local copy
// of the slot (never the shared page); encoding zeroes the slot first.
#include "xensock/wire/profile.hpp"
#include "xensock/wire/pvcalls_v1.hpp"
#include "xensock/wire/xensock_v3.hpp"

#include <fmt/core.h>

#include <charconv>
#include <cstddef>
#include <cstring>

namespace xensock::wire {

std::string_view command_name(Command c) noexcept {
    switch (c) {
        case Command::socket: return "socket";
        case Command::connect: return "connect";
        case Command::release: return "release";
        case Command::bind: return "bind";
        case Command::listen: return "listen";
        case Command::accept: return "accept";
        case Command::poll: return "poll";
        case Command::unknown: break;
    }
    return "unknown";
}

std::optional<uint32_t> parse_u32(std::string_view text) {
    if (text.empty() || text.size() > 10) return std::nullopt;
    uint32_t value = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value, 10);
    if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
    return value;
}

namespace {

// Both protocols number their commands the same way.
Command command_from_wire(uint32_t raw) {
    switch (raw) {
        case 0: return Command::socket;
        case 1: return Command::connect;
        case 2: return Command::release;
        case 3: return Command::bind;
        case 4: return Command::listen;
        case 5: return Command::accept;
        case 6: return Command::poll;
        default: return Command::unknown;
    }
}
uint32_t command_to_wire(Command c) { return static_cast<uint32_t>(c); }

template <typename T>
T copy_from(const void* p) {
    T out;
    std::memcpy(&out, p, sizeof out);
    return out;
}

Result<uint32_t> read_u32_node(const NodeReader& read, std::string_view node, std::string& why) {
    auto value = read(node);
    if (!value) {
        why = fmt::format("frontend node '{}' is missing", node);
        return Errno{ENOENT};
    }
    auto parsed = parse_u32(*value);
    if (!parsed) {
        why = fmt::format("frontend node '{}' is not a decimal u32: '{:.32}'", node, *value);
        return Errno{EINVAL};
    }
    return *parsed;
}

Result<FrontendParams> read_ring_and_port(const NodeReader& read, std::string& why) {
    auto ring_ref = read_u32_node(read, "ring-ref", why);
    if (!ring_ref) return Errno{ring_ref.error()};
    auto port = read_u32_node(read, "port", why);
    if (!port) return Errno{port.error()};
    return FrontendParams{*ring_ref, *port};
}

// A profile's data interface layout, taken from its static_asserted struct
// so the table and the struct cannot disagree.
template <typename Intf>
const DataIntfLayout& data_layout_of() {
    static constexpr DataIntfLayout layout{
        .in_cons = offsetof(Intf, in_cons),
        .in_prod = offsetof(Intf, in_prod),
        .in_error = offsetof(Intf, in_error),
        .out_cons = offsetof(Intf, out_cons),
        .out_prod = offsetof(Intf, out_prod),
        .out_error = offsetof(Intf, out_error),
        .ring_order = offsetof(Intf, ring_order),
        .refs = offsetof(Intf, ref),
    };
    return layout;
}

// ------------------------------------------------------------ XenSock v3
class XensockV3 final : public ProtocolProfile {
public:
    std::string_view name() const override { return xensock_v3::kNodeName; }
    unsigned min_ring_order() const override { return xensock_v3::kMinRingOrder; }
    // The seed: in[((1<<ring_order)<<PAGE_SHIFT)/2], out the same.
    uint32_t ring_bytes(unsigned order) const override { return ((uint32_t{1} << order) << 12) / 2; }
    const DataIntfLayout& data_layout() const override {
        return data_layout_of<xensock_v3::DataIntf>();
    }

    NodeList backend_nodes(unsigned max_order) const override {
        return {{"max-dataring-page-order", std::to_string(max_order)}};
    }
    Result<FrontendParams> read_frontend(const NodeReader& read, std::string& why) const override {
        return read_ring_and_port(read, why);
    }
    Request decode_request(const Slot& slot) const override {
        const auto w = copy_from<xensock_v3::Request>(slot);
        Request r;
        r.req_id = w.id;
        r.raw_cmd = w.cmd;
        r.cmd = command_from_wire(w.cmd);
        r.sockid = w.sockid;
        switch (r.cmd) {
            case Command::socket:
                r.domain = w.u.socket.domain, r.type = w.u.socket.type, r.protocol = w.u.socket.protocol;
                break;
            case Command::connect:
                std::memcpy(r.addr.data(), w.u.connect.addr, r.addr.size());
                r.addr_len = w.u.connect.len, r.flags = w.u.connect.flags;
                r.ref = w.u.connect.ref, r.evtchn = w.u.connect.evtchn;
                break;
            case Command::bind:
                std::memcpy(r.addr.data(), w.u.bind.addr, r.addr.size());
                r.addr_len = w.u.bind.len;
                break;
            case Command::listen: r.backlog = w.u.listen.backlog; break;
            case Command::accept:
                r.new_sockid = w.u.accept.sockid, r.ref = w.u.accept.ref, r.evtchn = w.u.accept.evtchn;
                break;
            default: break;
        }
        return r;
    }
    void encode_response(std::byte* slot, const Response& rsp) const override {
        std::memset(slot, 0, kSlotSize);
        xensock_v3::Response w{};
        w.id = rsp.req_id, w.cmd = rsp.raw_cmd, w.sockid = rsp.sockid, w.ret = rsp.ret;
        std::memcpy(slot, &w, sizeof w);
    }

    NodeList frontend_nodes(const FrontendParams& p) const override {
        return {{"ring-ref", std::to_string(p.ring_ref)}, {"port", std::to_string(p.port)}};
    }
    Result<BackendParams> read_backend(const NodeReader& read, std::string& why) const override {
        auto order = read("max-dataring-page-order");
        auto parsed = order ? parse_u32(*order) : std::nullopt;
        if (!parsed) {
            why = "backend node 'max-dataring-page-order' is missing or malformed";
            return Errno{EINVAL};
        }
        return BackendParams{*parsed};
    }
    void encode_request(std::byte* slot, const Request& r) const override {
        xensock_v3::Request w{};
        w.id = r.req_id, w.cmd = r.cmd == Command::unknown ? r.raw_cmd : command_to_wire(r.cmd);
        w.sockid = r.sockid;
        switch (r.cmd) {
            case Command::socket:
                w.u.socket.domain = r.domain, w.u.socket.type = r.type, w.u.socket.protocol = r.protocol;
                break;
            case Command::connect:
                std::memcpy(w.u.connect.addr, r.addr.data(), r.addr.size());
                w.u.connect.len = r.addr_len, w.u.connect.flags = r.flags;
                w.u.connect.ref = r.ref, w.u.connect.evtchn = r.evtchn;
                break;
            case Command::bind:
                std::memcpy(w.u.bind.addr, r.addr.data(), r.addr.size());
                w.u.bind.len = r.addr_len;
                break;
            case Command::listen: w.u.listen.backlog = r.backlog; break;
            case Command::accept:
                w.u.accept.sockid = r.new_sockid, w.u.accept.ref = r.ref, w.u.accept.evtchn = r.evtchn;
                break;
            default: break;
        }
        std::memcpy(slot, &w, sizeof w);
    }
    Response decode_response(const Slot& slot) const override {
        const auto w = copy_from<xensock_v3::Response>(slot);
        return Response{w.id, w.cmd, w.sockid, w.ret};
    }
};

// ------------------------------------------------------------ PVCalls v1
class PvcallsV1 final : public ProtocolProfile {
public:
    std::string_view name() const override { return pvcalls_v1::kNodeName; }
    unsigned min_ring_order() const override { return pvcalls_v1::kMinRingOrder; }
    // pvcalls.h: XEN_FLEX_RING_SIZE(order) = 1 << (order + XEN_PAGE_SHIFT - 1).
    uint32_t ring_bytes(unsigned order) const override { return uint32_t{1} << (order + 12 - 1); }
    const DataIntfLayout& data_layout() const override {
        return data_layout_of<pvcalls_v1::DataIntf>();
    }

    NodeList backend_nodes(unsigned max_order) const override {
        return {{"versions", pvcalls_v1::kVersion},
                {"max-page-order", std::to_string(max_order)},
                {"function-calls", "1"}};
    }
    Result<FrontendParams> read_frontend(const NodeReader& read, std::string& why) const override {
        auto version = read("version");
        if (!version || *version != pvcalls_v1::kVersion) {
            why = fmt::format("frontend node 'version' is '{:.16}', this backend speaks only \"1\"",
                              version.value_or("(missing)"));
            return Errno{EINVAL};
        }
        return read_ring_and_port(read, why);
    }
    Request decode_request(const Slot& slot) const override {
        const auto w = copy_from<pvcalls_v1::Request>(slot);
        Request r;
        r.req_id = w.req_id;
        r.raw_cmd = w.cmd;
        r.cmd = command_from_wire(w.cmd);
        // Every union member starts with the socket id at offset 8.
        r.sockid = w.u.socket.id;
        switch (r.cmd) {
            case Command::socket:
                r.domain = w.u.socket.domain, r.type = w.u.socket.type, r.protocol = w.u.socket.protocol;
                break;
            case Command::connect:
                std::memcpy(r.addr.data(), w.u.connect.addr, r.addr.size());
                r.addr_len = w.u.connect.len, r.flags = w.u.connect.flags;
                r.ref = w.u.connect.ref, r.evtchn = w.u.connect.evtchn;
                break;
            case Command::bind:
                std::memcpy(r.addr.data(), w.u.bind.addr, r.addr.size());
                r.addr_len = w.u.bind.len;
                break;
            case Command::listen: r.backlog = w.u.listen.backlog; break;
            case Command::accept:
                r.new_sockid = w.u.accept.id_new, r.ref = w.u.accept.ref, r.evtchn = w.u.accept.evtchn;
                break;
            default: break;  // release.reuse is a hint we ignore; pad is ignored
        }
        return r;
    }
    void encode_response(std::byte* slot, const Response& rsp) const override {
        std::memset(slot, 0, kSlotSize);
        pvcalls_v1::Response w{};
        w.req_id = rsp.req_id, w.cmd = rsp.raw_cmd, w.ret = rsp.ret, w.id = rsp.sockid;
        std::memcpy(slot, &w, sizeof w);
    }

    NodeList frontend_nodes(const FrontendParams& p) const override {
        return {{"version", pvcalls_v1::kVersion},
                {"ring-ref", std::to_string(p.ring_ref)},
                {"port", std::to_string(p.port)}};
    }
    Result<BackendParams> read_backend(const NodeReader& read, std::string& why) const override {
        auto versions = read("versions");
        if (!versions || *versions != pvcalls_v1::kVersion) {
            why = "backend node 'versions' is not \"1\"";
            return Errno{EINVAL};
        }
        auto order = read("max-page-order");
        auto parsed = order ? parse_u32(*order) : std::nullopt;
        if (!parsed) {
            why = "backend node 'max-page-order' is missing or malformed";
            return Errno{EINVAL};
        }
        return BackendParams{*parsed};
    }
    void encode_request(std::byte* slot, const Request& r) const override {
        pvcalls_v1::Request w{};
        w.req_id = r.req_id, w.cmd = r.cmd == Command::unknown ? r.raw_cmd : command_to_wire(r.cmd);
        w.u.socket.id = r.sockid;
        switch (r.cmd) {
            case Command::socket:
                w.u.socket.domain = r.domain, w.u.socket.type = r.type, w.u.socket.protocol = r.protocol;
                break;
            case Command::connect:
                std::memcpy(w.u.connect.addr, r.addr.data(), r.addr.size());
                w.u.connect.len = r.addr_len, w.u.connect.flags = r.flags;
                w.u.connect.ref = r.ref, w.u.connect.evtchn = r.evtchn;
                break;
            case Command::bind:
                std::memcpy(w.u.bind.addr, r.addr.data(), r.addr.size());
                w.u.bind.len = r.addr_len;
                break;
            case Command::listen: w.u.listen.backlog = r.backlog; break;
            case Command::accept:
                w.u.accept.id_new = r.new_sockid, w.u.accept.ref = r.ref, w.u.accept.evtchn = r.evtchn;
                break;
            case Command::release: w.u.release.reuse = r.reuse ? 1 : 0; break;
            default: break;
        }
        std::memcpy(slot, &w, sizeof w);
    }
    Response decode_response(const Slot& slot) const override {
        const auto w = copy_from<pvcalls_v1::Response>(slot);
        return Response{w.req_id, w.cmd, w.id, w.ret};
    }
};

}  // namespace

const ProtocolProfile& xensock_v3_profile() {
    static const XensockV3 profile;
    return profile;
}
const ProtocolProfile& pvcalls_v1_profile() {
    static const PvcallsV1 profile;
    return profile;
}
std::vector<const ProtocolProfile*> all_profiles() { return {&xensock_v3_profile(), &pvcalls_v1_profile()}; }
const ProtocolProfile* find_profile(std::string_view name) {
    for (const auto* p : all_profiles())
        if (p->name() == name) return p;
    return nullptr;
}

}  // namespace xensock::wire
