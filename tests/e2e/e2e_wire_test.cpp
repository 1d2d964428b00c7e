// End to end on sim, about wire bytes the guest library never produces on
// its own: pad and unused union bytes set to 0xFF and PVCalls release.reuse
// set to 1 (all must be ignored), ring order 0 (PVCalls refuses it, XenSock
// serves it), and unknown commands with odd ids, which must come back echoed
// exactly. A wrapping profile on the guest side rewrites each request slot
// after the real profile encoded it; xensockd runs unchanged.
#include <doctest/doctest.h>

#include "guest_util.hpp"

#include <array>
#include <fstream>
#include <map>
#include <optional>

using namespace xensock;
using namespace xensock::testing;
using frontend::RingOptions;

namespace {


wire::Request raw_request(uint32_t raw_cmd, uint64_t sockid) {
    wire::Request r;
    r.cmd = raw_cmd <= 6 ? static_cast<wire::Command>(raw_cmd) : wire::Command::unknown;
    r.raw_cmd = raw_cmd;
    r.sockid = sockid;
    return r;
}

// One past the last request byte a command uses (shared/spec/protocols.md:
// the same payload offsets in both protocols); the rest is pad.
size_t used_request_bytes(wire::Command c) {
    switch (c) {
        case wire::Command::socket: return 28;   // domain, type, protocol
        case wire::Command::connect: return 60;  // addr, len, flags, ref, evtchn
        case wire::Command::bind: return 48;     // addr, len
        case wire::Command::listen: return 20;   // backlog
        case wire::Command::accept: return 32;   // new id, ref, evtchn
        default: return 16;                      // release, poll, unknown: ids only
    }
}

template <typename T>
T field_at(const std::array<std::byte, wire::kSlotSize>& slot, size_t offset) {
    T v;
    std::memcpy(&v, slot.data() + offset, sizeof v);
    return v;
}

// The guest's profile with hostile-looking but valid request bytes: every
// unused byte 0xFF, PVCalls release.reuse = 1, and on request a req_id of
// our choosing on the wire (mapped back to the library's own id when the
// answer comes, so only an exact echo finds its caller).
class PaddingProfile final : public wire::ProtocolProfile {
public:
    explicit PaddingProfile(const wire::ProtocolProfile& inner) : inner_(inner) {}

    std::string_view name() const override { return inner_.name(); }
    unsigned min_ring_order() const override { return inner_.min_ring_order(); }
    const wire::DataIntfLayout& data_layout() const override { return inner_.data_layout(); }
    uint32_t ring_bytes(unsigned order) const override { return inner_.ring_bytes(order); }
    wire::NodeList backend_nodes(unsigned max_order) const override { return inner_.backend_nodes(max_order); }
    Result<wire::FrontendParams> read_frontend(const wire::NodeReader& read, std::string& why) const override {
        return inner_.read_frontend(read, why);
    }
    wire::Request decode_request(const wire::Slot& slot) const override { return inner_.decode_request(slot); }
    void encode_response(std::byte* slot, const wire::Response& rsp) const override {
        inner_.encode_response(slot, rsp);
    }
    wire::NodeList frontend_nodes(const wire::FrontendParams& p) const override { return inner_.frontend_nodes(p); }
    Result<wire::BackendParams> read_backend(const wire::NodeReader& read, std::string& why) const override {
        return inner_.read_backend(read, why);
    }

    void encode_request(std::byte* slot, const wire::Request& req) const override {
        inner_.encode_request(slot, req);
        const size_t used = used_request_bytes(req.cmd);
        std::memset(slot + used, 0xFF, wire::kSlotSize - used);
        if (req.cmd == wire::Command::release && inner_.name() == "pvcalls") {
            slot[16] = std::byte{1};  // reuse: a hint the backend may ignore
            ++releases_with_reuse;
        }
        if (next_wire_id_) {
            std::memcpy(slot, &*next_wire_id_, sizeof(uint32_t));
            wire_to_library_[*next_wire_id_] = req.req_id;
            next_wire_id_.reset();
        }
        ++padded_requests;
    }
    wire::Response decode_response(const wire::Slot& slot) const override {
        wire::Response rsp = inner_.decode_response(slot);
        if (auto it = wire_to_library_.find(rsp.req_id); it != wire_to_library_.end()) {
            rsp.req_id = it->second;
            wire_to_library_.erase(it);
        }
        std::memcpy(raw_responses_[rsp.req_id].data(), slot, wire::kSlotSize);
        return rsp;
    }

    // The next request goes out with this req_id on the wire.
    void use_wire_req_id(uint32_t id) { next_wire_id_ = id; }
    // The response slot, as xensockd wrote it, for the library's req_id.
    std::optional<std::array<std::byte, wire::kSlotSize>> raw_response(uint32_t library_id) const {
        auto it = raw_responses_.find(library_id);
        if (it == raw_responses_.end()) return std::nullopt;
        return it->second;
    }
    // Responses decoded so far, by the library's req_id.
    size_t responses() const { return raw_responses_.size(); }

