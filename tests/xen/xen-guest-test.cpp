// xen-guest-test: the guest half of the real-Xen lab (tests/xen/run-xen-lab.sh).
//
// Runs inside a PV guest on real Xen, on the real platform
// (platform::open_xen_platform(): libxengntshr over /dev/xen/gntalloc,
// libxenevtchn, libxenstore over /dev/xen/xenbus). It waits for the xensock
// or pvcalls device the toolstack gave its domain, attaches the frontend
// library, and checks, printing one line per check on stdout (the guest's
// console, which xenconsoled logs in dom0):
//
//   XENSOCK-CHECK PASS <label>/<check> (details)
//   XENSOCK-CHECK FAIL <label>/<check>: why
//
//   attach         handshake with xensockd on the device found
//   unknown-cmd    an unknown command is answered -ENOTSUPP (524), ids echoed
//   connect-echo   connect to dom0's echo service; --bytes each way at once,
//                  every received byte checked against the pattern, checksums
//   accept         bind/listen in dom0's network, accept a dom0 client, echo
//                  what it sends (checked against the pattern) back to it
//   parallel       --parallel sockets (ring order 4) connected to the echo
//                  service at once, --parallel-bytes each way on each
//   release-all    every socket released with 0, then an orderly close: the
//                  backend follows to Closing/Closed
//   hold           (with --hold-port) attach again and keep a socket connected
//                  to dom0's second echo service, so that `xl destroy` meets
//                  a live session
//
// then `XENSOCK-GUEST END <label> failed=<n>`; with --hold-port it then sleeps
// until the domain is destroyed. Exit code: 0 if every check passed.
#include "lab_common.hpp"

#include "xensock/frontend/frontend.hpp"
#include "xensock/platform/platform.hpp"
#include "xensock/platform/xenstore.hpp"
#include "xensock/runtime/reactor.hpp"
#include "xensock/toolstack/toolstack.hpp"
#include "xensock/util/log.hpp"
#include "xensock/wire/profile.hpp"

#include <fmt/core.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace xensock;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

struct Args {
    std::string label = "guest";
    uint16_t echo_port = 5001;
    uint16_t listen_port = 6001;
    uint64_t bytes = 64ull << 20;        // each way through the echo service
    uint64_t accept_bytes = 8ull << 20;  // from the dom0 client
    unsigned ring_order = 0;             // 0: the library's default
    unsigned parallel = 8;
    uint64_t parallel_bytes = 1ull << 20;
    uint16_t hold_port = 0;              // 0: no hold
    int device_wait_s = 120;
};

int g_failed = 0;
std::string g_label;

void report(bool ok, const std::string& check, const std::string& detail) {
    if (ok) {
        std::printf("XENSOCK-CHECK PASS %s/%s (%s)\n", g_label.c_str(), check.c_str(), detail.c_str());
    } else {
        ++g_failed;
        std::printf("XENSOCK-CHECK FAIL %s/%s: %s\n", g_label.c_str(), check.c_str(), detail.c_str());
    }
    std::fflush(stdout);
}

void note(const std::string& text) {
    std::printf("XENSOCK-GUEST %s %s\n", g_label.c_str(), text.c_str());
    std::fflush(stdout);
}

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string rc_text(long rc) {
    if (rc >= 0) return std::to_string(rc);
    return fmt::format("{} ({})", rc, rc == -524 ? "ENOTSUPP" : std::strerror(static_cast<int>(-rc)));
}

// ------------------------------------------------------------ transfers

struct SendResult {
    long rc = 0;  // 0, or the failing call's result
    uint64_t sent = 0;
    uint64_t sum = 0;
    bool done = false;
};

// Sends `total` pattern bytes in 256 KiB application writes.
rt::Task<void> send_pattern(frontend::Guest* g, uint64_t id, uint64_t total, uint64_t seed, SendResult* out,
                            rt::Event* done) {
    std::vector<std::byte> chunk(256 * 1024);
    lab::StreamSum sum;
    while (out->sent < total) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), total - out->sent));
        lab::fill_pattern(chunk.data(), n, out->sent, seed);
        const ssize_t s = co_await g->send_all(id, std::span(chunk.data(), n), 60s);
        if (s != static_cast<ssize_t>(n)) {
            out->rc = s < 0 ? s : -EIO;
            break;
        }
        sum.update(chunk.data(), n);
        out->sent += n;
    }
    out->sum = sum.value();
    out->done = true;
    done->set();
}

