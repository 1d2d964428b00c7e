// Sim event channels (shared/spec/sim-platform.md, "Event channels"): each
// local port P of domain D is a Unix datagram socket DIR/dom<D>/evtchn/<P>;
// BIND, NOTIFY and CLOSE travel as 16-byte XSEV datagrams.
//
// One handle = one epoll fd over its port sockets plus an eventfd (the
// "wake"), which is what fd() returns. Datagrams are untrusted: any size,
// any content, from anyone who can reach the socket. Each is checked (size,
// magic, op, and that it comes from the port's peer, or for a BIND from the
// domain the port was offered to); anything else is ignored and counted.
// Who sent a datagram is its sender's socket address, not what its payload
// claims: as on Xen, where only the bound remote end can signal a port, a
// datagram counts only if it was sent from the socket of the (dom, port) it
// names, DIR/dom<dom>/evtchn/<port>. So every datagram we send leaves from
// the sending port's own bound socket.
//
// Where we send, and what that costs in descriptors (xensockd holds one port
// per guest socket, so this is per connection):
// - A port bound with bind_interdomain() (the backend side) knows its peer
//   from the start and never changes it. Its socket is connect()ed to the
//   peer's socket before it is even bound: one descriptor per port, sends
//   are plain send(), and the kernel refuses (EPERM) a datagram to it from
//   any socket but the peer's, on top of our own sender check. What the
//   peer can queue on it is bounded by the peer's send buffer rather than
//   by net.unix.max_dgram_qlen (Linux skips that limit when the receiver is
//   connected to the sender); kMaxDrainPerPort bounds our work either way.
// - A port bound with bind_unbound() (the frontend side) must take a BIND
//   from whatever socket a restarted backend sends it from, so it stays
//   unconnected (a connected socket would refuse that BIND) and reaches its
//   peer through a pin (see PeerPin): two descriptors per port, in the guest.
// Either way a peer that replaces its socket file (by a symlink to another
// socket, say /dev/log) cannot redirect what we send: the socket we reach
// is fixed when the peer becomes known.
//
// BIND and CLOSE are never dropped for a full queue: the sender retries
// for up to a second. Neither retry holds up the thread, which serves every
// other port of the handle: bind_interdomain() waits on the caller's reactor
// between attempts, and a CLOSE that does not fit is retried in the
// background from a timer in the handle's epoll set (so whoever polls fd()
// and calls pending() drives it).
//
// Not thread safe: one handle per thread, as xensockd uses them. Every
// BoundPort, and every bind in progress, must end before its handle.
#include "sim_internal.hpp"

#include "xensock/runtime/reactor.hpp"
#include "xensock/util/log.hpp"

#include <endian.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <system_error>
#include <thread>
#include <unordered_map>

