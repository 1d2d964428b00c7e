// XenStore over the real libxenstore (Xen 4.17), shared by both platforms.
//
// Facts about libxenstore 4.17 this wrapper relies on (tools/libs/store/xs.c):
// - xs_open() ignores XS_OPEN_SOCKETONLY (deprecated). It tries the socket
//   named by xs_daemon_socket() — $XENSTORED_PATH if set, else
//   $XENSTORED_RUNDIR/socket, else /var/run/xenstored/socket — and then the
//   device: $XENSTORED_PATH again if set, else /dev/xen/xenbus (Linux). So
//   with XENSTORED_PATH set both attempts use that path.
// - xs_fileno() is not the connection: it is a pipe, created on first call,
//   that holds one byte while watch events are queued. Events are read off
//   the connection by a thread libxenstore starts at the first xs_watch().
// - xs_check_watch() never blocks: NULL with errno EAGAIN when none queued.
// - If the connection breaks, libxenstore closes it for good; every later
//   request fails (EBADF/EINVAL), and the watch pipe does *not* become
//   readable, so a broken connection is seen at the next request.
// - Each request temporarily sets SIGPIPE to SIG_IGN with sigaction(), which
//   is process-wide; programs using sockets ignore SIGPIPE anyway.
#include "xensock/platform/xenstore.hpp"

#include "xensock/util/log.hpp"

extern "C" {
#include <xenstore.h>
}

#include <fmt/core.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <utility>

#include <unistd.h>

