// xensock-bench: throughput, latency, connection rate and scale of xensockd
// on the sim platform, each next to what a user would use instead, measured
// in the same run: direct loopback TCP between two processes, and a socat
// relay. See docs/performance.md for what each figure means and how the
// processes are laid out; `xensock-bench --help` for the knobs.
#include "bench.hpp"

#include "sim_env.hpp"

#include "xensock/wire/profile.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <signal.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <thread>

using namespace xensock;
using namespace xensock::bench;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kKiB = 1024, kMiB = 1024 * kKiB, kGiB = 1024 * kMiB;

// ------------------------------------------------------------------ config
struct Config {
    std::string protocol = "xensock";
    unsigned reps = 3;
    uint64_t run_bytes = 2 * kGiB;  // per throughput run, split over the streams
    unsigned rtt_warmup = 2000, rtt_samples = 20000;
    double connrate_secs = 2.0;
    unsigned conn_concurrency = 8;
    size_t conn_msg = 32;
    unsigned scale_guests = 100, scale_conns = 100;
    // Long enough that every connection moves many ring-fulls inside the
    // fairness window: with ring order 1 one connection moves ~25 KiB/s, and
    // over a few seconds sampling noise alone costs a few points of Jain's index.
    double scale_secs = 30.0;
    unsigned scale_order = 1;
    unsigned workers = 0;     // 0: xensockd's default
    unsigned ring_order = 0;  // 0: the frontend's default
    std::vector<unsigned> sweep_workers{1, 2, 4};
    std::vector<unsigned> sweep_orders{4, 6, 8, 9};
    unsigned sweep_reps = 1;
    // The tuned configuration: what the sweep and the profile say is best.
    unsigned tuned_busy_poll_us = 50;
    unsigned tuned_bulk_order = 9;
    unsigned tuned_conn_order = 1;
    std::vector<std::string> only;  // sections; empty = all
    std::vector<std::string> flows;  // throughput flows by short name; empty = all
    bool only_xensock = false;       // profiling: skip the baselines
    bool smoke = false;
    bool socat = true;

    bool want(const std::string& section) const {
        return only.empty() || std::find(only.begin(), only.end(), section) != only.end();
    }
};

// xensockd's own default (src/daemon/main.cpp).
unsigned daemon_default_workers() { return std::max(1u, std::min(4u, std::thread::hardware_concurrency())); }
constexpr unsigned kDaemonDefaultMaxOrder = 6;
constexpr unsigned kFrontendDefaultOrder = 6;  // ring_order 0: largest allowed, capped at 6

// ---------------------------------------------------------------- daemon
// One sim installation (xenstored + xensockd) with a given configuration.
struct Daemon {
    std::unique_ptr<testing::SimEnv> env;
    unsigned workers;
    unsigned max_order;
    unsigned next_domid = 1;
    const wire::ProtocolProfile* profile;

    // busy_poll_us: XENSOCK_BUSY_POLL_US for xensockd only (the guests,
    // forked later, do not inherit it).
    Daemon(unsigned w, unsigned max_ring_order, const std::string& protocol, uint32_t max_sockets,
           unsigned busy_poll_us = 0)
        : workers(w), max_order(max_ring_order), profile(wire::find_profile(protocol)) {
        testing::SimEnvOptions o;
        o.workers = w;
        o.max_ring_order = max_ring_order;
        o.extra_args = {"--max-sockets-per-guest", std::to_string(max_sockets), "--protocols", protocol};
        if (busy_poll_us) setenv("XENSOCK_BUSY_POLL_US", std::to_string(busy_poll_us).c_str(), 1);
        try {
            env = std::make_unique<testing::SimEnv>(o);
        } catch (...) {
            if (busy_poll_us) unsetenv("XENSOCK_BUSY_POLL_US");
            throw;
        }
        if (busy_poll_us) unsetenv("XENSOCK_BUSY_POLL_US");
    }
    pid_t pid() const { return env->daemon_pid(); }
    unsigned attach() {
        const unsigned d = next_domid++;
        env->attach(d, *profile);
        return d;
    }
    void detach(unsigned domid) { (void)env->detach(domid, *profile, 5s); }
};

// A Shared region that goes away with the scope.
struct SharedRegion {
    explicit SharedRegion(uint32_t n) : sh(Shared::create(n)) {}
    ~SharedRegion() { Shared::destroy(sh); }
    SharedRegion(const SharedRegion&) = delete;
    SharedRegion& operator=(const SharedRegion&) = delete;
    Shared* sh;
};

struct FdCloser {
    int fd;
    ~FdCloser() {
        if (fd >= 0) ::close(fd);
    }
};

class BenchError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

enum class Path { xensock, loopback, socat };
const char* path_name(Path p) {
    switch (p) {
        case Path::xensock: return "xensock";
        case Path::loopback: return "loopback";
        case Path::socat: return "socat";
    }
    return "?";
}

// Waits until `n` participants said ready; fails fast if one of `pids` died.
void wait_ready(Shared* sh, uint32_t n, ProcSet& procs, const std::vector<pid_t>& pids,
                std::chrono::milliseconds bound, const std::function<void()>& tick = {}) {
    const uint64_t deadline = now_ns() + static_cast<uint64_t>(bound.count()) * 1000000ull;
    uint64_t last_tick = 0;
    while (sh->ready.load() < n) {
        for (pid_t p : pids) {
            if (!procs.alive(p)) {
                const int rc = procs.wait(p, 1s);
                throw BenchError(fmt::format("a participant (pid {}) exited with {} before the start ({} of {} ready)",
                                             p, rc, sh->ready.load(), n));
            }
        }
        if (now_ns() > deadline) throw BenchError(fmt::format("only {} of {} ready after {} ms", sh->ready.load(), n, bound.count()));
        if (tick && now_ns() - last_tick > 100'000'000) {
            tick();
            last_tick = now_ns();
        }
        ::usleep(500);
    }
}

void expect_exit(ProcSet& procs, pid_t pid, const char* what, std::chrono::milliseconds bound = 600s) {
    const int rc = procs.wait(pid, bound);
    if (rc != 0) throw BenchError(fmt::format("{} (pid {}) exited with {}", what, pid, rc));
}

