// What the guest side can be checked for without a backend: the command
// ring's two ends in one process, both profiles' wire bytes, and the data
// ring steps (index math across the u32 wrap, errors, hostile indexes).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "xensock/frontend/frontend.hpp"
#include "xensock/wire/profile.hpp"
#include "xensock/wire/xen_ring.hpp"

#include <arpa/inet.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

namespace {

using namespace xensock;
using wire::Command;

struct FreeDeleter {
    void operator()(void* p) const noexcept { std::free(p); }
};

// Page-aligned, zeroed memory, like granted pages.
std::unique_ptr<std::byte, FreeDeleter> pages(size_t n) {
    void* p = std::aligned_alloc(4096, n * 4096);
    REQUIRE(p != nullptr);
    std::memset(p, 0, n * 4096);
    return std::unique_ptr<std::byte, FreeDeleter>(static_cast<std::byte*>(p));
}

template <typename T>
T at(const std::byte* base, size_t offset) {
    T v;
    std::memcpy(&v, base + offset, sizeof v);
    return v;
}

template <typename T>
void put(std::byte* base, size_t offset, T v) {
    std::memcpy(base + offset, &v, sizeof v);
}

wire::SringHeader* header(std::byte* page) { return reinterpret_cast<wire::SringHeader*>(page); }

bool all_zero(const std::byte* p, size_t from, size_t to) {
    for (size_t i = from; i < to; ++i)
        if (p[i] != std::byte{0}) return false;
    return true;
}

const wire::ProtocolProfile& xensock_v3() { return wire::xensock_v3_profile(); }
const wire::ProtocolProfile& pvcalls_v1() { return wire::pvcalls_v1_profile(); }

}  // namespace

// ================================================================ command ring

TEST_CASE("command ring: requests and responses round-trip between FrontRing and BackRing") {
    auto page = pages(1);
    wire::FrontRing front(page.get());
    wire::BackRing back(page.get());
    const auto& profile = xensock_v3();

    CHECK(front.free_slots() == wire::kCommandRingSize);
    CHECK(back.unconsumed_requests() == 0);

    // Many laps of the 32-slot ring, with a varying batch size.
    uint32_t next_id = 1, expect_id = 1;
    for (int lap = 0; lap < 200; ++lap) {
        const int batch = 1 + lap % static_cast<int>(wire::kCommandRingSize);
        REQUIRE(front.free_slots() >= static_cast<wire::RingIdx>(batch));
        for (int i = 0; i < batch; ++i) {
            wire::Request req;
            req.req_id = next_id++;
            req.cmd = Command::listen;
            req.sockid = 1000 + req.req_id;
            req.backlog = req.req_id * 3;
            profile.encode_request(front.next_request_slot(), req);
            front.commit_request();
        }
        (void)front.push_requests();

        const int n = back.final_check_for_requests();
        REQUIRE(n == batch);
        for (int i = 0; i < n; ++i) {
            wire::Slot slot;
            back.take_request(slot);
            const wire::Request req = profile.decode_request(slot);
            CHECK(req.req_id == expect_id);
            CHECK(req.cmd == Command::listen);
            CHECK(req.sockid == 1000 + expect_id);
            CHECK(req.backlog == expect_id * 3);
            ++expect_id;
            // Answer in reverse pairs to show order does not matter to the ring.
            wire::Response rsp{req.req_id, req.raw_cmd, req.sockid, -static_cast<int32_t>(req.req_id % 100)};
            profile.encode_response(back.next_response_slot(), rsp);
            back.commit_response();
        }
        (void)back.push_responses();

        REQUIRE(front.final_check_for_responses() == static_cast<wire::RingIdx>(batch));
        for (int i = 0; i < batch; ++i) {
            wire::Slot slot;
            front.take_response(slot);
            const wire::Response rsp = profile.decode_response(slot);
            const uint32_t id = expect_id - static_cast<uint32_t>(batch) + static_cast<uint32_t>(i);
            CHECK(rsp.req_id == id);
            CHECK(rsp.sockid == 1000 + id);
            CHECK(rsp.ret == -static_cast<int32_t>(id % 100));
        }
        CHECK(front.final_check_for_responses() == 0);
        CHECK(front.free_slots() == wire::kCommandRingSize);
    }
}

