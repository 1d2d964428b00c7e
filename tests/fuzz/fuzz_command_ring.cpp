// Fuzz target: both ends of the shared command ring (wire/xen_ring.hpp)
// with the other end hostile. The input is a program of operations: the
// hostile side writes any index or any bytes of the page at any time; our
// side polls, takes, answers, pushes and re-arms as xensockd (BackRing) or
// the guest library (FrontRing) do.
//
// Invariants, checked against a model that keeps its own indexes:
// - unconsumed_requests() is -1 exactly when req_prod is more than a ring
//   ahead, otherwise min(pending, free answer slots), so at most 32 requests
//   are ever outstanding;
// - take_request() copies exactly the slot the model says, from inside the
//   page; each of our operations writes only the bytes it owns (its response
//   slot, rsp_prod, req_event / its request slot, req_prod, rsp_event);
// - push_*() publish the private producer index and notify exactly when
//   the Xen macro would, given the event index the other side wrote;
// - the guest library's check (responses published <= requests outstanding)
//   holds before any response is taken.
// Each page is its own 4096-byte allocation: a sanitizer build catches any
// access outside it.
#include "fuzz_support.hpp"

#include "xensock/wire/profile.hpp"
#include "xensock/wire/xen_ring.hpp"

#include <array>
#include <cstdlib>
#include <memory>

namespace {

using namespace xensock;
using wire::kCommandRingSize;
using wire::kRingPageSize;
using wire::kSlotSize;
using wire::RingIdx;

struct FreeDeleter {
    void operator()(void* p) const noexcept { std::free(p); }
};
using PagePtr = std::unique_ptr<std::byte, FreeDeleter>;
PagePtr new_page() {
    void* p = std::aligned_alloc(kRingPageSize, kRingPageSize);
    if (!p) std::abort();
    std::memset(p, 0, kRingPageSize);
    return PagePtr(static_cast<std::byte*>(p));
}

RingIdx field(const std::byte* page, size_t offset) { return fuzz::load_at<RingIdx>(page, offset); }
void set_field(std::byte* page, size_t offset, RingIdx v) { std::memcpy(page + offset, &v, sizeof v); }
constexpr size_t kReqProd = 0, kReqEvent = 4, kRspProd = 8, kRspEvent = 12;

size_t slot_offset(RingIdx idx) { return sizeof(wire::SringHeader) + (idx & (kCommandRingSize - 1)) * kSlotSize; }

// True if every byte outside [from, to) is as in `before`.
bool only_changed(const std::byte* page, const std::array<std::byte, kRingPageSize>& before, size_t from, size_t to) {
    return std::memcmp(page, before.data(), from) == 0 &&
           std::memcmp(page + to, before.data() + to, kRingPageSize - to) == 0;
}

bool xen_would_notify(RingIdx old_prod, RingIdx new_prod, RingIdx event) {
    return static_cast<RingIdx>(new_prod - event) < static_cast<RingIdx>(new_prod - old_prod);
}

// A value a hostile peer would write: anything, or close to `near`.
RingIdx hostile_index(fuzz::Input& in, RingIdx near) {
    const uint8_t how = in.u8();
    if (how & 1) return in.u32();
    return near + static_cast<RingIdx>(static_cast<int8_t>(in.u8()));
}

struct Backend {  // xensockd's end; the fuzzer is the guest
    PagePtr page = new_page();
    wire::BackRing ring{page.get()};
    RingIdx req_cons = 0, rsp_prod_pvt = 0;

