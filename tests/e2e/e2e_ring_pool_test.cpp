// End to end on sim: the guest library's pool of data rings
// (GuestOptions::ring_pool). A ring the backend has let go of (RELEASE, or a
// failed CONNECT/ACCEPT, answered) is offered again, same grant refs and
// port, to the next connect/accept of the same order; xensockd maps and binds
// it afresh, and nothing of the previous socket may show through.
#include <doctest/doctest.h>

#include "guest_util.hpp"

#include <string>
#include <string_view>

using namespace xensock;
using namespace xensock::testing;
using namespace std::chrono_literals;
using frontend::RingOptions;

namespace {

rt::Task<int> recv_text(Guest& g, uint64_t id, std::string& out, size_t n) {
    out.assign(n, '\0');
    const ssize_t got = co_await g.recv_exact(id, std::as_writable_bytes(std::span(out.data(), n)), std::chrono::seconds(20));
    co_return static_cast<int>(got);
}

rt::Task<int> send_text(Guest& g, uint64_t id, std::string_view text) {
    const ssize_t sent = co_await g.send_all(id, std::as_bytes(std::span(text.data(), text.size())));
    co_return static_cast<int>(sent);
}

// Host side: accepts `count` connections in turn; on each sends `greeting`
// (the first may hold bytes the guest never reads), then expects and checks
// one byte per connection.
pid_t spawn_host(SimEnv& env, int lfd, int count) {
    return env.spawn([lfd, count]() -> int {
        for (int i = 0; i < count; ++i) {
            const int c = ::accept(lfd, nullptr, nullptr);
            if (c < 0) return 2;
            const std::string greeting = i == 0 ? std::string(5000, 'o') : "new" + std::to_string(i);
            if (!write_all(c, greeting.data(), greeting.size())) return 3;
            char b = 0;
            if (::recv(c, &b, 1, MSG_WAITALL) != 1 || b != static_cast<char>('a' + i)) return 4;
            ::close(c);
        }
        return 0;
    });
}

}  // namespace

TEST_CASE("frontend ring pool: a released ring is offered again (same refs and port) and carries nothing over") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        env.attach(31, *profile);
        uint16_t port = 0;
        const int lfd = host_listen(port);
        const pid_t host = spawn_host(env, lfd, 3);
        frontend::GuestOptions options;
        options.profile = profile;
        const pid_t guest = spawn_guest_with(env, 31, options, [port](Guest& g, rt::Reactor& r) -> rt::Task<int> {
            // First socket: the host's 5000 bytes arrive and are left unread.
            uint64_t a = 0;
            GCHECK_EQ(co_await g.socket(a), 0);
            GCHECK_EQ(co_await g.connect(a, loopback(port)), 0);
            const auto first = g.socket_info(a);
            GCHECK(first && first->has_ring);
            const auto ring = g.data_ring(a);
            for (int i = 0; i < 2000; ++i) {  // wait until something is queued in our in half
                if (ring->intf.in_prod() != ring->intf.in_cons()) break;
                co_await r.sleep_for(std::chrono::milliseconds(5));
            }
            GCHECK(ring->intf.in_prod() != ring->intf.in_cons());
            GCHECK_EQ(co_await send_text(g, a, "a"), 1);
            GCHECK_EQ(co_await g.release(a), 0);
            GCHECK_EQ(g.stats().rings_reused, 0u);

            // Second and third: served from the pool, same ref and port.
            for (int i = 1; i <= 2; ++i) {
                uint64_t b = 0;
                GCHECK_EQ(co_await g.socket(b), 0);
                GCHECK_EQ(co_await g.connect(b, loopback(port)), 0);
                const auto again = g.socket_info(b);
                GCHECK(again && again->has_ring);
                GCHECK_EQ(again->intf_ref, first->intf_ref);
                GCHECK_EQ(again->port, first->port);
                GCHECK_EQ(g.stats().rings_reused, static_cast<uint64_t>(i));
                // Only this connection's bytes, none of the first's.
                const std::string expect = "new" + std::to_string(i);
                std::string got;
                GCHECK_EQ(co_await recv_text(g, b, got, expect.size()), static_cast<int>(expect.size()));
                GCHECK(got == expect);
                const std::string reply(1, static_cast<char>('a' + i));
                GCHECK_EQ(co_await send_text(g, b, reply), 1);
                GCHECK_EQ(co_await g.release(b), 0);
            }
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest, 60s) == 0);
        CHECK(SimEnv::wait_child(host, 60s) == 0);
        ::close(lfd);
        CHECK(env.detach(31, *profile).ok());
        CHECK(eventually([&] { return env.daemon_ring_mappings() == 0; }));
    }
}