    mutable unsigned padded_requests = 0;
    mutable unsigned releases_with_reuse = 0;

private:
    const wire::ProtocolProfile& inner_;
    mutable std::optional<uint32_t> next_wire_id_;
    mutable std::map<uint32_t, uint32_t> wire_to_library_;
    mutable std::map<uint32_t, std::array<std::byte, wire::kSlotSize>> raw_responses_;
};

}  // namespace

TEST_CASE("wire: pad and unused bytes set to 0xFF, and PVCalls release.reuse = 1, are ignored") {
    for (const auto* real : wire::all_profiles()) {
        CAPTURE(real->name());
        SimEnv env;
        PaddingProfile padded(*real);
        uint16_t echo_port = 0;
        const int lfd = host_listen(echo_port);
        const pid_t echo = spawn_echo_server(env, lfd, 1);
        const uint16_t listen_port = free_port();
        const std::string root = env.root();
        env.attach(11, *real);
        const bool pv = real->name() == "pvcalls";
        const pid_t guest = spawn_guest(env, 11, padded, [&padded, root, echo_port, listen_port,
                                                          pv](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            // SOCKET, CONNECT, data both ways, RELEASE (reuse=1 on PVCalls).
            uint64_t c = 0;
            GCHECK_EQ(co_await g.socket(c), 0);
            GCHECK_EQ(co_await g.connect(c, loopback(echo_port)), 0);
            std::vector<std::byte> out(100000), back(out.size());
            fill_pattern(out.data(), out.size(), 0, 42);
            GCHECK_EQ(co_await g.send_all(c, out, 20s), static_cast<ssize_t>(out.size()));
            GCHECK_EQ(co_await g.recv_exact(c, back, 20s), static_cast<ssize_t>(back.size()));
            GCHECK(out == back);
            GCHECK_EQ(co_await g.release(c), 0);

            // SOCKET, BIND, LISTEN, POLL, ACCEPT from a host client, RELEASE.
            uint64_t l = 0, a = 0;
            GCHECK_EQ(co_await g.socket(l), 0);
            GCHECK_EQ(co_await g.bind(l, loopback(listen_port)), 0);
            GCHECK_EQ(co_await g.listen(l, 4), 0);
            mark(root, "listening");
            GCHECK_EQ(co_await g.poll(l), 0);
            GCHECK_EQ(co_await g.accept(l, a), 0);
            std::array<std::byte, 5> hello{};
            GCHECK_EQ(co_await g.recv_exact(a, hello, 10s), 5);
            GCHECK(std::memcmp(hello.data(), "hello", 5) == 0);
            GCHECK_EQ(co_await g.release(a), 0);
            GCHECK_EQ(co_await g.release(l), 0);

            // The bytes really went out padded, and nothing was ignored or lost.
            GCHECK(padded.padded_requests >= 10);
            GCHECK_EQ(padded.releases_with_reuse, pv ? 3u : 0u);
            GCHECK_EQ(g.stats().ignored_responses, 0u);
            (void)r;
            co_return 0;
        });
        REQUIRE(eventually([&] { return marked(root, "listening"); }, 30s));
        int client = -1;
        REQUIRE(eventually([&] { return (client = host_connect(listen_port)) >= 0; }, 10s));
        CHECK(write_all(client, "hello", 5));
        CHECK(SimEnv::wait_child(guest) == 0);
        ::close(client);
        CHECK(SimEnv::wait_child(echo) == 0);
        ::close(lfd);
    }
}

