// xensock-bench: the host side (sinks, sources, servers), the plain-TCP
// baseline clients, process handling and /proc readers. Nothing here knows
// xensock: these are what the guests talk to and what they are compared with.
#include "bench.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <new>
#include <sstream>
#include <thread>
#include <unordered_map>

namespace xensock::bench {

uint64_t now_ns() noexcept {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// ------------------------------------------------------------------ Shared

Shared* Shared::create(uint32_t records) {
    if (records == 0) records = 1;
    const size_t bytes = sizeof(Shared) + sizeof(Record) * (records - 1);
    void* mem = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) throw std::bad_alloc();
    auto* s = new (mem) Shared();
    for (uint32_t i = 1; i < records; ++i) new (&s->rec[i]) Record();
    s->capacity = records;
    return s;
}

void Shared::destroy(Shared* s) {
    if (!s) return;
    const size_t bytes = sizeof(Shared) + sizeof(Record) * (s->capacity - 1);
    ::munmap(s, bytes);
}

Record* Shared::claim() {
    const uint32_t i = next_record.fetch_add(1);
    return i < capacity ? &rec[i] : nullptr;
}

namespace {
long futex(std::atomic<uint32_t>* word, int op, uint32_t val, const timespec* ts) {
    // Not FUTEX_PRIVATE: the word is shared between processes.
    return ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, val, ts, nullptr, 0);
}
}  // namespace

void Shared::wait_go() {
    while (go.load(std::memory_order_acquire) == 0) {
        timespec ts{1, 0};
        futex(&go, FUTEX_WAIT, 0, &ts);
    }
}

void Shared::release_go() {
    go_ns.store(now_ns(), std::memory_order_release);
    go.store(1, std::memory_order_release);
    futex(&go, FUTEX_WAKE, INT_MAX, nullptr);
}

// ----------------------------------------------------------------- ProcSet

ProcSet::~ProcSet() { kill_all(); }

void ProcSet::kill_all() {
    for (pid_t p : pids_) {
        if (::kill(p, 0) == 0) {
            ::kill(p, SIGKILL);
            ::waitpid(p, nullptr, 0);
        }
    }
    pids_.clear();
}

pid_t ProcSet::spawn(const std::function<int()>& body) {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        int rc = 99;
        try {
            rc = body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "bench child %d failed: %s\n", getpid(), e.what());
            rc = 98;
        }
        std::fflush(nullptr);
        _exit(rc);
    }
    pids_.push_back(pid);
    return pid;
}

pid_t ProcSet::spawn_exec(const std::vector<std::string>& argv) {
    return spawn([argv]() -> int {
        std::vector<char*> args;
        for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        ::execvp(args[0], args.data());
        std::fprintf(stderr, "bench: cannot run %s: %s\n", args[0], std::strerror(errno));
        return 127;
    });
}

bool ProcSet::alive(pid_t pid) const {
    siginfo_t info{};
    if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0) return false;
    return info.si_pid == 0;  // nothing to report: still running
}

int ProcSet::wait(pid_t pid, std::chrono::milliseconds bound) {
    const uint64_t deadline = now_ns() + static_cast<uint64_t>(bound.count()) * 1000000ull;
    int status = 0;
    while (true) {
        const pid_t r = ::waitpid(pid, &status, WNOHANG);
        if (r == pid) break;
        if (r < 0) return -1;
        if (now_ns() > deadline) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
            std::erase(pids_, pid);
            return -1;
        }
        ::usleep(1000);
    }
    std::erase(pids_, pid);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return -1;
}

// ------------------------------------------------------------ host sockets

namespace {
sockaddr_in loopback(uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

void set_nodelay(int fd) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

bool write_all(int fd, const void* data, size_t len) {
    auto* p = static_cast<const char*>(data);
    while (len > 0) {
        const ssize_t n = ::send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        p += n;
        len -= static_cast<size_t>(n);
    }
    return true;
}

bool read_exact(int fd, void* data, size_t len) {
    auto* p = static_cast<char*>(data);
    while (len > 0) {
        const ssize_t n = ::recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        p += n;
        len -= static_cast<size_t>(n);
    }
    return true;
}

// The application buffer every sender writes from: constant content (the
// bench measures moving bytes, not making them).
const std::byte* send_buffer() {
    static std::vector<std::byte> buf = [] {
        std::vector<std::byte> b(kChunk);
        for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>(i * 131 + 7);
        return b;
    }();
    return buf.data();
}
}  // namespace

int listen_on(uint16_t port, uint16_t& bound, int backlog) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);  // inherited by the service child
    if (fd < 0) return -1;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = loopback(port);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0 || ::listen(fd, backlog) < 0) {
        ::close(fd);
        return -1;
    }
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    bound = ntohs(a.sin_port);
    return fd;
}