struct RecvResult {
    long rc = 0;
    uint64_t received = 0;
    uint64_t sum = 0;
    std::string error;
};

// Receives exactly `total` bytes, checking each against the pattern.
rt::Task<void> recv_pattern(frontend::Guest* g, uint64_t id, uint64_t total, uint64_t seed, RecvResult* out) {
    std::vector<std::byte> buf(256 * 1024), want(256 * 1024);
    lab::StreamSum sum;
    while (out->received < total) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), total - out->received));
        const ssize_t k = co_await g->recv(id, std::span(buf.data(), n), 60s);
        if (k <= 0) {
            out->rc = k;
            out->error = fmt::format("recv returned {} after {} of {} bytes", rc_text(k), out->received, total);
            break;
        }
        const size_t bad = lab::pattern_mismatch(buf.data(), static_cast<size_t>(k), out->received, seed, want.data());
        if (bad != static_cast<size_t>(k)) {
            out->rc = -EIO;
            out->error = fmt::format("byte {} differs from the pattern", out->received + bad);
            break;
        }
        sum.update(buf.data(), static_cast<size_t>(k));
        out->received += static_cast<uint64_t>(k);
    }
    out->sum = sum.value();
}

rt::Task<void> recv_spawned(frontend::Guest* g, uint64_t id, uint64_t total, uint64_t seed, RecvResult* out,
                            rt::Event* done) {
    co_await recv_pattern(g, id, total, seed, out);
    done->set();
}

// ------------------------------------------------------------------ checks

rt::Task<void> check_unknown_command(frontend::Guest& g) {
    wire::Request req;
    req.cmd = wire::Command::unknown;
    req.raw_cmd = 77;
    req.sockid = 0x5EED0000ABCDull;
    auto rsp = co_await g.try_call(req, 20s);
    if (!rsp) {
        report(false, "unknown-cmd", "no answer to command 77 within 20 s");
    } else {
        const bool ok = rsp->ret == -524 && rsp->raw_cmd == 77 && rsp->sockid == 0x5EED0000ABCDull;
        report(ok, "unknown-cmd",
               fmt::format("command 77 answered ret={} cmd={} id={:#x}", rc_text(rsp->ret), rsp->raw_cmd, rsp->sockid));
    }
}

rt::Task<void> check_connect_echo(rt::Reactor& r, frontend::Guest& g, const Args& args) {
    const uint64_t seed = lab::seed_of(g_label + "/echo");
    uint64_t id = 0;
    long rc = co_await g.socket(id);
    if (rc != 0) {
        report(false, "connect-echo", "SOCKET: " + rc_text(rc));
        co_return;
    }
    const auto addr = *frontend::ipv4("127.0.0.1", args.echo_port);
    // dom0 starts its echo service before the guest; retry briefly anyway.
    for (int attempt = 0; attempt < 50; ++attempt) {
        rc = co_await g.connect(id, addr);
        if (rc != -ECONNREFUSED) break;
        co_await r.sleep_for(200ms);
    }
    if (rc != 0) {
        report(false, "connect-echo", fmt::format("CONNECT 127.0.0.1:{}: {}", args.echo_port, rc_text(rc)));
        (void)co_await g.release(id);
        co_return;
    }
    const auto info = g.socket_info(id);
    const auto t0 = Clock::now();
    SendResult sent;
    rt::Event send_done(r);
    r.spawn(send_pattern(&g, id, args.bytes, seed, &sent, &send_done));
    RecvResult got;
    co_await recv_pattern(&g, id, args.bytes, seed, &got);
    if (!sent.done) co_await send_done.wait();
    const double secs = since(t0);
    const uint64_t expect = lab::pattern_sum(args.bytes, seed);
    const long rel = co_await g.release(id);
    std::string why;
    if (sent.rc != 0) why = fmt::format("send failed with {} after {} bytes", rc_text(sent.rc), sent.sent);
    else if (got.rc != 0) why = got.error;
    else if (sent.sum != expect || got.sum != expect)
        why = fmt::format("checksums differ: sent {:016x} received {:016x} expected {:016x}", sent.sum, got.sum, expect);
    else if (rel != 0) why = "RELEASE: " + rc_text(rel);
    if (!why.empty()) {
        report(false, "connect-echo", why);
        co_return;
    }
    const double mib = static_cast<double>(args.bytes) / (1 << 20);
    report(true, "connect-echo",
           fmt::format("{:.0f} MiB each way in {:.1f} s ({:.1f} MiB/s each way), ring order {}, checksum {:016x} "
                       "both ways",
                       mib, secs, mib / secs, info ? info->ring_order : 0u, expect));
}