// Starts `socat TCP-LISTEN:p,fork TCP:127.0.0.1:upstream`; returns p.
uint16_t start_socat(ProcSet& procs, uint16_t upstream, pid_t& pid) {
    const uint16_t p = free_port();
    pid = procs.spawn_exec({"socat", fmt::format("TCP-LISTEN:{},bind=127.0.0.1,fork,reuseaddr", p),
                            fmt::format("TCP:127.0.0.1:{}", upstream)});
    if (!wait_listening(p, 5s)) throw BenchError("socat did not start listening (is socat installed?)");
    return p;
}

// Stops socat and returns its CPU seconds (its own and its reaped children's).
double stop_socat(ProcSet& procs, pid_t pid) {
    ::usleep(100000);  // let it reap the per-connection children
    const double cpu = cpu_seconds(pid, true);
    ::kill(pid, SIGTERM);
    procs.wait(pid, 5s);
    return cpu;
}

// ------------------------------------------------------------- throughput
struct Flow {
    bool to_host = true;  // guest -> host (else host -> guest)
    unsigned streams = 1;
    unsigned guests = 1;  // xensock: streams spread over this many guests
    std::string short_name() const {
        return fmt::format("{}{}{}", to_host ? "g2h" : "h2g", streams, guests > 1 ? fmt::format("x{}", guests) : "");
    }
    std::string name() const {
        return fmt::format("{} {} stream{}{}", to_host ? "guest->host" : "host->guest", streams,
                           streams == 1 ? "" : "s", guests > 1 ? fmt::format(", {} guests", guests) : "");
    }
};

struct TpResult {
    double gib_s = 0;
    double secs = 0;
    uint64_t bytes = 0;
    double middle_cpu = 0;  // xensockd or socat, seconds
};

TpResult run_throughput(const Config& cfg, Path path, const Flow& flow, uint64_t per_stream, Daemon* d,
                        unsigned ring_order) {
    SharedRegion region(flow.streams);
    Shared* sh = region.sh;
    ProcSet procs;
    uint16_t svc_port = 0;
    FdCloser lfd{listen_on(0, svc_port)};
    if (lfd.fd < 0) throw BenchError("cannot listen on 127.0.0.1");
    const pid_t svc = flow.to_host ? procs.spawn([&] { return run_sink(sh, lfd.fd, flow.streams); })
                                   : procs.spawn([&] { return run_source(sh, lfd.fd, flow.streams, per_stream); });
    uint16_t target = svc_port;
    pid_t socat = -1;
    if (path == Path::socat) target = start_socat(procs, svc_port, socat);

    std::vector<pid_t> clients;
    std::vector<unsigned> domids;
    if (path == Path::xensock) {
        const unsigned per_guest = flow.streams / flow.guests;
        for (unsigned g = 0; g < flow.guests; ++g) {
            GuestJob job;
            job.root = d->env->root();
            job.domid = d->attach();
            domids.push_back(job.domid);
            job.protocol = cfg.protocol;
            job.ring_order = ring_order;
            job.sh = sh;
            job.port = target;
            job.streams = per_guest + (g < flow.streams % flow.guests ? 1 : 0);
            job.bytes = per_stream;
            const GuestKind kind = flow.to_host ? GuestKind::bulk_send : GuestKind::bulk_recv;
            clients.push_back(procs.spawn([job, kind] { return run_guest(kind, job); }));
        }
    } else {
        clients.push_back(procs.spawn([&] {
            return flow.to_host ? tcp_bulk_send(sh, target, flow.streams, per_stream)
                                : tcp_bulk_recv(sh, target, flow.streams, per_stream);
        }));
    }
    std::vector<pid_t> all{svc};
    all.insert(all.end(), clients.begin(), clients.end());
    wait_ready(sh, flow.to_host ? flow.streams : 2 * flow.streams, procs, all, 120s);

    const double cpu0 = path == Path::xensock ? cpu_seconds(d->pid()) : 0;
    sh->release_go();
    expect_exit(procs, svc, flow.to_host ? "the sink" : "the source");
    for (pid_t c : clients) expect_exit(procs, c, path == Path::xensock ? "a guest" : "the client");
    TpResult r;
    if (path == Path::xensock) r.middle_cpu = cpu_seconds(d->pid()) - cpu0;
    if (path == Path::socat) r.middle_cpu = stop_socat(procs, socat);

    // Every stream must have delivered exactly what was sent.
    uint64_t end = 0;
    const uint32_t used = std::min(sh->next_record.load(), sh->capacity);
    if (used != flow.streams) throw BenchError(fmt::format("{} streams finished, {} expected", used, flow.streams));
    for (uint32_t i = 0; i < used; ++i) {
        const Record& rec = sh->rec[i];
        if (rec.bytes.load() != per_stream || rec.status.load() != 0) {
            throw BenchError(fmt::format("{} {}: a stream moved {} bytes (status {}), {} expected", path_name(path),
                                         flow.name(), rec.bytes.load(), rec.status.load(), per_stream));
        }
        r.bytes += rec.bytes.load();
        end = std::max(end, rec.end_ns.load());
    }
    r.secs = static_cast<double>(end - sh->go_ns.load()) / 1e9;
    r.gib_s = static_cast<double>(r.bytes) / static_cast<double>(kGiB) / r.secs;
    for (unsigned dom : domids) d->detach(dom);
    return r;
}

// --------------------------------------------------------------------- RTT
struct RttResult {
    double p50 = 0, p99 = 0, mean = 0;
};

RttResult run_rtt(const Config& cfg, Path path, Daemon* d) {
    SharedRegion region(1);
    Shared* sh = region.sh;
    ProcSet procs;
    uint16_t port = 0;
    FdCloser lfd{listen_on(0, port)};
    const pid_t echo = procs.spawn([&] { return run_echo(lfd.fd); });
    pid_t client;
    unsigned domid = 0;
    if (path == Path::xensock) {
        GuestJob job;
        job.root = d->env->root();
        job.domid = domid = d->attach();
        job.protocol = cfg.protocol;
        job.ring_order = cfg.ring_order;
        job.sh = sh;
        job.port = port;
        job.warmup = cfg.rtt_warmup;
        job.samples = cfg.rtt_samples;
        client = procs.spawn([job] { return run_guest(GuestKind::rtt, job); });
    } else {
        client = procs.spawn([&] { return tcp_rtt(sh, port, cfg.rtt_warmup, cfg.rtt_samples); });
    }
    wait_ready(sh, 1, procs, {client, echo}, 120s);
    sh->release_go();
    expect_exit(procs, client, "the RTT client");
    if (sh->rtt_samples != cfg.rtt_samples) throw BenchError("RTT client took too few samples");
    if (domid) d->detach(domid);
    return {sh->rtt_p50_us, sh->rtt_p99_us, sh->rtt_mean_us};
}