TEST_CASE("command ring: notification decisions follow req_event / rsp_event") {
    auto page = pages(1);
    wire::FrontRing front(page.get());
    wire::BackRing back(page.get());
    CHECK(header(page.get())->req_event == 1);
    CHECK(header(page.get())->rsp_event == 1);

    auto push_one = [&] {
        wire::Request req;
        req.cmd = Command::poll;
        xensock_v3().encode_request(front.next_request_slot(), req);
        front.commit_request();
        return front.push_requests();
    };

    // First request: the backend asked for an event at index 1.
    CHECK(push_one());
    // The backend has not re-armed: no more notifications.
    CHECK_FALSE(push_one());
    CHECK_FALSE(push_one());
    // Backend consumes all and re-arms (req_event = req_cons + 1).
    REQUIRE(back.final_check_for_requests() == 3);
    for (int i = 0; i < 3; ++i) {
        wire::Slot s;
        back.take_request(s);
    }
    CHECK(back.final_check_for_requests() == 0);
    CHECK(header(page.get())->req_event == 4);
    CHECK(push_one());  // crosses req_event
    // Two pushed in one batch that crosses the event: one notification.
    REQUIRE(back.final_check_for_requests() == 1);
    {
        wire::Slot s;
        back.take_request(s);
    }
    CHECK(back.final_check_for_requests() == 0);
    for (int i = 0; i < 2; ++i) {
        wire::Request req;
        xensock_v3().encode_request(front.next_request_slot(), req);
        front.commit_request();
    }
    CHECK(front.push_requests());
    REQUIRE(back.final_check_for_requests() == 2);
    for (int i = 0; i < 2; ++i) {
        wire::Slot s;
        back.take_request(s);
    }
    CHECK(back.outstanding() == 6);

    // Responses: rsp_event starts at 1.
    for (int i = 0; i < 6; ++i) {
        xensock_v3().encode_response(back.next_response_slot(), wire::Response{});
        back.commit_response();
        if (i == 0) CHECK(back.push_responses());
    }
    // The frontend has not re-armed since: no notification for the rest.
    CHECK_FALSE(back.push_responses());
    // Frontend drains and re-arms; the next response notifies.
    wire::RingIdx n = front.final_check_for_responses();
    CHECK(n == 6);
    for (wire::RingIdx i = 0; i < n; ++i) {
        wire::Slot s;
        front.take_response(s);
    }
    CHECK(front.final_check_for_responses() == 0);
    CHECK(header(page.get())->rsp_event == 7);
    CHECK(back.outstanding() == 0);
    CHECK(front.free_slots() == wire::kCommandRingSize);
}

TEST_CASE("command ring: free slots, a full ring, and a hostile req_prod") {
    auto page = pages(1);
    wire::FrontRing front(page.get());
    for (wire::RingIdx i = 0; i < wire::kCommandRingSize; ++i) {
        CHECK(front.free_slots() == wire::kCommandRingSize - i);
        xensock_v3().encode_request(front.next_request_slot(), wire::Request{});
        front.commit_request();
    }
    CHECK(front.free_slots() == 0);
    (void)front.push_requests();

    wire::BackRing back(page.get());
    CHECK(back.unconsumed_requests() == static_cast<int>(wire::kCommandRingSize));
    // A frontend claiming more than a ring of requests is refused.
    header(page.get())->req_prod = wire::kCommandRingSize + 1;
    CHECK(back.unconsumed_requests() == -1);
    header(page.get())->req_prod = 0xFFFFFFFFu;  // "behind": also more than a ring apart
    CHECK(back.unconsumed_requests() == -1);
}

// ==================================================================== profiles

