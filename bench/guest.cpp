// xensock-bench: the guest side. Each guest is a process of its own that
// opens the sim platform as its domain and uses the frontend library
// directly, as a kernel frontend would: the figures measure the protocol
// path (command ring, data rings, event channels, xensockd), not a shim.
//
// GCC 12 (see reactor.hpp and task.hpp): no class-type argument is passed by
// value inside a co_await operand in a loop here; every Task is built in a
// statement of its own and then awaited. Coroutines are free functions, not
// lambdas.
#include "bench.hpp"

#include "xensock/frontend/frontend.hpp"
#include "xensock/platform/platform.hpp"
#include "xensock/runtime/reactor.hpp"
#include "xensock/wire/profile.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace xensock::bench {
namespace {

using frontend::Guest;

#define BCHECK(cond)                                                                              \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            std::fprintf(stderr, "bench guest dom%u: check failed at %s:%d: %s\n", job.domid, __FILE__, \
                         __LINE__, #cond);                                                        \
            co_return 1;                                                                          \
        }                                                                                         \
    } while (0)

// Counts spawned coroutines down to zero.
struct Join {
    explicit Join(rt::Reactor& r) : done(r) {}
    int running = 0;
    int failures = 0;
    rt::Event done;
    void leave(bool ok) {
        if (!ok) ++failures;
        if (--running == 0) done.set();
    }
};

rt::Task<void> join_all(Join& j) {
    while (j.running > 0) co_await j.done.wait();
}

const std::byte* app_buffer() {
    static std::vector<std::byte> buf = [] {
        std::vector<std::byte> b(kChunk);
        for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>(i * 131 + 7);
        return b;
    }();
    return buf.data();
}

frontend::RingOptions ring_options(const GuestJob& job) {
    frontend::RingOptions o;
    if (job.ring_order != 0) o.order = job.ring_order;
    return o;
}

// socket + connect; 0 or -errno.
rt::Task<int> open_connection(Guest& g, const GuestJob& job, uint64_t& id) {
    auto make = g.socket(id);
    int rc = co_await std::move(make);
    if (rc < 0) co_return rc;
    const sockaddr_in addr = *frontend::ipv4("127.0.0.1", job.port);
    const frontend::RingOptions ring = ring_options(job);
    auto conn = g.connect(id, addr, ring);
    rc = co_await std::move(conn);
    co_return rc;
}

// ------------------------------------------------------------- bulk send
rt::Task<void> send_stream(Guest& g, uint64_t id, const GuestJob& job, Join& join) {
    const std::byte* buf = app_buffer();
    bool ok = true;
    for (uint64_t left = job.bytes; left > 0;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(left, kChunk));
        const std::span<const std::byte> data(buf, n);
        auto send = g.send_all(id, data);
        const ssize_t s = co_await std::move(send);
        if (s != static_cast<ssize_t>(n)) {
            std::fprintf(stderr, "bench guest dom%u: send_all returned %zd\n", job.domid, s);
            ok = false;
            break;
        }
        left -= n;
    }
    // RELEASE is close(2): what is still queued is delivered, then FIN.
    auto rel = g.release(id);
    const int rc = co_await std::move(rel);
    if (rc != 0) ok = false;
    join.leave(ok);
}

rt::Task<int> bulk_send(Guest& g, rt::Reactor& r, const GuestJob& job) {
    std::vector<uint64_t> ids(job.streams);
    for (auto& id : ids) {
        auto open = open_connection(g, job, id);
        const int rc = co_await std::move(open);
        BCHECK(rc == 0);
    }
    job.sh->ready.fetch_add(job.streams);
    job.sh->wait_go();
    Join join(r);
    for (uint64_t id : ids) {
        ++join.running;
        r.spawn(send_stream(g, id, job, join));
    }
    co_await join_all(join);
    co_return join.failures == 0 ? 0 : 1;
}

// ----------------------------------------------------------------- scale
// Sends for the whole run (until stop_ns); the first 8 bytes name the
// connection's record so that the sink can count it against what was sent.
rt::Task<void> scale_stream(Guest& g, uint64_t id, const GuestJob& job, uint32_t index, Join& join) {
    Record& rec = job.sh->rec[index];
    rec.count.store(job.domid);  // scale: which guest (the bench groups by worker)
    std::byte tag[8];
    for (unsigned i = 0; i < sizeof tag; ++i) tag[i] = static_cast<std::byte>((uint64_t{index} >> (8 * i)) & 0xFF);
    const std::span<const std::byte> head(tag, sizeof tag);
    auto send_tag = g.send_all(id, head);
    bool ok = co_await std::move(send_tag) == static_cast<ssize_t>(sizeof tag);
    const std::byte* buf = app_buffer();
    uint64_t sent = 0;
    while (ok && now_ns() < job.sh->stop_ns.load(std::memory_order_relaxed)) {
        const std::span<const std::byte> data(buf, kChunk);
        auto send = g.send_all(id, data);
        const ssize_t s = co_await std::move(send);
        if (s != static_cast<ssize_t>(kChunk)) {
            std::fprintf(stderr, "bench guest dom%u: send_all returned %zd\n", job.domid, s);
            ok = false;
            break;
        }
        sent += kChunk;
    }
    rec.sent.store(sent);
    auto rel = g.release(id);
    if (co_await std::move(rel) != 0) ok = false;
    join.leave(ok);
}