// --------------------------------------------------------- connection rate
struct RateResult {
    double per_sec = 0;
    uint64_t connections = 0;
};

RateResult run_connrate(const Config& cfg, Path path, Daemon* d, unsigned ring_order) {
    SharedRegion region(cfg.conn_concurrency);
    Shared* sh = region.sh;
    ProcSet procs;
    uint16_t port = 0;
    FdCloser lfd{listen_on(0, port)};
    const pid_t server = procs.spawn([&] { return run_reqresp_server(lfd.fd, 4, cfg.conn_msg); });
    pid_t client;
    unsigned domid = 0;
    if (path == Path::xensock) {
        GuestJob job;
        job.root = d->env->root();
        job.domid = domid = d->attach();
        job.protocol = cfg.protocol;
        job.ring_order = ring_order;
        job.sh = sh;
        job.port = port;
        job.streams = cfg.conn_concurrency;
        job.msg = cfg.conn_msg;
        client = procs.spawn([job] { return run_guest(GuestKind::connrate, job); });
    } else {
        client = procs.spawn([&] { return tcp_connrate(sh, port, cfg.conn_concurrency, cfg.conn_msg); });
    }
    wait_ready(sh, 1, procs, {client, server}, 120s);
    sh->stop_ns.store(now_ns() + static_cast<uint64_t>(cfg.connrate_secs * 1e9));
    sh->release_go();
    expect_exit(procs, client, "the connection-rate client");
    RateResult r;
    uint64_t end = 0;
    for (uint32_t i = 0; i < std::min(sh->next_record.load(), sh->capacity); ++i) {
        r.connections += sh->rec[i].count.load();
        end = std::max(end, sh->rec[i].end_ns.load());
    }
    if (r.connections == 0) throw BenchError("no connection completed");
    r.per_sec = static_cast<double>(r.connections) / (static_cast<double>(end - sh->go_ns.load()) / 1e9);
    if (domid) d->detach(domid);
    return r;
}

// ------------------------------------------------------------------- scale
struct ScaleResult {
    uint32_t connections = 0, completed = 0;
    double setup_secs = 0, transfer_secs = 0, gib_s = 0;
    double jain = 0, min_share = 0;  // slowest connection's throughput / mean
    std::vector<double> worker_mean;  // mean window throughput of the guests on each worker (domid % workers)
    std::vector<double> worker_jain;
    double guest_jain = 0;       // over the guests' totals (each guest's share of the machine)
    double within_guest_jain = 0;  // mean over guests of the index among its own connections
    RssInfo idle, connected, peak;   // peak: highest non-ring RSS seen
    double cpu_per_gib = 0;
    uint64_t bytes = 0;
};

ScaleResult run_scale(const Config& cfg, Daemon& d) {
    const uint32_t total = cfg.scale_guests * cfg.scale_conns;
    SharedRegion region(total);
    Shared* sh = region.sh;
    ProcSet procs;
    uint16_t port = 0;
    FdCloser lfd{listen_on(0, port, 4096)};
    const pid_t sink = procs.spawn([&] { return run_scale_sink(sh, lfd.fd, total); });
    ScaleResult r;
    r.connections = total;
    r.idle = read_rss(d.pid(), d.env->root());
    auto sample = [&] {
        const RssInfo now = read_rss(d.pid(), d.env->root());
        if (now.total_kib - now.ring_kib > r.peak.total_kib - r.peak.ring_kib) r.peak = now;
    };
    const uint64_t t0 = now_ns();
    std::vector<pid_t> guests;
    std::vector<unsigned> domids;
    for (unsigned g = 0; g < cfg.scale_guests; ++g) {
        GuestJob job;
        job.root = d.env->root();
        job.domid = d.attach();
        domids.push_back(job.domid);
        job.protocol = cfg.protocol;
        job.ring_order = cfg.scale_order;
        job.sh = sh;
        job.port = port;
        job.streams = cfg.scale_conns;
        guests.push_back(procs.spawn([job] { return run_guest(GuestKind::scale_send, job); }));
    }
    std::vector<pid_t> all{sink};
    all.insert(all.end(), guests.begin(), guests.end());
    wait_ready(sh, total, procs, all, 600s, sample);
    r.setup_secs = static_cast<double>(now_ns() - t0) / 1e9;
    r.connected = read_rss(d.pid(), d.env->root());
    sample();
    const double cpu0 = cpu_seconds(d.pid());
    // Everyone sends for scale_secs; fairness is judged on the middle half,
    // when every connection is busy (none has started late or stopped).
    const uint64_t span = static_cast<uint64_t>(cfg.scale_secs * 1e9);
    const uint64_t start = now_ns();
    sh->window_begin_ns.store(start + span / 4);
    sh->window_end_ns.store(start + 3 * span / 4);
    sh->stop_ns.store(start + span);
    sh->release_go();
    // Sample while the data moves, until the sink has seen every EOF.
    while (procs.alive(sink)) {
        sample();
        ::usleep(100000);
    }
    expect_exit(procs, sink, "the sink", 10s);
    int failed = 0;
    for (pid_t g : guests) failed += procs.wait(g, 120s) != 0;
    const double cpu = cpu_seconds(d.pid()) - cpu0;

    std::vector<double> window;
    uint64_t end = 0;
    const uint64_t go = sh->go_ns.load();
    const double window_secs = static_cast<double>(sh->window_end_ns.load() - sh->window_begin_ns.load()) / 1e9;
    for (uint32_t i = 0; i < std::min(sh->next_record.load(), sh->capacity); ++i) {
        const Record& rec = sh->rec[i];
        // Complete: closed cleanly, and the sink counted every byte queued.
        if (rec.end_ns.load() != 0 && rec.status.load() == 0 && rec.sent.load() > 0 &&
            rec.bytes.load() == rec.sent.load())
            ++r.completed;
        r.bytes += rec.bytes.load();
        end = std::max(end, rec.end_ns.load());
        window.push_back(static_cast<double>(rec.window.load()) / window_secs);
    }
    r.transfer_secs = static_cast<double>(end - go) / 1e9;
    r.gib_s = static_cast<double>(r.bytes) / static_cast<double>(kGiB) / r.transfer_secs;
    r.jain = jain_index(window);
    {
        std::vector<std::vector<double>> by_worker(d.workers);
        for (uint32_t i = 0; i < window.size(); ++i)
            by_worker[sh->rec[i].count.load() % d.workers].push_back(window[i]);
        std::map<uint64_t, std::vector<double>> by_guest;
        for (uint32_t i = 0; i < window.size(); ++i) by_guest[sh->rec[i].count.load()].push_back(window[i]);
        std::vector<double> totals;
        double within = 0;
        for (const auto& [dom, v] : by_guest) {
            double sum = 0;
            for (double x : v) sum += x;
            totals.push_back(sum);
            within += jain_index(v);
        }
        r.guest_jain = jain_index(totals);
        r.within_guest_jain = by_guest.empty() ? 0 : within / static_cast<double>(by_guest.size());
        for (const auto& w : by_worker) {
            double sum = 0;
            for (double v : w) sum += v;
            r.worker_mean.push_back(w.empty() ? 0 : sum / static_cast<double>(w.size()));
            r.worker_jain.push_back(jain_index(w));
        }
    }
    if (!window.empty()) {
        double sum = 0;
        for (double v : window) sum += v;
        r.min_share = *std::min_element(window.begin(), window.end()) / (sum / static_cast<double>(window.size()));
    }
    r.cpu_per_gib = cpu / (static_cast<double>(r.bytes) / static_cast<double>(kGiB));
    if (failed) std::fprintf(stderr, "bench: %d guest process(es) failed in the scale run\n", failed);
    for (unsigned dom : domids) d.detach(dom);
    if (failed || r.completed != total) {
        throw BenchError(fmt::format("scale: {} of {} connections completed, {} guest processes failed", r.completed,
                                     total, failed));
    }
    return r;
}

