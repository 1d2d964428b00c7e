// The toolstack role: creating and removing a guest's PV-sockets device in
// xenstore exactly as libxl does for `pvcalls = [ 'backend=0' ]`
// (shared/spec/real-xen-lab.md, shared/spec/sim-platform.md "Lifetime").
// On sim, and for the xensock protocol on real Xen (xl knows no `xensock`),
// this is the only toolstack there is. Synchronous: each call is a few
// round trips to xenstored (detach additionally waits, bounded, on a watch).
#pragma once

#include "xensock/platform/platform.hpp"
#include "xensock/platform/xenstore.hpp"
#include "xensock/util/result.hpp"
#include "xensock/wire/profile.hpp"

#include <chrono>
#include <string>

namespace xensock::toolstack {

using platform::DomId;

// XenbusState values (xen/io/xenbus.h).
enum XenbusState : int {
    kUnknown = 0,
    kInitialising = 1,
    kInitWait = 2,
    kInitialised = 3,
    kConnected = 4,
    kClosing = 5,
    kClosed = 6,
    kReconfiguring = 7,
    kReconfigured = 8,
};

inline constexpr unsigned kDevid = 0;  // one device per guest and protocol

// /local/domain/<guest>/device/<proto>/<devid>
std::string frontend_dir(const wire::ProtocolProfile& profile, DomId guest, unsigned devid = kDevid);
// /local/domain/<backend>/backend/<proto>/<guest>/<devid>
std::string backend_dir(const wire::ProtocolProfile& profile, DomId guest, DomId backend = 0,
                        unsigned devid = kDevid);

// Creates, in one transaction, the frontend directory (owner the guest,
// backend may read) with `backend`, `backend-id`, `state` = 1, then the
// backend directory (owner the backend, guest may read) with `frontend`,
// `frontend-id`, `online` = 1, `state` = 1. Nothing of the protocol's own
// nodes: the two ends publish those.
// Errors: EEXIST if either directory already exists (nothing is changed);
// EINVAL for guest == backend; otherwise the xenstore error. `why`, when
// given, receives a one-line explanation on failure.
Status attach(platform::XenStore& xs, const wire::ProtocolProfile& profile, DomId guest, DomId backend = 0,
              std::string* why = nullptr);

// libxl's device removal: backend `online` = 0 and `state` = 5 (Closing),
// wait up to `wait` for the backend to write `state` = 6 (Closed), watching
// the node (no polling), then remove both directories (frontend first).
// Errors: ENOENT if neither directory exists; ETIMEDOUT when the backend
// did not reach Closed in time; the directories are removed in that case
// too, and `why` says "backend did not reach Closed within N ms".
//
// The watch is registered on `xs` for the duration of the call; watch events
// of other watches on the same handle that arrive meanwhile are consumed.
Status detach(platform::XenStore& xs, const wire::ProtocolProfile& profile, DomId guest, DomId backend,
              std::chrono::milliseconds wait, std::string* why = nullptr);

}  // namespace xensock::toolstack