namespace xensock::platform::sim {

namespace {

using Clock = std::chrono::steady_clock;

// A bound on the work one event costs: a flooding peer gets at most this
// many recv() per port and pending() call. What is left keeps the socket
// readable and is handled on the next call, so a burst of more than this
// many datagrams shows up as two events, which owners (who treat an event
// as "look again") cannot tell from one. (An unconnected port never holds
// more than net.unix.max_dgram_qlen + 1 datagrams; a connected one holds
// what fits in its peer's send buffer: a few hundred by default.)
constexpr size_t kMaxDrainPerPort = 256;
constexpr int kMaxEvents = 256;
// epoll data of the wake eventfd and of the CLOSE retry timer; ports are
// 1..kMaxPort.
constexpr uint64_t kWakeToken = 0;
constexpr uint64_t kRetryTimerToken = uint64_t{1} << 32;
// BIND and CLOSE must not be lost to a full queue: retry this long, with
// pauses growing from the first to the longest.
constexpr auto kControlRetryFor = std::chrono::seconds(1);
constexpr auto kControlRetryFirstPause = std::chrono::milliseconds(1);
constexpr auto kControlRetryMaxPause = std::chrono::milliseconds(20);
// Between attempts at the CLOSEs still waiting (one timer for them all).
constexpr auto kCloseRetryPause = std::chrono::milliseconds(10);

struct SocketAddress {
    sockaddr_un addr{};
    socklen_t len = 0;  // 0: path too long (cannot happen below a checked root)
};

SocketAddress socket_address(const std::string& path) noexcept {
    SocketAddress a;
    a.addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof a.addr.sun_path) return a;
    std::memcpy(a.addr.sun_path, path.data(), path.size());
    a.len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
    return a;
}

const sockaddr* as_sockaddr(const SocketAddress& a) noexcept { return reinterpret_cast<const sockaddr*>(&a.addr); }

EvDatagram encode(EvOp op, DomId dom, Port port) noexcept {
    return EvDatagram{htole32(kEvMagic), htole32(static_cast<uint32_t>(op)), htole32(dom), htole32(port)};
}

EvDatagram decode(const EvDatagram& raw) noexcept {
    return EvDatagram{le32toh(raw.magic), le32toh(raw.op), le32toh(raw.dom), le32toh(raw.port)};
}

// Logging from noexcept paths: formatting may allocate.
template <typename... Args>
void warn_noexcept(fmt::format_string<Args...> f, Args&&... args) noexcept {
    try {
        log::warn(f, std::forward<Args>(args)...);
    } catch (...) {
    }
}

// A send to the peer failed because its socket is gone: its file is gone
// (ENOENT), nobody is bound to it any more (ECONNREFUSED), or, on a
// connected port, an earlier send found that out (ENOTCONN: on that
// ECONNREFUSED the kernel disconnected our socket).
bool peer_vanished(int err) noexcept { return err == ECONNREFUSED || err == ENOENT || err == ENOTCONN; }

// True if nobody is bound at `a` (a socket file left by a dead process).
bool stale_socket(const SocketAddress& a) noexcept {
    const UniqueFd probe(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (!probe) return false;
    if (::connect(probe.get(), as_sockaddr(a), a.len) == 0) return false;
    return errno == ECONNREFUSED || errno == ENOENT;
}

// Opens DIR/dom<D>/evtchn/<name> following no symlink below the root, and
// only if it is of file type `type` with a single link. A guest owns its
// directory: a symlink (dom<D>/evtchn -> dom<E>/evtchn) or a hard link to
// another domain's socket would otherwise let it steer our BIND and
// notifications to another guest's ports, or anywhere on the machine.
UniqueFd open_evtchn_entry(const std::string& root, DomId d, const std::string& name, int flags,
                           mode_t type) noexcept {
    const UniqueFd rootfd(::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!rootfd) return {};
    const std::string dom = "dom" + std::to_string(d);
    const UniqueFd domfd(::openat(rootfd.get(), dom.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!domfd) return {};
    const UniqueFd evfd(::openat(domfd.get(), "evtchn", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!evfd) return {};
    UniqueFd fd(::openat(evfd.get(), name.c_str(), flags | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY));
    struct stat st {};
    if (!fd || ::fstat(fd.get(), &st) != 0 || (st.st_mode & S_IFMT) != type || st.st_nlink != 1) return {};
    return fd;
}

// Which domain (D,P)'s `.remote` offers the port to; nullopt if missing,
// not a plain file or not a strict decimal domain id. Read once.
std::optional<DomId> read_offer(const std::string& root, DomId d, Port p) noexcept {
    const UniqueFd fd = open_evtchn_entry(root, d, std::to_string(p) + ".remote", O_RDONLY | O_NONBLOCK, S_IFREG);
    if (!fd) return std::nullopt;
    char buf[16];
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n <= 0 || static_cast<size_t>(n) >= sizeof buf) return std::nullopt;  // empty, or absurdly long
    return parse_domid(std::string_view(buf, static_cast<size_t>(n)));
}

// Writes `<P>.remote` so that a reader never sees it half written.
int write_offer(const std::string& path, DomId remote) noexcept {
    const std::string tmp = path + ".tmp";
    const std::string text = std::to_string(remote);
    {
        const UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0666));
        if (!fd) return errno;
        if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
            const int err = errno ? errno : EIO;
            ::unlink(tmp.c_str());
            return err;
        }
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        return err;
    }
    return 0;
}