rt::Task<void> check_accept(frontend::Guest& g, const Args& args) {
    const uint64_t seed = lab::seed_of(g_label + "/accept");
    uint64_t l = 0;
    long rc = co_await g.socket(l);
    const auto addr = *frontend::ipv4("127.0.0.1", args.listen_port);
    if (rc == 0) rc = co_await g.bind(l, addr);
    if (rc == 0) rc = co_await g.listen(l, 4);
    if (rc != 0) {
        report(false, "accept", fmt::format("SOCKET/BIND/LISTEN on 127.0.0.1:{}: {}", args.listen_port, rc_text(rc)));
        if (l) (void)co_await g.release(l);
        co_return;
    }
    note(fmt::format("LISTENING 127.0.0.1:{}", args.listen_port));
    const auto t0 = Clock::now();
    uint64_t c = 0;
    rc = co_await g.accept(l, c);
    if (rc != 0) {
        report(false, "accept", "ACCEPT: " + rc_text(rc));
        (void)co_await g.release(l);
        co_return;
    }
    // Echo until the client's end of stream, checking what it sent.
    std::vector<std::byte> buf(128 * 1024), want(128 * 1024);
    lab::StreamSum sum;
    uint64_t total = 0;
    std::string why;
    while (true) {
        const ssize_t k = co_await g.recv(c, buf, 60s);
        if (k == 0) break;
        if (k < 0) {
            why = fmt::format("recv returned {} after {} bytes", rc_text(k), total);
            break;
        }
        const size_t bad = lab::pattern_mismatch(buf.data(), static_cast<size_t>(k), total, seed, want.data());
        if (bad != static_cast<size_t>(k)) {
            why = fmt::format("byte {} from the client differs from the pattern", total + bad);
            break;
        }
        sum.update(buf.data(), static_cast<size_t>(k));
        total += static_cast<uint64_t>(k);
        const ssize_t s = co_await g.send_all(c, std::span(buf.data(), static_cast<size_t>(k)), 60s);
        if (s != k) {
            why = fmt::format("send_all returned {} after {} bytes", rc_text(s), total);
            break;
        }
    }
    if (why.empty() && total != args.accept_bytes)
        why = fmt::format("the client sent {} bytes, expected {}", total, args.accept_bytes);
    if (why.empty() && sum.value() != lab::pattern_sum(args.accept_bytes, seed))
        why = fmt::format("checksum {:016x} differs from the pattern's", sum.value());
    // RELEASE is close(2): the echoed bytes still queued reach the client.
    const long rel_c = co_await g.release(c);
    const long rel_l = co_await g.release(l);
    if (why.empty() && (rel_c != 0 || rel_l != 0))
        why = fmt::format("RELEASE accepted: {}, listening: {}", rc_text(rel_c), rc_text(rel_l));
    report(why.empty(), "accept",
           why.empty() ? fmt::format("accepted a dom0 client on 127.0.0.1:{}, echoed {} verified bytes in {:.1f} s, "
                                     "checksum {:016x}",
                                     args.listen_port, total, since(t0), sum.value())
                       : why);
}

