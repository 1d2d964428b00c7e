// XenStore: RAII over the real libxenstore (both platforms). Synchronous
// calls (each a round trip to xenstored); watches are delivered through fd(),
// which the reactor polls.
#pragma once

#include "xensock/util/result.hpp"

#include <functional>
#include <optional>
#include <string>
#include <vector>

struct xs_handle;

namespace xensock::platform {

struct XsPermission {
    unsigned domid;
    char access;  // 'n' none, 'r' read, 'w' write, 'b' both
};

struct WatchEvent {
    std::string path;
    std::string token;
};

class XenStore {
public:
    // xenstored_path: "" for the default (real Xen); else the Unix socket.
    // Throws std::system_error naming the socket/device on failure.
    explicit XenStore(const std::string& xenstored_path = "");
    ~XenStore();
    XenStore(const XenStore&) = delete;
    XenStore& operator=(const XenStore&) = delete;

    // Outside a transaction unless one is active (see transaction()).
    std::optional<std::string> read(const std::string& path);
    Status write(const std::string& path, const std::string& value);
    Status mkdir(const std::string& path);
    Status rm(const std::string& path);
    std::optional<std::vector<std::string>> directory(const std::string& path);
    Status set_permissions(const std::string& path, const std::vector<XsPermission>& perms);
    std::optional<std::vector<XsPermission>> get_permissions(const std::string& path);

    // Runs body inside a transaction and commits; retries the whole body on
    // EAGAIN (conflict) up to `attempts` times. body returns false to abort.
    // Returns the error of the last attempt (EAGAIN if every attempt
    // conflicted), ECANCELED if body aborted.
    Status transaction(const std::function<bool(XenStore&)>& body, int attempts = 16);

    // Prefer Watch (below), which removes the watch on every path out.
    Status watch(const std::string& path, const std::string& token);
    Status unwatch(const std::string& path, const std::string& token);
    int fd() const;  // readable when watch events are queued
    // Non-blocking: the next queued watch event, if any.
    std::optional<WatchEvent> read_watch();

    // Our domain id (reads "domid"); 0 when unset (dom0).
    unsigned self_domid();
    xs_handle* raw() const noexcept { return handle_; }

private:
    xs_handle* handle_ = nullptr;
    unsigned transaction_ = 0;  // XBT_NULL when 0
};

// One registered xenstore watch and its only owner: the constructor
// registers it, the destructor (or reset()) removes it, whichever way the
// owner's scope ends. Movable, not copyable. The XenStore must outlive it.
// Events queued before the removal may still be read afterwards: a reader
// must not take an event's token as proof that its Watch still exists.
class Watch {
public:
    Watch() noexcept = default;
    // Registers (path, token) on xs. A failed registration holds nothing:
    // see active() and status().
    Watch(XenStore& xs, std::string path, std::string token);
    Watch(Watch&& o) noexcept { *this = std::move(o); }
    Watch& operator=(Watch&& o) noexcept;
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;
    ~Watch() { reset(); }

    // Removes the watch now (a failure is logged: nothing else to do).
    void reset() noexcept;
    bool active() const noexcept { return xs_ != nullptr; }
    explicit operator bool() const noexcept { return active(); }
    // How the registration went.
    Status status() const noexcept { return status_; }
    const std::string& path() const noexcept { return path_; }
    const std::string& token() const noexcept { return token_; }

private:
    XenStore* xs_ = nullptr;  // set while registered
    std::string path_;
    std::string token_;
    Status status_;
};

}  // namespace xensock::platform
