// The narrow interface between xensock and the hypervisor: grant mapping,
// event channels and xenstore, and their guest-side mirror images. Two
// implementations: real Xen (libxengnttab, libxenevtchn, libxengntshr,
// libxenstore) and sim (shared/spec/sim-platform.md). The engine and the
// frontend library see only this header.
//
// Failures a guest can cause (a bad ref, a port it did not offer) come back
// as Result errors carrying a positive errno; failures to set the platform up
// at all throw std::system_error / std::runtime_error with a message naming
// what failed.
#pragma once

#include "xensock/runtime/cancel.hpp"
#include "xensock/runtime/task.hpp"
#include "xensock/util/result.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace xensock::rt {
class Reactor;
}

namespace xensock::platform {

using DomId = uint32_t;
using GrantRef = uint32_t;
using Port = uint32_t;  // event-channel port

inline constexpr size_t kPageSize = 4096;
inline constexpr size_t kMaxMapPages = 1024;  // refuse absurd single maps

class GrantMapper;
class EventChannel;
class GrantSharer;

// ------------------------------------------------------------ backend side

// A live mapping of another domain's granted pages, contiguous in our address
// space. Exactly one owner; unmapped when destroyed.
class GrantMapping {
public:
    GrantMapping() = default;
    GrantMapping(GrantMapper* owner, void* addr, size_t pages) noexcept
        : owner_(owner), addr_(addr), pages_(pages) {}
    GrantMapping(GrantMapping&& o) noexcept { *this = std::move(o); }
    GrantMapping& operator=(GrantMapping&& o) noexcept;
    GrantMapping(const GrantMapping&) = delete;
    GrantMapping& operator=(const GrantMapping&) = delete;
    ~GrantMapping() { reset(); }

    void reset() noexcept;
    explicit operator bool() const noexcept { return addr_ != nullptr; }
    void* data() const noexcept { return addr_; }
    std::byte* bytes() const noexcept { return static_cast<std::byte*>(addr_); }
    size_t pages() const noexcept { return pages_; }
    size_t size() const noexcept { return pages_ * kPageSize; }

private:
    GrantMapper* owner_ = nullptr;
    void* addr_ = nullptr;
    size_t pages_ = 0;
};

class GrantMapper {
public:
    virtual ~GrantMapper() = default;
    // Maps `refs` granted by domain `granter` into one contiguous range.
    // Errors: EINVAL (ref out of range, frame beyond the granter's memory),
    // EPERM (not granted to us, or read-only and writable requested). A
    // failure maps nothing.
    virtual Result<GrantMapping> map(DomId granter, std::span<const GrantRef> refs, bool writable) = 0;
    // Mappings currently alive (tests and `xensockctl stats` count them).
    virtual size_t live_mappings() const noexcept = 0;

protected:
    friend class GrantMapping;
    virtual void unmap(void* addr, size_t pages) noexcept = 0;
};

// A bound local event-channel port. Exactly one owner; unbound when destroyed.
class BoundPort {
public:
    BoundPort() = default;
    BoundPort(EventChannel* owner, Port port) noexcept : owner_(owner), port_(port) {}
    BoundPort(BoundPort&& o) noexcept { *this = std::move(o); }
    BoundPort& operator=(BoundPort&& o) noexcept;
    BoundPort(const BoundPort&) = delete;
    BoundPort& operator=(const BoundPort&) = delete;
    ~BoundPort() { reset(); }

    void reset() noexcept;
    explicit operator bool() const noexcept { return owner_ != nullptr; }
    Port port() const noexcept { return port_; }
    // Kick the remote end. Never blocks; coalesces.
    Status notify() const;

private:
    EventChannel* owner_ = nullptr;
    Port port_ = 0;
};

// One event-channel handle; in xensockd, one per worker thread. Its fd() is
// readable when a port bound through it may be pending.
class EventChannel {
public:
    virtual ~EventChannel() = default;
    virtual int fd() const noexcept = 0;

    // Backend: bind to the remote domain's port it offered to us.
    // EINVAL if that port was not offered to this domain. May wait without
    // blocking the thread (on sim, while the remote end's queue is full, for
    // up to a second: ETIMEDOUT after that), on `reactor`, the one running
    // the awaiting coroutine; a cancelled `cancel` ends the wait (ECANCELED).
    // The channel must outlive the bind.
    rt::Task<Result<BoundPort>> bind_interdomain(rt::Reactor& reactor, DomId remote, Port remote_port,
                                                 const rt::CancelToken& cancel = {}) {
        // The token is copied into the coroutine frame here, so the caller's
        // may be a temporary; by const reference for GCC 12 (reactor.hpp).
        return do_bind_interdomain(reactor, remote, remote_port, cancel);
    }
    // Guest: allocate a port that only `remote` may bind to.
    virtual Result<BoundPort> bind_unbound(DomId remote) = 0;

