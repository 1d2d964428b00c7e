// Fuzz target: a data ring whose interface page and ring bytes the other
// side controls. Covers wire::ring_queued, wire::DataIntfView over both
// profiles' layouts, and the guest library's producer/consumer steps
// (frontend produce_out / consume_in and the wrap-around copies). The engine
// side of the same index checks uses the same wire::ring_queued.
//
// Invariants:
// - ring_queued(prod, cons, size) is prod - cons (mod 2^32) when that is at
//   most size, else -1: never more than a ring;
// - each DataIntfView field reads the bytes at its struct's offsetof, and
//   every ref(i) the page can hold lies inside it;
// - produce_out: with out_error set it returns the normalized error, with
//   indexes more than a ring apart -EIO, on a full ring -EAGAIN, and changes
//   nothing; otherwise it queues min(space, len) bytes exactly at out_prod
//   (wrapping), touches no other byte of either half, and moves only
//   out_prod, by what it returns;
// - consume_in never copies more than in_prod - in_cons nor more than asked,
//   copies exactly the ring's bytes from in_cons, writes nothing past what it
//   returns, moves only in_cons; errors only once the ring is empty;
// - normalize_ring_error gives 0 or a negative errno in [-4095, -1].
// Guard bytes around both halves catch a stray copy even without a sanitizer.
#include "fuzz_support.hpp"

#include "xensock/frontend/frontend.hpp"
#include "xensock/wire/data_ring.hpp"
#include "xensock/wire/pvcalls_v1.hpp"
#include "xensock/wire/xensock_v3.hpp"

#include <cerrno>
#include <climits>
#include <memory>
#include <vector>

namespace {

using namespace xensock;

constexpr size_t kGuard = 64;
constexpr std::byte kGuardByte{0xE7};

// Where each field is, from the static_asserted structs (not the table the
// profile hands out, which is what is being checked).
struct Offsets {
    size_t in_cons, in_prod, in_error, out_cons, out_prod, out_error, ring_order, refs;
};
template <typename T>
constexpr Offsets offsets_of() {
    return {offsetof(T, in_cons),  offsetof(T, in_prod),  offsetof(T, in_error),   offsetof(T, out_cons),
            offsetof(T, out_prod), offsetof(T, out_error), offsetof(T, ring_order), offsetof(T, ref)};
}

struct Ring {
    const wire::ProtocolProfile* profile;
    Offsets at;
    uint32_t size;
    std::unique_ptr<std::byte[]> intf{new std::byte[wire::kRingPageSize]()};
    std::vector<std::byte> mem;  // guard | in | guard | out | guard
    frontend::RingHalves halves;

