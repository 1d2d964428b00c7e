// Private to the sim platform (shared/spec/sim-platform.md): file layout,
// wire constants, and the state its pieces share. Nothing outside
// src/platform/sim includes this.
#pragma once

#include "xensock/platform/platform.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace xensock::platform::sim {

// Domain ids: 0..32751 (DOMID_FIRST_RESERVED is 0x7FF0).
inline constexpr DomId kMaxDomId = 0x7FEF;

// Grant table v1 (xen/include/public/grant_table.h).
inline constexpr uint32_t kGrantEntries = 32768;
inline constexpr uint32_t kReservedRefs = 8;  // GNTTAB_NR_RESERVED_ENTRIES
inline constexpr size_t kGrantEntrySize = 8;
inline constexpr size_t kGrantTableBytes = kGrantEntries * kGrantEntrySize;
inline constexpr uint16_t kGtfPermitAccess = 1;
inline constexpr uint16_t kGtfTypeMask = 3;
inline constexpr uint16_t kGtfReadonly = 4;

// Event channels. Ports 1..2^17-1, the FIFO ABI's limit: a PVCalls backend
// binds one port per active socket, so the 2-level ABI's 4095 is too few.
inline constexpr Port kMaxPort = (1u << 17) - 1;
inline constexpr uint32_t kEvMagic = 0x58534556;  // "XSEV"
enum class EvOp : uint32_t { bind = 1, notify = 2, close = 3 };

// On the wire: four little-endian uint32.
struct EvDatagram {
    uint32_t magic;
    uint32_t op;
    uint32_t dom;
    uint32_t port;
};
static_assert(sizeof(EvDatagram) == 16);

// The longest event-channel socket path below a root is
// ROOT + "/dom32751/evtchn/131071"; it must fit sockaddr_un::sun_path with
// its terminating NUL.
inline constexpr size_t kLongestSocketSuffix = sizeof("/dom32751/evtchn/131071") - 1;
inline constexpr size_t kMaxRootLength = sizeof(sockaddr_un::sun_path) - 1 - kLongestSocketSuffix;

// Owns one file descriptor.
class UniqueFd {
public:
    UniqueFd() = default;
    explicit UniqueFd(int fd) noexcept : fd_(fd) {}
    UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    UniqueFd& operator=(UniqueFd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    UniqueFd(const UniqueFd&) = delete;
    UniqueFd& operator=(const UniqueFd&) = delete;
    ~UniqueFd() { reset(); }

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    void reset() noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

private:
    int fd_ = -1;
};

inline std::string dom_dir(const std::string& root, DomId d) { return root + "/dom" + std::to_string(d); }
inline std::string evtchn_dir(const std::string& root, DomId d) { return dom_dir(root, d) + "/evtchn"; }
inline std::string port_path(const std::string& root, DomId d, Port p) {
    return evtchn_dir(root, d) + "/" + std::to_string(p);
}

// Decimal domain id as the contract stores it in `<P>.remote`: one or more
// ASCII digits, at most one trailing newline, value <= kMaxDomId.
std::optional<DomId> parse_domid(std::string_view text) noexcept;

// Local ports in use by this process in its own domain. Shared by every
// EventChannel of one platform (xensockd opens one per worker thread), so
// two handles never pick the same port.
class PortAllocator {
public:
    // Lowest free port >= 1, or nullopt when all are taken.
    std::optional<Port> allocate();
    void release(Port p) noexcept;

private:
    std::mutex mu_;
    std::vector<bool> used_;  // index = port; grown on demand
};

struct SharerState;  // sim_grants.cpp

// What the platform object and everything it opened share; kept alive by
// whichever of them lives longest.
struct Context {
    std::string root;  // canonical sim root, no trailing slash
    DomId self = 0;
    PortAllocator ports;
    std::mutex sharer_mu;
    std::shared_ptr<SharerState> sharer;  // created by the first GrantSharer
};

std::unique_ptr<GrantMapper> make_grant_mapper(std::shared_ptr<Context> ctx);
std::unique_ptr<GrantSharer> make_grant_sharer(std::shared_ptr<Context> ctx);
std::unique_ptr<EventChannel> make_event_channel(std::shared_ptr<Context> ctx);

}  // namespace xensock::platform::sim