TEST_CASE("profiles: request fields land at the documented offsets (both protocols)") {
    for (const wire::ProtocolProfile* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        const bool pv = profile->name() == "pvcalls";
        std::byte slot[wire::kSlotSize];

        // socket
        wire::Request req;
        req.req_id = 0x11223344;
        req.cmd = Command::socket;
        req.sockid = 0x0102030405060708ull;
        req.domain = AF_INET;
        req.type = SOCK_STREAM;
        req.protocol = 0;
        std::memset(slot, 0xAA, sizeof slot);
        profile->encode_request(slot, req);
        CHECK(at<uint32_t>(slot, 0) == 0x11223344u);
        CHECK(at<uint32_t>(slot, 4) == 0u);
        CHECK(at<uint64_t>(slot, 8) == 0x0102030405060708ull);
        CHECK(at<uint32_t>(slot, 16) == 2u);
        CHECK(at<uint32_t>(slot, 20) == 1u);
        CHECK(at<uint32_t>(slot, 24) == 0u);
        CHECK(all_zero(slot, 28, 64));

        // connect
        req = {};
        req.req_id = 7;
        req.cmd = Command::connect;
        req.sockid = 42;
        auto sa = frontend::ipv4("10.1.2.3", 8080);
        REQUIRE(sa);
        std::memcpy(req.addr.data(), &*sa, sizeof *sa);
        req.addr_len = 16;
        req.flags = 0x5a;
        req.ref = 0x1234;
        req.evtchn = 0x77;
        std::memset(slot, 0xAA, sizeof slot);
        profile->encode_request(slot, req);
        CHECK(at<uint32_t>(slot, 4) == 1u);
        CHECK(at<uint64_t>(slot, 8) == 42u);
        CHECK(at<uint16_t>(slot, 16) == AF_INET);  // family: guest byte order
        CHECK(at<uint16_t>(slot, 18) == htons(8080));
        CHECK(at<uint32_t>(slot, 20) == inet_addr("10.1.2.3"));
        CHECK(all_zero(slot, 24, 44));  // sin_zero and the rest of addr[28]
        CHECK(at<uint32_t>(slot, 44) == 16u);
        CHECK(at<uint32_t>(slot, 48) == 0x5au);
        CHECK(at<uint32_t>(slot, 52) == 0x1234u);
        CHECK(at<uint32_t>(slot, 56) == 0x77u);
        CHECK(all_zero(slot, 60, 64));
        wire::Slot copy;
        std::memcpy(copy, slot, sizeof copy);
        wire::Request back = profile->decode_request(copy);
        CHECK(back.cmd == Command::connect);
        CHECK(back.req_id == 7u);
        CHECK(back.sockid == 42u);
        CHECK(back.addr == req.addr);
        CHECK(back.addr_len == 16u);
        CHECK(back.flags == 0x5au);
        CHECK(back.ref == 0x1234u);
        CHECK(back.evtchn == 0x77u);

        // bind
        req.cmd = Command::bind;
        std::memset(slot, 0xAA, sizeof slot);
        profile->encode_request(slot, req);
        CHECK(at<uint32_t>(slot, 4) == 3u);
        CHECK(at<uint16_t>(slot, 18) == htons(8080));
        CHECK(at<uint32_t>(slot, 44) == 16u);
        CHECK(all_zero(slot, 48, 64));  // flags/ref/evtchn are connect's only

        // listen
        req = {};
        req.cmd = Command::listen;
        req.sockid = 9;
        req.backlog = 128;
        std::memset(slot, 0xAA, sizeof slot);
        profile->encode_request(slot, req);
        CHECK(at<uint32_t>(slot, 4) == 4u);
        CHECK(at<uint32_t>(slot, 16) == 128u);
        CHECK(all_zero(slot, 20, 64));

        // accept
        req = {};
        req.cmd = Command::accept;
        req.sockid = 9;
        req.new_sockid = 0xA0B0C0D0E0F00102ull;
        req.ref = 300;
        req.evtchn = 12;
        std::memset(slot, 0xAA, sizeof slot);
        profile->encode_request(slot, req);
        CHECK(at<uint32_t>(slot, 4) == 5u);
        CHECK(at<uint64_t>(slot, 8) == 9u);
        CHECK(at<uint64_t>(slot, 16) == 0xA0B0C0D0E0F00102ull);
        CHECK(at<uint32_t>(slot, 24) == 300u);
        CHECK(at<uint32_t>(slot, 28) == 12u);
        CHECK(all_zero(slot, 32, 64));
        std::memcpy(copy, slot, sizeof copy);
        back = profile->decode_request(copy);
        CHECK(back.new_sockid == req.new_sockid);
        CHECK(back.ref == 300u);
        CHECK(back.evtchn == 12u);

        // release, poll: nothing beyond the id
        for (auto [cmd, raw] : {std::pair{Command::release, 2u}, std::pair{Command::poll, 6u}}) {
            req = {};
            req.cmd = cmd;
            req.sockid = 5;
            std::memset(slot, 0xAA, sizeof slot);
            profile->encode_request(slot, req);
            CHECK(at<uint32_t>(slot, 4) == raw);
            CHECK(at<uint64_t>(slot, 8) == 5u);
            CHECK(all_zero(slot, 16, 64));
        }

        // an unknown command keeps its raw number
        req = {};
        req.cmd = Command::unknown;
        req.raw_cmd = 99;
        req.sockid = 3;
        std::memset(slot, 0xAA, sizeof slot);
        profile->encode_request(slot, req);
        CHECK(at<uint32_t>(slot, 4) == 99u);
        std::memcpy(copy, slot, sizeof copy);
        back = profile->decode_request(copy);
        CHECK(back.cmd == Command::unknown);
        CHECK(back.raw_cmd == 99u);
        CHECK(back.sockid == 3u);
        (void)pv;
    }
}

