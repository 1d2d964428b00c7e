// One connected socket's data path, top to bottom.
//
//   guest                        xensockd                         peer
//   out half ──(guest produces)──> pump_guest_to_socket ──sendmsg──> socket
//   in  half <──(we produce)────── pump_socket_to_guest <──recvmsg── socket
//
// The bytes move between the grant-mapped ring pages and the socket by
// io_uring recvmsg/sendmsg with iovecs pointing straight into the mapping
// (two iovecs when the region wraps): xensockd makes no copy of its own.
//
// The guest owns in_cons and out_prod and can write anything there at any
// moment. We read each once per pass into a local, check that it is at most
// a ring away from our own index, and only then use it. The indexes we
// produce (in_prod, out_cons) are kept privately and only published; what
// the guest writes into them is never read back.
#include "internal.hpp"

#include "xensock/util/log.hpp"

#include <sys/socket.h>

#include <cstring>

namespace xensock::engine {

DataRing::~DataRing() {
    if (worker && port) worker->port_listeners.erase(port.port());
}

// ------------------------------------------------------------------ mapping

Result<std::unique_ptr<DataRing>> map_data_ring(Worker& w, const wire::ProtocolProfile& profile, DomId domid,
                                                 uint32_t intf_ref, unsigned max_order, std::string& why) {
    const wire::DataIntfLayout& layout = profile.data_layout();
    const platform::GrantRef intf_refs[] = {intf_ref};
    auto intf_page = w.mapper->map(domid, intf_refs, /*writable=*/true);
    if (!intf_page) {
        why = fmt::format("cannot map data interface page (ref {}): {}", intf_ref, errno_text(intf_page.error()));
        return Errno{intf_page.error()};
    }
    wire::DataIntfView intf(intf_page->data(), layout);

    // Read the order once; the guest may change it after we looked.
    const uint32_t order = intf.ring_order();
    if (order < profile.min_ring_order() || order > max_order || (1u << order) > layout.max_refs()) {
        why = fmt::format("ring_order {} outside {}..{}", order, profile.min_ring_order(), max_order);
        return Errno{EINVAL};
    }
    std::vector<platform::GrantRef> refs(size_t{1} << order);
    for (uint32_t i = 0; i < refs.size(); ++i) refs[i] = intf.ref(i);

    auto buffers = w.mapper->map(domid, refs, /*writable=*/true);
    if (!buffers) {
        why = fmt::format("cannot map {} data ring pages: {}", refs.size(), errno_text(buffers.error()));
        return Errno{buffers.error()};
    }

    auto ring = std::make_unique<DataRing>(*w.reactor);
    ring->worker = &w;
    ring->order = order;
    ring->size = profile.ring_bytes(order);
    ring->intf_page = std::move(intf_page.value());
    ring->buffers = std::move(buffers.value());
    ring->intf = wire::DataIntfView(ring->intf_page.data(), layout);
    ring->in = ring->buffers.bytes();
    ring->out = ring->buffers.bytes() + ring->size;
    // Start from where the guest says the rings are (a fresh ring is all
    // zero); from now on our own copies are the truth.
    ring->in_prod = ring->intf.in_prod();
    ring->out_cons = ring->intf.out_cons();
    return ring;
}

namespace {

// The region [index, index + len) of a ring of `size` bytes as at most two
// iovecs. size is a power of two; len <= size.
unsigned ring_iovecs(std::byte* base, uint32_t size, uint32_t index, uint32_t len, iovec (&iov)[2]) {
    const uint32_t offset = index & (size - 1);
    const uint32_t first = std::min(len, size - offset);
    iov[0] = {base + offset, first};
    if (first == len) return 1;
    iov[1] = {base, len - first};
    return 2;
}

// The guest broke the ring protocol (an index more than a ring away): the
// whole socket fails, both halves and the host connection, and the sibling
// pump stops too. Only this socket is affected.
void fail_socket(DataRing& ring, int fd, rt::CancelSource& both, SessionCounters& counters) {
    counters.guest_protocol_errors.add();
    ring.intf.set_in_error(-EINVAL);
    ring.intf.set_out_error(-EINVAL);
    ring.notify_guest();
    ::shutdown(fd, SHUT_RDWR);
    both.cancel();
}

// Errors go to the guest as negative errnos; never EAGAIN (the protocol
// forbids it), and a peer's orderly shutdown is -ENOTCONN.
int32_t guest_error(int negative_errno) {
    if (negative_errno == -EAGAIN) return -EIO;
    return negative_errno;
}

// --------------------------------------------------- socket -> guest (in)
rt::Task<void> pump_socket_to_guest(rt::Reactor& reactor, DataRing& ring, int fd, rt::CancelSource& both,
                                    SessionCounters& counters) {
    const rt::CancelToken token = both.token();
    while (!token.cancelled()) {
        // Read the guest's consumer index once, then validate it.
        const uint32_t cons = ring.intf.in_cons();
        const int64_t queued = wire::ring_queued(ring.in_prod, cons, ring.size);
        if (queued < 0) {
            log::warn("guest put in_cons {} more than a ring from in_prod {}: socket failed", cons, ring.in_prod);
            fail_socket(ring, fd, both, counters);
            co_return;
        }
        const uint32_t space = ring.size - static_cast<uint32_t>(queued);
        if (space == 0) {
            // Full: stop reading the socket until the guest consumes.
            ring.in_full_stalls.add();
            counters.ring_full_stalls.add();
            ring.guest_consumed.reset();
            if (ring.intf.in_cons() != cons) continue;  // it moved while we looked
            if (!co_await ring.guest_consumed.wait(token)) co_return;
            continue;
        }

        iovec iov[2];
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = ring_iovecs(ring.in, ring.size, ring.in_prod, space, iov);
        const int n = co_await reactor.recvmsg(fd, &msg, 0, token);
        if (n == -ECANCELED) co_return;
        if (n <= 0) {
            // Every byte received is already published; now the error. Not
            // when cancelled meanwhile: a protocol error's shutdown ends a
            // pending recv with 0, and its -EINVAL must stay.
            if (token.cancelled()) co_return;
            const int32_t err = n == 0 ? -ENOTCONN : guest_error(n);
            ring.intf.set_in_error(err);
            counters.count_ring_error(SessionCounters::RingHalf::in, err);
            ring.notify_guest();
            co_return;
        }
        // Publish: the bytes are in place before the index moves (release).
        ring.in_prod += static_cast<uint32_t>(n);
        ring.intf.set_in_prod(ring.in_prod);
        ring.bytes_to_guest.add(static_cast<uint64_t>(n));
        counters.bytes_to_guest.add(static_cast<uint64_t>(n));
        ring.notify_guest();
    }
}

// --------------------------------------------------- guest -> socket (out)
rt::Task<void> pump_guest_to_socket(rt::Reactor& reactor, DataRing& ring, int fd, rt::CancelSource& both,
                                    SessionCounters& counters) {
    const rt::CancelToken token = both.token();
    while (!token.cancelled()) {
        ring.guest_produced.reset();
        // Read the guest's producer index once, then validate it.
        const uint32_t prod = ring.intf.out_prod();
        const int64_t queued = wire::ring_queued(prod, ring.out_cons, ring.size);
        if (queued < 0) {
            log::warn("guest put out_prod {} more than a ring from out_cons {}: socket failed", prod, ring.out_cons);
            fail_socket(ring, fd, both, counters);
            co_return;
        }
        if (queued == 0) {
            // Empty: wait for the guest's notification.
            ring.out_empty_waits.add();
            counters.ring_empty_waits.add();
            if (!co_await ring.guest_produced.wait(token)) co_return;
            continue;
        }

        iovec iov[2];
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = ring_iovecs(ring.out, ring.size, ring.out_cons, static_cast<uint32_t>(queued), iov);
        // A socket that cannot take data parks this op in io_uring: no spinning.
        const int n = co_await reactor.sendmsg(fd, &msg, MSG_NOSIGNAL, token);
        if (n == -ECANCELED) co_return;
        if (n < 0) {
            if (token.cancelled()) co_return;  // as above: keep a protocol error's -EINVAL
            ring.intf.set_out_error(guest_error(n));
            counters.count_ring_error(SessionCounters::RingHalf::out, guest_error(n));
            ring.notify_guest();
            co_return;
        }
        // The bytes are gone from the pages before the guest may reuse them.
        wire::DataIntfView::full_barrier();
        ring.out_cons += static_cast<uint32_t>(n);
        ring.intf.set_out_cons(ring.out_cons);
        ring.bytes_from_guest.add(static_cast<uint64_t>(n));
        counters.bytes_from_guest.add(static_cast<uint64_t>(n));
        ring.notify_guest();
    }
}

}  // namespace

// Both directions run concurrently; each ends on its own socket error (the
// other direction goes on: half-close), both end on a guest protocol error,
// and both end when the socket is released or the session torn down (token).
rt::Task<void> serve_data_ring(rt::Reactor& reactor, DataRing& ring, int fd, rt::CancelToken token,
                               SessionCounters& counters) {
    rt::CancelSource both(token);
    TaskCounter pumps(reactor);
    auto run = [](TaskCounter& count, rt::Task<void> pump) -> rt::Task<void> {
        co_await std::move(pump);
        count.leave();
    };
    pumps.enter();
    reactor.spawn(run(pumps, pump_socket_to_guest(reactor, ring, fd, both, counters)));
    pumps.enter();
    reactor.spawn(run(pumps, pump_guest_to_socket(reactor, ring, fd, both, counters)));
    co_await pumps.wait_idle();
}

std::vector<std::byte> take_unsent(DataRing& ring) {
    const uint32_t prod = ring.intf.out_prod();
    const int64_t queued = wire::ring_queued(prod, ring.out_cons, ring.size);
    if (queued <= 0 || ring.intf.out_error() != 0) return {};
    std::vector<std::byte> unsent(static_cast<size_t>(queued));
    iovec iov[2];
    const unsigned n = ring_iovecs(ring.out, ring.size, ring.out_cons, static_cast<uint32_t>(queued), iov);
    size_t at = 0;
    for (unsigned i = 0; i < n; ++i) {
        std::memcpy(unsent.data() + at, iov[i].iov_base, iov[i].iov_len);
        at += iov[i].iov_len;
    }
    ring.out_cons = prod;
    ring.intf.set_out_cons(prod);
    return unsent;
}

}  // namespace xensock::engine
