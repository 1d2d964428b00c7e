#include "xensock/toolstack/toolstack.hpp"

#include <fmt/core.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <optional>
#include <vector>

namespace xensock::toolstack {
namespace {

using Clock = std::chrono::steady_clock;

void explain(std::string* why, std::string text) {
    if (why) *why = std::move(text);
}

// Removes `path`, treating "already gone" as success.
bool rm_tree(platform::XenStore& xs, const std::string& path) {
    Status st = xs.rm(path);
    return st.ok() || st.error() == ENOENT;
}

// libxl__xs_path_cleanup keeps no empty per-guest directories behind.
void rm_if_empty(platform::XenStore& xs, const std::string& path) {
    auto children = xs.directory(path);
    if (children && children->empty()) (void)xs.rm(path);
}

std::string parent_of(const std::string& path) { return path.substr(0, path.rfind('/')); }

}  // namespace

std::string frontend_dir(const wire::ProtocolProfile& profile, DomId guest, unsigned devid) {
    return fmt::format("/local/domain/{}/device/{}/{}", guest, profile.name(), devid);
}

std::string backend_dir(const wire::ProtocolProfile& profile, DomId guest, DomId backend, unsigned devid) {
    return fmt::format("/local/domain/{}/backend/{}/{}/{}", backend, profile.name(), guest, devid);
}

Status attach(platform::XenStore& xs, const wire::ProtocolProfile& profile, DomId guest, DomId backend,
              std::string* why) {
    if (guest == backend) {
        explain(why, fmt::format("guest and backend are the same domain ({})", guest));
        return Errno{EINVAL};
    }
    const std::string fe = frontend_dir(profile, guest);
    const std::string be = backend_dir(profile, guest, backend);

    bool exists = false;
    std::string failed;  // which step failed, for `why`
    Status st = xs.transaction([&](platform::XenStore& t) {
        exists = false;
        failed.clear();
        if (t.read(fe) || t.read(be)) {
            exists = true;
            return false;
        }
        auto step = [&](Status s, const std::string& what) {
            if (!s.ok()) failed = fmt::format("{}: {}", what, errno_text(s.error()));
            return s.ok();
        };
        // Frontend first, as libxl does; permissions before the children so
        // that every node inherits them.
        return step(t.mkdir(fe), "mkdir " + fe) &&
               step(t.set_permissions(fe, {{guest, 'n'}, {backend, 'r'}}), "set permissions of " + fe) &&
               step(t.write(fe + "/backend", be), "write " + fe + "/backend") &&
               step(t.write(fe + "/backend-id", std::to_string(backend)), "write " + fe + "/backend-id") &&
               step(t.write(fe + "/state", std::to_string(kInitialising)), "write " + fe + "/state") &&
               step(t.mkdir(be), "mkdir " + be) &&
               step(t.set_permissions(be, {{backend, 'n'}, {guest, 'r'}}), "set permissions of " + be) &&
               step(t.write(be + "/frontend", fe), "write " + be + "/frontend") &&
               step(t.write(be + "/frontend-id", std::to_string(guest)), "write " + be + "/frontend-id") &&
               step(t.write(be + "/online", "1"), "write " + be + "/online") &&
               step(t.write(be + "/state", std::to_string(kInitialising)), "write " + be + "/state");
    });
    if (exists) {
        explain(why, fmt::format("domain {} already has a {} device ({} or {} exists)", guest, profile.name(), fe, be));
        return Errno{EEXIST};
    }
    if (!st.ok()) {
        explain(why, failed.empty() ? fmt::format("xenstore transaction failed: {}", errno_text(st.error()))
                                    : failed);
        return st.error() == ECANCELED ? Status(Errno{EIO}) : st;
    }
    return {};
}

Status detach(platform::XenStore& xs, const wire::ProtocolProfile& profile, DomId guest, DomId backend,
              std::chrono::milliseconds wait, std::string* why) {
    const std::string fe = frontend_dir(profile, guest);
    const std::string be = backend_dir(profile, guest, backend);
    const std::string be_state = be + "/state";

    const bool had_fe = xs.read(fe).has_value();
    bool had_be = false;
    bool already_closed = false;
    // Only touch a backend directory that still exists: writing state into
    // a vanished one would recreate it.
    Status st = xs.transaction([&](platform::XenStore& t) {
        auto state = t.read(be_state);
        had_be = t.read(be).has_value();
        already_closed = false;
        if (!state) return true;  // nothing to ask the backend
        if (*state == std::to_string(kClosed)) {
            already_closed = true;
            return true;
        }
        return t.write(be + "/online", "0").ok() && t.write(be_state, std::to_string(kClosing)).ok();
    });
    if (!had_fe && !had_be) {
        explain(why, fmt::format("domain {} has no {} device", guest, profile.name()));
        return Errno{ENOENT};
    }

    bool closed = already_closed || !had_be;
    bool timed_out = false;
    if (!closed && st.ok()) {
        // Watch the state node; the watch fires once at registration, and
        // again on every change (including removal of the node).
        const std::string token = fmt::format("xensock-detach-{}-{}", profile.name(), guest);
        Status w = xs.watch(be_state, token);
        const auto deadline = Clock::now() + wait;
        while (!closed) {
            auto state = xs.read(be_state);
            if (!state || *state == std::to_string(kClosed)) {
                closed = true;
                break;
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
            if (left.count() <= 0 || !w.ok()) {
                timed_out = true;
                break;
            }
            pollfd pfd{xs.fd(), POLLIN, 0};
            int rc = ::poll(&pfd, 1, static_cast<int>(std::min<long long>(left.count() + 1, 1 << 30)));
            if (rc < 0 && errno != EINTR) {
                timed_out = true;
                break;
            }
            while (xs.read_watch()) {
            }
        }
        if (w.ok()) (void)xs.unwatch(be_state, token);
    } else if (!st.ok()) {
        timed_out = true;  // could not even ask: remove anyway, report below
    }

    // Remove both directories whatever the backend did (libxl does too).
    bool removed = false;
    Status rm = xs.transaction([&](platform::XenStore& t) {
        removed = rm_tree(t, fe) && rm_tree(t, be);
        return removed;
    });
    rm_if_empty(xs, parent_of(fe));
    rm_if_empty(xs, parent_of(be));

    if (!rm.ok()) {
        explain(why, fmt::format("could not remove {} and {}: {}", fe, be, errno_text(rm.error())));
        return rm.error() == ECANCELED ? Status(Errno{EIO}) : rm;
    }
    if (!st.ok()) {
        explain(why, fmt::format("could not set {} to Closing: {}; removed the device anyway", be,
                                 errno_text(st.error())));
        return st;
    }
    if (timed_out) {
        explain(why, fmt::format("backend did not reach Closed within {} ms (unable to remove device with path {} "
                                 "cleanly; removed it anyway)",
                                 wait.count(), be));
        return Errno{ETIMEDOUT};
    }
    return {};
}

}  // namespace xensock::toolstack