TEST_CASE("profiles: response layouts differ (xensock ret@16 sockid@8; pvcalls ret@8 id@16)") {
    const wire::Response rsp{0xCAFE, 5, 0x1122334455667788ull, -111};
    std::byte slot[wire::kSlotSize];

    std::memset(slot, 0xAA, sizeof slot);
    xensock_v3().encode_response(slot, rsp);
    CHECK(at<uint32_t>(slot, 0) == 0xCAFEu);
    CHECK(at<uint32_t>(slot, 4) == 5u);
    CHECK(at<uint64_t>(slot, 8) == 0x1122334455667788ull);
    CHECK(at<int32_t>(slot, 16) == -111);
    CHECK(all_zero(slot, 20, 64));  // tail padding and the rest: zeroed (XSA-216)

    std::memset(slot, 0xAA, sizeof slot);
    pvcalls_v1().encode_response(slot, rsp);
    CHECK(at<uint32_t>(slot, 0) == 0xCAFEu);
    CHECK(at<uint32_t>(slot, 4) == 5u);
    CHECK(at<int32_t>(slot, 8) == -111);
    CHECK(at<uint32_t>(slot, 12) == 0u);  // pad
    CHECK(at<uint64_t>(slot, 16) == 0x1122334455667788ull);
    CHECK(all_zero(slot, 24, 64));

    for (const wire::ProtocolProfile* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        wire::Slot s;
        profile->encode_response(s, rsp);
        const wire::Response back = profile->decode_response(s);
        CHECK(back.req_id == rsp.req_id);
        CHECK(back.raw_cmd == rsp.raw_cmd);
        CHECK(back.sockid == rsp.sockid);
        CHECK(back.ret == rsp.ret);
    }
}

TEST_CASE("profiles: xenstore nodes") {
    auto fx = xensock_v3().frontend_nodes({123, 45});
    CHECK(fx == wire::NodeList{{"ring-ref", "123"}, {"port", "45"}});
    auto fp = pvcalls_v1().frontend_nodes({123, 45});
    CHECK(fp == wire::NodeList{{"version", "1"}, {"ring-ref", "123"}, {"port", "45"}});

    std::string why;
    auto reader_of = [](wire::NodeList nodes) {
        return [nodes](std::string_view node) -> std::optional<std::string> {
            for (const auto& [k, v] : nodes)
                if (k == node) return v;
            return std::nullopt;
        };
    };
    for (const wire::ProtocolProfile* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        auto params = profile->read_backend(reader_of(profile->backend_nodes(5)), why);
        REQUIRE(params);
        CHECK(params->max_ring_order == 5u);
        CHECK_FALSE(profile->read_backend(reader_of({}), why));
        CHECK_FALSE(why.empty());
    }
    // pvcalls insists on versions == "1"
    CHECK_FALSE(pvcalls_v1().read_backend(reader_of({{"versions", "2"}, {"max-page-order", "4"}}), why));
}

// =================================================================== data rings

namespace {

// A data ring in plain memory, with the backend's two steps played by the
// test (producing into in, consuming from out).
struct TestRing {
    const wire::ProtocolProfile& profile;
    unsigned order;
    std::unique_ptr<std::byte, FreeDeleter> intf_page = pages(1);
    std::unique_ptr<std::byte, FreeDeleter> data = pages(size_t{1} << order);
    frontend::RingHalves halves;