rt::Task<void> check_parallel(rt::Reactor& r, frontend::Guest& g, const Args& args) {
    const size_t n = args.parallel;
    if (n == 0) co_return;
    std::vector<uint64_t> ids;
    const auto addr = *frontend::ipv4("127.0.0.1", args.echo_port);
    frontend::RingOptions small;
    small.order = 4;  // 16 pages, 32 KiB each way (what Linux pvcalls-front uses)
    std::string why;
    for (size_t i = 0; i < n && why.empty(); ++i) {
        uint64_t id = 0;
        long rc = co_await g.socket(id);
        if (rc == 0) {
            ids.push_back(id);
            rc = co_await g.connect(id, addr, small);
        }
        if (rc != 0) why = fmt::format("socket {} of {}: SOCKET/CONNECT: {}", i + 1, n, rc_text(rc));
    }
    const auto t0 = Clock::now();
    if (why.empty()) {
        std::vector<SendResult> sent(n);
        std::vector<RecvResult> got(n);
        std::vector<std::unique_ptr<rt::Event>> events;
        for (size_t i = 0; i < n; ++i) {
            const uint64_t seed = lab::seed_of(fmt::format("{}/parallel/{}", g_label, i));
            events.push_back(std::make_unique<rt::Event>(r));
            r.spawn(send_pattern(&g, ids[i], args.parallel_bytes, seed, &sent[i], events.back().get()));
            events.push_back(std::make_unique<rt::Event>(r));
            r.spawn(recv_spawned(&g, ids[i], args.parallel_bytes, seed, &got[i], events.back().get()));
        }
        for (auto& e : events) co_await e->wait();
        for (size_t i = 0; i < n && why.empty(); ++i) {
            if (sent[i].rc != 0) why = fmt::format("socket {}: send failed with {}", i + 1, rc_text(sent[i].rc));
            else if (got[i].rc != 0) why = fmt::format("socket {}: {}", i + 1, got[i].error);
            else if (got[i].sum != sent[i].sum) why = fmt::format("socket {}: checksums differ", i + 1);
        }
    }
    const double secs = since(t0);
    for (const auto id : ids) {
        const long rc = co_await g.release(id);
        if (rc != 0 && why.empty()) why = fmt::format("RELEASE of socket {}: {}", id, rc_text(rc));
    }
    report(why.empty(), "parallel",
           why.empty() ? fmt::format("{} sockets with ring order 4 at once, {} KiB each way on each, all verified, "
                                     "in {:.1f} s",
                                     n, args.parallel_bytes >> 10, secs)
                       : why);
}

std::optional<const wire::ProtocolProfile*> find_device(platform::XenStore& xs, platform::DomId self) {
    for (const auto* p : wire::all_profiles()) {
        if (xs.read(toolstack::frontend_dir(*p, self) + "/backend")) return p;
    }
    return std::nullopt;
}