rt::Task<int> scale_send(Guest& g, rt::Reactor& r, const GuestJob& job) {
    std::vector<uint64_t> ids(job.streams);
    std::vector<uint32_t> index(job.streams);
    for (unsigned i = 0; i < job.streams; ++i) {
        auto open = open_connection(g, job, ids[i]);
        const int rc = co_await std::move(open);
        BCHECK(rc == 0);
        index[i] = job.sh->next_record.fetch_add(1);
        BCHECK(index[i] < job.sh->capacity);
    }
    job.sh->ready.fetch_add(job.streams);
    job.sh->wait_go();
    Join join(r);
    for (unsigned i = 0; i < job.streams; ++i) {
        ++join.running;
        r.spawn(scale_stream(g, ids[i], job, index[i], join));
    }
    co_await join_all(join);
    co_return join.failures == 0 ? 0 : 1;
}

// ------------------------------------------------------------- bulk recv
rt::Task<void> recv_stream(Guest& g, uint64_t id, const GuestJob& job, Record* rec, Join& join) {
    std::vector<std::byte> buf(kChunk);
    uint64_t total = 0;
    int status = 0;
    while (true) {
        const std::span<std::byte> into(buf.data(), buf.size());
        auto recv = g.recv(id, into);
        const ssize_t n = co_await std::move(recv);
        if (n < 0) {
            status = static_cast<int>(-n);
            std::fprintf(stderr, "bench guest dom%u: recv returned %zd after %llu bytes\n", job.domid, n,
                         static_cast<unsigned long long>(total));
            break;
        }
        if (n == 0) break;  // the peer closed; every byte before it was read
        total += static_cast<uint64_t>(n);
    }
    const uint64_t end = now_ns();
    if (rec) {
        rec->bytes.store(total);
        rec->end_ns.store(end);
        rec->status.store(status);
    }
    auto rel = g.release(id);
    (void)co_await std::move(rel);
    join.leave(status == 0);
}

rt::Task<int> bulk_recv(Guest& g, rt::Reactor& r, const GuestJob& job) {
    std::vector<uint64_t> ids(job.streams);
    for (auto& id : ids) {
        auto open = open_connection(g, job, id);
        const int rc = co_await std::move(open);
        BCHECK(rc == 0);
    }
    // Receivers start at once: nothing arrives before the source is released.
    Join join(r);
    for (uint64_t id : ids) {
        ++join.running;
        r.spawn(recv_stream(g, id, job, job.sh->claim(), join));
    }
    job.sh->ready.fetch_add(job.streams);
    co_await join_all(join);
    co_return join.failures == 0 ? 0 : 1;
}

// ------------------------------------------------------------------- RTT
rt::Task<int> rtt(Guest& g, rt::Reactor&, const GuestJob& job) {
    uint64_t id = 0;
    {
        auto open = open_connection(g, job, id);
        const int rc = co_await std::move(open);
        BCHECK(rc == 0);
    }
    job.sh->ready.fetch_add(1);
    job.sh->wait_go();
    std::vector<double> us;
    us.reserve(job.samples);
    std::byte b{'x'};
    for (unsigned i = 0; i < job.warmup + job.samples; ++i) {
        const uint64_t t0 = now_ns();
        const std::span<const std::byte> out(&b, 1);
        auto send = g.send_all(id, out);
        const ssize_t s = co_await std::move(send);
        BCHECK(s == 1);
        const std::span<std::byte> in(&b, 1);
        auto recv = g.recv_exact(id, in);
        const ssize_t n = co_await std::move(recv);
        BCHECK(n == 1);
        if (i >= job.warmup) us.push_back(static_cast<double>(now_ns() - t0) / 1000.0);
    }
    auto rel = g.release(id);
    (void)co_await std::move(rel);
    double sum = 0;
    for (double v : us) sum += v;
    job.sh->rtt_mean_us = us.empty() ? 0 : sum / static_cast<double>(us.size());
    job.sh->rtt_p50_us = percentile(us, 50);
    job.sh->rtt_p99_us = percentile(us, 99);
    job.sh->rtt_samples = us.size();
    co_return 0;
}

