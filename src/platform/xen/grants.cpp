// Grant mapping (backend, libxengnttab over /dev/xen/gntdev) and grant
// sharing (guest, libxengntshr over /dev/xen/gntalloc) on real Xen.
#include "xen_internal.hpp"

#include "xensock/util/log.hpp"

#include <atomic>
#include <cerrno>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>

namespace xensock::platform::xen {

namespace {

class XenGrantMapper final : public GrantMapper {
public:
    XenGrantMapper() : handle_(xengnttab_open(library_logger(), 0)) {
        if (!handle_) throw_device_error(errno, "/dev/xen/gntdev", "xen-gntdev");
    }
    ~XenGrantMapper() override {
        // Closing the handle would tear mappings down too, but a mapping that
        // outlives its mapper is a bug in the owner: say so.
        if (const size_t n = live_.load(std::memory_order_relaxed); n != 0) {
            log::error("grant mapper closed with {} live mapping(s)", n);
        }
    }

    Result<GrantMapping> map(DomId granter, std::span<const GrantRef> refs, bool writable) override {
        if (refs.empty() || refs.size() > kMaxMapPages) return Errno{EINVAL};
        // Reserved ids (DOMID_SELF, DOMID_IO, ...) are never a guest.
        if (granter >= DOMID_FIRST_RESERVED) return Errno{EINVAL};
        // The library takes a non-const array; keep the caller's untouched.
        std::vector<uint32_t> copy(refs.begin(), refs.end());
        const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
        // All refs from one domain into one contiguous range; on any failure
        // nothing stays mapped. Linux's gntdev reports a ref the granter did
        // not grant us, or granted read-only when we asked to write, as
        // EINVAL — it does not tell those apart from a ref out of range.
        // (libxengnttab retries a paged-out granted frame, GNTST_eagain, in
        // a 1 ms sleep loop; that needs Xen memory paging, which xensock's
        // deployments do not enable.)
        void* addr = xengnttab_map_domain_grant_refs(handle_.get(), static_cast<uint32_t>(copy.size()), granter,
                                                     copy.data(), prot);
        if (!addr) return last_errno();
        live_.fetch_add(1, std::memory_order_relaxed);
        return GrantMapping(this, addr, copy.size());
    }

    size_t live_mappings() const noexcept override { return live_.load(std::memory_order_relaxed); }

protected:
    void unmap(void* addr, size_t pages) noexcept override {
        if (xengnttab_unmap(handle_.get(), addr, static_cast<uint32_t>(pages)) != 0) {
            log::warn("xengnttab_unmap({}, {} pages) failed: {}", addr, pages, errno_text(errno));
        }
        live_.fetch_sub(1, std::memory_order_relaxed);
    }

private:
    GnttabHandle handle_;
    std::atomic<size_t> live_{0};
};

class XenGrantSharer final : public GrantSharer {
public:
    XenGrantSharer() : handle_(xengntshr_open(library_logger(), 0)) {
        if (!handle_) throw_device_error(errno, "/dev/xen/gntalloc", "xen-gntalloc");
        // libxengntshr 4.17 opens /dev/xen/gntalloc without O_CLOEXEC.
        const int fd = xengntshr_fd(handle_.get());
        if (const int flags = ::fcntl(fd, F_GETFD); flags < 0 || ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0) {
            throw_errno(errno, "fcntl(/dev/xen/gntalloc, FD_CLOEXEC)");
        }
    }

    Result<SharedPages> share(DomId to, size_t pages, bool writable) override {
        if (pages == 0 || pages > kMaxMapPages) return Errno{EINVAL};
        if (to >= DOMID_FIRST_RESERVED) return Errno{EINVAL};
        std::vector<GrantRef> refs(pages);
        // gntalloc allocates zeroed pages, grants each to `to` and maps them
        // contiguously; ENOSPC when out of grant entries (or over the
        // module's limit).
        void* addr =
            xengntshr_share_pages(handle_.get(), to, static_cast<int>(pages), refs.data(), writable ? 1 : 0);
        if (!addr) return last_errno();
        return SharedPages(this, addr, std::move(refs));
    }

protected:
    void unshare(void* addr, const std::vector<GrantRef>& refs) noexcept override {
        // Unmapping is all there is to it: gntalloc ends each grant and frees
        // the page once nobody maps it (deferred while the peer still does).
        if (xengntshr_unshare(handle_.get(), addr, static_cast<uint32_t>(refs.size())) != 0) {
            log::warn("xengntshr_unshare({}, {} pages) failed: {}", addr, refs.size(), errno_text(errno));
        }
    }

private:
    GntshrHandle handle_;
};

}  // namespace

std::unique_ptr<GrantMapper> open_grant_mapper() { return std::make_unique<XenGrantMapper>(); }
std::unique_ptr<GrantSharer> open_grant_sharer() { return std::make_unique<XenGrantSharer>(); }

}  // namespace xensock::platform::xen
