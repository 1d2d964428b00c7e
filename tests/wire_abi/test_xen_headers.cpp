// Our wire structs against Xen's own C reference headers (libxen-dev):
// xen/io/pvcalls.h for PVCalls v1 and xen/io/ring.h for the command ring.
// The layout checks are static_asserts, so a mismatch fails the build; the
// test cases then run each of our ring ends against the other end built
// from Xen's macros on one page, and compare their notify decisions.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "xensock/wire/profile.hpp"
#include "xensock/wire/pvcalls_v1.hpp"
#include "xensock/wire/xen_ring.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

// What ring.h asks its includer to provide (it defines xen_mb() as mb()).
#define mb() std::atomic_thread_fence(std::memory_order_seq_cst)
#define rmb() std::atomic_thread_fence(std::memory_order_acquire)
#define wmb() std::atomic_thread_fence(std::memory_order_release)

// The C headers use a flexible array member (ref[]) and, in the ring macros,
// GNU statement expressions: fine for GCC and clang, not ISO C++.
#pragma GCC diagnostic ignored "-Wpedantic"
extern "C" {
#include <xen/io/pvcalls.h>
}

namespace pv = xensock::wire::pvcalls_v1;
namespace wire = xensock::wire;

// ------------------------------------------------------------ pvcalls.h
static_assert(sizeof(pv::Request) == sizeof(struct xen_pvcalls_request));
#define SAME_REQ(ours, theirs) \
    static_assert(offsetof(pv::Request, ours) == offsetof(struct xen_pvcalls_request, theirs), #ours)
SAME_REQ(req_id, req_id);
SAME_REQ(cmd, cmd);
SAME_REQ(u, u);
SAME_REQ(u.socket.id, u.socket.id);
SAME_REQ(u.socket.domain, u.socket.domain);
SAME_REQ(u.socket.type, u.socket.type);
SAME_REQ(u.socket.protocol, u.socket.protocol);
SAME_REQ(u.socket.pad, u.socket.pad);
SAME_REQ(u.connect.id, u.connect.id);
SAME_REQ(u.connect.addr, u.connect.addr);
SAME_REQ(u.connect.len, u.connect.len);
SAME_REQ(u.connect.flags, u.connect.flags);
SAME_REQ(u.connect.ref, u.connect.ref);
SAME_REQ(u.connect.evtchn, u.connect.evtchn);
SAME_REQ(u.connect.pad, u.connect.pad);
SAME_REQ(u.release.id, u.release.id);
SAME_REQ(u.release.reuse, u.release.reuse);
SAME_REQ(u.release.pad, u.release.pad);
SAME_REQ(u.bind.id, u.bind.id);
SAME_REQ(u.bind.addr, u.bind.addr);
SAME_REQ(u.bind.len, u.bind.len);
SAME_REQ(u.listen.id, u.listen.id);
SAME_REQ(u.listen.backlog, u.listen.backlog);
SAME_REQ(u.listen.pad, u.listen.pad);
SAME_REQ(u.accept.id, u.accept.id);
SAME_REQ(u.accept.id_new, u.accept.id_new);
SAME_REQ(u.accept.ref, u.accept.ref);
SAME_REQ(u.accept.evtchn, u.accept.evtchn);
SAME_REQ(u.poll.id, u.poll.id);
SAME_REQ(u.dummy, u.dummy);
static_assert(sizeof(pv::Request::u) == sizeof(xen_pvcalls_request::u));
static_assert(sizeof(pv::Request{}.u.connect.addr) == sizeof(xen_pvcalls_request{}.u.connect.addr));
static_assert(sizeof(pv::Request{}.u.release.pad) == sizeof(xen_pvcalls_request{}.u.release.pad));

static_assert(sizeof(pv::Response) == sizeof(struct xen_pvcalls_response));
static_assert(offsetof(pv::Response, req_id) == offsetof(struct xen_pvcalls_response, req_id));
static_assert(offsetof(pv::Response, cmd) == offsetof(struct xen_pvcalls_response, cmd));
static_assert(offsetof(pv::Response, ret) == offsetof(struct xen_pvcalls_response, ret));
static_assert(offsetof(pv::Response, pad) == offsetof(struct xen_pvcalls_response, pad));
// Every member of Xen's response union is just the echoed id.
static_assert(offsetof(pv::Response, id) == offsetof(struct xen_pvcalls_response, u.socket.id));
static_assert(offsetof(pv::Response, id) == offsetof(struct xen_pvcalls_response, u.accept.id));
static_assert(offsetof(pv::Response, id) == offsetof(struct xen_pvcalls_response, u.poll.id));

static_assert(offsetof(pv::DataIntf, in_cons) == offsetof(struct pvcalls_data_intf, in_cons));
static_assert(offsetof(pv::DataIntf, in_prod) == offsetof(struct pvcalls_data_intf, in_prod));
static_assert(offsetof(pv::DataIntf, in_error) == offsetof(struct pvcalls_data_intf, in_error));
static_assert(offsetof(pv::DataIntf, out_cons) == offsetof(struct pvcalls_data_intf, out_cons));
static_assert(offsetof(pv::DataIntf, out_prod) == offsetof(struct pvcalls_data_intf, out_prod));
static_assert(offsetof(pv::DataIntf, out_error) == offsetof(struct pvcalls_data_intf, out_error));
static_assert(offsetof(pv::DataIntf, ring_order) == offsetof(struct pvcalls_data_intf, ring_order));
static_assert(offsetof(pv::DataIntf, ref) == offsetof(struct pvcalls_data_intf, ref));
static_assert(sizeof(grant_ref_t) == sizeof(uint32_t));

static_assert(pv::SOCKET == PVCALLS_SOCKET && pv::CONNECT == PVCALLS_CONNECT && pv::RELEASE == PVCALLS_RELEASE &&
              pv::BIND == PVCALLS_BIND && pv::LISTEN == PVCALLS_LISTEN && pv::ACCEPT == PVCALLS_ACCEPT &&
              pv::POLL == PVCALLS_POLL);

// --------------------------------------------------------------- ring.h
// DEFINE_RING_TYPES(xen_pvcalls, ...) in pvcalls.h gives the command ring.
static_assert(sizeof(wire::RingIdx) == sizeof(RING_IDX));
static_assert(offsetof(wire::SringHeader, req_prod) == offsetof(struct xen_pvcalls_sring, req_prod));
static_assert(offsetof(wire::SringHeader, req_event) == offsetof(struct xen_pvcalls_sring, req_event));
static_assert(offsetof(wire::SringHeader, rsp_prod) == offsetof(struct xen_pvcalls_sring, rsp_prod));
static_assert(offsetof(wire::SringHeader, rsp_event) == offsetof(struct xen_pvcalls_sring, rsp_event));
static_assert(sizeof(wire::SringHeader) == offsetof(struct xen_pvcalls_sring, ring));
static_assert(wire::kSlotSize == sizeof(union xen_pvcalls_sring_entry));
static_assert(wire::kCommandRingSize == __CONST_RING_SIZE(xen_pvcalls, wire::kRingPageSize));

namespace {

struct FreeDeleter {
    void operator()(void* p) const noexcept { std::free(p); }
};
std::unique_ptr<std::byte, FreeDeleter> page() {
    void* p = std::aligned_alloc(4096, 4096);
    REQUIRE(p != nullptr);
    std::memset(p, 0xA5, 4096);  // garbage: both inits must set what matters
    return std::unique_ptr<std::byte, FreeDeleter>(static_cast<std::byte*>(p));
}

}  // namespace

TEST_CASE("pvcalls profile: the data layout table is the reference header's") {
    const wire::DataIntfLayout& l = wire::pvcalls_v1_profile().data_layout();
    CHECK(l.in_cons == offsetof(struct pvcalls_data_intf, in_cons));
    CHECK(l.in_prod == offsetof(struct pvcalls_data_intf, in_prod));
    CHECK(l.in_error == offsetof(struct pvcalls_data_intf, in_error));
    CHECK(l.out_cons == offsetof(struct pvcalls_data_intf, out_cons));
    CHECK(l.out_prod == offsetof(struct pvcalls_data_intf, out_prod));
    CHECK(l.out_error == offsetof(struct pvcalls_data_intf, out_error));
    CHECK(l.ring_order == offsetof(struct pvcalls_data_intf, ring_order));
    CHECK(l.refs == offsetof(struct pvcalls_data_intf, ref));
    CHECK(l.max_refs() == (4096 - offsetof(struct pvcalls_data_intf, ref)) / sizeof(grant_ref_t));
}

TEST_CASE("pvcalls profile: requests built with the reference structs decode field for field") {
    struct xen_pvcalls_request x;
    std::memset(&x, 0xFF, sizeof x);  // pads and unused bytes set
    x.req_id = 0x01020304;
    x.cmd = PVCALLS_CONNECT;
    x.u.connect.id = 0x1122334455667788ull;
    for (unsigned i = 0; i < sizeof x.u.connect.addr; ++i) x.u.connect.addr[i] = static_cast<uint8_t>(i + 1);
    x.u.connect.len = 16;
    x.u.connect.flags = 7;
    x.u.connect.ref = 4242;
    x.u.connect.evtchn = 99;
    wire::Slot slot{};
    std::memcpy(slot, &x, sizeof x);
    const wire::Request r = wire::pvcalls_v1_profile().decode_request(slot);
    CHECK(r.req_id == 0x01020304u);
    CHECK(r.cmd == wire::Command::connect);
    CHECK(r.sockid == 0x1122334455667788ull);
    CHECK(std::memcmp(r.addr.data(), x.u.connect.addr, r.addr.size()) == 0);
    CHECK(r.addr_len == 16u);
    CHECK(r.flags == 7u);
    CHECK(r.ref == 4242u);
    CHECK(r.evtchn == 99u);

    x.cmd = PVCALLS_ACCEPT;
    x.u.accept.id_new = 0xCAFEull;
    x.u.accept.ref = 5;
    x.u.accept.evtchn = 6;
    std::memcpy(slot, &x, sizeof x);
    const wire::Request a = wire::pvcalls_v1_profile().decode_request(slot);
    CHECK(a.cmd == wire::Command::accept);
    CHECK(a.new_sockid == 0xCAFEull);
    CHECK(a.ref == 5u);
    CHECK(a.evtchn == 6u);

    wire::Response rsp{0xFFFFFFFFu, PVCALLS_ACCEPT, 0x8000000000000001ull, -22};
    wire::pvcalls_v1_profile().encode_response(slot, rsp);
    struct xen_pvcalls_response xr;
    std::memcpy(&xr, slot, sizeof xr);
    CHECK(xr.req_id == 0xFFFFFFFFu);
    CHECK(xr.cmd == uint32_t{PVCALLS_ACCEPT});
    CHECK(xr.ret == -22);
    CHECK(xr.pad == 0u);
    CHECK(xr.u.accept.id == 0x8000000000000001ull);
}

// Pushes `n` requests the way Linux pvcalls-front does, returning the
// macro's notify decision.
static bool xen_front_push(struct xen_pvcalls_front_ring& front, unsigned n, uint32_t first_id) {
    for (unsigned i = 0; i < n; ++i) {
        struct xen_pvcalls_request* req = RING_GET_REQUEST(&front, front.req_prod_pvt);
        std::memset(req, 0, sizeof *req);
        req->req_id = first_id + i;
        req->cmd = PVCALLS_POLL;
        req->u.poll.id = 1000 + first_id + i;
        front.req_prod_pvt++;
    }
    int notify = 0;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
    return notify != 0;
}

TEST_CASE("command ring: our BackRing against a front end built from Xen's ring.h macros") {
    auto mem = page();
    auto* sring = reinterpret_cast<struct xen_pvcalls_sring*>(mem.get());
    struct xen_pvcalls_front_ring front;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&front, sring, wire::kRingPageSize);
    REQUIRE(RING_SIZE(&front) == wire::kCommandRingSize);
    wire::BackRing back(mem.get());

    uint32_t next_id = 1;
    // Three rounds, and enough requests in all to wrap the 32 slots.
    for (unsigned round = 0; round < 12; ++round) {
        const unsigned n = 1 + round % 5;
        // The backend went idle with req_event armed: the first push notifies.
        CHECK(back.final_check_for_requests() == 0);
        CHECK(xen_front_push(front, n, next_id));
        REQUIRE(back.unconsumed_requests() == static_cast<int>(n));
        for (unsigned i = 0; i < n; ++i) {
            wire::Slot slot;
            back.take_request(slot);
            const wire::Request r = wire::pvcalls_v1_profile().decode_request(slot);
            CHECK(r.req_id == next_id + i);
            CHECK(r.cmd == wire::Command::poll);
            CHECK(r.sockid == 1000 + next_id + i);
            wire::pvcalls_v1_profile().encode_response(back.next_response_slot(),
                                                       {r.req_id, r.raw_cmd, r.sockid, -static_cast<int>(i)});
            back.commit_response();
        }
        // Xen's front end is waiting: rsp_event = rsp_cons + 1, so we notify.
        int more = 0;
        RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
        CHECK(more == 0);
        CHECK(back.push_responses());
        for (unsigned i = 0; i < n; ++i) {
            REQUIRE(RING_HAS_UNCONSUMED_RESPONSES(&front));
            const struct xen_pvcalls_response* rsp = RING_GET_RESPONSE(&front, front.rsp_cons);
            CHECK(rsp->req_id == next_id + i);
            CHECK(rsp->cmd == uint32_t{PVCALLS_POLL});
            CHECK(rsp->ret == -static_cast<int>(i));
            CHECK(rsp->u.poll.id == 1000 + next_id + i);
            front.rsp_cons++;
        }
        next_id += n;
    }
    CHECK(back.unconsumed_requests() == 0);
    // The backend did not re-arm req_event after the last round: no wake-up.
    CHECK_FALSE(xen_front_push(front, 1, next_id));
    CHECK(back.unconsumed_requests() == 1);
}