// The socket of a remote end, pinned: an O_PATH descriptor of the socket
// file, found without following any symlink (open_evtchn_entry), and the
// address /proc/self/fd/<fd>, which reaches that socket whatever its path
// becomes later. Connecting to, or sending to, that address follows no name
// the peer controls.
struct PeerPin {
    UniqueFd node;  // O_PATH
    SocketAddress address;
};

std::optional<PeerPin> pin_peer(const std::string& root, DomId dom, Port port) noexcept {
    PeerPin pin{open_evtchn_entry(root, dom, std::to_string(port), O_PATH, S_IFSOCK), {}};
    if (!pin.node) return std::nullopt;
    try {
        pin.address = socket_address("/proc/self/fd/" + std::to_string(pin.node.get()));
    } catch (...) {
        return std::nullopt;  // out of memory
    }
    return pin;
}

// The remote end of a port.
struct Peer {
    DomId dom = 0;
    Port port = 0;
    std::string path;  // port_path(): the address its datagrams come from
    // Only on a port whose socket is not connected to the peer (the
    // frontend side): what we send to. A peer that re-creates its socket is
    // a new incarnation and must BIND again.
    std::optional<PeerPin> pin;
};

// The path a received datagram's sender is bound to; empty for an unnamed
// (never bound) or abstract socket.
std::string_view sender_path(const sockaddr_un& from, socklen_t len) noexcept {
    constexpr size_t kPathOffset = offsetof(sockaddr_un, sun_path);
    if (len <= kPathOffset || from.sun_family != AF_UNIX || from.sun_path[0] == '\0') return {};
    const size_t max = std::min<size_t>(len - kPathOffset, sizeof from.sun_path);
    return std::string_view(from.sun_path, ::strnlen(from.sun_path, max));
}

// One bound local port. Its destructor undoes the binding: out of the epoll
// set (explicitly: a forked child may share the socket, and epoll only drops
// a socket when every copy is closed), socket closed, files removed, port
// number free again.
struct PortState {
    PortState(Context& c, int ep, Port p, UniqueFd s)
        : ctx(c), epfd(ep), port(p), path(port_path(c.root, c.self, p)), remote_path(path + ".remote"),
          sock(std::move(s)) {}
    PortState(const PortState&) = delete;
    PortState& operator=(const PortState&) = delete;
    ~PortState() {
        ::epoll_ctl(epfd, EPOLL_CTL_DEL, sock.get(), nullptr);
        sock.reset();
        ::unlink(path.c_str());
        ::unlink(remote_path.c_str());
        ctx.ports.release(port);
    }

    // Names the peer, and was sent from the peer's own socket.
    bool from_peer(const EvDatagram& d, std::string_view sender) const noexcept {
        return peer && !peer_gone && d.dom == peer->dom && d.port == peer->port && sender == peer->path;
    }

    Context& ctx;
    int epfd;
    Port port;
    std::string path;
    std::string remote_path;  // `<P>.remote`
    UniqueFd sock;
    std::optional<DomId> offered_to;  // bind_unbound: only this domain may BIND
    std::optional<Peer> peer;         // known remote end
    bool peer_gone = false;           // it sent CLOSE, or its socket vanished
    bool fired = false;               // queued in fired_, not yet reported
    bool logged_bad = false;          // one bad datagram logged already
};

// An unbound port whose CLOSE did not fit into the peer's queue yet.
struct ClosingPort {
    std::unique_ptr<PortState> ps;
    Clock::time_point give_up;
};

class SimEventChannel final : public EventChannel {
public:
    explicit SimEventChannel(std::shared_ptr<Context> ctx);
    ~SimEventChannel() override;

