// ProtocolProfile: the seam between the wire and the engine. The engine
// speaks neutral Requests/Responses and reads data rings through a layout
// table; one profile per protocol turns those into wire bytes and xenstore
// node names. Adding a protocol means adding a profile, nothing else.
#pragma once

#include "xensock/util/result.hpp"
#include "xensock/wire/xen_ring.hpp"

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace xensock::wire {

// Linux's kernel-internal ENOTSUPP, which both protocols use for an unknown
// command (not POSIX ENOTSUP/EOPNOTSUPP 95).
inline constexpr int kENOTSUPP = 524;
// Hard ceiling for any profile: 512 refs of 4 KiB, 1 MiB per direction.
inline constexpr unsigned kHardMaxRingOrder = 9;

enum class Command : uint8_t { socket, connect, release, bind, listen, accept, poll, unknown };
std::string_view command_name(Command c) noexcept;

// A request as copied out of the ring: every field the guest could have
// written, decoded once. Nothing here is validated yet.
struct Request {
    uint32_t req_id = 0;
    uint32_t raw_cmd = 0;
    Command cmd = Command::unknown;
    uint64_t sockid = 0;
    // socket
    uint32_t domain = 0, type = 0, protocol = 0;
    // connect / bind
    std::array<uint8_t, 28> addr{};
    uint32_t addr_len = 0;
    uint32_t flags = 0;
    // connect / accept: the new data ring
    uint32_t ref = 0;
    uint32_t evtchn = 0;
    // listen
    uint32_t backlog = 0;
    // accept
    uint64_t new_sockid = 0;
    // release: the frontend will offer this socket's data ring (same pages,
    // same port) for a later socket. Only PVCalls carries it (release.reuse);
    // a hint the backend may ignore, and xensockd does.
    bool reuse = false;
};

struct Response {
    uint32_t req_id = 0;
    uint32_t raw_cmd = 0;
    uint64_t sockid = 0;  // echoed; for accept the listening socket
    int32_t ret = 0;
};

// Where each field of the data interface page lives.
struct DataIntfLayout {
    uint32_t in_cons, in_prod, in_error;
    uint32_t out_cons, out_prod, out_error;
    uint32_t ring_order;
    uint32_t refs;  // offset of ref[0]
    // Largest number of refs the page can hold: (4096 - refs) / 4.
    uint32_t max_refs() const { return (kRingPageSize - refs) / 4; }
};

// Bytes per direction for a ring order: half of the pages. Both protocols
// agree (each profile's ring_bytes() states its own formula, and a test
// checks they match this); code that serves a protocol asks its profile.
inline constexpr uint32_t ring_bytes_per_direction(unsigned order) { return (4096u << order) / 2; }

struct FrontendParams {
    uint32_t ring_ref = 0;
    uint32_t port = 0;
};
struct BackendParams {
    unsigned max_ring_order = 0;
};

using NodeReader = std::function<std::optional<std::string>(std::string_view node)>;
using NodeList = std::vector<std::pair<std::string, std::string>>;

class ProtocolProfile {
public:
    virtual ~ProtocolProfile() = default;
    // Xenstore device class name: backend/<name>, device/<name>.
    virtual std::string_view name() const = 0;
    virtual unsigned min_ring_order() const = 0;
    virtual const DataIntfLayout& data_layout() const = 0;
    // Bytes per direction (the in half, and the out half) of a data ring of
    // 2^order pages, by the protocol's own formula. order <= kHardMaxRingOrder.
    virtual uint32_t ring_bytes(unsigned order) const = 0;

    // ---- backend
    // The nodes a backend publishes as soon as its directory appears.
    virtual NodeList backend_nodes(unsigned max_ring_order) const = 0;
    // Reads and validates the frontend's transport nodes; the error message
    // says which node was missing or malformed.
    virtual Result<FrontendParams> read_frontend(const NodeReader& read, std::string& why) const = 0;
    virtual Request decode_request(const Slot& slot) const = 0;
    // Zeroes the whole slot, then writes the response (XSA-216).
    virtual void encode_response(std::byte* slot, const Response& rsp) const = 0;

    // ---- frontend (guest library)
    virtual NodeList frontend_nodes(const FrontendParams& params) const = 0;
    virtual Result<BackendParams> read_backend(const NodeReader& read, std::string& why) const = 0;
    virtual void encode_request(std::byte* slot, const Request& req) const = 0;
    virtual Response decode_response(const Slot& slot) const = 0;
};

const ProtocolProfile& xensock_v3_profile();
const ProtocolProfile& pvcalls_v1_profile();
// By xenstore name ("xensock", "pvcalls"); nullptr if unknown.
const ProtocolProfile* find_profile(std::string_view name);
std::vector<const ProtocolProfile*> all_profiles();

// Strict decimal parse of a xenstore value (no sign, no spaces, fits u32).
std::optional<uint32_t> parse_u32(std::string_view text);

}  // namespace xensock::wire