// ------------------------------------------------------------------ output
std::string fmt_ratio(double x) { return std::isfinite(x) ? fmt::format("{:.2f}x", x) : "-"; }
std::string verdict(bool met) { return met ? "met" : "MISSED"; }

void print_machine() {
    utsname u{};
    ::uname(&u);
    std::string cpu = "?";
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("model name", 0) == 0) {
            cpu = line.substr(line.find(':') + 2);
            break;
        }
    }
    fmt::print("machine: {} CPU(s), {}; Linux {}\n", std::thread::hardware_concurrency(), cpu, u.release);
}

struct Summary {
    std::vector<std::string> lines;
    int missed = 0;
    int unmeasured = 0;
    void target(const std::string& what, double value, const std::string& goal, bool met) {
        // No baseline (--only-xensock) or no sample: a ratio that cannot be
        // judged is neither met nor missed.
        if (!std::isfinite(value) || value <= 0) {
            lines.push_back(fmt::format("  {:<52} {:>10}  {:<10} {}", what, "-", goal, "not measured"));
            ++unmeasured;
            return;
        }
        lines.push_back(fmt::format("  {:<52} {:>10}  {:<10} {}", what, fmt_ratio(value), goal, verdict(met)));
        if (!met) ++missed;
    }
};

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"xensock-bench: xensockd on sim vs direct loopback TCP and a socat relay, measured in one run"};
    Config cfg;
    std::string sections;
    app.add_option("--protocol", cfg.protocol, "xensock or pvcalls")->capture_default_str();
    app.add_option("--reps", cfg.reps, "Repetitions of each measurement (the median is reported)")->capture_default_str();
    uint64_t run_mib = cfg.run_bytes / kMiB;
    app.add_option("--run-mib", run_mib, "MiB moved per throughput run (split over the streams)")->capture_default_str();
    app.add_option("--rtt-samples", cfg.rtt_samples, "Round trips timed per RTT run")->capture_default_str();
    app.add_option("--connrate-secs", cfg.connrate_secs, "Seconds per connection-rate run")->capture_default_str();
    app.add_option("--conn-concurrency", cfg.conn_concurrency, "Concurrent connect/exchange/close loops")
        ->capture_default_str();
    app.add_option("--scale-guests", cfg.scale_guests, "Guest processes in the scale run")->capture_default_str();
    app.add_option("--scale-conns", cfg.scale_conns, "Connections per guest in the scale run")->capture_default_str();
    app.add_option("--scale-secs", cfg.scale_secs, "Seconds every scale connection keeps sending")->capture_default_str();
    app.add_option("--scale-ring-order", cfg.scale_order, "Data ring order of the scale run")->capture_default_str();
    app.add_option("--workers", cfg.workers, "xensockd --workers for the main figures (default: xensockd's default)");
    app.add_option("--ring-order", cfg.ring_order, "Data ring order for the main figures (default: the frontend's)");
    app.add_option("--sweep-workers", cfg.sweep_workers, "Worker counts to sweep")->delimiter(',');
    app.add_option("--sweep-orders", cfg.sweep_orders, "Ring orders to sweep")->delimiter(',');
    app.add_option("--sweep-reps", cfg.sweep_reps, "Repetitions of each sweep point")->capture_default_str();
    app.add_option("--only", sections, "Comma-separated sections: throughput,rtt,connrate,scale,tuned,sweep");
    app.add_option("--tuned-busy-poll-us", cfg.tuned_busy_poll_us, "Tuned: xensockd's XENSOCK_BUSY_POLL_US")
        ->capture_default_str();
    app.add_option("--tuned-bulk-order", cfg.tuned_bulk_order, "Tuned: ring order of the bulk flows")->capture_default_str();
    app.add_option("--tuned-conn-order", cfg.tuned_conn_order, "Tuned: ring order of the connection-rate run")
        ->capture_default_str();
    app.add_option("--flows", cfg.flows, "Throughput flows: g2h1,g2h8,g2h8x8,h2g1,h2g8,h2g8x8")->delimiter(',');
    app.add_flag("--only-xensock", cfg.only_xensock, "No baselines (for profiling xensockd)");
    app.add_flag("--no-socat", [&](int64_t) { cfg.socat = false; }, "Skip the socat relay");
    app.add_flag("--smoke", cfg.smoke, "Tiny sizes, one repetition: checks that everything runs and every byte arrives");
    CLI11_PARSE(app, argc, argv);
    cfg.run_bytes = run_mib * kMiB;

    if (!sections.empty()) {
        size_t start = 0;
        while (start <= sections.size()) {
            size_t end = sections.find(',', start);
            if (end == std::string::npos) end = sections.size();
            if (end > start) cfg.only.push_back(sections.substr(start, end - start));
            start = end + 1;
        }
    }
    if (!wire::find_profile(cfg.protocol)) {
        fmt::print(stderr, "unknown --protocol {}\n", cfg.protocol);
        return 2;
    }
    if (cfg.smoke) {
        cfg.reps = 1;
        cfg.run_bytes = 8 * kMiB;
        cfg.rtt_warmup = 10;
        cfg.rtt_samples = 200;
        cfg.connrate_secs = 0.2;
        cfg.conn_concurrency = 2;
        cfg.scale_guests = 3;
        cfg.scale_conns = 4;
        cfg.scale_secs = 1.0;
        cfg.sweep_workers = {1, 2};
        cfg.sweep_orders = {1, 9};
    }

    // Paths of this build tree, unless the environment says otherwise.
    setenv("XENSOCK_XENSOCKD", XENSOCK_BENCH_XENSOCKD, 0);
    setenv("XENSOCK_XENSTORED", XENSOCK_BENCH_XENSTORED, 0);
    setenv("XENSOCK_XENSTORED_SHIM", XENSOCK_BENCH_SHIM, 0);
    setenv("XENSOCK_XEN_LIBDIR", XENSOCK_BENCH_XEN_LIBDIR, 0);
    // 10,000 connections: a host socket and an event-channel socket each in
    // xensockd (which inherits this limit), and the sink's socket.
    raise_fd_limit(1u << 18);
    signal(SIGPIPE, SIG_IGN);

    const unsigned workers = cfg.workers ? cfg.workers : daemon_default_workers();
    const unsigned order = cfg.ring_order ? cfg.ring_order : kFrontendDefaultOrder;
    const uint32_t max_sockets = std::max<uint32_t>(4096, cfg.scale_conns + 16);

    print_machine();
    fmt::print("xensockd: --workers {} --max-ring-order {} (defaults: {} and {}); data ring order {} "
               "({} KiB per direction); protocol {}\n",
               workers, std::max(order, kDaemonDefaultMaxOrder), daemon_default_workers(), kDaemonDefaultMaxOrder,
               order, wire::ring_bytes_per_direction(order) / 1024, cfg.protocol);
    fmt::print("each figure: median of {} run(s); ratios are against baselines measured in this run\n\n", cfg.reps);
    std::fflush(stdout);

    Summary summary;
    int errors = 0;
    const std::vector<Flow> flows{{true, 1, 1}, {true, 8, 1}, {true, 8, 8}, {false, 1, 1}, {false, 8, 1}, {false, 8, 8}};
    std::map<std::string, double> loopback_tp;  // by flow: baseline for the sweep
    double loopback_rate = 0;                   // connections/s: baseline for the sweep
    auto per_stream = [&](const Flow& f) { return cfg.run_bytes / f.streams; };
    const bool socat_ok = cfg.socat && ::system("command -v socat >/dev/null 2>&1") == 0;
    if (cfg.socat && !socat_ok) fmt::print("socat not found: the relay column is skipped (scripts/bench.sh installs it)\n");

    try {
        Daemon main_daemon(workers, std::max(order, kDaemonDefaultMaxOrder), cfg.protocol, max_sockets);

        // ------------------------------------------------- 1, 2, 6: throughput
        if (cfg.want("throughput")) {
            fmt::print("== 1-2. Bulk throughput, 64 KiB application writes, GiB/s ({} MiB per run)\n",
                       cfg.run_bytes / kMiB);
            fmt::print("{:<36} {:>9} {:>9} {:>8} {:>9} {:>9} {:>14} {:>12}\n", "flow", "xensock", "loopback",
                       "xs/lo", "socat", "xs/socat", "xensockd s/GiB", "socat s/GiB");
            for (const Flow& f : flows) {
                if (!cfg.flows.empty() && std::find(cfg.flows.begin(), cfg.flows.end(), f.short_name()) == cfg.flows.end())
                    continue;
                std::vector<double> xs, lo, so, xs_cpu, so_cpu;
                for (unsigned rep = 0; rep < cfg.reps; ++rep) {
                    // Rotate the order so that drift in the machine's load
                    // does not always favour the same path.
                    std::vector<Path> order_paths{Path::xensock};
                    if (!cfg.only_xensock) order_paths.push_back(Path::loopback);
                    if (socat_ok && !cfg.only_xensock) order_paths.push_back(Path::socat);
                    std::rotate(order_paths.begin(), order_paths.begin() + rep % order_paths.size(), order_paths.end());
                    for (Path p : order_paths) {
                        const TpResult r = run_throughput(cfg, p, f, per_stream(f), &main_daemon, cfg.ring_order);
                        const double gib = static_cast<double>(r.bytes) / static_cast<double>(kGiB);
                        if (p == Path::xensock) {
                            xs.push_back(r.gib_s);
                            xs_cpu.push_back(r.middle_cpu / gib);
                        } else if (p == Path::loopback) {
                            lo.push_back(r.gib_s);
                        } else {
                            so.push_back(r.gib_s);
                            so_cpu.push_back(r.middle_cpu / gib);
                        }
                    }
                }
                const double x = median(xs), l = median(lo), s = median(so);
                loopback_tp[f.name()] = l;
                fmt::print("{:<36} {:>9.3f} {:>9.3f} {:>8} {:>9} {:>9} {:>14.3f} {:>12}\n", f.name(), x, l,
                           fmt_ratio(x / l), socat_ok ? fmt::format("{:.3f}", s) : "-",
                           socat_ok ? fmt_ratio(x / s) : "-", median(xs_cpu),
                           socat_ok ? fmt::format("{:.3f}", median(so_cpu)) : "-");
                std::fflush(stdout);
                if (f.guests == 1) {
                    summary.target("throughput " + f.name() + " vs loopback", x / l, ">= 0.80x", x / l >= 0.8);
                    if (socat_ok) summary.target("throughput " + f.name() + " vs socat", x / s, ">= 2.00x", x / s >= 2.0);
                }
            }
            fmt::print("(xensockd s/GiB: the daemon's user+sys CPU seconds per GiB moved — section 6; socat's\n"
                       " counts its forked per-connection children.)\n\n");
        }

        // ------------------------------------------------------------ 3: RTT
        if (cfg.want("rtt")) {
            fmt::print("== 3. 1-byte request/response round trip, microseconds ({} samples per run)\n",
                       cfg.rtt_samples);
            std::vector<double> x50, x99, l50, l99;
            for (unsigned rep = 0; rep < cfg.reps; ++rep) {
                for (int k = 0; k < 2; ++k) {
                    const bool xs_first = rep % 2 == 0;
                    const Path p = (k == 0) == xs_first ? Path::xensock : Path::loopback;
                    if (p == Path::loopback && cfg.only_xensock) continue;
                    const RttResult r = run_rtt(cfg, p, &main_daemon);
                    (p == Path::xensock ? x50 : l50).push_back(r.p50);
                    (p == Path::xensock ? x99 : l99).push_back(r.p99);
                }
            }
            fmt::print("{:<10} {:>9} {:>9} {:>8}\n", "", "xensock", "loopback", "ratio");
            fmt::print("{:<10} {:>9.1f} {:>9.1f} {:>8}\n", "p50", median(x50), median(l50), fmt_ratio(median(x50) / median(l50)));
            fmt::print("{:<10} {:>9.1f} {:>9.1f} {:>8}\n\n", "p99", median(x99), median(l99), fmt_ratio(median(x99) / median(l99)));
            summary.target("RTT p50 vs loopback", median(x50) / median(l50), "<= 1.50x", median(x50) / median(l50) <= 1.5);
            std::fflush(stdout);
        }

        // ------------------------------------------------- 4: connection rate
        if (cfg.want("connrate")) {
            fmt::print("== 4. Connections per second: connect, {}-byte request and response, close; {} concurrent "
                       "loops, {:.1f} s per run\n",
                       cfg.conn_msg, cfg.conn_concurrency, cfg.connrate_secs);
            std::vector<double> xs, lo;
            for (unsigned rep = 0; rep < cfg.reps; ++rep) {
                for (int k = 0; k < 2; ++k) {
                    const Path p = (k == 0) == (rep % 2 == 0) ? Path::xensock : Path::loopback;
                    if (p == Path::loopback && cfg.only_xensock) continue;
                    const RateResult r = run_connrate(cfg, p, &main_daemon, cfg.ring_order);
                    (p == Path::xensock ? xs : lo).push_back(r.per_sec);
                }
            }
            fmt::print("{:<10} {:>9} {:>9} {:>8}\n", "", "xensock", "loopback", "ratio");
            fmt::print("{:<10} {:>9.0f} {:>9.0f} {:>8}\n\n", "conn/s", median(xs), median(lo), fmt_ratio(median(xs) / median(lo)));
            summary.target("connection rate vs loopback", median(xs) / median(lo), ">= 0.50x", median(xs) / median(lo) >= 0.5);
            loopback_rate = median(lo);
            std::fflush(stdout);
        }

        // ------------------------------------------------------------ 5: scale
        if (cfg.want("scale")) {
            // On sim xensockd holds two descriptors per connection (the host
            // socket and its data ring's event-channel socket) and three per
            // guest (its mem and gnttab files, its command-ring port). It
            // inherits our limit; without CAP_SYS_RESOURCE the hard limit
            // cannot be raised, and then the run is cut to what fits, and
            // says so.
            rlimit lim{};
            ::getrlimit(RLIMIT_NOFILE, &lim);
            const uint64_t asked = uint64_t{cfg.scale_guests} * cfg.scale_conns;
            const uint64_t fixed = 128 + 3ull * cfg.scale_guests;
            constexpr uint64_t kPerConnection = 2;
            if (fixed + kPerConnection * asked > lim.rlim_cur) {
                const unsigned fit =
                    lim.rlim_cur > fixed
                        ? static_cast<unsigned>((lim.rlim_cur - fixed) / (kPerConnection * cfg.scale_guests))
                        : 0;
                fmt::print("NOTE: RLIMIT_NOFILE is {} and cannot be raised here (no CAP_SYS_RESOURCE); xensockd needs "
                           "{} descriptors per connection on sim, so {} x {} connections are cut to {} x {} = {}\n",
                           lim.rlim_cur, kPerConnection, cfg.scale_guests, cfg.scale_conns, cfg.scale_guests, fit,
                           uint64_t{cfg.scale_guests} * fit);
                cfg.scale_conns = fit;
            }
            fmt::print("== 5. Scale: {} guest processes x {} connections = {} concurrent connections, all sending "
                       "guest->host for {:.0f} s, ring order {}\n",
                       cfg.scale_guests, cfg.scale_conns, cfg.scale_guests * cfg.scale_conns, cfg.scale_secs,
                       cfg.scale_order);
            const ScaleResult r = run_scale(cfg, main_daemon);
            auto mib = [](uint64_t kib) { return static_cast<double>(kib) / 1024.0; };
            fmt::print("  completed                        {} of {} (closed cleanly, every byte sent counted at the sink)\n",
                       r.completed, r.connections);
            fmt::print("  set-up (attach + connect all)    {:.2f} s\n", r.setup_secs);
            fmt::print("  transfer                         {:.2f} s, {:.3f} GiB/s aggregate\n", r.transfer_secs, r.gib_s);
            fmt::print("  Jain's fairness index            {:.4f} over the middle half of the run (slowest connection at "
                       "{:.2f} of the mean)\n",
                       r.jain, r.min_share);
            fmt::print("  Jain between guests (totals)     {:.4f}; within a guest (mean) {:.4f}\n", r.guest_jain,
                       r.within_guest_jain);
            for (size_t w = 0; w < r.worker_mean.size(); ++w)
                fmt::print("  worker {} (domid % {} == {})       mean {:.1f} KiB/s per connection, Jain {:.4f}\n", w,
                           r.worker_mean.size(), w, r.worker_mean[w] / 1024.0, r.worker_jain[w]);
            fmt::print("  xensockd RSS idle                {:.1f} MiB\n", mib(r.idle.total_kib));
            fmt::print("  xensockd RSS, all connected      {:.1f} MiB = {:.1f} MiB ring pages + {:.1f} MiB rest\n",
                       mib(r.connected.total_kib), mib(r.connected.ring_kib), mib(r.connected.total_kib - r.connected.ring_kib));
            fmt::print("  xensockd RSS, peak rest          {:.1f} MiB beyond {:.1f} MiB ring pages\n",
                       mib(r.peak.total_kib - r.peak.ring_kib), mib(r.peak.ring_kib));
            {
                const double idle_rest = mib(r.idle.total_kib - r.idle.ring_kib);
                const double per_conn_kib =
                    (mib(r.peak.total_kib - r.peak.ring_kib) - idle_rest) * 1024.0 / r.connections;
                fmt::print("  per connection (peak rest)       {:.2f} KiB beyond ring pages; at {} connections: {:.1f} MiB\n",
                           per_conn_kib, asked, idle_rest + per_conn_kib * static_cast<double>(asked) / 1024.0);
            }
            fmt::print("  xensockd CPU                     {:.3f} s per GiB\n\n", r.cpu_per_gib);
            const double rest = mib(r.peak.total_kib - r.peak.ring_kib);
            summary.lines.push_back(fmt::format("  {:<52} {:>10}  {:<10} {}", "scale: RSS beyond ring pages (MiB)",
                                                fmt::format("{:.1f}", rest), "<= 64", verdict(rest <= 64)));
            if (rest > 64) ++summary.missed;
            summary.lines.push_back(fmt::format("  {:<52} {:>10}  {:<10} {}", "scale: Jain's index",
                                                fmt::format("{:.4f}", r.jain), ">= 0.95", verdict(r.jain >= 0.95)));
            if (r.jain < 0.95) ++summary.missed;
            summary.lines.push_back(fmt::format("  {:<52} {:>10}  {:<10} {}", "scale: connections lost",
                                                r.connections - r.completed, "0", verdict(r.completed == r.connections)));
            std::fflush(stdout);
        }
    } catch (const std::exception& e) {
        fmt::print(stderr, "bench: {}\n", e.what());
        ++errors;
    }

    // ------------------------------------------------------------ tuned
    // The same comparisons with the settings the sweep and the profile point
    // to: the largest data ring for bulk, the smallest for connection churn
    // (the frontend chooses per connection), xensockd busy-polling. Fresh
    // baselines are measured next to each figure.
    Summary tuned;
    if (cfg.want("tuned") && errors == 0) {
        try {
            fmt::print("== Tuned: xensockd XENSOCK_BUSY_POLL_US={} and --max-ring-order {}; ring order {} for bulk, {} "
                       "for the connection rate; workers {}\n",
                       cfg.tuned_busy_poll_us, std::max(cfg.tuned_bulk_order, kDaemonDefaultMaxOrder),
                       cfg.tuned_bulk_order, cfg.tuned_conn_order, workers);
            Daemon d(workers, std::max(cfg.tuned_bulk_order, kDaemonDefaultMaxOrder), cfg.protocol, max_sockets,
                     cfg.tuned_busy_poll_us);
            fmt::print("{:<36} {:>9} {:>9} {:>8} {:>9} {:>9} {:>14}\n", "", "xensock", "loopback", "xs/lo", "socat",
                       "xs/socat", "xensockd s/GiB");
            for (const Flow& f : flows) {
                if (f.guests != 1) continue;
                std::vector<double> xs, lo, so, cpu;
                for (unsigned rep = 0; rep < cfg.reps; ++rep) {
                    const TpResult r = run_throughput(cfg, Path::xensock, f, per_stream(f), &d, cfg.tuned_bulk_order);
                    xs.push_back(r.gib_s);
                    cpu.push_back(r.middle_cpu / (static_cast<double>(r.bytes) / static_cast<double>(kGiB)));
                    lo.push_back(run_throughput(cfg, Path::loopback, f, per_stream(f), nullptr, 0).gib_s);
                    if (socat_ok) so.push_back(run_throughput(cfg, Path::socat, f, per_stream(f), nullptr, 0).gib_s);
                }
                const double x = median(xs), l = median(lo), so_m = median(so);
                fmt::print("{:<36} {:>9.3f} {:>9.3f} {:>8} {:>9} {:>9} {:>14.3f}\n", f.name(), x, l, fmt_ratio(x / l),
                           socat_ok ? fmt::format("{:.3f}", so_m) : "-", socat_ok ? fmt_ratio(x / so_m) : "-",
                           median(cpu));
                std::fflush(stdout);
                tuned.target("throughput " + f.name() + " vs loopback", x / l, ">= 0.80x", x / l >= 0.8);
                if (socat_ok) tuned.target("throughput " + f.name() + " vs socat", x / so_m, ">= 2.00x", x / so_m >= 2.0);
            }
            std::vector<double> x50, x99, l50, l99;
            for (unsigned rep = 0; rep < cfg.reps; ++rep) {
                const RttResult x = run_rtt(cfg, Path::xensock, &d);
                const RttResult l = run_rtt(cfg, Path::loopback, nullptr);
                x50.push_back(x.p50);
                x99.push_back(x.p99);
                l50.push_back(l.p50);
                l99.push_back(l.p99);
            }
            fmt::print("{:<36} {:>9.1f} {:>9.1f} {:>8}\n", "RTT p50 (us)", median(x50), median(l50),
                       fmt_ratio(median(x50) / median(l50)));
            fmt::print("{:<36} {:>9.1f} {:>9.1f} {:>8}\n", "RTT p99 (us)", median(x99), median(l99),
                       fmt_ratio(median(x99) / median(l99)));
            tuned.target("RTT p50 vs loopback", median(x50) / median(l50), "<= 1.50x", median(x50) / median(l50) <= 1.5);
            std::vector<double> xr, lr;
            for (unsigned rep = 0; rep < cfg.reps; ++rep) {
                xr.push_back(run_connrate(cfg, Path::xensock, &d, cfg.tuned_conn_order).per_sec);
                lr.push_back(run_connrate(cfg, Path::loopback, nullptr, 0).per_sec);
            }
            fmt::print("{:<36} {:>9.0f} {:>9.0f} {:>8}\n\n", "connections/s", median(xr), median(lr),
                       fmt_ratio(median(xr) / median(lr)));
            tuned.target("connection rate vs loopback", median(xr) / median(lr), ">= 0.50x", median(xr) / median(lr) >= 0.5);
            std::fflush(stdout);
        } catch (const std::exception& e) {
            fmt::print(stderr, "bench: tuned: {}\n", e.what());
            ++errors;
        }
    }

    // ------------------------------------------------------------ sweep
    if (cfg.want("sweep") && errors == 0) {
        try {
            fmt::print("== Sweep: ring order x worker threads (xensock GiB/s, ratio to loopback of this run; connection "
                       "rate conn/s)\n");
            std::vector<Flow> sweep_flows;
            for (const Flow& f : flows)
                if (cfg.flows.empty() || std::find(cfg.flows.begin(), cfg.flows.end(), f.short_name()) != cfg.flows.end())
                    sweep_flows.push_back(f);
            // Baselines, if the throughput or connection-rate sections did not run.
            const bool sweep_rate = cfg.want("connrate") || !cfg.only.empty();
            if (sweep_rate && loopback_rate == 0) {
                std::vector<double> lo;
                for (unsigned rep = 0; rep < cfg.reps; ++rep)
                    lo.push_back(run_connrate(cfg, Path::loopback, nullptr, 0).per_sec);
                loopback_rate = median(lo);
            }
            for (const Flow& f : sweep_flows) {
                if (loopback_tp.count(f.name())) continue;
                std::vector<double> lo;
                for (unsigned rep = 0; rep < cfg.reps; ++rep)
                    lo.push_back(run_throughput(cfg, Path::loopback, f, per_stream(f), nullptr, 0).gib_s);
                loopback_tp[f.name()] = median(lo);
            }
            const unsigned max_order = *std::max_element(cfg.sweep_orders.begin(), cfg.sweep_orders.end());
            std::map<std::string, std::pair<double, std::string>> best;  // by flow
            fmt::print("{:<8} {:<6}", "workers", "order");
            for (const Flow& f : sweep_flows) fmt::print(" {:>15}", (f.to_host ? "g>h " : "h>g ") + std::to_string(f.streams) + (f.guests > 1 ? "x" + std::to_string(f.guests) + "g" : ""));
            fmt::print(" {:>15}\n", "conn/s");
            std::pair<double, std::string> best_rate{0, ""};
            for (unsigned w : cfg.sweep_workers) {
                Daemon d(w, std::max(max_order, kDaemonDefaultMaxOrder), cfg.protocol, max_sockets);
                for (unsigned o : cfg.sweep_orders) {
                    fmt::print("{:<8} {:<6}", w, o);
                    for (const Flow& f : sweep_flows) {
                        std::vector<double> xs;
                        for (unsigned rep = 0; rep < cfg.sweep_reps; ++rep)
                            xs.push_back(run_throughput(cfg, Path::xensock, f, per_stream(f), &d, o).gib_s);
                        const double x = median(xs);
                        const double ratio = x / loopback_tp[f.name()];
                        fmt::print(" {:>7.3f} ({:>5})", x, fmt_ratio(ratio));
                        std::fflush(stdout);
                        auto& b = best[f.name()];
                        if (ratio > b.first) b = {ratio, fmt::format("{:.3f} GiB/s = {} at workers {}, order {}", x, fmt_ratio(ratio), w, o)};
                    }
                    std::vector<double> rates;
                    if (sweep_rate)
                        for (unsigned rep = 0; rep < cfg.sweep_reps; ++rep)
                            rates.push_back(run_connrate(cfg, Path::xensock, &d, o).per_sec);
                    const double rate = median(rates);
                    if (sweep_rate) {
                        fmt::print(" {:>7.0f} ({:>5})\n", rate, fmt_ratio(rate / loopback_rate));
                        if (rate / loopback_rate > best_rate.first)
                            best_rate = {rate / loopback_rate, fmt::format("{:.0f}/s = {} at workers {}, order {}", rate,
                                                                           fmt_ratio(rate / loopback_rate), w, o)};
                    } else {
                        fmt::print(" {:>15}\n", "-");
                    }
                    std::fflush(stdout);
                }
            }
            fmt::print("best per flow:\n");
            for (const Flow& f : sweep_flows) fmt::print("  {:<36} {}\n", f.name(), best[f.name()].second);
            if (!best_rate.second.empty()) fmt::print("  {:<36} {}\n", "connection rate", best_rate.second);
            fmt::print("\n");
        } catch (const std::exception& e) {
            fmt::print(stderr, "bench: sweep: {}\n", e.what());
            ++errors;
        }
    }

    if (!summary.lines.empty()) {
        fmt::print("== Targets, default configuration\n");
        for (const auto& l : summary.lines) fmt::print("{}\n", l);
        fmt::print("  {} target(s) missed, {} not measured\n", summary.missed, summary.unmeasured);
    }
    if (!tuned.lines.empty()) {
        fmt::print("== Targets, tuned configuration\n");
        for (const auto& l : tuned.lines) fmt::print("{}\n", l);
        fmt::print("  {} target(s) missed, {} not measured\n", tuned.missed, tuned.unmeasured);
    }
    if (errors) {
        fmt::print(stderr, "bench: FAILED ({} error(s))\n", errors);
        return 1;
    }
    // Targets are reported, not enforced: timing never fails a run.
    return 0;
}
