// The Xen shared ring (xen/io/ring.h, DEFINE_RING_TYPES) as used by both
// protocols' command rings: one 4096-byte page, 64-byte header, 64-byte
// slots, 32 slots. Both ends are here: BackRing (xensockd) and FrontRing
// (the guest library). Shared indexes are read with atomic loads, exactly
// once per decision, and the back end validates what the guest wrote.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace xensock::wire {

using RingIdx = uint32_t;

struct SringHeader {
    RingIdx req_prod;
    RingIdx req_event;
    RingIdx rsp_prod;
    RingIdx rsp_event;
    uint8_t pvt[4];
    uint8_t pad[44];
};
static_assert(sizeof(SringHeader) == 64);
static_assert(offsetof(SringHeader, req_prod) == 0);
static_assert(offsetof(SringHeader, req_event) == 4);
static_assert(offsetof(SringHeader, rsp_prod) == 8);
static_assert(offsetof(SringHeader, rsp_event) == 12);

inline constexpr size_t kRingPageSize = 4096;
inline constexpr size_t kSlotSize = 64;  // union of request (64) and response (24)
// __RD32((4096 - 64) / 64) = __RD32(63) = 32
inline constexpr RingIdx kCommandRingSize = 32;
static_assert(sizeof(SringHeader) + kCommandRingSize * kSlotSize <= kRingPageSize);
static_assert(sizeof(SringHeader) + 2 * kCommandRingSize * kSlotSize > kRingPageSize);

using Slot = std::byte[kSlotSize];

namespace detail {
inline RingIdx load(const RingIdx* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void store(RingIdx* p, RingIdx v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
inline void full_barrier() { std::atomic_thread_fence(std::memory_order_seq_cst); }
}  // namespace detail

// Backend end of a command ring mapped from the guest.
class BackRing {
public:
    BackRing() = default;
    explicit BackRing(void* page) : header_(static_cast<SringHeader*>(page)) {}

    // How many requests may be consumed now, bounded by the slots we can
    // still answer into. Returns -1 if the guest's req_prod is more than a
    // ring ahead of what we consumed: a broken or hostile frontend.
    int unconsumed_requests() const {
        const RingIdx prod = detail::load(&header_->req_prod);
        const RingIdx pending = prod - req_cons_;
        if (pending > kCommandRingSize) return -1;
        const RingIdx answerable = kCommandRingSize - (req_cons_ - rsp_prod_pvt_);
        return static_cast<int>(pending < answerable ? pending : answerable);
    }

    // Copies the next request out of the shared slot (one fetch; XSA-155)
    // and consumes it.
    void take_request(Slot& out) {
        std::memcpy(out, slot(req_cons_), kSlotSize);
        ++req_cons_;
    }

    // Arms req_event and re-checks, closing the race with a frontend that
    // pushes just as we go idle (RING_FINAL_CHECK_FOR_REQUESTS).
    int final_check_for_requests() {
        int n = unconsumed_requests();
        if (n != 0) return n;
        detail::store(&header_->req_event, req_cons_ + 1);
        detail::full_barrier();
        return unconsumed_requests();
    }

    // The slot to build the next response in; the caller zeroes and fills it.
    std::byte* next_response_slot() { return slot(rsp_prod_pvt_); }
    void commit_response() { ++rsp_prod_pvt_; }
    // Answers outstanding = consumed requests not yet answered.
    RingIdx outstanding() const { return req_cons_ - rsp_prod_pvt_; }

    // Publishes responses; true if the frontend asked to be notified
    // (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY).
    bool push_responses() {
        const RingIdx old_prod = header_->rsp_prod;  // ours alone to write
        const RingIdx new_prod = rsp_prod_pvt_;
        detail::store(&header_->rsp_prod, new_prod);
        detail::full_barrier();
        const RingIdx event = detail::load(&header_->rsp_event);
        return static_cast<RingIdx>(new_prod - event) < static_cast<RingIdx>(new_prod - old_prod);
    }

private:
    std::byte* slot(RingIdx idx) const {
        return reinterpret_cast<std::byte*>(header_ + 1) + (idx & (kCommandRingSize - 1)) * kSlotSize;
    }
    SringHeader* header_ = nullptr;
    RingIdx req_cons_ = 0;
    RingIdx rsp_prod_pvt_ = 0;
};

// Frontend end of a command ring (the guest library).
class FrontRing {
public:
    FrontRing() = default;
    // Initializes the shared page (SHARED_RING_INIT + FRONT_RING_INIT).
    explicit FrontRing(void* page) : header_(static_cast<SringHeader*>(page)) {
        std::memset(page, 0, kRingPageSize);
        header_->req_event = 1;
        header_->rsp_event = 1;
    }

    RingIdx free_slots() const { return kCommandRingSize - (req_prod_pvt_ - rsp_cons_); }
    std::byte* next_request_slot() { return slot(req_prod_pvt_); }
    void commit_request() { ++req_prod_pvt_; }

    // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
    bool push_requests() {
        const RingIdx old_prod = header_->req_prod;
        const RingIdx new_prod = req_prod_pvt_;
        detail::store(&header_->req_prod, new_prod);
        detail::full_barrier();
        const RingIdx event = detail::load(&header_->req_event);
        return static_cast<RingIdx>(new_prod - event) < static_cast<RingIdx>(new_prod - old_prod);
    }

    RingIdx unconsumed_responses() const { return detail::load(&header_->rsp_prod) - rsp_cons_; }
    void take_response(Slot& out) {
        std::memcpy(out, slot(rsp_cons_), kSlotSize);
        ++rsp_cons_;
    }
    // RING_FINAL_CHECK_FOR_RESPONSES
    RingIdx final_check_for_responses() {
        RingIdx n = unconsumed_responses();
        if (n != 0) return n;
        detail::store(&header_->rsp_event, rsp_cons_ + 1);
        detail::full_barrier();
        return unconsumed_responses();
    }

private:
    std::byte* slot(RingIdx idx) const {
        return reinterpret_cast<std::byte*>(header_ + 1) + (idx & (kCommandRingSize - 1)) * kSlotSize;
    }
    SringHeader* header_ = nullptr;
    RingIdx req_prod_pvt_ = 0;
    RingIdx rsp_cons_ = 0;
};

}  // namespace xensock::wire