// ------------------------------------------------------- connection rate
// XENSOCK_BENCH_PHASES=1: where a connection's time goes (guest's view).
struct Phases {
    uint64_t socket = 0, connect = 0, exchange = 0, release = 0, n = 0;
    void report() const {
        if (n == 0 || !std::getenv("XENSOCK_BENCH_PHASES")) return;
        std::fprintf(stderr, "phases (us per connection, %llu): socket %.1f connect %.1f exchange %.1f release %.1f\n",
                     static_cast<unsigned long long>(n), socket / 1e3 / n, connect / 1e3 / n, exchange / 1e3 / n,
                     release / 1e3 / n);
    }
};
Phases g_phases;

rt::Task<void> connrate_loop(Guest& g, const GuestJob& job, Record* rec, Join& join) {
    std::vector<std::byte> buf(job.msg, std::byte{'q'});
    uint64_t done = 0;
    bool ok = true;
    const sockaddr_in addr = *frontend::ipv4("127.0.0.1", job.port);
    const frontend::RingOptions ring = ring_options(job);
    while (now_ns() < job.sh->stop_ns.load()) {
        uint64_t id = 0;
        uint64_t t0 = now_ns();
        auto make = g.socket(id);
        int rc = co_await std::move(make);
        uint64_t t1 = now_ns();
        g_phases.socket += t1 - t0;
        if (rc == 0) {
            auto conn = g.connect(id, addr, ring);
            rc = co_await std::move(conn);
            t0 = now_ns();
            g_phases.connect += t0 - t1;
        }
        if (rc == 0) {
            const std::span<const std::byte> out(buf.data(), buf.size());
            auto send = g.send_all(id, out);
            const ssize_t s = co_await std::move(send);
            const std::span<std::byte> in(buf.data(), buf.size());
            auto recv = g.recv_exact(id, in);
            const ssize_t n = s == static_cast<ssize_t>(buf.size()) ? co_await std::move(recv) : -1;
            rc = n == static_cast<ssize_t>(buf.size()) ? 0 : -1;
            t1 = now_ns();
            g_phases.exchange += t1 - t0;
        }
        if (id != 0) {
            auto rel = g.release(id);
            (void)co_await std::move(rel);
            g_phases.release += now_ns() - t1;
            ++g_phases.n;
        }
        if (rc != 0) {
            std::fprintf(stderr, "bench guest dom%u: connection %llu failed (%d)\n", job.domid,
                         static_cast<unsigned long long>(done), rc);
            ok = false;
            break;
        }
        ++done;
    }
    if (rec) {
        rec->count.store(done);
        rec->end_ns.store(now_ns());
    }
    join.leave(ok);
}

rt::Task<int> connrate(Guest& g, rt::Reactor& r, const GuestJob& job) {
    job.sh->ready.fetch_add(1);
    job.sh->wait_go();
    Join join(r);
    for (unsigned i = 0; i < job.streams; ++i) {
        ++join.running;
        r.spawn(connrate_loop(g, job, job.sh->claim(), join));
    }
    co_await join_all(join);
    g_phases.report();
    co_return join.failures == 0 ? 0 : 1;
}

rt::Task<int> guest_main(rt::Reactor& reactor, platform::Platform& platform, GuestKind kind, const GuestJob& job) {
    frontend::GuestOptions options;
    options.profile = wire::find_profile(job.protocol);
    options.ring_order = job.ring_order;
    options.connect_timeout = std::chrono::milliseconds(60000);
    auto attach = Guest::attach(reactor, platform, options);
    std::unique_ptr<Guest> guest = co_await std::move(attach);
    int rc = 1;
    switch (kind) {
        case GuestKind::bulk_send: {
            auto t = bulk_send(*guest, reactor, job);
            rc = co_await std::move(t);
            break;
        }
        case GuestKind::bulk_recv: {
            auto t = bulk_recv(*guest, reactor, job);
            rc = co_await std::move(t);
            break;
        }
        case GuestKind::rtt: {
            auto t = rtt(*guest, reactor, job);
            rc = co_await std::move(t);
            break;
        }
        case GuestKind::scale_send: {
            auto t = scale_send(*guest, reactor, job);
            rc = co_await std::move(t);
            break;
        }
        case GuestKind::connrate: {
            auto t = connrate(*guest, reactor, job);
            rc = co_await std::move(t);
            break;
        }
    }
    auto close = guest->close();
    co_await std::move(close);
    co_return rc;
}

}  // namespace

int run_guest(GuestKind kind, const GuestJob& job) {
    if (!wire::find_profile(job.protocol)) throw std::runtime_error("unknown protocol " + job.protocol);
    auto platform = platform::open_sim_platform(job.root, job.domid);
    rt::Reactor reactor;
    return reactor.run_until(guest_main(reactor, *platform, kind, job));
}

}  // namespace xensock::bench