int connect_to(uint16_t port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    set_nodelay(fd);
    sockaddr_in a = loopback(port);
    while (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) {
        if (errno == EINTR) continue;
        ::close(fd);
        return -1;
    }
    return fd;
}

uint16_t free_port() {
    uint16_t port = 0;
    const int fd = listen_on(0, port);
    if (fd >= 0) ::close(fd);
    return port;
}

// Listening sockets from /proc/net/tcp (state 0A): probing with a connect
// would make socat open a relayed connection to the service behind it.
bool wait_listening(uint16_t port, std::chrono::milliseconds bound) {
    const uint64_t deadline = now_ns() + static_cast<uint64_t>(bound.count()) * 1000000ull;
    char want[32];
    std::snprintf(want, sizeof want, ":%04X", port);
    while (now_ns() < deadline) {
        std::ifstream f("/proc/net/tcp");
        std::string line;
        std::getline(f, line);
        while (std::getline(f, line)) {
            std::istringstream in(line);
            std::string sl, local, remote, state;
            in >> sl >> local >> remote >> state;
            if (state == "0A" && local.size() > 5 && local.compare(local.size() - 5, 5, want) == 0) return true;
        }
        ::usleep(5000);
    }
    return false;
}

void raise_fd_limit(rlim_t want) {
    rlimit lim{};
    ::getrlimit(RLIMIT_NOFILE, &lim);
    if (lim.rlim_cur >= want) return;
    rlimit up{want, std::max(want, lim.rlim_max)};
    if (::setrlimit(RLIMIT_NOFILE, &up) == 0) return;  // root may raise the hard limit
    lim.rlim_cur = lim.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &lim);
}

double cpu_seconds(pid_t pid, bool with_children) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t paren = text.rfind(')');
    if (paren == std::string::npos) return 0;
    std::istringstream in(text.substr(paren + 2));
    std::vector<std::string> fields;
    std::string w;
    while (in >> w) fields.push_back(w);
    // Fields after the comm: state is index 0, utime is field 14 => index 11.
    if (fields.size() < 15) return 0;
    const double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
    double t = std::stod(fields[11]) + std::stod(fields[12]);
    if (with_children) t += std::stod(fields[13]) + std::stod(fields[14]);
    return t / tick;
}

RssInfo read_rss(pid_t pid, const std::string& sim_root) {
    RssInfo info;
    std::ifstream f("/proc/" + std::to_string(pid) + "/smaps");
    std::string line;
    bool ring = false;
    const std::string prefix = sim_root + "/dom";
    while (std::getline(f, line)) {
        // A mapping header: "start-end perms offset dev inode [path]"; the
        // other lines are "Name: value".
        const size_t space = line.find(' ');
        const std::string first = line.substr(0, space);
        const bool header = !first.empty() && first.find('-') != std::string::npos &&
                            first.find_first_not_of("0123456789abcdef-") == std::string::npos;
        if (header) {
            const size_t slash = line.find('/');
            const std::string path = slash == std::string::npos ? "" : line.substr(slash);
            ring = !sim_root.empty() && path.compare(0, prefix.size(), prefix) == 0 &&
                   path.size() >= 4 && path.compare(path.size() - 4, 4, "/mem") == 0;
            continue;
        }
        if (line.compare(0, 4, "Rss:") == 0) {
            const uint64_t kib = std::strtoull(line.c_str() + 4, nullptr, 10);
            info.total_kib += kib;
            if (ring) info.ring_kib += kib;
        }
    }
    return info;
}

// ---------------------------------------------------------------- services

namespace {
// Reads one accepted connection to EOF.
void drain_connection(int fd, Record* rec) {
    std::vector<char> buf(kChunk);
    uint64_t total = 0;
    int status = 0;
    while (true) {
        const ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            status = errno;
            break;
        }
        if (n == 0) break;
        total += static_cast<uint64_t>(n);
    }
    const uint64_t end = now_ns();
    ::close(fd);
    if (rec) {
        rec->bytes.store(total);
        rec->end_ns.store(end);
        rec->status.store(status);
    }
}

int sink_threads(Shared* sh, int listen_fd, uint32_t expected) {
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < expected; ++i) {
        const int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) return 2;
        threads.emplace_back(drain_connection, c, sh->claim());
    }
    for (auto& t : threads) t.join();
    return 0;
}

}  // namespace

