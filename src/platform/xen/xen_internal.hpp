// Real-Xen platform internals: RAII handles over libxengnttab (which also
// holds libxengntshr) and libxenevtchn, and the factories the platform uses.
#pragma once

#include "xensock/platform/platform.hpp"

// The Xen 4.17 headers have no extern "C" of their own.
extern "C" {
#include <xenevtchn.h>
#include <xengnttab.h>
#include <xentoollog.h>
}

#include <memory>

namespace xensock::platform::xen {

struct GnttabClose {
    void operator()(xengnttab_handle* h) const noexcept { xengnttab_close(h); }
};
struct GntshrClose {
    void operator()(xengntshr_handle* h) const noexcept { xengntshr_close(h); }
};
struct EvtchnClose {
    void operator()(xenevtchn_handle* h) const noexcept { xenevtchn_close(h); }
};
using GnttabHandle = std::unique_ptr<xengnttab_handle, GnttabClose>;
using GntshrHandle = std::unique_ptr<xengntshr_handle, GntshrClose>;
using EvtchnHandle = std::unique_ptr<xenevtchn_handle, EvtchnClose>;

// The logger handed to every xen*_open(). A NULL logger would make the
// libraries print to stderr themselves — including on failures a guest can
// cause at will (a bad grant ref logs "mmap failed"). Each such failure also
// comes back to us as an errno, which the caller reports with context, so
// the libraries' own messages go to our log at debug level.
xentoollog_logger* library_logger() noexcept;

// Throws std::system_error for a /dev/xen/<node> that would not open,
// naming the node, the kernel module that provides it, and --sim.
[[noreturn]] void throw_device_error(int err, const char* node, const char* module);

std::unique_ptr<GrantMapper> open_grant_mapper();
std::unique_ptr<EventChannel> open_event_channel();
std::unique_ptr<GrantSharer> open_grant_sharer();

}  // namespace xensock::platform::xen
