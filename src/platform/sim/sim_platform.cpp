// The sim platform object: checks the sim root, sets up this domain's files
// (shared/spec/sim-platform.md, sections Root and Lifetime) and hands out the
// grant and event-channel handles implemented in sim_grants.cpp and
// sim_evtchn.cpp.
#include "sim_internal.hpp"

#include "xensock/util/log.hpp"

#include <fmt/core.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <tuple>
#include <stdexcept>
#include <system_error>

namespace xensock::platform {

namespace sim {

std::optional<DomId> parse_domid(std::string_view text) noexcept {
    if (!text.empty() && text.back() == '\n') text.remove_suffix(1);
    if (text.empty() || text.size() > 5) return std::nullopt;  // "32751" is the longest
    DomId value = 0;
    for (const char c : text) {
        if (c < '0' || c > '9') return std::nullopt;
        value = value * 10 + static_cast<DomId>(c - '0');
    }
    if (value > kMaxDomId) return std::nullopt;
    return value;
}

std::optional<Port> PortAllocator::allocate() {
    std::lock_guard lock(mu_);
    for (Port p = 1; p < used_.size(); ++p) {
        if (!used_[p]) {
            used_[p] = true;
            return p;
        }
    }
    const auto next = static_cast<Port>(std::max<size_t>(used_.size(), 1));
    if (next > kMaxPort) return std::nullopt;
    used_.resize(next + 1, false);
    used_[next] = true;
    return next;
}

void PortAllocator::release(Port p) noexcept {
    std::lock_guard lock(mu_);
    if (p < used_.size()) used_[p] = false;
}

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error("sim platform: " + what); }

[[noreturn]] void fail_errno(const std::string& what, int err) {
    throw std::system_error(err, std::generic_category(), "sim platform: " + what);
}

// Creates `path` as a directory unless it already is one.
void ensure_dir(const std::string& path) {
    if (::mkdir(path.c_str(), 0777) == 0) return;
    const int err = errno;
    struct stat st {};
    if (err == EEXIST && ::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return;
    if (err == EEXIST) fail(fmt::format("{} exists and is not a directory", path));
    fail_errno("mkdir " + path, err);
}

// A file of `size` zero bytes, created fresh (the domain directory was just
// made, so O_EXCL catches a racing second process of the same domain).
void create_zeroed_file(const std::string& path, off_t size) {
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0666));
    if (!fd) fail_errno("create " + path, errno);
    if (size > 0 && ::ftruncate(fd.get(), size) != 0) fail_errno("ftruncate " + path, errno);
}

// A starting frontend is a freshly booted domain: whatever a previous
// incarnation left (grants, memory, ports) is gone.
void recreate_guest_domain(const std::string& root, DomId self) {
    const std::string dir = dom_dir(root, self);
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);  // does not follow symlinks
    if (ec) fail_errno("remove " + dir, ec.value());
    if (::mkdir(dir.c_str(), 0777) != 0) fail_errno("mkdir " + dir, errno);
    create_zeroed_file(dir + "/mem", 0);
    create_zeroed_file(dir + "/gnttab", static_cast<off_t>(kGrantTableBytes));
    if (::mkdir(evtchn_dir(root, self).c_str(), 0777) != 0) fail_errno("mkdir " + evtchn_dir(root, self), errno);
}

// Contexts alive in this process, by (pid, root, domain).
struct LiveContexts {
    std::mutex mu;
    std::map<std::tuple<pid_t, std::string, DomId>, std::weak_ptr<Context>> contexts;
};

LiveContexts& live_contexts() {
    static LiveContexts* live = new LiveContexts;  // never destroyed: usable from any static destructor
    return *live;
}

class SimPlatform final : public Platform {
public:
    explicit SimPlatform(std::shared_ptr<sim::Context> ctx) : ctx_(std::move(ctx)) {}

    std::string name() const override { return "sim:" + ctx_->root; }
    DomId self_domid() const override { return ctx_->self; }
    std::unique_ptr<GrantMapper> open_grant_mapper() override { return make_grant_mapper(ctx_); }
    std::unique_ptr<EventChannel> open_event_channel() override { return make_event_channel(ctx_); }
    std::unique_ptr<GrantSharer> open_grant_sharer() override { return make_grant_sharer(ctx_); }
    std::string xenstored_path() const override { return ctx_->root + "/xenstored.sock"; }

private:
    std::shared_ptr<sim::Context> ctx_;
};

}  // namespace
}  // namespace sim

std::unique_ptr<Platform> open_sim_platform(const std::string& dir, DomId self) {
    using namespace sim;
    if (dir.empty()) fail("empty sim root; pass --sim DIR or set XENSOCK_SIM_DIR");
    if (self > kMaxDomId) fail(fmt::format("domain id {} out of range (0..{})", self, kMaxDomId));

    struct FreeChars {
        void operator()(char* p) const noexcept { std::free(p); }
    };
    const std::unique_ptr<char, FreeChars> real(::realpath(dir.c_str(), nullptr));
    if (!real) {
        const int err = errno;
        fail_errno(fmt::format("sim root {} (create it first, e.g. mktemp -d /dev/shm/xs-XXXXXX)", dir), err);
    }
    std::string root = real.get();
    struct stat st {};
    if (::stat(root.c_str(), &st) != 0) fail_errno("stat " + root, errno);
    if (!S_ISDIR(st.st_mode)) fail(fmt::format("sim root {} is not a directory", root));
    if (::access(root.c_str(), W_OK | X_OK) != 0) fail_errno(fmt::format("sim root {} is not writable", root), errno);
    if (root.size() > kMaxRootLength) {
        fail(fmt::format("sim root {} is too long ({} bytes, at most {}): event-channel sockets live below it and "
                         "Unix socket paths are limited to 108 bytes; use a short root such as /dev/shm/xs-XXXXXX",
                         root, root.size(), kMaxRootLength));
    }
    // One domain's state in one process is one Context: a second platform
    // object for it (a library opening its own) shares the port numbers and
    // the grant table instead of rebooting the domain under the first.
    LiveContexts& live = live_contexts();
    std::lock_guard lock(live.mu);
    const auto key = std::make_tuple(::getpid(), root, self);  // a forked child is a new process
    if (auto it = live.contexts.find(key); it != live.contexts.end()) {
        if (auto ctx = it->second.lock()) return std::make_unique<SimPlatform>(std::move(ctx));
    }

    if (self != 0) {
        recreate_guest_domain(root, self);
    } else {
        // The backend never wipes anything: guests' files are theirs, and its
        // own stale port sockets are reclaimed one by one when bound.
        ensure_dir(dom_dir(root, 0));
        ensure_dir(evtchn_dir(root, 0));
    }

    auto ctx = std::make_shared<Context>();
    ctx->root = root;
    ctx->self = self;
    live.contexts[key] = ctx;
    log::debug("sim platform: root {}, domain {}", ctx->root, self);
    return std::make_unique<SimPlatform>(std::move(ctx));
}

}  // namespace xensock::platform