int run_scale_sink(Shared* sh, int listen_fd, uint32_t expected) {
    const int ep = ::epoll_create1(EPOLL_CLOEXEC);
    ::fcntl(listen_fd, F_SETFL, ::fcntl(listen_fd, F_GETFL) | O_NONBLOCK);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = listen_fd;
    ::epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &ev);
    struct Conn {
        Record* rec = nullptr;
        uint64_t tag = 0;
        unsigned tag_bytes = 0;
        uint64_t bytes = 0, window = 0;
    };
    std::unordered_map<int, Conn> conns;
    std::vector<char> buf(kChunk);
    uint32_t accepted = 0, finished = 0;
    int bad = 0;
    std::vector<epoll_event> events(1024);
    while (finished < expected) {
        const int n = ::epoll_wait(ep, events.data(), static_cast<int>(events.size()), 60000);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            std::fprintf(stderr, "sink: stalled with %u of %u connections finished (%u accepted)\n", finished,
                         expected, accepted);
            return 3;
        }
        for (int i = 0; i < n; ++i) {
            const int fd = events[static_cast<size_t>(i)].data.fd;
            if (fd == listen_fd) {
                while (true) {
                    const int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
                    if (c < 0) break;
                    ++accepted;
                    conns.emplace(c, Conn{});
                    epoll_event cev{};
                    cev.events = EPOLLIN;
                    cev.data.fd = c;
                    ::epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            auto it = conns.find(fd);
            if (it == conns.end()) continue;
            Conn& conn = it->second;
            // One read per event keeps every connection served in turn.
            const ssize_t r = ::recv(fd, buf.data(), buf.size(), 0);
            if (r > 0) {
                size_t at = 0;
                while (conn.tag_bytes < sizeof conn.tag && at < static_cast<size_t>(r)) {
                    conn.tag |= static_cast<uint64_t>(static_cast<unsigned char>(buf[at++])) << (8 * conn.tag_bytes);
                    if (++conn.tag_bytes == sizeof conn.tag) {
                        if (conn.tag < sh->capacity) conn.rec = &sh->rec[conn.tag];
                        else ++bad;
                    }
                }
                const uint64_t payload = static_cast<uint64_t>(r) - at;
                conn.bytes += payload;
                const uint64_t t = now_ns();
                if (t >= sh->window_begin_ns.load(std::memory_order_relaxed) &&
                    t < sh->window_end_ns.load(std::memory_order_relaxed))
                    conn.window += payload;
                continue;
            }
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (Record* rec = conn.rec) {
                rec->bytes.store(conn.bytes);
                rec->window.store(conn.window);
                rec->end_ns.store(now_ns());
                rec->status.store(r < 0 ? errno : 0);
            } else {
                ++bad;
            }
            ::epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
            ::close(fd);
            conns.erase(it);
            ++finished;
        }
    }
    ::close(ep);
    if (bad) std::fprintf(stderr, "sink: %d connections without a valid record tag\n", bad);
    return bad == 0 ? 0 : 4;
}

int run_sink(Shared* sh, int listen_fd, uint32_t expected) { return sink_threads(sh, listen_fd, expected); }

int run_source(Shared* sh, int listen_fd, uint32_t expected, uint64_t bytes) {
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (uint32_t i = 0; i < expected; ++i) {
        const int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) return 2;
        set_nodelay(c);
        sh->ready.fetch_add(1);
        threads.emplace_back([sh, c, bytes, &failures] {
            sh->wait_go();
            const std::byte* buf = send_buffer();
            for (uint64_t left = bytes; left > 0;) {
                const size_t n = static_cast<size_t>(std::min<uint64_t>(left, kChunk));
                if (!write_all(c, buf, n)) {
                    failures.fetch_add(1);
                    break;
                }
                left -= n;
            }
            ::close(c);
        });
    }
    for (auto& t : threads) t.join();
    return failures.load() == 0 ? 0 : 1;
}

int run_echo(int listen_fd) {
    while (true) {
        const int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) return errno == EINTR ? 0 : 2;
        set_nodelay(c);
        std::thread([c] {
            std::vector<char> buf(kChunk);
            while (true) {
                const ssize_t n = ::recv(c, buf.data(), buf.size(), 0);
                if (n <= 0) break;
                if (!write_all(c, buf.data(), static_cast<size_t>(n))) break;
            }
            ::close(c);
        }).detach();
    }
}

