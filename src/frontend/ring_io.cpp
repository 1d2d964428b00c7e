// The guest's producer and consumer steps on a data ring, and small helpers.
// Pure memory operations: no platform, no reactor (unit-testable).
#include "xensock/frontend/frontend.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>

namespace xensock::frontend {

int normalize_ring_error(int32_t value) noexcept {
    if (value == 0) return 0;
    const int64_t magnitude = value < 0 ? -static_cast<int64_t>(value) : value;
    if (magnitude > 4095) return -EIO;  // no errno is that large
    return -static_cast<int>(magnitude);
}

void copy_to_ring(std::byte* base, uint32_t size, uint32_t index, const std::byte* src, uint32_t len) noexcept {
    const uint32_t offset = index & (size - 1);
    const uint32_t first = std::min(len, size - offset);
    std::memcpy(base + offset, src, first);
    if (first < len) std::memcpy(base, src + first, len - first);
}

void copy_from_ring(const std::byte* base, uint32_t size, uint32_t index, std::byte* dst, uint32_t len) noexcept {
    const uint32_t offset = index & (size - 1);
    const uint32_t first = std::min(len, size - offset);
    std::memcpy(dst, base + offset, first);
    if (first < len) std::memcpy(dst + first, base, len - first);
}

ssize_t produce_out(RingHalves ring, std::span<const std::byte> data) noexcept {
    if (data.empty()) return 0;
    // One read of each shared field; the backend may change them any time.
    const uint32_t cons = ring.intf.out_cons();
    const uint32_t prod = ring.intf.out_prod();
    const int32_t error = ring.intf.out_error();
    wire::DataIntfView::full_barrier();
    if (error != 0) return normalize_ring_error(error);
    const int64_t queued = wire::ring_queued(prod, cons, ring.size);
    if (queued < 0) return -EIO;  // indexes more than a ring apart
    const uint32_t space = ring.size - static_cast<uint32_t>(queued);
    if (space == 0) return -EAGAIN;
    const auto n = static_cast<uint32_t>(std::min<size_t>(space, data.size()));
    copy_to_ring(ring.out, ring.size, prod, data.data(), n);
    // Write barrier: the bytes are in place before the index that publishes
    // them moves (the store below is a release store as well).
    std::atomic_thread_fence(std::memory_order_release);
    ring.intf.set_out_prod(prod + n);
    return static_cast<ssize_t>(n);
}

ssize_t consume_in(RingHalves ring, std::span<std::byte> buf) noexcept {
    if (buf.empty()) return 0;
    // The error first: if it is set, every byte produced before it is
    // already visible through the in_prod we read next.
    const int32_t error = ring.intf.in_error();
    std::atomic_thread_fence(std::memory_order_acquire);  // read barrier
    const uint32_t prod = ring.intf.in_prod();
    const uint32_t cons = ring.intf.in_cons();
    const int64_t queued = wire::ring_queued(prod, cons, ring.size);
    if (queued < 0) return -EIO;
    if (queued == 0) {
        // Report the error only once the ring is empty: the bytes before an
        // orderly shutdown are data.
        if (error == 0) return -EAGAIN;
        const int e = normalize_ring_error(error);
        return e == -ENOTCONN ? 0 : e;
    }
    const auto n = static_cast<uint32_t>(std::min<size_t>(static_cast<size_t>(queued), buf.size()));
    copy_from_ring(ring.in, ring.size, cons, buf.data(), n);
    // The bytes are copied out before the backend may overwrite them.
    wire::DataIntfView::full_barrier();
    ring.intf.set_in_cons(cons + n);
    return static_cast<ssize_t>(n);
}

std::optional<sockaddr_in> ipv4(std::string_view addr, uint16_t port) {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    const std::string text(addr);
    if (::inet_pton(AF_INET, text.c_str(), &sa.sin_addr) != 1) return std::nullopt;
    return sa;
}

std::string_view socket_state_name(SocketState s) noexcept {
    switch (s) {
        case SocketState::created: return "created";
        case SocketState::bound: return "bound";
        case SocketState::listening: return "listening";
        case SocketState::connecting: return "connecting";
        case SocketState::connected: return "connected";
        case SocketState::accepting: return "accepting";
        case SocketState::releasing: return "releasing";
    }
    return "unknown";
}

}  // namespace xensock::frontend