    int fd() const noexcept override { return epoll_.get(); }
    Result<BoundPort> bind_unbound(DomId remote) override;
    Status notify(Port local) override;
    void pending(std::vector<Port>& fired) override;
    size_t bound_ports() const noexcept override { return ports_.size(); }

protected:
    rt::Task<Result<BoundPort>> do_bind_interdomain(rt::Reactor& reactor, DomId remote, Port remote_port,
                                                    rt::CancelToken cancel) override;
    void unbind(Port local) noexcept override;

private:
    // A fresh local port; with `peer`, its socket is connected there first.
    Result<std::unique_ptr<PortState>> open_port(const SocketAddress* peer = nullptr);
    // Sends one datagram to the port's peer, once; the errno otherwise.
    int send_to_peer(PortState& ps, EvOp op) noexcept;
    // One attempt; EAGAIN if the peer's queue is full.
    Status try_send_control(PortState& ps, EvOp op) noexcept;
    // Moves an unbound port whose CLOSE got EAGAIN to closing_; false if
    // that failed (out of memory: the CLOSE is then dropped).
    bool defer_close(std::unique_ptr<PortState>& ps) noexcept;
    void retry_closes() noexcept;
    void arm_retry_timer() noexcept;
    void drain(PortState& ps);
    void handle(PortState& ps, const EvDatagram& d, std::string_view sender);
    void fire(PortState& ps);
    void wake() noexcept;
    void bad_datagram(PortState& ps, const char* why) noexcept;

    std::shared_ptr<Context> ctx_;
    UniqueFd epoll_;
    UniqueFd wake_;
    std::unordered_map<Port, std::unique_ptr<PortState>> ports_;
    UniqueFd retry_timer_;            // timerfd: the next attempt at closing_
    std::vector<ClosingPort> closing_;
    std::vector<Port> fired_;  // ports with `fired` set, in firing order
    uint64_t bad_datagrams_ = 0;
};

SimEventChannel::SimEventChannel(std::shared_ptr<Context> ctx) : ctx_(std::move(ctx)) {
    epoll_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_) throw std::system_error(errno, std::generic_category(), "sim evtchn: epoll_create1");
    // Peers are reached through /proc/self/fd (see PeerPin).
    if (::access("/proc/self/fd", X_OK) != 0) {
        throw std::system_error(errno, std::generic_category(), "sim evtchn: /proc/self/fd (is /proc mounted?)");
    }
    wake_ = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!wake_) throw std::system_error(errno, std::generic_category(), "sim evtchn: eventfd");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kWakeToken;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_.get(), &ev) != 0) {
        throw std::system_error(errno, std::generic_category(), "sim evtchn: epoll_ctl");
    }
    retry_timer_ = UniqueFd(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
    if (!retry_timer_) throw std::system_error(errno, std::generic_category(), "sim evtchn: timerfd_create");
    ev.data.u64 = kRetryTimerToken;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, retry_timer_.get(), &ev) != 0) {
        throw std::system_error(errno, std::generic_category(), "sim evtchn: epoll_ctl");
    }
}

SimEventChannel::~SimEventChannel() {
    // As closing a Xen evtchn handle does: every remote end learns it.
    for (auto& [port, ps] : ports_) {
        if (!ps->peer || ps->peer_gone) continue;
        const Status sent = try_send_control(*ps, EvOp::close);
        if (!sent && sent.error() == EAGAIN) (void)defer_close(ps);
    }
    ports_.clear();
    // The handle is going away, so nobody will call pending() again: the
    // CLOSEs that still wait get their second here, on this thread (it is
    // ending this channel, not serving it), one second in all.
    while (!closing_.empty()) {
        retry_closes();
        if (!closing_.empty()) std::this_thread::sleep_for(kCloseRetryPause);
    }
    if (bad_datagrams_ != 0) log::debug("sim evtchn: ignored {} bad datagrams", bad_datagrams_);
}

