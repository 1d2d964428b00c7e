// The commands. Each request runs as its own coroutine, so a connect to a
// blackholed address or an accept with no client waits on io_uring without
// holding up anything else. Each handler validates every guest field before
// use and returns the one value that goes back in the response.
//
// Error numbers (negative Linux errnos, which are the protocol's):
//   unknown command                  -ENOTSUPP (524)
//   unknown sockid                   -EBADF
//   SOCKET: sockid in use            -EEXIST; family/type/protocol other than
//           AF_INET/SOCK_STREAM/0|6  -EAFNOSUPPORT (as Linux's backend);
//           too many sockets         -EMFILE
//   CONNECT/BIND: address length outside 16..28 -EINVAL, family not AF_INET
//           -EAFNOSUPPORT, socket not fresh -EISCONN (connected) / -EINVAL,
//           bad data ring (order, refs, port) -EINVAL/-EPERM, plus connect(2)
//           and bind(2) errors (-ECONNREFUSED, -EADDRINUSE, -ETIMEDOUT, ...)
//   LISTEN on a socket that is not bound/fresh  -EINVAL
//   ACCEPT/POLL on a socket that is not listening -EINVAL; ACCEPT's new
//           sockid in use -EEXIST; pending ACCEPT/POLL when the listening
//           socket is released or killed: -EBADF, answered before RELEASE.
//   CONNECT while a connect is in progress -EALREADY; after a failed port
//           bind (the host connection is reset, a fresh host socket takes its
//           place) the guest may CONNECT again; if that socket cannot be
//           made, later CONNECTs get -ECONNABORTED.
//   RELEASE with queued bytes beyond the guest's lingering budget: the
//           connection is reset (RST), a quota refusal; RELEASE answers 0.
#include "internal.hpp"

#include "xensock/util/log.hpp"

#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstring>