namespace xensock::platform {

namespace {

// libxenstore hands out malloc()ed memory that the caller free()s.
struct Free {
    void operator()(void* p) const noexcept { std::free(p); }
};
template <typename T>
using CPtr = std::unique_ptr<T, Free>;

struct XsClose {
    void operator()(xs_handle* h) const noexcept { xs_close(h); }
};

// Opening reads XENSTORED_PATH from the environment: serialize our own
// setenv()+xs_open() pairs so concurrent constructors cannot interleave.
std::mutex& open_mutex() {
    static std::mutex m;
    return m;
}

Status status_of(bool ok) { return ok ? Status::success() : Status(last_errno()); }

[[noreturn]] void throw_open_error(int err, const std::string& xenstored_path) {
    if (!xenstored_path.empty()) {
        throw_errno(err, fmt::format("cannot connect to xenstored at {} (is the sim running? "
                                     "`xensock-sim up DIR` starts it)",
                                     xenstored_path));
    }
    // xs_daemon_socket() names the socket libxenstore tried first.
    const std::string socket = xs_daemon_socket();
    const bool have_device = ::access("/dev/xen/xenbus", F_OK) == 0 || ::access("/proc/xen/xenbus", F_OK) == 0;
    if (!have_device && ::access(socket.c_str(), F_OK) != 0) {
        throw_errno(err, fmt::format("no xenstore: no xenstored socket at {} and /dev/xen/xenbus missing — "
                                     "not in a Xen domain? use --sim DIR",
                                     socket));
    }
    throw_errno(err, fmt::format("cannot open xenstore (tried {}, then /dev/xen/xenbus)", socket));
}

unsigned access_bits(char access) {
    switch (access) {
    case 'n': return XS_PERM_NONE;
    case 'r': return XS_PERM_READ;
    case 'w': return XS_PERM_WRITE;
    case 'b': return XS_PERM_READ | XS_PERM_WRITE;
    default: return std::numeric_limits<unsigned>::max();
    }
}

char access_char(unsigned bits) {
    switch (bits & (XS_PERM_READ | XS_PERM_WRITE)) {
    case XS_PERM_READ: return 'r';
    case XS_PERM_WRITE: return 'w';
    case XS_PERM_READ | XS_PERM_WRITE: return 'b';
    default: return 'n';
    }
}

}  // namespace

XenStore::XenStore(const std::string& xenstored_path) {
    std::unique_ptr<xs_handle, XsClose> handle;
    {
        std::lock_guard lock(open_mutex());
        if (!xenstored_path.empty()) {
            // The only way to name the socket in 4.17 (see the top of this
            // file). It stays set: libxenstore reads it only while opening,
            // and child processes (tools, tests) should reach the same store.
            // setenv() is process-global and not safe against concurrent
            // getenv() in other threads: open XenStores at start-up.
            if (::setenv("XENSTORED_PATH", xenstored_path.c_str(), 1) != 0) {
                throw_errno(errno, "setenv(XENSTORED_PATH)");
            }
        }
        errno = 0;
        handle.reset(xs_open(0));
        if (!handle) throw_open_error(errno ? errno : ENOENT, xenstored_path);
    }
    // Create the watch pipe now, so fd() cannot fail later.
    if (xs_fileno(handle.get()) < 0) {
        throw_errno(errno ? errno : EMFILE, "xenstore: cannot create the watch pipe");
    }
    handle_ = handle.release();
}

XenStore::~XenStore() {
    if (transaction_ != XBT_NULL) xs_transaction_end(handle_, transaction_, true);
    xs_close(handle_);
}

std::optional<std::string> XenStore::read(const std::string& path) {
    unsigned len = 0;
    CPtr<char> value(static_cast<char*>(xs_read(handle_, transaction_, path.c_str(), &len)));
    if (!value) return std::nullopt;  // errno says why (ENOENT, EACCES, ...)
    return std::string(value.get(), len);
}

Status XenStore::write(const std::string& path, const std::string& value) {
    if (value.size() > XENSTORE_PAYLOAD_MAX) return Errno{E2BIG};
    return status_of(
        xs_write(handle_, transaction_, path.c_str(), value.data(), static_cast<unsigned>(value.size())));
}

Status XenStore::mkdir(const std::string& path) { return status_of(xs_mkdir(handle_, transaction_, path.c_str())); }

Status XenStore::rm(const std::string& path) { return status_of(xs_rm(handle_, transaction_, path.c_str())); }

std::optional<std::vector<std::string>> XenStore::directory(const std::string& path) {
    unsigned num = 0;
    // One allocation: the pointer array followed by the strings.
    CPtr<char*> entries(xs_directory(handle_, transaction_, path.c_str(), &num));
    if (!entries) return std::nullopt;
    return std::vector<std::string>(entries.get(), entries.get() + num);
}

Status XenStore::set_permissions(const std::string& path, const std::vector<XsPermission>& perms) {
    // The first entry is the owner (and the default for unlisted domains);
    // xenstored rejects an empty list.
    if (perms.empty()) return Errno{EINVAL};
    std::vector<xs_permissions> raw;
    raw.reserve(perms.size());
    for (const auto& p : perms) {
        const unsigned bits = access_bits(p.access);
        if (bits == std::numeric_limits<unsigned>::max()) return Errno{EINVAL};
        raw.push_back(xs_permissions{p.domid, bits});
    }
    return status_of(xs_set_permissions(handle_, transaction_, path.c_str(), raw.data(),
                                        static_cast<unsigned>(raw.size())));
}

std::optional<std::vector<XsPermission>> XenStore::get_permissions(const std::string& path) {
    unsigned num = 0;
    CPtr<xs_permissions> raw(xs_get_permissions(handle_, transaction_, path.c_str(), &num));
    if (!raw) return std::nullopt;
    std::vector<XsPermission> out;
    out.reserve(num);
    for (unsigned i = 0; i < num; ++i) out.push_back(XsPermission{raw.get()[i].id, access_char(raw.get()[i].perms)});
    return out;
}

Status XenStore::transaction(const std::function<bool(XenStore&)>& body, int attempts) {
    // xenstore has no nested transactions.
    if (transaction_ != XBT_NULL) return Errno{EBUSY};
    if (attempts < 1) attempts = 1;

    int last = EAGAIN;
    for (int attempt = 1; attempt <= attempts; ++attempt) {
        const xs_transaction_t t = xs_transaction_start(handle_);
        if (t == XBT_NULL) return last_errno();

        // While body runs, every call on this object goes into `t`; on any
        // way out (return, abort, exception) we are back outside.
        struct Scope {
            XenStore& xs;
            xs_transaction_t t;
            bool open = true;
            ~Scope() {
                xs.transaction_ = XBT_NULL;
                if (open) xs_transaction_end(xs.handle_, t, true);
            }
        } scope{*this, t};
        transaction_ = t;

        if (!body(*this)) return Errno{ECANCELED};  // Scope aborts it

        scope.open = false;
        transaction_ = XBT_NULL;
        // Ends the transaction whatever the outcome; EAGAIN means another
        // writer touched what we read or wrote: run the body again.
        if (xs_transaction_end(handle_, t, false)) return Status::success();
        last = errno ? errno : EIO;
        if (last != EAGAIN) return Errno{last};
        log::debug("xenstore: transaction conflicted (attempt {} of {})", attempt, attempts);
    }
    return Errno{last};
}

Status XenStore::watch(const std::string& path, const std::string& token) {
    // xenstored queues one event straight away (the initial fire); callers
    // must treat every event as "look again", never as "this changed".
    return status_of(xs_watch(handle_, path.c_str(), token.c_str()));
}

Status XenStore::unwatch(const std::string& path, const std::string& token) {
    // Events already queued for this watch may still be delivered.
    return status_of(xs_unwatch(handle_, path.c_str(), token.c_str()));
}

Watch::Watch(XenStore& xs, std::string path, std::string token)
    : path_(std::move(path)), token_(std::move(token)), status_(xs.watch(path_, token_)) {
    if (status_) xs_ = &xs;
}

Watch& Watch::operator=(Watch&& o) noexcept {
    if (this != &o) {
        reset();
        xs_ = std::exchange(o.xs_, nullptr);
        path_ = std::move(o.path_);
        token_ = std::move(o.token_);
        status_ = o.status_;
    }
    return *this;
}

void Watch::reset() noexcept {
    XenStore* xs = std::exchange(xs_, nullptr);
    if (xs == nullptr) return;
    try {
        if (const Status st = xs->unwatch(path_, token_); !st) {
            log::warn("xenstore: cannot remove the watch on {} (token {}): {}", path_, token_, errno_text(st.error()));
        }
    } catch (...) {
        // Logging could not allocate: the watch is gone or the connection is.
    }
}

int XenStore::fd() const { return xs_fileno(handle_); }

std::optional<WatchEvent> XenStore::read_watch() {
    errno = 0;
    CPtr<char*> event(xs_check_watch(handle_));
    if (!event) {
        // EAGAIN: nothing queued. Anything else: the connection is gone.
        if (errno != EAGAIN && errno != 0) {
            log::warn("xenstore: reading watch events failed: {} (connection to xenstored lost?)",
                      errno_text(errno));
        }
        return std::nullopt;
    }
    return WatchEvent{event.get()[XS_WATCH_PATH], event.get()[XS_WATCH_TOKEN]};
}

unsigned XenStore::self_domid() {
    // Relative paths are under our domain's home, /local/domain/<self>/;
    // the toolstack writes "domid" there (xen-init-dom0 for dom0).
    const auto text = read("domid");
    if (!text) return 0;
    unsigned domid = 0;
    const char* end = text->data() + text->size();
    const auto [ptr, ec] = std::from_chars(text->data(), end, domid);
    if (ec != std::errc{} || ptr != end) {
        throw std::runtime_error(fmt::format("xenstore: \"domid\" holds \"{}\", not a domain id", *text));
    }
    return domid;
}

}  // namespace xensock::platform