    int expected_unconsumed() const {
        const RingIdx pending = field(page.get(), kReqProd) - req_cons;
        if (pending > kCommandRingSize) return -1;
        const RingIdx answerable = kCommandRingSize - (req_cons - rsp_prod_pvt);
        return static_cast<int>(pending < answerable ? pending : answerable);
    }
};

struct Frontend {  // the guest library's end; the fuzzer is the backend
    PagePtr page = new_page();
    wire::FrontRing ring{page.get()};
    RingIdx req_prod_pvt = 0, rsp_cons = 0;
    bool broken = false;  // the library stops using a ring it caught lying
};

void backend_op(Backend& b, uint8_t op, fuzz::Input& in, const wire::ProtocolProfile& profile) {
    std::array<std::byte, kRingPageSize> before;
    std::memcpy(before.data(), b.page.get(), kRingPageSize);
    switch (op) {
        case 0:  // the guest moves req_prod
            set_field(b.page.get(), kReqProd, hostile_index(in, b.req_cons));
            break;
        case 1: {  // the guest scribbles anywhere on the page
            const size_t at = in.get<uint16_t>() % kRingPageSize;
            const size_t len = std::min<size_t>(in.u8() % 65, kRingPageSize - at);
            in.bytes(b.page.get() + at, len);
            break;
        }
        case 2: {  // poll and take some
            const int n = b.ring.unconsumed_requests();
            FUZZ_CHECK(n == b.expected_unconsumed());
            FUZZ_CHECK(n <= static_cast<int>(kCommandRingSize - (b.req_cons - b.rsp_prod_pvt)));
            if (n <= 0) break;
            const int take = in.u8() % (n + 1);
            for (int i = 0; i < take; ++i) {
                wire::Slot slot;
                b.ring.take_request(slot);
                FUZZ_CHECK(std::memcmp(slot, b.page.get() + slot_offset(b.req_cons), kSlotSize) == 0);
                ++b.req_cons;
                (void)profile.decode_request(slot);  // from the copy, never the page
            }
            FUZZ_CHECK(std::memcmp(b.page.get(), before.data(), kRingPageSize) == 0);  // reads only
            break;
        }
        case 3: {  // idle: arm req_event and re-check
            const bool was_idle = b.expected_unconsumed() == 0;
            const int n = b.ring.final_check_for_requests();
            FUZZ_CHECK(n == b.expected_unconsumed());
            if (was_idle) {
                FUZZ_CHECK(field(b.page.get(), kReqEvent) == b.req_cons + 1);
                FUZZ_CHECK(only_changed(b.page.get(), before, kReqEvent, kReqEvent + 4));
            } else {
                FUZZ_CHECK(std::memcmp(b.page.get(), before.data(), kRingPageSize) == 0);
            }
            break;
        }
        case 4: {  // answer one outstanding request
            FUZZ_CHECK(b.ring.outstanding() == b.req_cons - b.rsp_prod_pvt);
            if (b.ring.outstanding() == 0) break;
            std::byte* slot = b.ring.next_response_slot();
            FUZZ_CHECK(slot == b.page.get() + slot_offset(b.rsp_prod_pvt));
            wire::Response rsp{in.u32(), in.u32(), in.u64(), in.get<int32_t>()};
            profile.encode_response(slot, rsp);
            b.ring.commit_response();
            ++b.rsp_prod_pvt;
            const size_t at = slot_offset(b.rsp_prod_pvt - 1);
            FUZZ_CHECK(only_changed(b.page.get(), before, at, at + kSlotSize));
            break;
        }
        case 5: {  // publish responses
            const RingIdx old_prod = field(b.page.get(), kRspProd);  // whatever the guest left there
            const RingIdx event = field(b.page.get(), kRspEvent);
            const bool notify = b.ring.push_responses();
            FUZZ_CHECK(field(b.page.get(), kRspProd) == b.rsp_prod_pvt);
            FUZZ_CHECK(notify == xen_would_notify(old_prod, b.rsp_prod_pvt, event));
            FUZZ_CHECK(only_changed(b.page.get(), before, kRspProd, kRspProd + 4));
            break;
        }
        case 6:  // the guest moves rsp_event
            set_field(b.page.get(), kRspEvent, hostile_index(in, b.rsp_prod_pvt));
            break;
        default: break;
    }
    FUZZ_CHECK(b.req_cons - b.rsp_prod_pvt <= kCommandRingSize);
}

void frontend_op(Frontend& f, uint8_t op, fuzz::Input& in, const wire::ProtocolProfile& profile) {
    std::array<std::byte, kRingPageSize> before;
    std::memcpy(before.data(), f.page.get(), kRingPageSize);
    switch (op) {
        case 0:  // the backend moves rsp_prod
            set_field(f.page.get(), kRspProd, hostile_index(in, f.rsp_cons));
            break;
        case 1: {  // the backend scribbles
            const size_t at = in.get<uint16_t>() % kRingPageSize;
            const size_t len = std::min<size_t>(in.u8() % 65, kRingPageSize - at);
            in.bytes(f.page.get() + at, len);
            break;
        }
        case 2: {  // queue a request and push
            FUZZ_CHECK(f.ring.free_slots() == kCommandRingSize - (f.req_prod_pvt - f.rsp_cons));
            if (f.broken || f.ring.free_slots() == 0) break;
            std::byte* slot = f.ring.next_request_slot();
            FUZZ_CHECK(slot == f.page.get() + slot_offset(f.req_prod_pvt));
            wire::Request req;
            req.req_id = in.u32();
            req.raw_cmd = in.u32();
            req.cmd = wire::Command::unknown;
            req.sockid = in.u64();
            profile.encode_request(slot, req);
            f.ring.commit_request();
            ++f.req_prod_pvt;
            const RingIdx old_prod = field(f.page.get(), kReqProd);
            const RingIdx event = field(f.page.get(), kReqEvent);
            const bool notify = f.ring.push_requests();
            FUZZ_CHECK(field(f.page.get(), kReqProd) == f.req_prod_pvt);
            FUZZ_CHECK(notify == xen_would_notify(old_prod, f.req_prod_pvt, event));
            const size_t at = slot_offset(f.req_prod_pvt - 1);
            for (size_t i = 0; i < kRingPageSize; ++i) {
                const bool ours = (i >= at && i < at + kSlotSize) || (i >= kReqProd && i < kReqProd + 4);
                if (!ours) FUZZ_CHECK(f.page.get()[i] == before[i]);
            }
            break;
        }
        case 3: {  // take responses, as Guest::drain_responses does
            if (f.broken) break;
            const RingIdx available = f.ring.unconsumed_responses();
            FUZZ_CHECK(available == field(f.page.get(), kRspProd) - f.rsp_cons);
            const RingIdx outstanding = kCommandRingSize - f.ring.free_slots();
            if (available > outstanding) {
                f.broken = true;
                break;
            }
            for (RingIdx i = 0; i < available; ++i) {
                wire::Slot slot;
                f.ring.take_response(slot);
                FUZZ_CHECK(std::memcmp(slot, f.page.get() + slot_offset(f.rsp_cons), kSlotSize) == 0);
                ++f.rsp_cons;
                (void)profile.decode_response(slot);
            }
            FUZZ_CHECK(std::memcmp(f.page.get(), before.data(), kRingPageSize) == 0);
            FUZZ_CHECK(f.req_prod_pvt - f.rsp_cons <= kCommandRingSize);
            break;
        }
        case 4: {  // idle: arm rsp_event
            if (f.broken) break;
            const bool was_idle = field(f.page.get(), kRspProd) == f.rsp_cons;
            const RingIdx n = f.ring.final_check_for_responses();
            FUZZ_CHECK(n == field(f.page.get(), kRspProd) - f.rsp_cons);
            if (was_idle) FUZZ_CHECK(field(f.page.get(), kRspEvent) == f.rsp_cons + 1);
            break;
        }
        case 5:  // the backend moves req_event
            set_field(f.page.get(), kReqEvent, hostile_index(in, f.req_prod_pvt));
            break;
        default: break;
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::Input in(data, size);
    const wire::ProtocolProfile& profile = (in.u8() & 1) ? wire::pvcalls_v1_profile() : wire::xensock_v3_profile();
    Backend back;
    Frontend front;
    // The front ring starts as SHARED_RING_INIT leaves it.
    FUZZ_CHECK(field(front.page.get(), kReqEvent) == 1u && field(front.page.get(), kRspEvent) == 1u);
    for (unsigned steps = 0; steps < 4096 && !in.empty(); ++steps) {
        const uint8_t op = in.u8();
        if (op & 0x80) frontend_op(front, op % 6, in, profile);
        else backend_op(back, op % 7, in, profile);
    }
    return 0;
}