rt::Task<int> run(rt::Reactor& r, platform::Platform& p, const Args& args) {
    const platform::DomId self = p.self_domid();
    auto xs = std::make_unique<platform::XenStore>();
    const auto t0 = Clock::now();
    std::optional<const wire::ProtocolProfile*> profile;
    while (!(profile = find_device(*xs, self)) && since(t0) < args.device_wait_s) co_await r.sleep_for(100ms);
    if (!profile) {
        report(false, "attach", fmt::format("no xensock or pvcalls device for domain {} after {} s", self,
                                            args.device_wait_s));
        co_return 1;
    }
    const auto& prof = **profile;
    note(fmt::format("domain {} has a {} device after {:.1f} s", self, prof.name(), since(t0)));

    frontend::GuestOptions options;
    options.profile = &prof;
    options.ring_order = args.ring_order;
    options.connect_timeout = 30s;
    std::unique_ptr<frontend::Guest> g;
    std::string error;
    const auto t1 = Clock::now();
    try {
        g = co_await frontend::Guest::attach(r, p, options);
    } catch (const std::exception& e) {
        error = e.what();
    }
    if (!g) {
        report(false, "attach", fmt::format("{} handshake failed: {}", prof.name(), error));
        co_return 1;
    }
    report(true, "attach",
           fmt::format("{} device of domain {}, backend {} Connected in {:.2f} s, max ring order {}", prof.name(), self,
                       g->backend_path(), since(t1), g->max_ring_order()));

    co_await check_unknown_command(*g);
    co_await check_connect_echo(r, *g, args);
    co_await check_accept(*g, args);
    co_await check_parallel(r, *g, args);

    // Everything released (each release above was checked), then an
    // orderly close.
    const size_t left = g->socket_count();
    const std::string be_state = g->backend_path() + "/state";
    co_await g->close();
    const auto state = xs->read(be_state);
    const bool followed = state && (*state == "5" || *state == "6");
    report(left == 0 && followed, "release-all",
           fmt::format("{} socket(s) left before close; backend state after close: {}; {} requests, {} responses",
                       left, state ? *state : "(missing)", g->stats().requests, g->stats().responses));
    g.reset();

    if (args.hold_port != 0) {
        // A second session that is alive when the domain is destroyed.
        std::unique_ptr<frontend::Guest> h;
        try {
            h = co_await frontend::Guest::attach(r, p, options);
        } catch (const std::exception& e) {
            error = e.what();
        }
        uint64_t id = 0;
        long rc = h ? co_await h->socket(id) : -ENOTCONN;
        const auto addr = *frontend::ipv4("127.0.0.1", args.hold_port);
        if (rc == 0) rc = co_await h->connect(id, addr);
        RecvResult got;
        if (rc == 0) {
            const uint64_t seed = lab::seed_of(g_label + "/hold");
            SendResult sent;
            rt::Event done(r);
            r.spawn(send_pattern(h.get(), id, 1 << 20, seed, &sent, &done));
            co_await recv_pattern(h.get(), id, 1 << 20, seed, &got);
            if (!sent.done) co_await done.wait();
            rc = sent.rc != 0 ? sent.rc : got.rc;
        }
        report(rc == 0, "hold",
               rc == 0 ? fmt::format("attached again, socket {} connected to 127.0.0.1:{} and 1 MiB echoed; "
                                     "holding it for xl destroy",
                                     id, args.hold_port)
                       : (h ? fmt::format("{} {}", rc_text(rc), got.error) : "attach again failed: " + error));
        note(fmt::format("END {} failed={}", g_label, g_failed));
        while (true) co_await r.sleep_for(3600s);  // until the domain dies
    }
    note(fmt::format("END {} failed={}", g_label, g_failed));
    co_return g_failed == 0 ? 0 : 1;
}

void usage() {
    std::fprintf(stderr,
                 "usage: xen-guest-test [--label L] [--echo-port P] [--listen-port P] [--bytes N] "
                 "[--accept-bytes N] [--ring-order K] [--parallel N] [--parallel-bytes N] [--hold-port P]\n"
                 "Runs inside a Xen PV guest with a xensock or pvcalls device; see the top of "
                 "tests/xen/xen-guest-test.cpp.\n");
}

}  // namespace

int main(int argc, char** argv) {
    Args args;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> const char* {
            if (i + 1 >= argc) {
                usage();
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--label") args.label = value();
        else if (a == "--echo-port") args.echo_port = static_cast<uint16_t>(std::atoi(value()));
        else if (a == "--listen-port") args.listen_port = static_cast<uint16_t>(std::atoi(value()));
        else if (a == "--bytes") args.bytes = std::strtoull(value(), nullptr, 0);
        else if (a == "--accept-bytes") args.accept_bytes = std::strtoull(value(), nullptr, 0);
        else if (a == "--ring-order") args.ring_order = static_cast<unsigned>(std::atoi(value()));
        else if (a == "--parallel") args.parallel = static_cast<unsigned>(std::atoi(value()));
        else if (a == "--parallel-bytes") args.parallel_bytes = std::strtoull(value(), nullptr, 0);
        else if (a == "--hold-port") args.hold_port = static_cast<uint16_t>(std::atoi(value()));
        else if (a == "--help" || a == "-h") {
            usage();
            return 0;
        } else {
            usage();
            return 2;
        }
    }
    g_label = args.label;
    log::set_program("xen-guest-test");
    std::setvbuf(stdout, nullptr, _IOLBF, 0);

    std::unique_ptr<platform::Platform> p;
    try {
        p = platform::open_xen_platform();
    } catch (const std::exception& e) {
        report(false, "platform", e.what());
        note(fmt::format("END {} failed={}", g_label, g_failed));
        return 1;
    }
    report(true, "platform", fmt::format("real Xen platform opened in domain {}", p->self_domid()));
    try {
        rt::Reactor reactor;
        return reactor.run_until(run(reactor, *p, args));
    } catch (const std::exception& e) {
        report(false, "run", e.what());
        note(fmt::format("END {} failed={}", g_label, g_failed));
        return 1;
    }
}