    Ring(const wire::ProtocolProfile& p, Offsets o, unsigned order)
        : profile(&p), at(o), size(wire::ring_bytes_per_direction(order)), mem(3 * kGuard + 2 * size, kGuardByte) {
        std::memset(in(), 0, size);
        std::memset(out(), 0, size);
        halves = {wire::DataIntfView(intf.get(), p.data_layout()), in(), out(), size};
    }
    std::byte* in() { return mem.data() + kGuard; }
    std::byte* out() { return mem.data() + 2 * kGuard + size; }
    uint32_t get(size_t offset) const { return fuzz::load_at<uint32_t>(intf.get(), offset); }
    void set(size_t offset, uint32_t v) { std::memcpy(intf.get() + offset, &v, sizeof v); }
    bool guards_intact() const {
        for (size_t g : {size_t{0}, kGuard + size, 2 * kGuard + 2 * size})
            for (size_t i = 0; i < kGuard; ++i)
                if (mem[g + i] != kGuardByte) return false;
        return true;
    }
};

int expected_normalized(int32_t v) {
    if (v == 0) return 0;
    const int64_t m = v < 0 ? -static_cast<int64_t>(v) : v;
    return m > 4095 ? -EIO : -static_cast<int>(m);
}

// Within 2 of `near` or of a whole ring away from it: where the edges are.
uint32_t at_edge(fuzz::Input& in, uint32_t near, uint32_t ring_size) {
    const auto delta = static_cast<uint32_t>(static_cast<int8_t>(in.u8()) % 3);
    const uint32_t base = (in.u8() & 1) ? near - ring_size : near + ring_size;
    return (in.u8() & 1) ? base + delta : near + delta;
}

uint32_t hostile_value(fuzz::Input& in, uint32_t near, uint32_t ring_size) {
    switch (in.u8() % 5) {
        case 0: return in.u32();
        case 1: return near + static_cast<uint32_t>(static_cast<int16_t>(in.get<uint16_t>()));
        case 4: return at_edge(in, near, ring_size);
        case 2: {
            static constexpr int32_t errors[] = {-ENOTCONN, ENOTCONN, -ECONNRESET, -EPIPE, INT32_MIN, INT32_MAX, -4096, 4095};
            return static_cast<uint32_t>(errors[in.u8() % std::size(errors)]);
        }
        default: return near;
    }
}

void check_view(Ring& r) {
    const wire::DataIntfView& v = r.halves.intf;
    FUZZ_CHECK(v.in_cons() == r.get(r.at.in_cons));
    FUZZ_CHECK(v.in_prod() == r.get(r.at.in_prod));
    FUZZ_CHECK(v.in_error() == static_cast<int32_t>(r.get(r.at.in_error)));
    FUZZ_CHECK(v.out_cons() == r.get(r.at.out_cons));
    FUZZ_CHECK(v.out_prod() == r.get(r.at.out_prod));
    FUZZ_CHECK(v.out_error() == static_cast<int32_t>(r.get(r.at.out_error)));
    FUZZ_CHECK(v.ring_order() == r.get(r.at.ring_order));
    const wire::DataIntfLayout& l = r.profile->data_layout();
    FUZZ_CHECK(l.refs == r.at.refs);
    FUZZ_CHECK(l.refs + 4 * size_t{l.max_refs()} <= wire::kRingPageSize);
    FUZZ_CHECK(l.refs + 4 * (size_t{l.max_refs()} + 1) > wire::kRingPageSize);
    FUZZ_CHECK(v.ref(l.max_refs() - 1) == r.get(r.at.refs + 4 * (l.max_refs() - 1)));
}

void produce(Ring& r, fuzz::Input& in) {
    const size_t len = in.get<uint16_t>() % (2 * r.size + 2);
    std::vector<std::byte> data(len);
    for (size_t i = 0; i < len; ++i) data[i] = static_cast<std::byte>(i * 131 + 7);
    const uint32_t cons = r.get(r.at.out_cons), prod = r.get(r.at.out_prod);
    const int32_t error = static_cast<int32_t>(r.get(r.at.out_error));
    const std::vector<std::byte> mem_before = r.mem;
    std::unique_ptr<std::byte[]> intf_before(new std::byte[wire::kRingPageSize]);
    std::memcpy(intf_before.get(), r.intf.get(), wire::kRingPageSize);

    const ssize_t n = frontend::produce_out(r.halves, data);
    const uint32_t queued = prod - cons;
    ssize_t want;
    if (len == 0) want = 0;
    else if (error != 0) want = expected_normalized(error);
    else if (queued > r.size) want = -EIO;
    else if (queued == r.size) want = -EAGAIN;
    else want = static_cast<ssize_t>(std::min<size_t>(r.size - queued, len));
    FUZZ_CHECK(n == want);
    FUZZ_CHECK(r.guards_intact());
    FUZZ_CHECK(std::memcmp(r.in(), mem_before.data() + kGuard, r.size) == 0);  // in half untouched
    const std::byte* out_before = mem_before.data() + 2 * kGuard + r.size;
    if (n <= 0) {
        FUZZ_CHECK(r.mem == mem_before);
        FUZZ_CHECK(std::memcmp(r.intf.get(), intf_before.get(), wire::kRingPageSize) == 0);
        return;
    }
    FUZZ_CHECK(r.get(r.at.out_prod) == prod + static_cast<uint32_t>(n));
    r.set(r.at.out_prod, prod);
    FUZZ_CHECK(std::memcmp(r.intf.get(), intf_before.get(), wire::kRingPageSize) == 0);  // only out_prod moved
    r.set(r.at.out_prod, prod + static_cast<uint32_t>(n));
    std::vector<bool> written(r.size, false);
    for (ssize_t i = 0; i < n; ++i) {
        const uint32_t pos = (prod + static_cast<uint32_t>(i)) & (r.size - 1);
        FUZZ_CHECK(!written[pos]);  // never more than a ring
        written[pos] = true;
        FUZZ_CHECK(r.out()[pos] == data[static_cast<size_t>(i)]);
    }
    for (uint32_t pos = 0; pos < r.size; ++pos)
        if (!written[pos]) FUZZ_CHECK(r.out()[pos] == out_before[pos]);
}

void consume(Ring& r, fuzz::Input& in) {
    const size_t len = in.get<uint16_t>() % (2 * r.size + 2);
    // Exactly len bytes plus a guard, prefilled so stray writes show.
    std::vector<std::byte> buf(len + kGuard, std::byte{0x3C});
    const int32_t error = static_cast<int32_t>(r.get(r.at.in_error));
    const uint32_t prod = r.get(r.at.in_prod), cons = r.get(r.at.in_cons);
    const std::vector<std::byte> mem_before = r.mem;
    std::unique_ptr<std::byte[]> intf_before(new std::byte[wire::kRingPageSize]);
    std::memcpy(intf_before.get(), r.intf.get(), wire::kRingPageSize);

    const ssize_t n = frontend::consume_in(r.halves, std::span<std::byte>(buf.data(), len));
    const uint32_t queued = prod - cons;
    ssize_t want;
    if (len == 0) want = 0;
    else if (queued > r.size) want = -EIO;
    else if (queued == 0) {
        const int e = expected_normalized(error);
        want = error == 0 ? -EAGAIN : (e == -ENOTCONN ? 0 : e);
    } else want = static_cast<ssize_t>(std::min<size_t>(queued, len));
    FUZZ_CHECK(n == want);
    FUZZ_CHECK(r.mem == mem_before);  // a consumer writes no ring byte
    const size_t copied = n > 0 ? static_cast<size_t>(n) : 0;
    FUZZ_CHECK(copied <= queued && copied <= len);
    for (size_t i = copied; i < buf.size(); ++i) FUZZ_CHECK(buf[i] == std::byte{0x3C});
    for (size_t i = 0; i < copied; ++i)
        FUZZ_CHECK(buf[i] == r.in()[(cons + static_cast<uint32_t>(i)) & (r.size - 1)]);
    FUZZ_CHECK(r.get(r.at.in_cons) == cons + static_cast<uint32_t>(copied));
    r.set(r.at.in_cons, cons);
    FUZZ_CHECK(std::memcmp(r.intf.get(), intf_before.get(), wire::kRingPageSize) == 0);  // only in_cons moved
    r.set(r.at.in_cons, cons + static_cast<uint32_t>(copied));
}

void copies(Ring& r, fuzz::Input& in) {
    const uint32_t index = in.u32();
    const uint32_t len = in.get<uint16_t>() % (r.size + 1);
    std::vector<std::byte> src(len + 1), back(len + 1);  // never a null data() for len 0
    in.bytes(src.data(), len);
    const std::vector<std::byte> before(r.out(), r.out() + r.size);
    frontend::copy_to_ring(r.out(), r.size, index, src.data(), len);
    frontend::copy_from_ring(r.out(), r.size, index, back.data(), len);
    FUZZ_CHECK(src == back);
    FUZZ_CHECK(r.guards_intact());
    for (uint32_t pos = 0; pos < r.size; ++pos) {
        const uint32_t distance = (pos - index) & (r.size - 1);  // from index, going forward
        if (distance >= len) FUZZ_CHECK(r.out()[pos] == before[pos]);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::Input in(data, size);
    const uint8_t setup = in.u8();
    const bool pv = setup & 1;
    const unsigned order = (setup >> 1) % 4;  // up to 16 KiB per direction: fast
    Ring r(pv ? wire::pvcalls_v1_profile() : wire::xensock_v3_profile(),
           pv ? offsets_of<wire::pvcalls_v1::DataIntf>() : offsets_of<wire::xensock_v3::DataIntf>(), order);
    check_view(r);

    const size_t fields[] = {r.at.in_cons, r.at.in_prod, r.at.in_error, r.at.out_cons,
                             r.at.out_prod, r.at.out_error, r.at.ring_order};
    for (unsigned steps = 0; steps < 256 && !in.empty(); ++steps) {
        switch (in.u8() % 9) {
            case 0: {  // the backend writes one field (near its partner index, or anything)
                static constexpr unsigned partner[] = {1, 0, 2, 4, 3, 5, 6};  // cons <-> prod
                const unsigned f = in.u8() % std::size(fields);
                const uint32_t near = r.get(fields[partner[f]]);
                r.set(fields[f], hostile_value(in, near, r.size));
                break;
            }
            case 1: {  // the backend scribbles on the interface page
                const size_t at = in.get<uint16_t>() % wire::kRingPageSize;
                in.bytes(r.intf.get() + at, std::min<size_t>(in.u8() % 33, wire::kRingPageSize - at));
                break;
            }
            case 2: {  // the backend writes bytes into the in half
                const uint32_t at = in.get<uint16_t>() % r.size;
                in.bytes(r.in() + at, std::min<size_t>(in.u8(), r.size - at));
                break;
            }
            case 3: produce(r, in); break;
            case 4: consume(r, in); break;
            case 5: {
                const uint32_t cons = in.u32();
                const uint32_t ring_size = uint32_t{1} << (in.u8() % 32);
                const uint32_t prod = (in.u8() & 1) ? at_edge(in, cons, ring_size) : in.u32();
                const int64_t q = wire::ring_queued(prod, cons, ring_size);
                FUZZ_CHECK(q <= static_cast<int64_t>(ring_size));
                FUZZ_CHECK(q == (prod - cons > ring_size ? -1 : static_cast<int64_t>(prod - cons)));
                FUZZ_CHECK(q < 0 || cons + static_cast<uint32_t>(q) == prod);
                break;
            }
            case 6: {
                const int32_t v = in.get<int32_t>();
                const int e = frontend::normalize_ring_error(v);
                FUZZ_CHECK(e == expected_normalized(v));
                FUZZ_CHECK((e == 0) == (v == 0) && e <= 0 && e >= -4095);
                break;
            }
            case 7: check_view(r); break;
            case 8: copies(r, in); break;
        }
        FUZZ_CHECK(r.guards_intact());
    }
    return 0;
}