Result<std::unique_ptr<PortState>> SimEventChannel::open_port(const SocketAddress* peer) {
    // A port number held by a live socket of some other process of this
    // domain (which should not exist) stays allocated and is skipped.
    for (int attempt = 0; attempt < 64; ++attempt) {
        const std::optional<Port> port = ctx_->ports.allocate();
        if (!port) return Errno{ENOSPC};
        UniqueFd sock(::socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
        if (!sock) {
            const int err = errno;
            ctx_->ports.release(*port);
            return Errno{err};
        }
        // Connected before it is bound: there is no moment at which its
        // path takes datagrams from anyone but the peer.
        if (peer != nullptr && ::connect(sock.get(), as_sockaddr(*peer), peer->len) != 0) {
            const int err = errno;
            ctx_->ports.release(*port);
            return Errno{err};
        }
        const std::string path = port_path(ctx_->root, ctx_->self, *port);
        const SocketAddress addr = socket_address(path);
        if (addr.len == 0) {
            ctx_->ports.release(*port);
            return Errno{ENAMETOOLONG};
        }
        int rc = ::bind(sock.get(), as_sockaddr(addr), addr.len);
        if (rc != 0 && errno == EADDRINUSE && stale_socket(addr)) {
            ::unlink(path.c_str());  // left by a dead process of this domain
            rc = ::bind(sock.get(), as_sockaddr(addr), addr.len);
        }
        if (rc != 0) {
            const int err = errno;
            if (err == EADDRINUSE) {
                log::warn("sim evtchn: {} is bound by another process; skipping port {}", path, *port);
                continue;
            }
            ctx_->ports.release(*port);
            return Errno{err};
        }
        auto ps = std::make_unique<PortState>(*ctx_, epoll_.get(), *port, std::move(sock));
        // A stale `.remote` would offer this port to someone: drop it.
        ::unlink(ps->remote_path.c_str());
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = *port;
        if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, ps->sock.get(), &ev) != 0) return last_errno();
        return ps;
    }
    return Errno{EADDRINUSE};
}

rt::Task<Result<BoundPort>> SimEventChannel::do_bind_interdomain(rt::Reactor& reactor, DomId remote,
                                                                  Port remote_port, rt::CancelToken cancel) {
    if (remote > kMaxDomId || remote_port == 0 || remote_port > kMaxPort) co_return Errno{EINVAL};
    const std::optional<DomId> offered = read_offer(ctx_->root, remote, remote_port);
    if (!offered || *offered != ctx_->self) co_return Errno{EINVAL};
    Result<std::unique_ptr<PortState>> opened = Errno{EINVAL};
    {
        // Pinned only for as long as the connect takes: from then on the
        // connected socket is what holds on to the peer's.
        const std::optional<PeerPin> pin = pin_peer(ctx_->root, remote, remote_port);
        if (!pin) co_return Errno{EINVAL};  // no socket there (or not one we may use)
        opened = open_port(&pin->address);
    }
    if (!opened) {
        // ECONNREFUSED: a socket file nobody is bound to, no longer on offer.
        co_return Errno{opened.error() == ECONNREFUSED ? EINVAL : opened.error()};
    }
    std::unique_ptr<PortState> owned = std::move(opened.value());
    owned->peer = Peer{remote, remote_port, port_path(ctx_->root, remote, remote_port), std::nullopt};
    PortState& ps = *owned;
    const Port local = ps.port;
    // Listed at once, though nobody holds it yet: its socket is in the epoll
    // set, and pending() must find it to drain whatever arrives meanwhile.
    ports_.emplace(local, std::move(owned));

    // The remote end learns its peer from this, before anyone hands the port on.
    Status sent = try_send_control(ps, EvOp::bind);
    if (!sent && sent.error() == EAGAIN) {
        // Its queue is full (a guest that does not drain its port, or fills
        // it itself). Wait on the reactor, never the thread: every other
        // port of this handle is served meanwhile.
        const auto give_up = Clock::now() + kControlRetryFor;
        std::chrono::nanoseconds pause = kControlRetryFirstPause;
        while (!sent && sent.error() == EAGAIN) {
            const auto left = give_up - Clock::now();
            if (left <= Clock::duration::zero()) {
                sent = Errno{ETIMEDOUT};
                break;
            }
            // Made in a statement of its own (GCC 12, see reactor.hpp).
            auto nap = reactor.sleep_for(std::min<std::chrono::nanoseconds>(pause, left), cancel);
            if (co_await nap == -ECANCELED) {
                sent = Errno{ECANCELED};
                break;
            }
            pause = std::min<std::chrono::nanoseconds>(pause * 2, kControlRetryMaxPause);
            sent = try_send_control(ps, EvOp::bind);
        }
    }
    if (!sent) {
        const int err = sent.error();
        log::debug("sim evtchn: BIND to domain {} port {} failed: {}", remote, remote_port, errno_text(err));
        ports_.erase(local);  // the BIND never arrived: no CLOSE owed
        // Its socket vanished: the port is no longer on offer.
        co_return Errno{peer_vanished(err) ? EINVAL : err};
    }
    co_return BoundPort(this, local);
}