namespace xensock::engine {

std::string_view kind_name(SocketKind k) {
    switch (k) {
        case SocketKind::reserved: return "reserved";
        case SocketKind::fresh: return "new";
        case SocketKind::connecting: return "connecting";
        case SocketKind::active: return "connected";
        case SocketKind::bound: return "bound";
        case SocketKind::listening: return "listening";
        case SocketKind::closing: return "closing";
        case SocketKind::failed: return "failed";
    }
    return "?";
}

namespace {

// The guest's sockaddr_in: family u16 in the guest's byte order (x86: little
// endian), port and address in network order.
int parse_guest_address(const wire::Request& req, sockaddr_in& out) {
    if (req.addr_len < sizeof(sockaddr_in) || req.addr_len > req.addr.size()) return -EINVAL;
    uint16_t family;
    std::memcpy(&family, req.addr.data(), sizeof family);
    if (family != AF_INET) return -EAFNOSUPPORT;
    out = {};
    out.sin_family = AF_INET;
    std::memcpy(&out.sin_port, req.addr.data() + 2, sizeof out.sin_port);
    std::memcpy(&out.sin_addr, req.addr.data() + 4, sizeof out.sin_addr);
    return 0;
}

int new_host_socket(FileDescriptor& out) {
    // Blocking on purpose: io_uring does its own non-blocking attempt and
    // then parks the request; with O_NONBLOCK it would hand us -EAGAIN.
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    out = FileDescriptor(fd);
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return 0;
}

// Closes a connected host socket with an RST (SO_LINGER 0) rather than a
// FIN: the peer must not mistake an aborted connection for an orderly end.
void abort_connection(FileDescriptor& fd) {
    if (!fd) return;
    const linger reset{1, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
    fd.reset();
}

// Runs `task` as a child of `counter` (the socket's or the connection's), so
// the owner can wait for it before it frees what the task uses.
rt::Task<void> tracked(TaskCounter& counter, rt::Task<void> task) {
    co_await std::move(task);
    counter.leave();
}

}  // namespace

rt::Task<void> Session::run_command(Connection& c, wire::Request req) {
    const auto cmd_index = static_cast<size_t>(req.cmd);
    counters.commands[cmd_index].add();
    int ret = 0;
    uint64_t echo_sockid = req.sockid;
    try {
        switch (req.cmd) {
            case wire::Command::socket: ret = co_await cmd_socket(c, req); break;
            case wire::Command::connect: ret = co_await cmd_connect(c, req); break;
            case wire::Command::release: ret = co_await cmd_release(c, req); break;
            case wire::Command::bind: ret = co_await cmd_bind(c, req); break;
            case wire::Command::listen: ret = co_await cmd_listen(c, req); break;
            case wire::Command::accept: ret = co_await cmd_accept(c, req); break;
            case wire::Command::poll: ret = co_await cmd_poll(c, req); break;
            case wire::Command::unknown: ret = -wire::kENOTSUPP; break;
        }
    } catch (const std::exception& e) {
        log::error("dom{}: {} failed: {}", key.domid, wire::command_name(req.cmd), e.what());
        ret = -EIO;
    }
    if (ret < 0) {
        counters.command_errors[cmd_index].add();
        counters.count_error(ret);
    } else {
        counters.command_ok[cmd_index].add();
    }
    respond(c, req, ret, echo_sockid);
    c.tasks.leave();
}

rt::Task<int> Session::cmd_socket(Connection& c, const wire::Request& req) {
    if (req.domain != AF_INET || req.type != SOCK_STREAM || (req.protocol != 0 && req.protocol != IPPROTO_TCP))
        co_return -EAFNOSUPPORT;
    if (c.sockets.count(req.sockid)) co_return -EEXIST;
    if (c.sockets.size() >= worker.shared.config.max_sockets_per_guest) {
        counters.quota_refusals.add();
        co_return -EMFILE;
    }
    auto sock = std::make_unique<Socket>(*worker.reactor, req.sockid, c.cancel.token());
    if (int rc = new_host_socket(sock->fd); rc < 0) co_return rc;
    sock->kind = SocketKind::fresh;
    c.sockets[req.sockid] = std::move(sock);
    co_return 0;
}

rt::Task<int> Session::cmd_connect(Connection& c, const wire::Request& req) {
    auto it = c.sockets.find(req.sockid);
    if (it == c.sockets.end() || it->second->kind == SocketKind::reserved) co_return -EBADF;
    Socket& sock = *it->second;
    if (sock.killed) co_return -ECONNRESET;
    if (sock.kind == SocketKind::failed) co_return -ECONNABORTED;
    if (sock.kind == SocketKind::active) co_return -EISCONN;
    if (sock.kind == SocketKind::connecting) co_return -EALREADY;
    if (sock.kind != SocketKind::fresh) co_return -EINVAL;
    sockaddr_in addr{};
    if (int rc = parse_guest_address(req, addr); rc < 0) co_return rc;

    // Map the guest's ring before connecting: a bad ring fails fast, and a
    // good one is ready the moment the connection is.
    std::string why;
    auto ring = map_data_ring(worker, profile, key.domid, req.ref, worker.shared.config.max_ring_order, why);
    if (!ring) {
        log::warn("dom{} connect sockid {}: {}", key.domid, req.sockid, why);
        counters.guest_protocol_errors.add();
        co_return -ring.error();
    }

    sock.kind = SocketKind::connecting;
    TaskGuard busy(sock.tasks);  // RELEASE waits for this command to end
    const int rc = co_await worker.reactor->connect(sock.fd.get(), reinterpret_cast<const sockaddr*>(&addr),
                                                    sizeof addr, sock.cancel.token());
    if (sock.cancel.cancelled()) co_return -EBADF;  // released or killed meanwhile
    if (rc < 0) {
        sock.kind = SocketKind::fresh;
        co_return rc;
    }

    // Bind the guest's port last: on sim the BIND goes out before our reply.
    auto port = co_await worker.evtchn->bind_interdomain(*worker.reactor, key.domid, req.evtchn, sock.cancel.token());
    if (sock.cancel.cancelled()) co_return -EBADF;  // released or killed meanwhile
    if (!port) {
        // The host connection exists, but the guest's ring never will: abort
        // the connection and start over with a fresh host socket, as if the
        // connect had failed (the guest may CONNECT again).
        log::warn("dom{} connect sockid {}: cannot bind event channel {}: {}", key.domid, req.sockid, req.evtchn,
                  errno_text(port.error()));
        counters.guest_protocol_errors.add();
        abort_connection(sock.fd);
        sock.kind = new_host_socket(sock.fd) == 0 ? SocketKind::fresh : SocketKind::failed;
        co_return -port.error();
    }
    (*ring)->port = std::move(port.value());
    (*ring)->session_counters = &counters;
    worker.port_listeners[(*ring)->port.port()] = ring->get();
    sock.ring = std::move(ring.value());
    sock.remote = addr;
    socklen_t len = sizeof sock.local;
    ::getsockname(sock.fd.get(), reinterpret_cast<sockaddr*>(&sock.local), &len);
    sock.kind = SocketKind::active;
    sock.tasks.enter();
    worker.reactor->spawn(
        tracked(sock.tasks, serve_data_ring(*worker.reactor, *sock.ring, sock.fd.get(), sock.cancel.token(), counters)));
    co_return 0;
}

rt::Task<int> Session::cmd_bind(Connection& c, const wire::Request& req) {
    auto it = c.sockets.find(req.sockid);
    if (it == c.sockets.end() || it->second->kind == SocketKind::reserved) co_return -EBADF;
    Socket& sock = *it->second;
    if (sock.kind != SocketKind::fresh) co_return -EINVAL;  // double bind, or connected
    sockaddr_in addr{};
    if (int rc = parse_guest_address(req, addr); rc < 0) co_return rc;
    const int one = 1;
    ::setsockopt(sock.fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(sock.fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) < 0) co_return -errno;
    socklen_t len = sizeof sock.local;
    ::getsockname(sock.fd.get(), reinterpret_cast<sockaddr*>(&sock.local), &len);
    sock.kind = SocketKind::bound;
    co_return 0;
}

rt::Task<int> Session::cmd_listen(Connection& c, const wire::Request& req) {
    auto it = c.sockets.find(req.sockid);
    if (it == c.sockets.end() || it->second->kind == SocketKind::reserved) co_return -EBADF;
    Socket& sock = *it->second;
    if (sock.kind == SocketKind::listening) co_return 0;  // as listen(2): adjusts nothing harmful
    if (sock.kind != SocketKind::bound && sock.kind != SocketKind::fresh) co_return -EINVAL;
    const int backlog = static_cast<int>(std::min<uint32_t>(req.backlog, SOMAXCONN));
    if (::listen(sock.fd.get(), backlog) < 0) co_return -errno;
    socklen_t len = sizeof sock.local;
    ::getsockname(sock.fd.get(), reinterpret_cast<sockaddr*>(&sock.local), &len);
    sock.kind = SocketKind::listening;
    co_return 0;
}

// ACCEPT replies only once a connection was accepted (never -EAGAIN), with
// the new socket's data ring mapped and its port bound before the reply.
// Any number of ACCEPTs and POLLs may wait on one listening socket: the
// kernel hands connections to the ACCEPTs in order, and a POLL completes as
// soon as a connection is queued, even if a waiting ACCEPT then takes it —
// exactly how poll(2) and accept(2) behave across threads.
rt::Task<int> Session::cmd_accept(Connection& c, const wire::Request& req) {
    auto it = c.sockets.find(req.sockid);
    if (it == c.sockets.end() || it->second->kind == SocketKind::reserved) co_return -EBADF;
    Socket& listener = *it->second;
    if (listener.kind != SocketKind::listening) co_return -EINVAL;
    if (c.sockets.count(req.new_sockid)) co_return -EEXIST;
    if (c.sockets.size() >= worker.shared.config.max_sockets_per_guest) {
        counters.quota_refusals.add();
        co_return -EMFILE;
    }

    std::string why;
    auto ring = map_data_ring(worker, profile, key.domid, req.ref, worker.shared.config.max_ring_order, why);
    if (!ring) {
        log::warn("dom{} accept sockid {}: {}", key.domid, req.new_sockid, why);
        counters.guest_protocol_errors.add();
        co_return -ring.error();
    }
    // Reserve the new id so a SOCKET meanwhile cannot take it.
    const uint64_t new_id = req.new_sockid;
    auto placeholder = std::make_unique<Socket>(*worker.reactor, new_id, c.cancel.token());
    placeholder->kind = SocketKind::reserved;
    c.sockets[new_id] = std::move(placeholder);
    auto unreserve = [&c, new_id] {
        auto p = c.sockets.find(new_id);
        if (p != c.sockets.end() && p->second->kind == SocketKind::reserved) c.sockets.erase(p);
    };

    sockaddr_in peer{};
    int fd = -1;
    {
        TaskGuard busy(listener.tasks);
        while (true) {
            socklen_t peer_len = sizeof peer;
            fd = co_await worker.reactor->accept(listener.fd.get(), reinterpret_cast<sockaddr*>(&peer), &peer_len,
                                                 SOCK_CLOEXEC, listener.cancel.token());
            // Transient failures (the client gave up, a signal) are no answer.
            if (fd == -EAGAIN || fd == -EINTR || fd == -ECONNABORTED) continue;
            break;
        }
    }
    if (fd >= 0 && listener.cancel.cancelled()) {
        ::close(fd);
        fd = -ECANCELED;
    }
    if (fd < 0) {
        unreserve();
        co_return fd == -ECANCELED ? -EBADF : fd;
    }
    FileDescriptor conn_fd(fd);
    auto port = co_await worker.evtchn->bind_interdomain(*worker.reactor, key.domid, req.evtchn, c.cancel.token());
    if (!port) {
        log::warn("dom{} accept sockid {}: cannot bind event channel {}: {}", key.domid, new_id, req.evtchn,
                  errno_text(port.error()));
        counters.guest_protocol_errors.add();
        abort_connection(conn_fd);  // the client sees a reset, not an empty session
        unreserve();
        co_return -port.error();
    }
    (*ring)->port = std::move(port.value());
    (*ring)->session_counters = &counters;
    worker.port_listeners[(*ring)->port.port()] = ring->get();

    auto sock = std::make_unique<Socket>(*worker.reactor, new_id, c.cancel.token());
    sock->fd = std::move(conn_fd);
    const int one = 1;
    ::setsockopt(sock->fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    sock->ring = std::move(ring.value());
    sock->remote = peer;
    socklen_t len = sizeof sock->local;
    ::getsockname(sock->fd.get(), reinterpret_cast<sockaddr*>(&sock->local), &len);
    sock->kind = SocketKind::active;
    Socket& s = *sock;
    c.sockets[new_id] = std::move(sock);  // replaces the reservation
    s.tasks.enter();
    worker.reactor->spawn(
        tracked(s.tasks, serve_data_ring(*worker.reactor, *s.ring, s.fd.get(), s.cancel.token(), counters)));
    co_return 0;
}

rt::Task<int> Session::cmd_poll(Connection& c, const wire::Request& req) {
    auto it = c.sockets.find(req.sockid);
    if (it == c.sockets.end() || it->second->kind == SocketKind::reserved) co_return -EBADF;
    Socket& listener = *it->second;
    if (listener.kind != SocketKind::listening) co_return -EINVAL;
    TaskGuard busy(listener.tasks);
    const int rc = co_await worker.reactor->poll(listener.fd.get(), POLLIN, listener.cancel.token());
    if (rc == -ECANCELED || listener.cancel.cancelled()) co_return -EBADF;
    co_return rc < 0 ? rc : 0;
}

// RELEASE behaves like close(2): what the guest already queued in `out` is
// still delivered (copied out before the reply, sent in the background, up to
// the linger bound), then the socket closes. Pending ACCEPT/POLL on a
// listening socket are answered (-EBADF) before this reply.
rt::Task<int> Session::cmd_release(Connection& c, const wire::Request& req) {
    auto it = c.sockets.find(req.sockid);
    if (it == c.sockets.end() || it->second->kind == SocketKind::reserved) co_return -EBADF;
    Socket& sock = *it->second;
    if (sock.kind == SocketKind::closing && !sock.killed) co_return -EBADF;  // a RELEASE is already running
    sock.kind = SocketKind::closing;
    sock.killed = false;
    sock.cancel.cancel();
    // A pending ACCEPT/POLL answers before we do: its TaskGuard's exit wakes
    // us through the ready queue (never inline), and it responds with no
    // co_await in between. Keep it that way.
    co_await sock.tasks.wait_idle();

    std::unique_ptr<Socket> owned = std::move(c.sockets[req.sockid]);
    c.sockets.erase(req.sockid);
    std::vector<std::byte> unsent;
    if (owned->ring) {
        unsent = take_unsent(*owned->ring);
        owned->ring.reset();  // unmap and unbind before the reply
    }
    if (!unsent.empty()) {
        const auto& cfg = worker.shared.config;
        Worker::Lingering& budget = worker.lingering[key.domid];
        if (budget.sockets >= cfg.max_lingering_sockets_per_guest ||
            unsent.size() > cfg.max_lingering_bytes_per_guest - std::min(budget.bytes, cfg.max_lingering_bytes_per_guest)) {
            // Over this guest's budget for bytes still on their way: drop
            // them, and let the peer know (RST) rather than fake an orderly
            // end of stream.
            log::info("dom{} release sockid {}: {} queued bytes dropped, connection reset ({} sockets / {} bytes "
                      "of this guest still lingering)",
                      key.domid, req.sockid, unsent.size(), budget.sockets, budget.bytes);
            if (budget.sockets == 0) worker.lingering.erase(key.domid);
            counters.quota_refusals.add();
            abort_connection(owned->fd);
            co_return 0;
        }
        ++budget.sockets;
        budget.bytes += unsent.size();
        // Deliver the tail, then close, like close(2) with data still in the
        // send buffer. The bytes and the socket now belong to the worker, not
        // to the session: a guest that exits right after RELEASE (the common
        // case) must not cut its own last bytes off. Bounded by the linger
        // time and by the guest's lingering budget; only the daemon stopping
        // ends it sooner.
        worker.session_tasks->enter();
        auto deliver = [](Worker& w, DomId domid, FileDescriptor fd, std::vector<std::byte> bytes) -> rt::Task<void> {
            rt::Reactor& r = *w.reactor;
            const rt::CancelToken token = w.stopping.token();
            size_t sent = 0;
            const auto deadline = std::chrono::steady_clock::now() + w.shared.config.linger;
            while (sent < bytes.size() && !token.cancelled()) {
                const auto left = deadline - std::chrono::steady_clock::now();
                if (left <= std::chrono::nanoseconds(0)) break;
                auto op = r.send(fd.get(), bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL, token);
                op.timeout(left);
                const int n = co_await op;
                if (n <= 0) break;
                sent += static_cast<size_t>(n);
            }
            if (sent < bytes.size()) {
                log::info("released socket: {} of {} queued bytes not delivered (linger bound or daemon stopping)",
                          bytes.size() - sent, bytes.size());
                abort_connection(fd);
            }
            if (auto it = w.lingering.find(domid); it != w.lingering.end()) {
                it->second.bytes -= std::min<uint64_t>(it->second.bytes, bytes.size());
                if (--it->second.sockets == 0) w.lingering.erase(it);
            }
            w.session_tasks->leave();
        };
        worker.reactor->spawn(deliver(worker, key.domid, std::move(owned->fd), std::move(unsent)));
    }
    co_return 0;
}

// xensockctl kill DOMID SOCKID: close the host socket; the guest sees the
// error on that ring; everything else is untouched.
rt::Task<void> Session::kill_socket(Connection& c, uint64_t sockid) {
    auto it = c.sockets.find(sockid);
    if (it == c.sockets.end()) co_return;
    Socket& sock = *it->second;
    if (sock.kind == SocketKind::reserved || sock.kind == SocketKind::closing) co_return;
    sock.cancel.cancel();
    co_await sock.tasks.wait_idle();
    if (sock.ring) {
        sock.ring->intf.set_in_error(-ECONNRESET);
        sock.ring->intf.set_out_error(-ECONNRESET);
        sock.ring->notify_guest();
    }
    ::shutdown(sock.fd.get(), SHUT_RDWR);
    sock.fd.reset();
    // The entry stays (with its ring mapped) until the guest releases it, so
    // its sockid keeps answering; a killed socket cannot be used again.
    sock.kind_before_kill = std::exchange(sock.kind, SocketKind::closing);
    sock.killed = true;
}

}  // namespace xensock::engine
