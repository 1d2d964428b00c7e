// xensock-bench: shared declarations.
//
// Every measurement is made of processes: host services (sink, source, echo,
// request/response server) and clients (xensock guests through xensockd, or
// plain TCP clients for the baselines) are forked from the bench; they meet
// in one MAP_SHARED region (Shared) where clients say they are ready, the
// bench releases them all at once (`go`, a process-shared futex) and each
// connection leaves its byte count and finishing time. All times are
// CLOCK_MONOTONIC, which every process on the machine shares.
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace xensock::bench {

uint64_t now_ns() noexcept;

// One connection's outcome, written by whoever sees its end.
struct Record {
    std::atomic<uint64_t> bytes{0};
    std::atomic<uint64_t> end_ns{0};
    std::atomic<uint64_t> count{0};  // exchanges completed (connection rate)
    std::atomic<int32_t> status{0};  // 0 ok, else what failed
    std::atomic<uint64_t> sent{0};    // scale: payload bytes the guest queued
    std::atomic<uint64_t> window{0};  // scale: bytes the sink read inside the window
};

struct Shared {
    std::atomic<uint32_t> ready{0};  // clients (and servers' accepts) set up
    std::atomic<uint32_t> go{0};     // futex word: 1 = start
    std::atomic<uint64_t> go_ns{0};
    std::atomic<uint64_t> stop_ns{0};  // connection rate, scale: stop starting new ones / sending
    std::atomic<uint64_t> window_begin_ns{0}, window_end_ns{0};  // scale: fairness window
    std::atomic<uint32_t> next_record{0};
    std::atomic<int32_t> failures{0};
    // Round trips, filled by the one RTT client.
    double rtt_p50_us = 0, rtt_p99_us = 0, rtt_mean_us = 0;
    uint64_t rtt_samples = 0;
    uint32_t capacity = 0;
    Record rec[1];  // `capacity` of them

    // A region for `records` records in memory shared with forked children.
    static Shared* create(uint32_t records);
    static void destroy(Shared* s);
    Record* claim();  // next free record (nullptr if none left)
    void wait_go();   // blocks until go (futex)
    void release_go();
};

// --------------------------------------------------------------- processes
// Forked children, killed (SIGKILL) if still alive when the set goes away.
class ProcSet {
public:
    ProcSet() = default;
    ~ProcSet();
    ProcSet(const ProcSet&) = delete;
    ProcSet& operator=(const ProcSet&) = delete;
    // Runs body in a child (its return value is the exit code; an exception
    // is 98). The child dies with the bench (PR_SET_PDEATHSIG).
    pid_t spawn(const std::function<int()>& body);
    pid_t spawn_exec(const std::vector<std::string>& argv);
    // Exit code, 128+signal, or -1 on timeout (then killed).
    int wait(pid_t pid, std::chrono::milliseconds bound);
    bool alive(pid_t pid) const;
    void kill_all();

private:
    std::vector<pid_t> pids_;
};

// ------------------------------------------------------------ host sockets
int listen_on(uint16_t port, uint16_t& bound, int backlog = 4096);
int connect_to(uint16_t port);  // blocking, TCP_NODELAY; -1 on failure
uint16_t free_port();
bool wait_listening(uint16_t port, std::chrono::milliseconds bound);
void raise_fd_limit(rlim_t want);

// /proc readers.
double cpu_seconds(pid_t pid, bool with_children = false);  // utime+stime
struct RssInfo {
    uint64_t total_kib = 0;
    uint64_t ring_kib = 0;  // mappings of <root>/dom<D>/mem: the granted ring pages
};
RssInfo read_rss(pid_t pid, const std::string& sim_root);

// ------------------------------------------------------- host-side services
// All run in a child process until their work is done and return the exit
// code (0 ok). `listen_fd` is inherited from the bench.

// Accepts `expected` connections and reads each to EOF (64 KiB reads),
// leaving bytes and EOF time in a claimed record. Threads for a few
// connections, epoll for many.
int run_sink(Shared* sh, int listen_fd, uint32_t expected);
// Scale: accepts `expected` connections on one epoll thread; each starts
// with an 8-byte record index (its guest's), then payload until EOF. Counts
// payload per record, and separately what arrives inside the window.
int run_scale_sink(Shared* sh, int listen_fd, uint32_t expected);
// Accepts `expected` connections (ready++ each), waits for go, then writes
// `bytes` on each in 64 KiB writes and closes.
int run_source(Shared* sh, int listen_fd, uint32_t expected, uint64_t bytes);
// Echoes every connection until EOF (thread per connection).
int run_echo(int listen_fd);
// Connection-rate server: `threads` threads accept; each connection gets
// one request of `msg` bytes answered with `msg` bytes, then close.
int run_reqresp_server(int listen_fd, unsigned threads, size_t msg);

// ----------------------------------------------- baseline (plain TCP) clients
int tcp_bulk_send(Shared* sh, uint16_t port, unsigned streams, uint64_t bytes);
int tcp_bulk_recv(Shared* sh, uint16_t port, unsigned streams, uint64_t bytes);
int tcp_rtt(Shared* sh, uint16_t port, unsigned warmup, unsigned samples);
int tcp_connrate(Shared* sh, uint16_t port, unsigned concurrency, size_t msg);

// ------------------------------------------------------ xensock guest clients
struct GuestJob {
    std::string root;    // sim root
    unsigned domid = 0;
    std::string protocol = "xensock";
    unsigned ring_order = 0;  // 0: the frontend's default
    Shared* sh = nullptr;
    uint16_t port = 0;
    unsigned streams = 1;
    uint64_t bytes = 0;
    unsigned warmup = 0, samples = 0;  // rtt
    size_t msg = 32;                   // connection rate
};
enum class GuestKind { bulk_send, bulk_recv, rtt, connrate, scale_send };
// Runs in the child: opens the sim platform as `domid`, attaches, runs the
// workload, closes. Returns the exit code.
int run_guest(GuestKind kind, const GuestJob& job);

// Statistics.
double jain_index(const std::vector<double>& x);
double percentile(std::vector<double> v, double p);  // p in [0,100]
double median(std::vector<double> v);

constexpr size_t kChunk = 64 * 1024;  // application write/read size

}  // namespace xensock::bench