    virtual Status notify(Port local) = 0;
    // Appends every local port that fired since the last call, then re-arms
    // (unmasks) them. Never blocks.
    virtual void pending(std::vector<Port>& fired) = 0;
    virtual size_t bound_ports() const noexcept = 0;

protected:
    friend class BoundPort;
    virtual rt::Task<Result<BoundPort>> do_bind_interdomain(rt::Reactor& reactor, DomId remote, Port remote_port,
                                                            rt::CancelToken cancel) = 0;
    virtual void unbind(Port local) noexcept = 0;
};

// ------------------------------------------------------------- guest side

// Pages this domain allocated and granted to another domain; the grants are
// ended and the pages freed when destroyed.
class SharedPages {
public:
    SharedPages() = default;
    SharedPages(GrantSharer* owner, void* addr, std::vector<GrantRef> refs) noexcept
        : owner_(owner), addr_(addr), refs_(std::move(refs)) {}
    SharedPages(SharedPages&& o) noexcept { *this = std::move(o); }
    SharedPages& operator=(SharedPages&& o) noexcept;
    SharedPages(const SharedPages&) = delete;
    SharedPages& operator=(const SharedPages&) = delete;
    ~SharedPages() { reset(); }

    void reset() noexcept;
    explicit operator bool() const noexcept { return addr_ != nullptr; }
    void* data() const noexcept { return addr_; }
    std::byte* bytes() const noexcept { return static_cast<std::byte*>(addr_); }
    size_t pages() const noexcept { return refs_.size(); }
    size_t size() const noexcept { return refs_.size() * kPageSize; }
    const std::vector<GrantRef>& refs() const noexcept { return refs_; }

private:
    GrantSharer* owner_ = nullptr;
    void* addr_ = nullptr;
    std::vector<GrantRef> refs_;
};

class GrantSharer {
public:
    virtual ~GrantSharer() = default;
    // Allocates `pages` zeroed pages, contiguous for us, and grants each to
    // domain `to`. Errors: ENOSPC (grant table full), ENOMEM.
    virtual Result<SharedPages> share(DomId to, size_t pages, bool writable) = 0;

protected:
    friend class SharedPages;
    virtual void unshare(void* addr, const std::vector<GrantRef>& refs) noexcept = 0;
};

// --------------------------------------------------------------- platform

struct PlatformOptions {
    // Sim root; empty: use XENSOCK_SIM_DIR, else real Xen.
    std::string sim_dir;
    // Which domain this process is on sim (0 = the backend). Ignored on Xen,
    // where the domain id is read from xenstore.
    DomId sim_domid = 0;
};

class Platform {
public:
    virtual ~Platform() = default;
    virtual std::string name() const = 0;  // "xen" or "sim:<dir>"
    virtual DomId self_domid() const = 0;
    virtual std::unique_ptr<GrantMapper> open_grant_mapper() = 0;
    virtual std::unique_ptr<EventChannel> open_event_channel() = 0;
    virtual std::unique_ptr<GrantSharer> open_grant_sharer() = 0;
    // Path to hand to libxenstore through XENSTORED_PATH ("" on real Xen).
    virtual std::string xenstored_path() const = 0;
};

// Sim if options.sim_dir or XENSOCK_SIM_DIR is set; otherwise real Xen.
// Throws std::runtime_error naming what is missing, e.g. "no /dev/xen/gntdev:
// not running in a Xen domain; use --sim DIR".
std::unique_ptr<Platform> open_platform(const PlatformOptions& options);

std::unique_ptr<Platform> open_sim_platform(const std::string& dir, DomId self);
std::unique_ptr<Platform> open_xen_platform();

// ------------------------------------------------------------ inline RAII

inline GrantMapping& GrantMapping::operator=(GrantMapping&& o) noexcept {
    if (this != &o) {
        reset();
        owner_ = std::exchange(o.owner_, nullptr);
        addr_ = std::exchange(o.addr_, nullptr);
        pages_ = std::exchange(o.pages_, 0);
    }
    return *this;
}
inline void GrantMapping::reset() noexcept {
    if (addr_ && owner_) owner_->unmap(addr_, pages_);
    owner_ = nullptr;
    addr_ = nullptr;
    pages_ = 0;
}

inline BoundPort& BoundPort::operator=(BoundPort&& o) noexcept {
    if (this != &o) {
        reset();
        owner_ = std::exchange(o.owner_, nullptr);
        port_ = std::exchange(o.port_, 0);
    }
    return *this;
}
inline void BoundPort::reset() noexcept {
    if (owner_) owner_->unbind(port_);
    owner_ = nullptr;
    port_ = 0;
}
inline Status BoundPort::notify() const { return owner_ ? owner_->notify(port_) : Status(Errno{EBADF}); }

inline SharedPages& SharedPages::operator=(SharedPages&& o) noexcept {
    if (this != &o) {
        reset();
        owner_ = std::exchange(o.owner_, nullptr);
        addr_ = std::exchange(o.addr_, nullptr);
        refs_ = std::move(o.refs_);
        o.refs_.clear();
    }
    return *this;
}
inline void SharedPages::reset() noexcept {
    if (addr_ && owner_) owner_->unshare(addr_, refs_);
    owner_ = nullptr;
    addr_ = nullptr;
    refs_.clear();
}

}  // namespace xensock::platform