TEST_CASE("command ring: our FrontRing against a back end built from Xen's ring.h macros") {
    auto mem = page();
    wire::FrontRing ours(mem.get());  // SHARED_RING_INIT + FRONT_RING_INIT
    auto* sring = reinterpret_cast<struct xen_pvcalls_sring*>(mem.get());
    CHECK(sring->req_prod == 0u);
    CHECK(sring->rsp_prod == 0u);
    CHECK(sring->req_event == 1u);
    CHECK(sring->rsp_event == 1u);
    struct xen_pvcalls_back_ring back;
    BACK_RING_INIT(&back, sring, wire::kRingPageSize);
    REQUIRE(RING_SIZE(&back) == wire::kCommandRingSize);

    uint32_t next_id = 7;
    for (unsigned round = 0; round < 12; ++round) {
        const unsigned n = 1 + round % 6;
        CHECK(ours.free_slots() == wire::kCommandRingSize);
        for (unsigned i = 0; i < n; ++i) {
            wire::Request r;
            r.req_id = next_id + i;
            r.cmd = wire::Command::listen;
            r.sockid = 500 + next_id + i;
            r.backlog = i;
            wire::pvcalls_v1_profile().encode_request(ours.next_request_slot(), r);
            ours.commit_request();
        }
        int more = 0;
        RING_FINAL_CHECK_FOR_REQUESTS(&back, more);  // the back end went idle
        CHECK(more == 0);
        CHECK(ours.push_requests());
        for (unsigned i = 0; i < n; ++i) {
            REQUIRE(RING_HAS_UNCONSUMED_REQUESTS(&back));
            struct xen_pvcalls_request req;
            std::memcpy(&req, RING_GET_REQUEST(&back, back.req_cons), sizeof req);
            back.req_cons++;
            CHECK(req.req_id == next_id + i);
            CHECK(req.cmd == uint32_t{PVCALLS_LISTEN});
            CHECK(req.u.listen.id == 500 + next_id + i);
            CHECK(req.u.listen.backlog == i);
            struct xen_pvcalls_response* rsp = RING_GET_RESPONSE(&back, back.rsp_prod_pvt);
            std::memset(rsp, 0, sizeof *rsp);
            rsp->req_id = req.req_id;
            rsp->cmd = req.cmd;
            rsp->ret = 0;
            rsp->u.listen.id = req.u.listen.id;
            back.rsp_prod_pvt++;
        }
        CHECK(ours.final_check_for_responses() == 0);  // arms rsp_event
        int notify = 0;
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
        CHECK(notify != 0);
        REQUIRE(ours.unconsumed_responses() == n);
        for (unsigned i = 0; i < n; ++i) {
            wire::Slot slot;
            ours.take_response(slot);
            const wire::Response rsp = wire::pvcalls_v1_profile().decode_response(slot);
            CHECK(rsp.req_id == next_id + i);
            CHECK(rsp.raw_cmd == uint32_t{PVCALLS_LISTEN});
            CHECK(rsp.sockid == 500 + next_id + i);
        }
        next_id += n;
    }
}