Result<BoundPort> SimEventChannel::bind_unbound(DomId remote) {
    if (remote > kMaxDomId) return Errno{EINVAL};
    auto opened = open_port();
    if (!opened) return Errno{opened.error()};
    std::unique_ptr<PortState> ps = std::move(opened.value());
    ps->offered_to = remote;
    // The socket exists before the offer does: whoever reads `.remote` can
    // send its BIND at once.
    if (const int err = write_offer(ps->remote_path, remote); err != 0) {
        log::warn("sim evtchn: cannot write {}: {}", ps->remote_path, errno_text(err));
        return Errno{err};
    }
    const Port local = ps->port;
    ports_.emplace(local, std::move(ps));
    return BoundPort(this, local);
}

Status SimEventChannel::notify(Port local) {
    const auto it = ports_.find(local);
    if (it == ports_.end()) return Errno{EINVAL};
    PortState& ps = *it->second;

    if (ps.offered_to && (!ps.peer || ps.peer_gone)) {
        // A guest may notify before its reactor ran pending(): the backend's
        // BIND is then still queued on our socket. Learn the peer from it
        // now. Whatever else was drained on the way (a NOTIFY, a CLOSE) is
        // no longer visible to epoll, so it is queued in fired_ and the wake
        // eventfd makes fd() readable until pending() reports it.
        const size_t before = fired_.size();
        drain(ps);
        if (fired_.size() != before) wake();
    }
    // No peer yet, or it went away: dropped, as Xen drops a send on an
    // unbound port.
    if (!ps.peer || ps.peer_gone) return Status::success();

    const int err = send_to_peer(ps, EvOp::notify);
    // A full queue: the peer has events pending and will look anyway.
    if (err == 0 || err == EAGAIN) return Status::success();
    if (peer_vanished(err)) {
        // The peer died without a CLOSE (killed): treat it as one, so the
        // owner gets an event and later notifies are dropped.
        ps.peer_gone = true;
        fire(ps);
        wake();
        return Status::success();
    }
    return Errno{err};
}

void SimEventChannel::pending(std::vector<Port>& fired) {
    uint64_t ignored = 0;
    std::array<epoll_event, kMaxEvents> events;
    int n = ::epoll_wait(epoll_.get(), events.data(), kMaxEvents, 0);
    if (n < 0) n = 0;  // EINTR: nothing this time; fd() stays readable
    for (int i = 0; i < n; ++i) {
        const uint64_t token = events[static_cast<size_t>(i)].data.u64;
        if (token == kWakeToken) {
            // Level-triggered, so read only when it is set (one syscall less
            // per event otherwise); fired_ holds what it was for.
            (void)!::read(wake_.get(), &ignored, sizeof ignored);
            continue;
        }
        if (token == kRetryTimerToken) {
            (void)!::read(retry_timer_.get(), &ignored, sizeof ignored);  // disarmed until re-armed
            retry_closes();
            continue;
        }
        const auto it = ports_.find(static_cast<Port>(token));
        if (it != ports_.end()) drain(*it->second);
    }

    for (const Port p : fired_) {
        const auto it = ports_.find(p);
        if (it == ports_.end() || !it->second->fired) continue;  // unbound since, or already listed
        it->second->fired = false;
        fired.push_back(p);
    }
    fired_.clear();
}

void SimEventChannel::unbind(Port local) noexcept {
    const auto it = ports_.find(local);
    if (it == ports_.end()) return;
    PortState& ps = *it->second;
    if (ps.peer && !ps.peer_gone) {
        const Status sent = try_send_control(ps, EvOp::close);
        if (!sent && sent.error() == EAGAIN && defer_close(it->second)) {
            ports_.erase(it);  // now owned by closing_
            return;
        }
        if (!sent && !peer_vanished(sent.error())) {
            warn_noexcept("sim evtchn: CLOSE from port {} to domain {} port {} failed: {}", ps.port, ps.peer->dom,
                          ps.peer->port, errno_text(sent.error()));
        }
    }
    ports_.erase(it);  // ~PortState removes the socket and its files
}