    TestRing(const wire::ProtocolProfile& p, unsigned o, uint32_t start) : profile(p), order(o) {
        const uint32_t size = wire::ring_bytes_per_direction(order);
        halves = {wire::DataIntfView(intf_page.get(), profile.data_layout()), data.get(), data.get() + size, size};
        halves.intf.set_in_cons(start);
        halves.intf.set_in_prod(start);
        halves.intf.set_out_cons(start);
        halves.intf.set_out_prod(start);
        halves.intf.set_ring_order(order);
    }

    // Backend: produce up to len bytes into in; returns bytes produced.
    uint32_t backend_produce(const std::byte* src, uint32_t len) {
        const uint32_t prod = halves.intf.in_prod(), cons = halves.intf.in_cons();
        const uint32_t space = halves.size - (prod - cons);
        const uint32_t n = std::min(space, len);
        frontend::copy_to_ring(halves.in, halves.size, prod, src, n);
        halves.intf.set_in_prod(prod + n);
        return n;
    }
    // Backend: consume up to len bytes from out.
    uint32_t backend_consume(std::byte* dst, uint32_t len) {
        const uint32_t prod = halves.intf.out_prod(), cons = halves.intf.out_cons();
        const uint32_t n = std::min(prod - cons, len);
        frontend::copy_from_ring(halves.out, halves.size, cons, dst, n);
        halves.intf.set_out_cons(cons + n);
        return n;
    }
};

std::vector<std::byte> pattern(size_t n, uint32_t seed) {
    std::vector<std::byte> v(n);
    std::mt19937 rng(seed);
    for (auto& b : v) b = static_cast<std::byte>(rng());
    return v;
}

}  // namespace

TEST_CASE("data ring: layout of the interface page per protocol") {
    for (const wire::ProtocolProfile* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        const bool pv = profile->name() == "pvcalls";
        TestRing ring(*profile, 1, 0);
        auto v = ring.halves.intf;
        v.set_in_cons(0x01010101);
        v.set_in_prod(0x02020202);
        v.set_out_cons(0x03030303);
        v.set_out_prod(0x04040404);
        v.set_in_error(-5);
        v.set_out_error(-6);
        v.set_ref(0, 0x0A0A0A0A);
        v.set_ref(1, 0x0B0B0B0B);
        const std::byte* p = ring.intf_page.get();
        CHECK(at<uint32_t>(p, 0) == 0x01010101u);
        CHECK(at<uint32_t>(p, 4) == 0x02020202u);
        CHECK(at<uint32_t>(p, pv ? 64 : 8) == 0x03030303u);
        CHECK(at<uint32_t>(p, pv ? 68 : 12) == 0x04040404u);
        CHECK(at<int32_t>(p, pv ? 8 : 16) == -5);
        CHECK(at<int32_t>(p, pv ? 72 : 20) == -6);
        CHECK(at<uint32_t>(p, pv ? 128 : 24) == 1u);
        CHECK(at<uint32_t>(p, pv ? 132 : 28) == 0x0A0A0A0Au);
        CHECK(at<uint32_t>(p, pv ? 136 : 32) == 0x0B0B0B0Bu);
    }
    CHECK(wire::ring_bytes_per_direction(0) == 2048u);
    CHECK(wire::ring_bytes_per_direction(1) == 4096u);
    CHECK(wire::ring_bytes_per_direction(4) == 32768u);
    CHECK(wire::ring_bytes_per_direction(9) == 1048576u);
    // Each protocol's own formula gives the same sizes.
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        for (unsigned order = 0; order <= wire::kHardMaxRingOrder; ++order)
            CHECK(profile->ring_bytes(order) == wire::ring_bytes_per_direction(order));
    }
}

TEST_CASE("data ring: copy helpers wrap at the end of the buffer") {
    std::vector<std::byte> buf(16, std::byte{0});
    const auto src = pattern(10, 1);
    frontend::copy_to_ring(buf.data(), 16, 0xFFFFFFFAu + 0, src.data(), 10);  // offset 10: 6 + 4 wrapped
    for (int i = 0; i < 6; ++i) CHECK(buf[10 + i] == src[i]);
    for (int i = 0; i < 4; ++i) CHECK(buf[i] == src[6 + i]);
    std::vector<std::byte> out(10);
    frontend::copy_from_ring(buf.data(), 16, 0xFFFFFFFAu, out.data(), 10);
    CHECK(out == src);
}

