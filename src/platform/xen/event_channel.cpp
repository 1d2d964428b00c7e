// Event channels on real Xen: libxenevtchn over /dev/xen/evtchn.
//
// How Linux's evtchn device behaves (drivers/xen/evtchn.c), which this file
// is built around:
// - When a bound port fires, the driver masks it and appends it to the
//   handle's ring; the fd polls readable while the ring is non-empty. A
//   masked port is never queued twice, so the ring holds at most one entry
//   per bound port (the driver sizes it to fit).
// - xenevtchn_pending() reads one port off the ring; with O_NONBLOCK it fails
//   with EAGAIN when the ring is empty, otherwise it would block.
// - xenevtchn_unmask() re-enables the port; a kick that arrived while it was
//   masked fires at once and queues it again. Unmasking a port this handle
//   no longer has is ignored.
// - If the ring ever overflowed, reads fail with EFBIG (and poll reports
//   POLLERR) until the ring is reset.
#include "xen_internal.hpp"

#include "xensock/util/log.hpp"

#include <atomic>
#include <cerrno>
#include <unordered_set>

#include <fcntl.h>
#include <sys/ioctl.h>

extern "C" {
#include <xen/sys/evtchn.h>
}

namespace xensock::platform::xen {

namespace {

// Ports read per pending() call; more stay queued and keep fd() readable.
constexpr size_t kMaxPendingPerCall = 4096;

class XenEventChannel final : public EventChannel {
public:
    XenEventChannel() : handle_(xenevtchn_open(library_logger(), 0)) {
        if (!handle_) throw_device_error(errno, "/dev/xen/evtchn", "xen-evtchn");
        fd_ = xenevtchn_fd(handle_.get());
        // The library opens the device blocking; pending() must never block.
        // (xenevtchn.h warns that some old kernels ignored O_NONBLOCK here;
        // every kernel that runs xensock — Linux >= 4 — honours it.)
        if (const int flags = ::fcntl(fd_, F_GETFL); flags < 0 || ::fcntl(fd_, F_SETFL, flags | O_NONBLOCK) < 0) {
            throw_errno(errno, "fcntl(/dev/xen/evtchn, O_NONBLOCK)");
        }
    }
    ~XenEventChannel() override {
        // Closing the handle unbinds whatever is left; a BoundPort that
        // outlives its channel is a bug in the owner: say so.
        if (!bound_.empty()) log::error("event channel closed with {} port(s) still bound", bound_.size());
    }

    int fd() const noexcept override { return fd_; }

    // The hypercall binds and tells the remote end in one step: nothing to
    // wait for, so this completes without suspending.
    rt::Task<Result<BoundPort>> do_bind_interdomain(rt::Reactor&, DomId remote, Port remote_port,
                                                    rt::CancelToken) override {
        co_return bind_interdomain_now(remote, remote_port);
    }

    Result<BoundPort> bind_interdomain_now(DomId remote, Port remote_port) {
        if (remote >= DOMID_FIRST_RESERVED) return Errno{EINVAL};
        const xenevtchn_port_or_error_t port = xenevtchn_bind_interdomain(handle_.get(), remote, remote_port);
        if (port < 0) return last_errno();
        return adopt(static_cast<Port>(port));
    }

    Result<BoundPort> bind_unbound(DomId remote) override {
        if (remote >= DOMID_FIRST_RESERVED) return Errno{EINVAL};
        const xenevtchn_port_or_error_t port = xenevtchn_bind_unbound_port(handle_.get(), remote);
        if (port < 0) return last_errno();
        return adopt(static_cast<Port>(port));
    }

    Status notify(Port local) override {
        if (xenevtchn_notify(handle_.get(), local) != 0) return last_errno();
        return Status::success();
    }

    void pending(std::vector<Port>& fired) override {
        // Drain first, then unmask. Draining before unmasking bounds the
        // loop: each queued port is masked, so a guest kicking nonstop
        // cannot keep us here. Unmasking before the owner looks at the
        // shared rings (it does so after we return) means a kick arriving
        // while it works queues the port again and fd() turns readable:
        // at worst a spurious wakeup, never a lost one.
        const size_t first = fired.size();
        for (size_t n = 0; n < kMaxPendingPerCall; ++n) {
            const xenevtchn_port_or_error_t port = xenevtchn_pending(handle_.get());
            if (port >= 0) {
                // Skip ports unbound since they fired (their unmask would be
                // ignored anyway).
                if (bound_.contains(static_cast<Port>(port))) fired.push_back(static_cast<Port>(port));
                continue;
            }
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EFBIG) {
                recover_overflow(fired, first);
                return;
            }
            log::warn("xenevtchn_pending failed: {}", errno_text(errno));
            break;
        }
        unmask(fired, first);
    }

    size_t bound_ports() const noexcept override { return bound_count_.load(std::memory_order_relaxed); }

protected:
    void unbind(Port local) noexcept override {
        if (xenevtchn_unbind(handle_.get(), local) != 0) {
            log::warn("xenevtchn_unbind(port {}) failed: {}", local, errno_text(errno));
        }
        bound_.erase(local);
        bound_count_.store(bound_.size(), std::memory_order_relaxed);
    }

private:
    BoundPort adopt(Port port) {
        bound_.insert(port);
        bound_count_.store(bound_.size(), std::memory_order_relaxed);
        return BoundPort(this, port);
    }

    void unmask(const std::vector<Port>& fired, size_t first) noexcept {
        for (size_t i = first; i < fired.size(); ++i) {
            if (xenevtchn_unmask(handle_.get(), fired[i]) != 0) {
                log::warn("xenevtchn_unmask(port {}) failed: {}", fired[i], errno_text(errno));
            }
        }
    }

    // The driver sizes the ring for every bound port, so this should not
    // happen; if it does, which ports fired is lost. Reset the ring and
    // report every bound port as fired (owners treat a spurious event as
    // "look again"), unmasking them all.
    void recover_overflow(std::vector<Port>& fired, size_t first) {
        log::warn("event channel ring overflowed: resetting it and re-checking all {} bound port(s)", bound_.size());
        if (::ioctl(fd_, IOCTL_EVTCHN_RESET, 0) != 0) {
            log::error("ioctl(/dev/xen/evtchn, IOCTL_EVTCHN_RESET) failed: {}", errno_text(errno));
        }
        fired.resize(first);
        fired.insert(fired.end(), bound_.begin(), bound_.end());
        unmask(fired, first);
    }

    EvtchnHandle handle_;
    int fd_ = -1;
    std::unordered_set<Port> bound_;  // touched by the owning thread only
    std::atomic<size_t> bound_count_{0};  // for readers on other threads (stats)
};

}  // namespace

std::unique_ptr<EventChannel> open_event_channel() { return std::make_unique<XenEventChannel>(); }

}  // namespace xensock::platform::xen