Status SimEventChannel::try_send_control(PortState& ps, EvOp op) noexcept {
    const int err = send_to_peer(ps, op);
    if (err == 0) return Status::success();
    return Errno{err};
}

int SimEventChannel::send_to_peer(PortState& ps, EvOp op) noexcept {
    const Peer& peer = *ps.peer;
    const EvDatagram d = encode(op, ctx_->self, ps.port);
    bool reported_pending_error = false;
    for (;;) {
        // From the port's own socket: the peer checks where it comes from.
        const ssize_t n =
            peer.pin ? ::sendto(ps.sock.get(), &d, sizeof d, MSG_DONTWAIT | MSG_NOSIGNAL,
                                as_sockaddr(peer.pin->address), peer.pin->address.len)
                     : ::send(ps.sock.get(), &d, sizeof d, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n == static_cast<ssize_t>(sizeof d)) return 0;
        const int err = n < 0 ? errno : EIO;
        if (err == EINTR) continue;
        // The socket's pending error (see drain()), reported instead of
        // sending and cleared: nothing was sent, try once more.
        if (err == ECONNRESET && !reported_pending_error) {
            reported_pending_error = true;
            continue;
        }
        return err == EWOULDBLOCK ? EAGAIN : err;
    }
}

bool SimEventChannel::defer_close(std::unique_ptr<PortState>& ps) noexcept {
    try {
        closing_.reserve(closing_.size() + 1);
    } catch (...) {
        return false;
    }
    // Unbound for its owner; for the peer it stays as it was until the CLOSE
    // is in: a peer that has yet to read our BIND must still find the socket
    // it names, or it would drop the BIND and then the CLOSE. Out of the
    // epoll set: nothing it receives matters now.
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, ps->sock.get(), nullptr);
    ps->fired = false;
    closing_.push_back(ClosingPort{std::move(ps), Clock::now() + kControlRetryFor});
    if (closing_.size() == 1) arm_retry_timer();
    return true;
}

void SimEventChannel::retry_closes() noexcept {
    const auto now = Clock::now();
    for (size_t i = 0; i < closing_.size();) {
        PortState& ps = *closing_[i].ps;
        const Status sent = try_send_control(ps, EvOp::close);
        bool done = sent.ok() || sent.error() != EAGAIN;
        if (!done && now >= closing_[i].give_up) {
            warn_noexcept("sim evtchn: gave up on the CLOSE from port {} to domain {} port {}: its queue stayed "
                          "full for {} ms", ps.port, ps.peer->dom, ps.peer->port,
                          std::chrono::milliseconds(kControlRetryFor).count());
            done = true;
        } else if (!sent && sent.error() != EAGAIN && !peer_vanished(sent.error())) {
            warn_noexcept("sim evtchn: CLOSE from port {} to domain {} port {} failed: {}", ps.port, ps.peer->dom,
                          ps.peer->port, errno_text(sent.error()));
        }
        if (!done) {
            ++i;
            continue;
        }
        if (i + 1 != closing_.size()) std::swap(closing_[i], closing_.back());
        closing_.pop_back();  // ~PortState: socket closed, port number free
    }
    if (!closing_.empty()) arm_retry_timer();
}

void SimEventChannel::arm_retry_timer() noexcept {
    itimerspec when{};
    when.it_value.tv_nsec = std::chrono::nanoseconds(kCloseRetryPause).count();
    if (::timerfd_settime(retry_timer_.get(), 0, &when, nullptr) != 0) {
        warn_noexcept("sim evtchn: cannot arm the CLOSE retry timer: {}", errno_text(errno));
    }
}