TEST_CASE("data ring: streams survive the u32 index wrap in both directions") {
    for (const wire::ProtocolProfile* profile : wire::all_profiles()) {
        for (unsigned order : {profile->min_ring_order(), 2u}) {
            for (uint32_t start : {0u, 0xFFFFF000u, 0xFFFFFFFFu, 0x7FFFFFF0u}) {
                CAPTURE(profile->name());
                CAPTURE(order);
                CAPTURE(start);
                TestRing ring(*profile, order, start);
                const uint32_t size = ring.halves.size;
                const auto send_data = pattern(size * 5 + 123, 7);
                const auto recv_data = pattern(size * 5 + 321, 8);
                std::vector<std::byte> sent_by_backend_view, received;
                size_t sent = 0, backend_in = 0;
                std::mt19937 rng(start ^ order);
                int rounds = 0;
                while ((sent < send_data.size() || sent_by_backend_view.size() < send_data.size() ||
                        received.size() < recv_data.size()) &&
                       ++rounds < 100000) {
                    // Guest sends a random chunk.
                    if (sent < send_data.size()) {
                        const size_t chunk = std::min<size_t>(1 + rng() % (size + 100), send_data.size() - sent);
                        const ssize_t n = frontend::produce_out(ring.halves, {send_data.data() + sent, chunk});
                        if (n == -EAGAIN) {
                            CHECK(ring.halves.intf.out_prod() - ring.halves.intf.out_cons() == size);
                        } else {
                            REQUIRE(n > 0);
                            sent += static_cast<size_t>(n);
                        }
                    }
                    // Backend consumes some.
                    std::vector<std::byte> tmp(1 + rng() % size);
                    const uint32_t c = ring.backend_consume(tmp.data(), static_cast<uint32_t>(tmp.size()));
                    sent_by_backend_view.insert(sent_by_backend_view.end(), tmp.begin(), tmp.begin() + c);
                    // Backend produces some.
                    if (backend_in < recv_data.size()) {
                        const uint32_t want =
                            static_cast<uint32_t>(std::min<size_t>(1 + rng() % size, recv_data.size() - backend_in));
                        backend_in += ring.backend_produce(recv_data.data() + backend_in, want);
                    }
                    // Guest receives some.
                    std::vector<std::byte> in(1 + rng() % (size + 100));
                    const ssize_t r = frontend::consume_in(ring.halves, in);
                    if (r == -EAGAIN) {
                        CHECK(ring.halves.intf.in_prod() == ring.halves.intf.in_cons());
                    } else {
                        REQUIRE(r > 0);
                        received.insert(received.end(), in.begin(), in.begin() + r);
                    }
                }
                CHECK(sent_by_backend_view == send_data);
                CHECK(received == recv_data);
                // The indexes really did travel (and, for the high starts, wrapped).
                CHECK(ring.halves.intf.out_prod() == static_cast<uint32_t>(start + send_data.size()));
                CHECK(ring.halves.intf.in_cons() == static_cast<uint32_t>(start + recv_data.size()));
            }
        }
    }
}

TEST_CASE("data ring: full and empty, exactly a ring queued is not an error") {
    TestRing ring(xensock_v3(), 0, 0xFFFFFF00u);
    const uint32_t size = ring.halves.size;
    const auto data = pattern(size, 3);
    CHECK(frontend::produce_out(ring.halves, data) == static_cast<ssize_t>(size));
    CHECK(frontend::produce_out(ring.halves, data) == -EAGAIN);  // full, prod - cons == size
    std::byte one[1];
    CHECK(frontend::consume_in(ring.halves, one) == -EAGAIN);  // empty
    CHECK(frontend::produce_out(ring.halves, {}) == 0);
    CHECK(frontend::consume_in(ring.halves, std::span<std::byte>{}) == 0);
    // The backend fills in completely: all of it is readable.
    CHECK(ring.backend_produce(data.data(), size) == size);
    std::vector<std::byte> got(size * 2);
    CHECK(frontend::consume_in(ring.halves, got) == static_cast<ssize_t>(size));
    CHECK(std::equal(data.begin(), data.end(), got.begin()));
}