int run_reqresp_server(int listen_fd, unsigned threads, size_t msg) {
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([listen_fd, msg] {
            std::vector<char> buf(msg);
            while (true) {
                const int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
                if (c < 0) {
                    if (errno == EINTR || errno == ECONNABORTED) continue;
                    return;
                }
                set_nodelay(c);
                if (read_exact(c, buf.data(), msg)) (void)write_all(c, buf.data(), msg);
                ::close(c);  // we close first: TIME_WAIT stays here, not on the client's ports
            }
        });
    }
    for (auto& t : pool) t.join();
    return 0;
}

// ---------------------------------------------------------- baseline clients

int tcp_bulk_send(Shared* sh, uint16_t port, unsigned streams, uint64_t bytes) {
    std::vector<int> fds;
    for (unsigned i = 0; i < streams; ++i) {
        const int fd = connect_to(port);
        if (fd < 0) return 2;
        fds.push_back(fd);
    }
    sh->ready.fetch_add(streams);
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int fd : fds) {
        threads.emplace_back([sh, fd, bytes, &failures] {
            sh->wait_go();
            const std::byte* buf = send_buffer();
            for (uint64_t left = bytes; left > 0;) {
                const size_t n = static_cast<size_t>(std::min<uint64_t>(left, kChunk));
                if (!write_all(fd, buf, n)) {
                    failures.fetch_add(1);
                    break;
                }
                left -= n;
            }
            ::close(fd);
        });
    }
    for (auto& t : threads) t.join();
    return failures.load() == 0 ? 0 : 1;
}

int tcp_bulk_recv(Shared* sh, uint16_t port, unsigned streams, uint64_t bytes) {
    std::vector<int> fds;
    for (unsigned i = 0; i < streams; ++i) {
        const int fd = connect_to(port);
        if (fd < 0) return 2;
        fds.push_back(fd);
    }
    sh->ready.fetch_add(streams);
    std::vector<std::thread> threads;
    for (int fd : fds) threads.emplace_back(drain_connection, fd, sh->claim());
    for (auto& t : threads) t.join();
    (void)bytes;  // checked by the bench from the records
    return 0;
}

int tcp_rtt(Shared* sh, uint16_t port, unsigned warmup, unsigned samples) {
    const int fd = connect_to(port);
    if (fd < 0) return 2;
    sh->ready.fetch_add(1);
    sh->wait_go();
    std::vector<double> us;
    us.reserve(samples);
    char b = 'x';
    for (unsigned i = 0; i < warmup + samples; ++i) {
        const uint64_t t0 = now_ns();
        if (!write_all(fd, &b, 1) || !read_exact(fd, &b, 1)) return 3;
        if (i >= warmup) us.push_back(static_cast<double>(now_ns() - t0) / 1000.0);
    }
    ::close(fd);
    double sum = 0;
    for (double v : us) sum += v;
    sh->rtt_mean_us = us.empty() ? 0 : sum / static_cast<double>(us.size());
    sh->rtt_p50_us = percentile(us, 50);
    sh->rtt_p99_us = percentile(us, 99);
    sh->rtt_samples = us.size();
    return 0;
}

int tcp_connrate(Shared* sh, uint16_t port, unsigned concurrency, size_t msg) {
    sh->ready.fetch_add(1);
    sh->wait_go();
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (unsigned t = 0; t < concurrency; ++t) {
        threads.emplace_back([sh, port, msg, &failures] {
            Record* rec = sh->claim();
            std::vector<char> buf(msg, 'q');
            uint64_t done = 0;
            while (now_ns() < sh->stop_ns.load()) {
                const int fd = connect_to(port);
                if (fd < 0 || !write_all(fd, buf.data(), msg) || !read_exact(fd, buf.data(), msg)) {
                    if (fd >= 0) ::close(fd);
                    failures.fetch_add(1);
                    break;
                }
                ::close(fd);
                ++done;
            }
            if (rec) {
                rec->count.store(done);
                rec->end_ns.store(now_ns());
            }
        });
    }
    for (auto& t : threads) t.join();
    return failures.load() == 0 ? 0 : 1;
}

// -------------------------------------------------------------- statistics

double jain_index(const std::vector<double>& x) {
    if (x.empty()) return 0;
    double sum = 0, sq = 0;
    for (double v : x) {
        sum += v;
        sq += v * v;
    }
    return sq == 0 ? 0 : (sum * sum) / (static_cast<double>(x.size()) * sq);
}

double percentile(std::vector<double> v, double p) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    // Nearest rank.
    size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
    rank = std::clamp<size_t>(rank, 1, v.size());
    return v[rank - 1];
}

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace xensock::bench