void SimEventChannel::drain(PortState& ps) {
    // Datagrams are taken kDrainBatch at a time with one recvmmsg: a batch
    // that comes back short means the queue is empty (no extra call just to
    // see EAGAIN), and a flooding peer costs at most kMaxDrainPerPort.
    constexpr unsigned kDrainBatch = 16;
    std::array<EvDatagram, kDrainBatch> raw;
    std::array<sockaddr_un, kDrainBatch> from;
    std::array<iovec, kDrainBatch> iov;
    std::array<mmsghdr, kDrainBatch> msgs;
    size_t taken = 0;
    unsigned interrupted = 0;
    while (taken < kMaxDrainPerPort) {
        for (unsigned i = 0; i < kDrainBatch; ++i) {
            iov[i] = {&raw[i], sizeof raw[i]};
            msgs[i] = {};
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // MSG_TRUNC: msg_len is the real length, so an oversized datagram
        // is caught.
        const int n = ::recvmmsg(ps.sock.get(), msgs.data(), kDrainBatch, MSG_DONTWAIT | MSG_TRUNC, nullptr);
        if (n < 0) {
            // ECONNRESET: the socket's pending error, reported once and then
            // cleared; what is queued is still there. A peer raises it on a
            // connected port by connecting its own socket to ours and away
            // again with datagrams in its queue. It means nothing to us.
            if ((errno == EINTR || errno == ECONNRESET) && ++interrupted < kDrainBatch) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                log::debug("sim evtchn: recv on port {}: {}", ps.port, errno_text(errno));
            }
            return;
        }
        for (int i = 0; i < n; ++i) {
            const mmsghdr& m = msgs[static_cast<size_t>(i)];
            if (m.msg_len != sizeof(EvDatagram) || (m.msg_hdr.msg_flags & MSG_TRUNC) != 0) {
                bad_datagram(ps, "wrong size");
                continue;
            }
            handle(ps, decode(raw[static_cast<size_t>(i)]),
                   sender_path(from[static_cast<size_t>(i)], m.msg_hdr.msg_namelen));
        }
        taken += static_cast<size_t>(n);
        if (n < static_cast<int>(kDrainBatch)) return;  // the queue is empty
    }
}

void SimEventChannel::handle(PortState& ps, const EvDatagram& d, std::string_view sender) {
    if (d.magic != kEvMagic) return bad_datagram(ps, "bad magic");
    switch (static_cast<EvOp>(d.op)) {
    case EvOp::notify:
        if (!ps.from_peer(d, sender)) return bad_datagram(ps, "NOTIFY not from the peer's socket");
        return fire(ps);
    case EvOp::bind:
        // Only on a port we offered, only from the domain it was offered
        // to, sent from the socket it names; a later BIND replaces the peer
        // (a restarted backend). Not an event: on Xen, binding raises none.
        if (!ps.offered_to || d.dom != *ps.offered_to || d.port == 0 || d.port > kMaxPort) {
            return bad_datagram(ps, "BIND not from the domain the port is offered to");
        }
        if (sender.empty() || sender != port_path(ctx_->root, d.dom, d.port)) {
            return bad_datagram(ps, "BIND not sent from the socket it names");
        }
        if (std::optional<PeerPin> pin = pin_peer(ctx_->root, d.dom, d.port)) {
            ps.peer = Peer{d.dom, d.port, port_path(ctx_->root, d.dom, d.port), std::move(pin)};
            ps.peer_gone = false;
            return;
        }
        return bad_datagram(ps, "BIND from a port without a usable socket");
    case EvOp::close:
        if (!ps.from_peer(d, sender)) return bad_datagram(ps, "CLOSE not from the peer's socket");
        ps.peer_gone = true;
        return fire(ps);  // the owner wants to notice its peer went away
    }
    bad_datagram(ps, "unknown op");
}

void SimEventChannel::fire(PortState& ps) {
    if (ps.fired) return;
    fired_.push_back(ps.port);
    ps.fired = true;
}

void SimEventChannel::wake() noexcept {
    const uint64_t one = 1;
    (void)!::write(wake_.get(), &one, sizeof one);  // EAGAIN only at 2^64-1: already readable
}

void SimEventChannel::bad_datagram(PortState& ps, const char* why) noexcept {
    ++bad_datagrams_;
    if (ps.logged_bad) return;
    ps.logged_bad = true;  // once per port: a hostile sender must not flood the log
    try {
        log::debug("sim evtchn: port {}: ignoring a bad datagram ({}); later ones are only counted", ps.port, why);
    } catch (...) {
    }
}

}  // namespace

std::unique_ptr<EventChannel> make_event_channel(std::shared_ptr<Context> ctx) {
    return std::make_unique<SimEventChannel>(std::move(ctx));
}

}  // namespace xensock::platform::sim