TEST_CASE("data ring: errors are reported only once the in ring is empty") {
    TestRing ring(pvcalls_v1(), 1, 0xFFFFFFF0u);
    const auto data = pattern(100, 4);
    ring.backend_produce(data.data(), 100);
    ring.halves.intf.set_in_error(-ENOTCONN);  // orderly shutdown after 100 bytes
    std::vector<std::byte> buf(60);
    CHECK(frontend::consume_in(ring.halves, buf) == 60);
    CHECK(frontend::consume_in(ring.halves, buf) == 40);
    CHECK(frontend::consume_in(ring.halves, buf) == 0);  // EOF
    CHECK(frontend::consume_in(ring.halves, buf) == 0);  // and it stays so

    TestRing reset(pvcalls_v1(), 1, 0);
    reset.backend_produce(data.data(), 10);
    reset.halves.intf.set_in_error(-ECONNRESET);
    CHECK(frontend::consume_in(reset.halves, buf) == 10);
    CHECK(frontend::consume_in(reset.halves, buf) == -ECONNRESET);

    // The seed's text says the positive ENOTCONN; accept that too.
    TestRing positive(xensock_v3(), 0, 0);
    positive.halves.intf.set_in_error(ENOTCONN);
    CHECK(frontend::consume_in(positive.halves, buf) == 0);

    // out_error stops the producer at once.
    TestRing out(xensock_v3(), 0, 0);
    out.halves.intf.set_out_error(-EPIPE);
    CHECK(frontend::produce_out(out.halves, data) == -EPIPE);
    CHECK(out.halves.intf.out_prod() == 0u);
}

TEST_CASE("data ring: indexes more than a ring apart are -EIO, never a crash") {
    TestRing ring(xensock_v3(), 0, 1000);
    const uint32_t size = ring.halves.size;
    const auto data = pattern(size, 5);
    std::vector<std::byte> buf(size);

    ring.halves.intf.set_in_prod(1000 + size + 1);
    CHECK(frontend::consume_in(ring.halves, buf) == -EIO);
    ring.halves.intf.set_in_prod(999);  // behind cons
    CHECK(frontend::consume_in(ring.halves, buf) == -EIO);
    ring.halves.intf.set_in_prod(1000 + size);  // exactly full is fine
    CHECK(frontend::consume_in(ring.halves, buf) == static_cast<ssize_t>(size));

    ring.halves.intf.set_out_cons(1000 + 1);  // the backend "consumed" more than we produced
    CHECK(frontend::produce_out(ring.halves, data) == -EIO);
    ring.halves.intf.set_out_cons(1000 - size - 1);
    CHECK(frontend::produce_out(ring.halves, data) == -EIO);
}

TEST_CASE("data ring: error normalization") {
    CHECK(frontend::normalize_ring_error(0) == 0);
    CHECK(frontend::normalize_ring_error(-ENOTCONN) == -ENOTCONN);
    CHECK(frontend::normalize_ring_error(ENOTCONN) == -ENOTCONN);
    CHECK(frontend::normalize_ring_error(INT_MIN) == -EIO);
    CHECK(frontend::normalize_ring_error(INT_MAX) == -EIO);
    CHECK(frontend::normalize_ring_error(-4096) == -EIO);
}

TEST_CASE("addresses: ipv4() builds a Linux sockaddr_in") {
    auto sa = frontend::ipv4("127.0.0.1", 443);
    REQUIRE(sa);
    static_assert(sizeof(sockaddr_in) == 16);
    const auto* b = reinterpret_cast<const std::byte*>(&*sa);
    CHECK(at<uint16_t>(b, 0) == AF_INET);
    CHECK(at<uint16_t>(b, 2) == htons(443));
    CHECK(at<uint32_t>(b, 4) == htonl(INADDR_LOOPBACK));
    CHECK(all_zero(b, 8, 16));
    CHECK_FALSE(frontend::ipv4("localhost", 1));
    CHECK_FALSE(frontend::ipv4("1.2.3.4.5", 1));
}
