// The real-Xen Platform: each open_*() opens a fresh library handle (one per
// worker thread); the domain id comes from xenstore.
#include "xen_internal.hpp"

#include "xensock/platform/xenstore.hpp"
#include "xensock/util/log.hpp"

#include <fmt/core.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <string>
#include <system_error>

#include <unistd.h>

namespace xensock::platform {

namespace xen {

namespace {

// Our own names: xtl_level_to_string() would mean linking libxentoollog.
const char* level_name(xentoollog_level level) noexcept {
    if (level >= XTL_ERROR) return "error";
    if (level >= XTL_WARN) return "warning";
    return "info";
}

__attribute__((format(printf, 5, 0))) void library_vmessage(xentoollog_logger*, xentoollog_level level, int errnoval,
                                                            const char* context, const char* format, va_list args) {
    if (!log::enabled(log::Level::debug)) return;
    char text[512];
    std::vsnprintf(text, sizeof text, format, args);
    log::debug("lib{} ({}): {}{}{}", context ? context : "xen", level_name(level), text,
               errnoval >= 0 ? ": " : "", errnoval >= 0 ? errno_text(errnoval) : std::string());
}

// Never destroyed: the libraries only destroy loggers they created.
xentoollog_logger g_library_logger{library_vmessage, nullptr, nullptr};

}  // namespace

xentoollog_logger* library_logger() noexcept { return &g_library_logger; }

void throw_device_error(int err, const char* node, const char* module) {
    if (err == ENOENT || err == ENODEV || err == ENXIO) {
        throw_errno(err, fmt::format("no {}: not running in a Xen domain, or the {} kernel module is not "
                                     "loaded; use --sim DIR (or set XENSOCK_SIM_DIR) to run without Xen",
                                     node, module));
    }
    if (err == EACCES || err == EPERM) {
        throw_errno(err, fmt::format("cannot open {}: permission denied (xensock needs root, or access to {})",
                                     node, node));
    }
    throw_errno(err, fmt::format("cannot open {}", node));
}

namespace {

class XenPlatform final : public Platform {
public:
    explicit XenPlatform(DomId self) : self_(self) {}

    std::string name() const override { return "xen"; }
    DomId self_domid() const override { return self_; }
    std::unique_ptr<GrantMapper> open_grant_mapper() override { return xen::open_grant_mapper(); }
    std::unique_ptr<EventChannel> open_event_channel() override { return xen::open_event_channel(); }
    std::unique_ptr<GrantSharer> open_grant_sharer() override { return xen::open_grant_sharer(); }
    std::string xenstored_path() const override { return {}; }

private:
    DomId self_;
};

}  // namespace

}  // namespace xen

std::unique_ptr<Platform> open_xen_platform() {
    // Event channels are needed on both sides (backend and guest); check the
    // device up front so "not a Xen domain" reads as such, not as a
    // xenstore error. The grant devices are checked when opened (the
    // backend needs gntdev, a guest gntalloc).
    if (::access("/dev/xen/evtchn", F_OK) != 0) xen::throw_device_error(errno, "/dev/xen/evtchn", "xen-evtchn");
    const DomId self = XenStore().self_domid();
    log::debug("platform: real Xen, domain {}", self);
    return std::make_unique<xen::XenPlatform>(self);
}

}  // namespace xensock::platform