TEST_CASE("wire: ring order 0 is -EINVAL for PVCalls CONNECT and ACCEPT, and works for XenSock") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        uint16_t echo_port = 0;
        const int lfd = host_listen(echo_port);
        const pid_t echo = spawn_echo_server(env, lfd, 1);
        const uint16_t listen_port = free_port();
        const std::string root = env.root();
        env.attach(12, *profile);
        const bool pv = profile->name() == "pvcalls";
        const pid_t guest = spawn_guest(env, 12, *profile, [=](Guest& g, rt::Reactor&) -> rt::Task<int> {
            RingOptions order0;
            order0.order = 0;
            uint64_t c = 0;
            GCHECK_EQ(co_await g.socket(c), 0);
            GCHECK_EQ(co_await g.connect(c, loopback(echo_port), order0), pv ? -EINVAL : 0);
            if (pv) {
                // The smallest order PVCalls allows works on the same socket.
                RingOptions order1;
                order1.order = 1;
                GCHECK_EQ(co_await g.connect(c, loopback(echo_port), order1), 0);
            }
            GCHECK_EQ(g.socket_info(c)->ring_order, pv ? 1u : 0u);
            // Several times the 2 KiB (order 0) or 4 KiB (order 1) ring.
            std::vector<std::byte> out(50000), back(out.size());
            fill_pattern(out.data(), out.size(), 0, 7);
            GCHECK_EQ(co_await g.send_all(c, out, 20s), static_cast<ssize_t>(out.size()));
            GCHECK_EQ(co_await g.recv_exact(c, back, 20s), static_cast<ssize_t>(back.size()));
            GCHECK(out == back);
            GCHECK_EQ(co_await g.release(c), 0);

            uint64_t l = 0, a = 0;
            GCHECK_EQ(co_await g.socket(l), 0);
            GCHECK_EQ(co_await g.bind(l, loopback(listen_port)), 0);
            GCHECK_EQ(co_await g.listen(l, 4), 0);
            if (pv) {
                // Refused at once: the ring is checked before waiting for a client.
                GCHECK_EQ(co_await g.accept(l, a, order0), -EINVAL);
                mark(root, "listening");
                GCHECK_EQ(co_await g.accept(l, a), 0);
            } else {
                mark(root, "listening");
                GCHECK_EQ(co_await g.accept(l, a, order0), 0);
                GCHECK_EQ(g.socket_info(a)->ring_order, 0u);
            }
            std::array<std::byte, 5> hello{};
            GCHECK_EQ(co_await g.recv_exact(a, hello, 10s), 5);
            GCHECK(std::memcmp(hello.data(), "hello", 5) == 0);
            GCHECK_EQ(co_await g.release(a), 0);
            GCHECK_EQ(co_await g.release(l), 0);
            co_return 0;
        });
        REQUIRE(eventually([&] { return marked(root, "listening"); }, 30s));
        int client = -1;
        REQUIRE(eventually([&] { return (client = host_connect(listen_port)) >= 0; }, 10s));
        CHECK(write_all(client, "hello", 5));
        CHECK(SimEnv::wait_child(guest) == 0);
        ::close(client);
        CHECK(SimEnv::wait_child(echo) == 0);
        ::close(lfd);
    }
}

TEST_CASE("wire: unknown commands echo req_id, cmd and id exactly, odd values included") {
    for (const auto* real : wire::all_profiles()) {
        CAPTURE(real->name());
        SimEnv env;
        PaddingProfile padded(*real);
        env.attach(13, *real);
        const bool pv = real->name() == "pvcalls";
        const pid_t guest = spawn_guest(env, 13, padded, [&padded, pv](Guest& g, rt::Reactor&) -> rt::Task<int> {
            const uint32_t wire_ids[] = {0xFFFFFFFFu, 0u, 0x80000000u, 0xFFFFFFFEu};
            const uint32_t cmds[] = {0xFFFFFFFFu, 7u, 0x80000000u, 524u};
            const uint64_t sockids[] = {0xFFFFFFFFFFFFFFFFull, 0ull, 0x8000000000000000ull, 0x00000000FFFFFFFFull};
            for (size_t i = 0; i < std::size(wire_ids); ++i) {
                const size_t before = padded.responses();
                padded.use_wire_req_id(wire_ids[i]);
                // Only a response carrying exactly wire_ids[i] finds this call.
                const auto rsp = co_await g.try_call(raw_request(cmds[i], sockids[i]), 5s);
                GCHECK(rsp.has_value());
                GCHECK_EQ(rsp->ret, -wire::kENOTSUPP);
                GCHECK_EQ(rsp->raw_cmd, cmds[i]);
                GCHECK(rsp->sockid == sockids[i]);
                GCHECK_EQ(padded.responses(), before + 1);
                const auto bytes = padded.raw_response(rsp->req_id);
                GCHECK(bytes.has_value());
                // The documented offsets, byte for byte; every other byte zero.
                GCHECK_EQ(field_at<uint32_t>(*bytes, 0), wire_ids[i]);
                GCHECK_EQ(field_at<uint32_t>(*bytes, 4), cmds[i]);
                size_t zero_from = 24;
                if (pv) {  // req_id@0 cmd@4 ret@8 pad@12 id@16
                    GCHECK_EQ(field_at<int32_t>(*bytes, 8), -wire::kENOTSUPP);
                    GCHECK_EQ(field_at<uint32_t>(*bytes, 12), 0u);
                    GCHECK(field_at<uint64_t>(*bytes, 16) == sockids[i]);
                } else {  // id@0 cmd@4 sockid@8 ret@16
                    GCHECK(field_at<uint64_t>(*bytes, 8) == sockids[i]);
                    GCHECK_EQ(field_at<int32_t>(*bytes, 16), -wire::kENOTSUPP);
                    zero_from = 20;
                }
                for (size_t b = zero_from; b < wire::kSlotSize; ++b) GCHECK(bytes->at(b) == std::byte{0});
            }
            GCHECK_EQ(g.stats().ignored_responses, 0u);
            // The session is still fine afterwards.
            uint64_t s = 0;
            GCHECK_EQ(co_await g.socket(s), 0);
            GCHECK_EQ(co_await g.release(s), 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest) == 0);
    }
}