TEST_CASE("frontend ring pool: bounded, per order, and off with ring_pool = 0") {
    for (const auto* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        SimEnv env;
        env.attach(32, *profile);
        uint16_t port = 0;
        const int lfd = host_listen(port, 64);
        // The host only accepts (and keeps) connections; nothing is sent.
        const pid_t host = env.spawn([lfd]() -> int {
            std::vector<int> conns;
            for (int i = 0; i < 12 + 12 + 1 + 1 + 2; ++i) {
                const int c = ::accept(lfd, nullptr, nullptr);
                if (c < 0) return 2;
                conns.push_back(c);
            }
            for (int c : conns) ::close(c);
            return 0;
        });
        frontend::GuestOptions options;
        options.profile = profile;
        options.ring_pool = 4;
        const pid_t guest = spawn_guest_with(env, 32, options, [port](Guest& g, rt::Reactor&) -> rt::Task<int> {
            const unsigned low = std::max(1u, g.profile().min_ring_order());
            RingOptions small, large;
            small.order = low;
            large.order = low + 1;
            auto open_many = [&](int n, RingOptions o, std::vector<uint64_t>& ids) -> rt::Task<int> {
                for (int i = 0; i < n; ++i) {
                    uint64_t id = 0;
                    if (co_await g.socket(id) != 0) co_return 1;
                    if (co_await g.connect(id, loopback(port), o) != 0) co_return 2;
                    ids.push_back(id);
                }
                co_return 0;
            };
            std::vector<uint64_t> ids;
            GCHECK_EQ(co_await open_many(12, small, ids), 0);
            for (auto id : ids) GCHECK_EQ(co_await g.release(id), 0);
            ids.clear();
            // At most 4 were kept.
            GCHECK_EQ(co_await open_many(12, small, ids), 0);
            GCHECK_EQ(g.stats().rings_reused, 4u);
            for (auto id : ids) GCHECK_EQ(co_await g.release(id), 0);
            ids.clear();
            // A ring of another order is not taken from the pool.
            GCHECK_EQ(co_await open_many(1, large, ids), 0);
            GCHECK_EQ(g.stats().rings_reused, 4u);
            GCHECK_EQ(co_await open_many(1, small, ids), 0);
            GCHECK_EQ(g.stats().rings_reused, 5u);
            for (auto id : ids) GCHECK_EQ(co_await g.release(id), 0);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(guest, 60s) == 0);

        // ring_pool = 0: every ring is freed, none reused.
        options.ring_pool = 0;
        const pid_t plain = spawn_guest_with(env, 32, options, [port](Guest& g, rt::Reactor&) -> rt::Task<int> {
            for (int i = 0; i < 2; ++i) {
                uint64_t id = 0;
                GCHECK_EQ(co_await g.socket(id), 0);
                GCHECK_EQ(co_await g.connect(id, loopback(port)), 0);
                GCHECK_EQ(co_await g.release(id), 0);
            }
            GCHECK_EQ(g.stats().rings_reused, 0u);
            co_return 0;
        });
        CHECK(SimEnv::wait_child(plain, 60s) == 0);
        CHECK(SimEnv::wait_child(host, 60s) == 0);
        ::close(lfd);
        CHECK(env.detach(32, *profile).ok());
        CHECK(eventually([&] { return env.daemon_ring_mappings() == 0; }));
    }
}
