// The sim platform's grant tables and event channels
// (shared/spec/sim-platform.md), always between two real processes: the test
// process is the backend (domain 0) and forks a guest (domain 5), each
// opening its own sim platform on a fresh /dev/shm/xs-XXXXXX root.
//
// A socketpair between the two carries only test orchestration: the grant
// refs and port numbers that the real system passes through xenstore, and
// "go on" signals. Every check of the platform itself goes through the sim
// files and sockets. Waits are bounded polls, never sleeps.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "xensock/platform/platform.hpp"
#include "xensock/runtime/reactor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace xp = xensock::platform;
namespace fs = std::filesystem;
using xp::DomId;
using xp::GrantRef;
using xp::Port;
namespace rt = xensock::rt;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr DomId kGuest = 5;
constexpr int kWaitMs = 5000;  // generous bound for anything that should be immediate

// ------------------------------------------------------------------ helpers

struct TempRoot {
    std::string dir;
    TempRoot() {
        char tmpl[] = "/dev/shm/xs-XXXXXX";
        if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
        dir = tmpl;
    }
    ~TempRoot() {
        std::error_code ec;
        fs::remove_all(dir, ec);
    }
    TempRoot(const TempRoot&) = delete;
    TempRoot& operator=(const TempRoot&) = delete;

    std::string dom(DomId d) const { return dir + "/dom" + std::to_string(d); }
    std::string port(DomId d, Port p) const { return dom(d) + "/evtchn/" + std::to_string(p); }
};

// The orchestration channel (SOCK_SEQPACKET: one message = one vector).
class Chan {
public:
    explicit Chan(int fd = -1) : fd_(fd) {}
    Chan(Chan&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Chan& operator=(Chan&& o) noexcept {
        std::swap(fd_, o.fd_);
        return *this;
    }
    ~Chan() {
        if (fd_ >= 0) ::close(fd_);
    }

    void send(std::initializer_list<uint32_t> words) { send(std::vector<uint32_t>(words)); }
    void send(const std::vector<uint32_t>& words) {
        const auto n = ::send(fd_, words.data(), words.size() * sizeof(uint32_t), MSG_NOSIGNAL);
        if (n != static_cast<ssize_t>(words.size() * sizeof(uint32_t))) throw std::runtime_error("chan: send failed");
    }
    // The next message; throws if the other side went away or took too long.
    std::vector<uint32_t> recv(int timeout_ms = 10000) {
        pollfd p{fd_, POLLIN, 0};
        int rc;
        do {
            rc = ::poll(&p, 1, timeout_ms);
        } while (rc < 0 && errno == EINTR);
        if (rc == 0) throw std::runtime_error("chan: timed out waiting for the other process");
        std::vector<uint32_t> words(256);
        const auto n = ::recv(fd_, words.data(), words.size() * sizeof(uint32_t), 0);
        if (n <= 0) throw std::runtime_error("chan: the other process went away");
        words.resize(static_cast<size_t>(n) / sizeof(uint32_t));
        return words;
    }

    int fd() const { return fd_; }

private:
    int fd_;
};

// In the guest: a failed check ends the process with a message; the test
// process sees the exit status.
[[noreturn]] void guest_fail(const char* file, int line, const char* what) {
    std::fprintf(stderr, "guest check failed at %s:%d: %s\n", file, line, what);
    std::fflush(stderr);
    ::_exit(1);
}
#define G_REQUIRE(cond)                                    \
    do {                                                   \
        if (!(cond)) guest_fail(__FILE__, __LINE__, #cond); \
    } while (0)

// A forked process running `body`; killed and reaped if still around at the end.
class Process {
public:
    explicit Process(const std::function<void(Chan&)>& body) {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) throw std::runtime_error("socketpair");
        std::fflush(nullptr);
        pid_ = ::fork();
        if (pid_ < 0) throw std::runtime_error("fork");
        if (pid_ == 0) {
            ::prctl(PR_SET_PDEATHSIG, SIGKILL);
            ::close(sv[0]);
            Chan chan(sv[1]);
            try {
                body(chan);
            } catch (const std::exception& e) {
                std::fprintf(stderr, "guest: exception: %s\n", e.what());
                std::fflush(stderr);
                ::_exit(3);
            }
            std::fflush(nullptr);
            ::_exit(0);  // no atexit handlers, no doctest reporting from the child
        }
        ::close(sv[1]);
        chan_ = Chan(sv[0]);
    }
    Process(const Process&) = delete;
    Process& operator=(const Process&) = delete;
    ~Process() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, nullptr, 0);
        }
    }

    Chan& chan() { return chan_; }
    pid_t pid() const { return pid_; }

    // Exit status (0 = every guest check passed), 128+signal if killed,
    // -1 if it did not end within the bound (it is then killed).
    int wait(int timeout_ms = 10000) {
        for (int waited = 0;; waited += 10) {
            int status = 0;
            const pid_t r = ::waitpid(pid_, &status, WNOHANG);
            if (r == pid_) {
                pid_ = -1;
                return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            }
            if (waited >= timeout_ms) return -1;
            ::poll(nullptr, 0, 10);  // reaping has no fd to wait on without pidfd; bounded
        }
    }
    void kill_now() {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
        pid_ = -1;
    }

private:
    pid_t pid_ = -1;
    Chan chan_;
};

bool readable(int fd, int timeout_ms) {
    pollfd p{fd, POLLIN, 0};
    int rc;
    do {
        rc = ::poll(&p, 1, timeout_ms);
    } while (rc < 0 && errno == EINTR);
    return rc == 1 && (p.revents & POLLIN) != 0;
}

std::vector<Port> pending_of(xp::EventChannel& ch) {
    std::vector<Port> out;
    ch.pending(out);
    return out;
}

// Waits (bounded) for fd() and returns what pending() reports.
std::vector<Port> wait_pending(xp::EventChannel& ch) {
    if (!readable(ch.fd(), kWaitMs)) return {};
    return pending_of(ch);
}

// bind_interdomain() on a reactor of its own, to completion.
xensock::Result<xp::BoundPort> bind_now(xp::EventChannel& ch, DomId remote, Port remote_port) {
    xensock::rt::Reactor reactor;
    return reactor.run_until(ch.bind_interdomain(reactor, remote, remote_port));
}

xensock::Result<xp::GrantMapping> map1(xp::GrantMapper& m, DomId d, GrantRef ref, bool writable) {
    return m.map(d, std::span<const GrantRef>(&ref, 1), writable);
}

uint32_t read_u32(const void* p) {
    uint32_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

void write_file(const std::string& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    REQUIRE(out.good());
}

// Rewrites grant entry `ref` of domain `dom` by hand (a hostile guest).
void poke_entry(const TempRoot& root, DomId dom, GrantRef ref, uint16_t flags, uint16_t domid, uint32_t frame) {
    const int fd = ::open((root.dom(dom) + "/gnttab").c_str(), O_WRONLY);
    REQUIRE(fd >= 0);
    unsigned char e[8];
    std::memcpy(e, &flags, 2);
    std::memcpy(e + 2, &domid, 2);
    std::memcpy(e + 4, &frame, 4);
    CHECK(::pwrite(fd, e, sizeof e, static_cast<off_t>(ref) * 8) == 8);
    ::close(fd);
}

// Lines of /proc/self/maps that contain `needle`.
size_t maps_lines_with(const std::string& needle) {
    std::ifstream maps("/proc/self/maps");
    size_t n = 0;
    for (std::string line; std::getline(maps, line);) n += line.find(needle) != std::string::npos ? 1 : 0;
    return n;
}

// Anonymous inaccessible regions (where a reservation would linger).
size_t maps_prot_none_anon() {
    std::ifstream maps("/proc/self/maps");
    size_t n = 0;
    for (std::string line; std::getline(maps, line);) {
        // "start-end ---p 00000000 00:00 0" with no path
        if (line.find(" ---p ") != std::string::npos && line.find(" 00:00 0") != std::string::npos &&
            line.find('/') == std::string::npos && line.find('[') == std::string::npos) {
            ++n;
        }
    }
    return n;
}

// Sends one raw datagram to a port socket, as anybody on the machine can.
bool send_raw(const std::string& path, const void* data, size_t len) {
    const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    const auto n = ::sendto(fd, data, len, MSG_DONTWAIT, reinterpret_cast<const sockaddr*>(&a), sizeof a);
    ::close(fd);
    return n == static_cast<ssize_t>(len);
}

bool send_ev(const std::string& path, uint32_t magic, uint32_t op, uint32_t dom, uint32_t port) {
    const uint32_t d[4] = {magic, op, dom, port};
    return send_raw(path, d, sizeof d);
}

constexpr uint32_t kMagic = 0x58534556;
constexpr uint32_t kBind = 1, kNotify = 2, kClose = 3;

// A datagram socket bound at `path`, as a process that can create files there
// could make one. Closed (and its file removed) when destroyed.
class BoundSocket {
public:
    explicit BoundSocket(std::string path) : path_(std::move(path)) {
        fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fd_ < 0) throw std::runtime_error("socket");
        sockaddr_un a{};
        a.sun_family = AF_UNIX;
        std::strncpy(a.sun_path, path_.c_str(), sizeof a.sun_path - 1);
        if (::bind(fd_, reinterpret_cast<const sockaddr*>(&a), sizeof a) != 0) {
            ::close(fd_);
            throw std::runtime_error("bind " + path_ + ": " + std::strerror(errno));
        }
    }
    BoundSocket(const BoundSocket&) = delete;
    BoundSocket& operator=(const BoundSocket&) = delete;
    ~BoundSocket() {
        ::close(fd_);
        ::unlink(path_.c_str());
    }
    // Sends a well-formed XSEV datagram to the socket at `to`.
    bool send_ev(const std::string& to, uint32_t op, uint32_t dom, uint32_t port) const {
        const uint32_t d[4] = {kMagic, op, dom, port};
        return send_bytes(to, d, sizeof d);
    }
    // Sends any datagram; false (errno says why) if the kernel refused it.
    bool send_bytes(const std::string& to, const void* data, size_t len) const {
        const sockaddr_un a = address(to);
        return ::sendto(fd_, data, len, MSG_DONTWAIT, reinterpret_cast<const sockaddr*>(&a), sizeof a) ==
               static_cast<ssize_t>(len);
    }
    // The next datagram queued on it, if any (it never waits: whatever was
    // sent to it before is there already).
    std::optional<std::vector<uint32_t>> recv_ev() const {
        std::vector<uint32_t> words(8);
        const auto n = ::recv(fd_, words.data(), words.size() * sizeof(uint32_t), MSG_DONTWAIT);
        if (n < 0) return std::nullopt;
        words.resize(static_cast<size_t>(n) / sizeof(uint32_t));
        return words;
    }
    // connect(): to the socket at `to`, or with an empty `to` away again.
    bool connect_to(const std::string& to) const {
        sockaddr_un a = address(to);
        if (to.empty()) a.sun_family = AF_UNSPEC;
        return ::connect(fd_, reinterpret_cast<const sockaddr*>(&a), sizeof a) == 0;
    }
    // Moves its socket file (the socket keeps the address it was bound to).
    void rename_to(std::string path) {
        if (::rename(path_.c_str(), path.c_str()) != 0) throw std::runtime_error("rename " + path_);
        path_ = std::move(path);
    }

private:
    static sockaddr_un address(const std::string& path) {
        sockaddr_un a{};
        a.sun_family = AF_UNIX;
        std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
        return a;
    }

    std::string path_;
    int fd_ = -1;
};

}  // namespace

// =================================================================== setup

TEST_CASE("a starting guest recreates its domain directory; the backend wipes nothing") {
    TempRoot root;
    // Leftovers of a previous incarnation of domain 5, and of others.
    fs::create_directories(root.dom(kGuest) + "/evtchn");
    write_file(root.dom(kGuest) + "/junk", "old");
    write_file(root.dom(kGuest) + "/mem", std::string(3 * 4096, 'x'));
    write_file(root.dom(kGuest) + "/gnttab", std::string(4096, '\xff'));
    write_file(root.dom(kGuest) + "/evtchn/3.remote", "0");
    fs::create_directories(root.dom(0) + "/evtchn");
    write_file(root.dom(0) + "/keep", "backend file");
    fs::create_directories(root.dom(9));
    write_file(root.dom(9) + "/mem", "other guest");

    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        G_REQUIRE(plat->self_domid() == kGuest);
        G_REQUIRE(plat->name() == "sim:" + dir);
        G_REQUIRE(plat->xenstored_path() == dir + "/xenstored.sock");
        c.send({1});
        c.recv();
    });
    guest.chan().recv();

    CHECK_FALSE(fs::exists(root.dom(kGuest) + "/junk"));
    CHECK_FALSE(fs::exists(root.dom(kGuest) + "/evtchn/3.remote"));
    CHECK(fs::is_directory(root.dom(kGuest) + "/evtchn"));
    CHECK(fs::file_size(root.dom(kGuest) + "/mem") == 0);
    REQUIRE(fs::file_size(root.dom(kGuest) + "/gnttab") == 32768 * 8);
    std::ifstream table(root.dom(kGuest) + "/gnttab", std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(table)), std::istreambuf_iterator<char>());
    CHECK(std::all_of(bytes.begin(), bytes.end(), [](char ch) { return ch == 0; }));

    auto backend = xp::open_sim_platform(root.dir, 0);
    CHECK(backend->self_domid() == 0);
    CHECK(fs::exists(root.dom(0) + "/keep"));
    CHECK(fs::exists(root.dom(9) + "/mem"));
    CHECK(fs::file_size(root.dom(kGuest) + "/gnttab") == 32768 * 8);

    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a second platform object of a domain in one process shares its state, no second boot") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat1 = xp::open_sim_platform(dir, kGuest);
        auto ch1 = plat1->open_event_channel();
        auto port1 = ch1->bind_unbound(0);
        auto sharer1 = plat1->open_grant_sharer();  // must outlive its SharedPages
        auto pages1 = sharer1->share(0, 1, true);
        G_REQUIRE(port1.ok());
        G_REQUIRE(pages1.ok());
        std::memcpy(pages1->bytes(), "one", 4);

        auto plat2 = xp::open_sim_platform(dir, kGuest);
        G_REQUIRE(::access((dir + "/dom5/evtchn/" + std::to_string(port1->port())).c_str(), F_OK) == 0);
        auto ch2 = plat2->open_event_channel();
        auto port2 = ch2->bind_unbound(0);
        auto sharer2 = plat2->open_grant_sharer();
        auto pages2 = sharer2->share(0, 1, true);
        G_REQUIRE(port2.ok());
        G_REQUIRE(pages2.ok());
        G_REQUIRE(port2->port() != port1->port());
        G_REQUIRE(pages2->refs()[0] != pages1->refs()[0]);
        std::memcpy(pages2->bytes(), "two", 4);
        c.send({pages1->refs()[0], pages2->refs()[0]});
        c.recv();
    });
    const auto refs = guest.chan().recv();
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    auto m1 = map1(*mapper, kGuest, refs.at(0), false);
    auto m2 = map1(*mapper, kGuest, refs.at(1), false);
    REQUIRE(m1.ok());
    REQUIRE(m2.ok());
    CHECK(std::strcmp(reinterpret_cast<const char*>(m1->bytes()), "one") == 0);
    CHECK(std::strcmp(reinterpret_cast<const char*>(m2->bytes()), "two") == 0);
    guest.chan().send({1});
    CHECK(guest.wait() == 0);
}

TEST_CASE("bad sim roots are refused with a clear message") {
    CHECK_THROWS_WITH_AS(xp::open_sim_platform("/nonexistent/xs-none", 0), doctest::Contains("mktemp"),
                         std::runtime_error);
    TempRoot root;
    CHECK_THROWS_AS(xp::open_sim_platform(root.dir, 32752), std::runtime_error);
    write_file(root.dir + "/file", "");
    CHECK_THROWS_WITH_AS(xp::open_sim_platform(root.dir + "/file", 0), doctest::Contains("not a directory"),
                         std::runtime_error);
    const std::string long_root = root.dir + "/" + std::string(90, 'l');
    fs::create_directories(long_root);
    CHECK_THROWS_WITH_AS(xp::open_sim_platform(long_root, 0), doctest::Contains("/dev/shm/xs-XXXXXX"),
                         std::runtime_error);
}

// ================================================================== grants

TEST_CASE("a granted page is shared both ways") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        auto pages = sharer->share(0, 1, true);
        G_REQUIRE(pages.ok());
        G_REQUIRE(pages->refs().size() == 1 && pages->refs()[0] >= 8);
        G_REQUIRE(read_u32(pages->bytes() + 200) == 0);  // zeroed
        std::memcpy(pages->bytes(), "from guest", 11);
        c.send({pages->refs()[0]});
        c.recv();  // the backend wrote
        G_REQUIRE(std::memcmp(pages->bytes() + 100, "from backend", 13) == 0);
        std::memcpy(pages->bytes(), "again guest", 12);
        c.send({1});
        c.recv();
    });
    const GrantRef ref = guest.chan().recv().at(0);

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    CHECK(mapper->live_mappings() == 0);
    auto m = map1(*mapper, kGuest, ref, true);
    REQUIRE(m.ok());
    CHECK(m->pages() == 1);
    CHECK(mapper->live_mappings() == 1);
    CHECK(std::memcmp(m->bytes(), "from guest", 11) == 0);
    std::memcpy(m->bytes() + 100, "from backend", 13);
    guest.chan().send({1});
    guest.chan().recv();
    CHECK(std::memcmp(m->bytes(), "again guest", 12) == 0);

    // A second mapping of the same ref sees the same page.
    auto m2 = map1(*mapper, kGuest, ref, false);
    REQUIRE(m2.ok());
    CHECK(mapper->live_mappings() == 2);
    CHECK(std::memcmp(m2->bytes() + 100, "from backend", 13) == 0);
    m2->reset();
    m->reset();
    CHECK(mapper->live_mappings() == 0);
    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}

TEST_CASE("several refs map contiguously, in the order given") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        // Interleave allocations so refs and frames do not simply line up.
        auto filler = sharer->share(0, 3, true);
        auto pages = sharer->share(0, 8, true);
        G_REQUIRE(filler.ok() && pages.ok());
        filler->reset();
        for (uint32_t i = 0; i < 8; ++i) {
            const uint32_t marker = 0xA000 + i;
            std::memcpy(pages->bytes() + i * xp::kPageSize + 8, &marker, 4);
        }
        c.send(pages->refs());
        c.recv();
    });
    const std::vector<uint32_t> refs = guest.chan().recv();
    REQUIRE(refs.size() == 8);

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    auto m = mapper->map(kGuest, refs, true);
    REQUIRE(m.ok());
    REQUIRE(m->pages() == 8);
    CHECK(m->size() == 8 * xp::kPageSize);
    for (uint32_t i = 0; i < 8; ++i) CHECK(read_u32(m->bytes() + i * xp::kPageSize + 8) == 0xA000 + i);

    // Each ref brings its own frame: reversed refs, reversed pages.
    std::vector<GrantRef> reversed(refs.rbegin(), refs.rend());
    auto r = mapper->map(kGuest, reversed, false);
    REQUIRE(r.ok());
    for (uint32_t i = 0; i < 8; ++i) CHECK(read_u32(r->bytes() + i * xp::kPageSize + 8) == 0xA000 + 7 - i);

    // Runs of consecutive refs and frames mixed with jumps (the mapper reads
    // and maps each run at once): every page still lands where it was asked.
    const size_t order[] = {0, 1, 5, 6, 7, 2, 3, 4, 4};
    std::vector<GrantRef> mixed;
    for (const size_t i : order) mixed.push_back(refs[i]);
    auto x = mapper->map(kGuest, mixed, false);
    REQUIRE(x.ok());
    for (size_t i = 0; i < mixed.size(); ++i) CHECK(read_u32(x->bytes() + i * xp::kPageSize + 8) == 0xA000 + order[i]);
    x->reset();

    // And the two ranges alias the same pages.
    const uint32_t poked = 0xBEEF;
    std::memcpy(m->bytes() + 2 * xp::kPageSize + 16, &poked, 4);
    CHECK(read_u32(r->bytes() + 5 * xp::kPageSize + 16) == poked);
    CHECK(mapper->live_mappings() == 2);
    guest.chan().send({1});
    CHECK(guest.wait() == 0);
}

TEST_CASE("only grants to us map: EPERM otherwise, and a grant's end refuses new maps") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        auto to7 = sharer->share(7, 1, true);
        auto to0 = sharer->share(0, 1, true);
        G_REQUIRE(to7.ok() && to0.ok());
        std::memcpy(to0->bytes(), "still here", 11);
        c.send({to7->refs()[0], to0->refs()[0]});
        c.recv();
        to0->reset();  // end the grant while the backend maps it
        c.send({1});
        c.recv();
    });
    const auto refs = guest.chan().recv();
    const GrantRef to7 = refs.at(0), to0 = refs.at(1);

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    CHECK(map1(*mapper, kGuest, to7, false).error() == EPERM);
    CHECK(map1(*mapper, kGuest, 100, false).error() == EPERM);  // never granted
    CHECK(map1(*mapper, kGuest, 0, false).error() == EPERM);    // reserved, never granted
    CHECK(mapper->live_mappings() == 0);

    // Domain 7 itself may map what was granted to it.
    {
        auto dom7 = xp::open_sim_platform(root.dir, 7);
        auto mapper7 = dom7->open_grant_mapper();
        auto m7 = map1(*mapper7, kGuest, to7, true);
        CHECK(m7.ok());
        CHECK(map1(*mapper7, kGuest, to0, true).error() == EPERM);
    }

    auto m = map1(*mapper, kGuest, to0, true);
    REQUIRE(m.ok());
    guest.chan().send({1});
    guest.chan().recv();  // the guest ended that grant
    CHECK(map1(*mapper, kGuest, to0, true).error() == EPERM);
    // Ending a grant does not revoke an existing mapping: it stays usable.
    // The guest also freed the page, and sim gives its memory back at once
    // (the frame is never used again), so it now reads as zeros.
    CHECK(read_u32(m->bytes()) == 0);
    std::memcpy(m->bytes(), "written late", 13);
    CHECK(std::memcmp(m->bytes(), "written late", 13) == 0);
    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}

TEST_CASE("EINVAL: refs outside the table, bad requests, unknown domains") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        auto p = sharer->share(0, 1, true);
        G_REQUIRE(p.ok());
        G_REQUIRE(sharer->share(0, 0, true).error() == EINVAL);
        c.send({p->refs()[0]});
        c.recv();
    });
    const GrantRef good = guest.chan().recv().at(0);

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    CHECK(map1(*mapper, kGuest, 32768, false).error() == EINVAL);
    CHECK(map1(*mapper, kGuest, 0xFFFFFFFF, false).error() == EINVAL);
    CHECK(mapper->map(kGuest, std::vector<GrantRef>{good, 40000}, false).error() == EINVAL);
    CHECK(mapper->map(kGuest, std::vector<GrantRef>{}, false).error() == EINVAL);
    CHECK(mapper->map(kGuest, std::vector<GrantRef>(xp::kMaxMapPages + 1, good), false).error() == EINVAL);
    CHECK(map1(*mapper, 6, good, false).error() == EINVAL);       // no such domain
    CHECK(map1(*mapper, 40000, good, false).error() == EINVAL);   // not a domain id
    CHECK(mapper->live_mappings() == 0);
    CHECK(map1(*mapper, kGuest, good, false).ok());
    guest.chan().send({1});
    CHECK(guest.wait() == 0);
}

TEST_CASE("hostile grant tables: frames beyond mem, garbage, a truncated table") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        auto p = sharer->share(0, 2, true);
        G_REQUIRE(p.ok());
        c.send(p->refs());
        c.recv();
        ::_exit(0);  // the table is wrecked now: skip the destructors that would write it
    });
    const auto refs = guest.chan().recv();
    const GrantRef ref = refs.at(0), ref2 = refs.at(1);

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    auto first = map1(*mapper, kGuest, ref, true);
    REQUIRE(first.ok());
    REQUIRE(fs::file_size(root.dom(kGuest) + "/mem") == 2 * xp::kPageSize);

    poke_entry(root, kGuest, ref, 1, 0, 0x00FFFFFF);
    CHECK(map1(*mapper, kGuest, ref, true).error() == EINVAL);
    poke_entry(root, kGuest, ref, 1, 0, 0xFFFFFFFF);
    CHECK(map1(*mapper, kGuest, ref, true).error() == EINVAL);
    poke_entry(root, kGuest, ref, 1, 0, 2);  // just past the end
    CHECK(map1(*mapper, kGuest, ref, true).error() == EINVAL);
    CHECK(mapper->map(kGuest, std::vector<GrantRef>{ref2, ref}, true).error() == EINVAL);
    poke_entry(root, kGuest, ref, 1, 0, 1);  // a frame that exists (ref2's)
    CHECK(map1(*mapper, kGuest, ref, true).ok());
    poke_entry(root, kGuest, ref, 2, 0, 0);  // GTF_transitive: not a plain grant
    CHECK(map1(*mapper, kGuest, ref, true).error() == EPERM);

    // Garbage everywhere.
    {
        const int fd = ::open((root.dom(kGuest) + "/gnttab").c_str(), O_WRONLY);
        REQUIRE(fd >= 0);
        std::vector<unsigned char> junk(32768 * 8);
        uint32_t x = 12345;
        for (auto& b : junk) b = static_cast<unsigned char>((x = x * 1103515245 + 12345) >> 16);
        REQUIRE(::pwrite(fd, junk.data(), junk.size(), 0) == static_cast<ssize_t>(junk.size()));
        ::close(fd);
    }
    for (GrantRef r = 0; r < 32768; r += 7) {
        auto m = map1(*mapper, kGuest, r, false);
        CHECK((m.ok() || m.error() == EPERM || m.error() == EINVAL));
    }

    // A table shrunk under us.
    REQUIRE(::truncate((root.dom(kGuest) + "/gnttab").c_str(), 16) == 0);
    CHECK(map1(*mapper, kGuest, ref, true).error() == EINVAL);
    REQUIRE(::truncate((root.dom(kGuest) + "/gnttab").c_str(), 0) == 0);
    CHECK(map1(*mapper, kGuest, 8, true).error() == EINVAL);
    // Files gone altogether.
    fs::remove(root.dom(kGuest) + "/mem");
    CHECK(map1(*mapper, kGuest, ref, true).error() == EINVAL);
    // mem replaced by a symlink to a file we could write.
    write_file(root.dir + "/victim", std::string(8192, 'v'));
    fs::create_symlink(root.dir + "/victim", root.dom(kGuest) + "/mem");
    poke_entry(root, kGuest, 8, 1, 0, 0);
    CHECK(map1(*mapper, kGuest, 8, true).error() == EINVAL);
    CHECK(mapper->live_mappings() == 1);  // only the first, good one
    guest.chan().send({1});
    CHECK(guest.wait() == 0);
}

TEST_CASE("read-only grants map read-only, never writable") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        auto p = sharer->share(0, 1, false);
        G_REQUIRE(p.ok());
        std::memcpy(p->bytes(), "read me", 8);
        c.send({p->refs()[0]});
        c.recv();
        std::memcpy(p->bytes(), "changed", 8);
        c.send({1});
        c.recv();
    });
    const GrantRef ref = guest.chan().recv().at(0);

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    CHECK(map1(*mapper, kGuest, ref, true).error() == EPERM);
    auto m = map1(*mapper, kGuest, ref, false);
    REQUIRE(m.ok());
    CHECK(std::memcmp(m->bytes(), "read me", 8) == 0);
    guest.chan().send({1});
    guest.chan().recv();
    CHECK(std::memcmp(m->bytes(), "changed", 8) == 0);
    CHECK(maps_lines_with(root.dom(kGuest) + "/mem") == 1);
    {
        // The mapping really is read-only.
        std::ifstream maps("/proc/self/maps");
        bool found = false;
        for (std::string line; std::getline(maps, line);) {
            if (line.find(root.dom(kGuest) + "/mem") != std::string::npos) found = line.find(" r--s ") != std::string::npos;
        }
        CHECK(found);
    }
    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a failed multi-ref map leaves nothing mapped") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        auto good = sharer->share(0, 4, true);
        auto other = sharer->share(7, 1, true);
        auto ro = sharer->share(0, 1, false);
        G_REQUIRE(good.ok() && other.ok() && ro.ok());
        std::vector<uint32_t> msg = good->refs();
        msg.push_back(other->refs()[0]);
        msg.push_back(ro->refs()[0]);
        c.send(msg);
        c.recv();
    });
    const auto refs = guest.chan().recv();
    REQUIRE(refs.size() == 6);
    const GrantRef r0 = refs[0], r1 = refs[1], r2 = refs[2], r3 = refs[3], to7 = refs[4], ro = refs[5];
    const std::string mem = root.dom(kGuest) + "/mem";

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    const size_t reservations_before = maps_prot_none_anon();
    CHECK(maps_lines_with(mem) == 0);

    CHECK(mapper->map(kGuest, std::vector<GrantRef>{r0, r1, r2, to7, r3}, true).error() == EPERM);
    CHECK(mapper->map(kGuest, std::vector<GrantRef>{r0, r1, ro, r2}, true).error() == EPERM);
    CHECK(mapper->map(kGuest, std::vector<GrantRef>{r0, r1, r2, 32768}, true).error() == EINVAL);
    poke_entry(root, kGuest, r3, 1, 0, 0x7FFFFF);
    CHECK(mapper->map(kGuest, std::vector<GrantRef>{r0, r1, r2, r3}, true).error() == EINVAL);
    CHECK(mapper->live_mappings() == 0);
    CHECK(maps_lines_with(mem) == 0);
    CHECK(maps_prot_none_anon() == reservations_before);

    // The probes do see a mapping when there is one.
    auto ok = mapper->map(kGuest, std::vector<GrantRef>{r0, r1, r2}, true);
    REQUIRE(ok.ok());
    CHECK(maps_lines_with(mem) >= 1);
    ok->reset();
    CHECK(maps_lines_with(mem) == 0);
    CHECK(mapper->live_mappings() == 0);
    guest.chan().send({1});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a guest shrinking its memory under a mapping does not crash the backend") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        auto p = sharer->share(0, 2, true);
        auto q = sharer->share(0, 1, false);
        G_REQUIRE(p.ok() && q.ok());
        std::memcpy(p->bytes() + xp::kPageSize, "second page", 12);
        std::memcpy(q->bytes(), "read only", 10);
        std::vector<uint32_t> msg = p->refs();
        msg.push_back(q->refs()[0]);
        c.send(msg);
        c.recv();
        // Hostile: take the memory away while it is mapped.
        G_REQUIRE(::ftruncate(::open((dir + "/dom5/mem").c_str(), O_RDWR), 0) == 0);
        c.send({1});
        c.recv();
        ::_exit(0);  // our own mappings of mem would fault too
    });
    const auto refs = guest.chan().recv();
    REQUIRE(refs.size() == 3);

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    auto m = mapper->map(kGuest, std::vector<GrantRef>{refs[0], refs[1]}, true);
    auto r = map1(*mapper, kGuest, refs[2], false);
    REQUIRE(m.ok());
    REQUIRE(r.ok());
    CHECK(std::memcmp(m->bytes() + xp::kPageSize, "second page", 12) == 0);
    guest.chan().send({1});
    guest.chan().recv();  // mem is empty now

    // Each access would be a SIGBUS; the guard turns the pages into zero pages.
    volatile const unsigned char* second = reinterpret_cast<volatile const unsigned char*>(m->bytes() + xp::kPageSize);
    CHECK(second[0] == 0);
    volatile const unsigned char* ro_page = reinterpret_cast<volatile const unsigned char*>(r->bytes());
    CHECK(ro_page[5] == 0);
    std::memcpy(m->bytes(), "backend still writes", 21);
    CHECK(std::memcmp(m->bytes(), "backend still writes", 21) == 0);
    // New maps of those frames are refused.
    CHECK(map1(*mapper, kGuest, refs[0], true).error() == EINVAL);
    m->reset();
    r->reset();
    CHECK(mapper->live_mappings() == 0);
    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}

TEST_CASE("the SIGBUS guard grows with the live mappings: a shrink under the 20000th does not crash") {
    TempRoot root;
    const std::string dir = root.dir;
    // Here the test process is the guest; the forked process maps.
    auto plat = xp::open_sim_platform(root.dir, kGuest);
    auto sharer = plat->open_grant_sharer();
    auto page = sharer->share(0, 1, true);
    REQUIRE(page.ok());
    const GrantRef ref = page->refs()[0];
    constexpr uint32_t kMappings = 20000;  // more than any fixed guard this had
    Process backend([dir, ref](Chan& c) {
        auto be = xp::open_sim_platform(dir, 0);
        auto mapper = be->open_grant_mapper();
        std::vector<xp::GrantMapping> held;
        held.reserve(kMappings);
        for (uint32_t i = 0; i < kMappings; ++i) {
            auto m = map1(*mapper, kGuest, ref, true);
            G_REQUIRE(m.ok());
            held.push_back(std::move(m.value()));
        }
        c.send({kMappings});
        c.recv();  // mem is empty now: every page would fault
        for (auto& m : held) G_REQUIRE(reinterpret_cast<volatile const unsigned char*>(m.bytes())[7] == 0);
        std::memcpy(held.back().bytes(), "still alive", 12);
        held.clear();
        G_REQUIRE(mapper->live_mappings() == 0);
        c.send({1});
    });
    REQUIRE(backend.chan().recv(60000).at(0) == kMappings);
    REQUIRE(::truncate((root.dom(kGuest) + "/mem").c_str(), 0) == 0);
    backend.chan().send({1});
    CHECK(backend.wait(60000) == 0);
}

TEST_CASE("a restarted guest's new files are used, old mappings keep the old pages") {
    TempRoot root;
    const std::string dir = root.dir;
    auto run_guest = [dir](const char* text) {
        return [dir, text](Chan& c) {
            auto plat = xp::open_sim_platform(dir, kGuest);
            auto sharer = plat->open_grant_sharer();
            auto p = sharer->share(0, 1, true);
            G_REQUIRE(p.ok());
            std::memcpy(p->bytes(), text, std::strlen(text) + 1);
            c.send({p->refs()[0]});
            c.recv();
        };
    };
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();

    Process first(run_guest("first boot"));
    const GrantRef ref1 = first.chan().recv().at(0);
    auto old = map1(*mapper, kGuest, ref1, true);
    REQUIRE(old.ok());
    CHECK(std::strcmp(reinterpret_cast<const char*>(old->bytes()), "first boot") == 0);
    first.chan().send({1});
    CHECK(first.wait() == 0);

    Process second(run_guest("second boot"));
    const GrantRef ref2 = second.chan().recv().at(0);
    CHECK(ref2 == ref1);  // same ref number, different domain incarnation
    auto fresh = map1(*mapper, kGuest, ref2, true);
    REQUIRE(fresh.ok());
    CHECK(std::strcmp(reinterpret_cast<const char*>(fresh->bytes()), "second boot") == 0);
    // The old mapping still works and shows nothing of the new incarnation
    // (its page was freed when the first guest ended: zeros).
    CHECK(std::strcmp(reinterpret_cast<const char*>(old->bytes()), "second boot") != 0);
    CHECK(read_u32(old->bytes()) == 0);
    second.chan().send({1});
    CHECK(second.wait() == 0);
}

TEST_CASE("the sharer reuses freed refs, never frames, returns their memory, and reports ENOSPC when refs run out") {
    TempRoot root;
    struct statvfs vfs {};
    // Every ref granted is 128 MiB of /dev/shm.
    if (::statvfs(root.dir.c_str(), &vfs) != 0 || vfs.f_bavail * vfs.f_frsize < (256u << 20)) {
        MESSAGE("skipped: less than 256 MiB free in /dev/shm");
        return;
    }
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        std::vector<xp::SharedPages> held;
        // 32768 - 8 refs: 31 x 1024 + 1 x 1016 pages.
        for (int i = 0; i < 31; ++i) {
            auto p = sharer->share(0, 1024, true);
            G_REQUIRE(p.ok());
            held.push_back(std::move(p.value()));
        }
        G_REQUIRE(sharer->share(0, 1017, true).error() == ENOSPC);
        auto last = sharer->share(0, 1016, true);
        G_REQUIRE(last.ok());
        G_REQUIRE(sharer->share(0, 1, true).error() == ENOSPC);
        struct stat st {};
        G_REQUIRE(::stat((dir + "/dom5/mem").c_str(), &st) == 0);
        const off_t full = st.st_size;
        G_REQUIRE(full == off_t{32760} * 4096);
        // Dirty every page: none of it may show up again.
        for (auto& h : held) std::memset(h.bytes(), 0xAB, h.size());
        std::memset(last->bytes(), 0xAB, last->size());
        G_REQUIRE(::stat((dir + "/dom5/mem").c_str(), &st) == 0 && st.st_blocks * 512 >= full);
        held.clear();
        last->reset();
        // The memory went back to the system (holes), though the size stays.
        G_REQUIRE(::stat((dir + "/dom5/mem").c_str(), &st) == 0 && st.st_size == full);
        G_REQUIRE(st.st_blocks * 512 < (1 << 20));
        auto again = sharer->share(0, 1024, true);
        G_REQUIRE(again.ok());
        for (size_t i = 0; i < 1024; ++i) G_REQUIRE(read_u32(again->bytes() + 4096 * i + 4092) == 0);
        // Fresh frames past the old ones: the table names frames >= 32760.
        G_REQUIRE(::stat((dir + "/dom5/mem").c_str(), &st) == 0 && st.st_size == full + off_t{1024} * 4096);
        c.send({again->refs()[0], again->refs()[1023]});
        c.recv();
    });
    const auto refs = guest.chan().recv();
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    CHECK(mapper->map(kGuest, std::vector<GrantRef>{refs.at(0), refs.at(1)}, true).ok());
    guest.chan().send({1});
    CHECK(guest.wait(30000) == 0);
}

TEST_CASE("a backend still mapping an ended grant never sees, nor touches, what is granted next") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();
        auto first = sharer->share(0, 2, true);
        G_REQUIRE(first.ok());
        std::memcpy(first->bytes(), "first grant", 12);
        c.send({first->refs()[0], first->refs()[1]});
        c.recv();  // mapped
        first->reset();
        // The next grants, to the backend and to another domain, take the
        // same refs but must not take the same pages.
        auto next = sharer->share(0, 1, true);
        auto other = sharer->share(6, 1, true);
        G_REQUIRE(next.ok() && other.ok());
        std::memcpy(next->bytes(), "secret for the next grant", 26);
        std::memcpy(other->bytes(), "secret for domain 6", 20);
        c.send({next->refs()[0]});
        c.recv();  // the backend wrote through its stale mapping
        G_REQUIRE(std::memcmp(next->bytes(), "secret for the next grant", 26) == 0);
        G_REQUIRE(std::memcmp(other->bytes(), "secret for domain 6", 20) == 0);
        c.send({1});
        c.recv();
    });
    const auto refs = guest.chan().recv();
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto mapper = backend->open_grant_mapper();
    auto stale = mapper->map(kGuest, std::vector<GrantRef>{refs.at(0), refs.at(1)}, true);
    REQUIRE(stale.ok());
    CHECK(std::memcmp(stale->bytes(), "first grant", 12) == 0);
    guest.chan().send({1});
    const GrantRef next_ref = guest.chan().recv().at(0);
    CHECK((next_ref == refs.at(0) || next_ref == refs.at(1)));  // refs are reused: pages must not be
    const std::string seen(reinterpret_cast<const char*>(stale->bytes()), stale->size());
    CHECK(seen.find("secret") == std::string::npos);
    std::memset(stale->bytes(), 'S', stale->size());
    auto next = map1(*mapper, kGuest, next_ref, false);
    REQUIRE(next.ok());
    CHECK(std::memcmp(next->bytes(), "secret for the next grant", 26) == 0);
    guest.chan().send({1});
    guest.chan().recv();
    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}

TEST_CASE("when the memory file cannot grow, the sharer goes round to frames no grant uses") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto sharer = plat->open_grant_sharer();  // sets up the 256 KiB grant table
        // From now on, no file of ours may grow past 16 frames.
        ::signal(SIGXFSZ, SIG_IGN);
        const rlimit limit{16 * 4096, 16 * 4096};
        G_REQUIRE(::setrlimit(RLIMIT_FSIZE, &limit) == 0);
        const int table = ::open((dir + "/dom5/gnttab").c_str(), O_RDONLY);
        G_REQUIRE(table >= 0);
        auto frame_of = [&](GrantRef r) {
            uint32_t frame = 0;
            G_REQUIRE(::pread(table, &frame, 4, static_cast<off_t>(r) * 8 + 4) == 4);
            return frame;
        };
        auto held = sharer->share(0, 3, true);  // frames 0..2, kept throughout
        G_REQUIRE(held.ok());
        std::memset(held->bytes(), 'H', held->size());
        std::vector<uint32_t> seen;
        for (int i = 0; i < 40; ++i) {
            auto p = sharer->share(0, 2, true);
            G_REQUIRE(p.ok());
            for (size_t k = 0; k < 2; ++k) {
                const uint32_t f = frame_of(p->refs()[k]);
                G_REQUIRE(f >= 3 && f < 16);  // never a live frame, never past the limit
                G_REQUIRE(read_u32(p->bytes() + k * 4096 + 100) == 0);  // emptied before reuse
                seen.push_back(f);
            }
            std::memset(p->bytes(), 'x', p->size());
        }
        // In increasing order up to the limit (the pair 15+16 does not fit),
        // then round again to the lowest frames not held.
        for (uint32_t k = 0; k < 12; ++k) G_REQUIRE(seen[k] == 3 + k);
        G_REQUIRE(seen[12] == 3 && seen[13] == 4);
        for (size_t k = 0; k < held->size(); ++k) G_REQUIRE(held->bytes()[k] == std::byte{'H'});
        struct stat st {};
        G_REQUIRE(::stat((dir + "/dom5/mem").c_str(), &st) == 0 && st.st_size <= 16 * 4096);
        ::close(table);
        c.send({1});
    });
    CHECK(guest.chan().recv().at(0) == 1);
    CHECK(guest.wait() == 0);
}

// =========================================================== event channels

TEST_CASE("notify both ways, including a guest that notifies before draining the BIND") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        auto port = ch->bind_unbound(0);
        G_REQUIRE(port.ok());
        G_REQUIRE(ch->bound_ports() == 1);
        c.send({port->port()});
        c.recv();  // bound: the BIND is queued on our socket, not yet seen by pending()
        G_REQUIRE(port->notify().ok());
        G_REQUIRE(pending_of(*ch).empty());  // a BIND is not an event
        G_REQUIRE(!readable(ch->fd(), 0));
        c.send({1});
        const auto fired = wait_pending(*ch);
        G_REQUIRE(fired == std::vector<Port>{port->port()});
        G_REQUIRE(pending_of(*ch).empty());
        c.send({2});
        c.recv();
    });
    const Port guest_port = guest.chan().recv().at(0);
    CHECK(fs::exists(root.port(kGuest, guest_port)));
    std::ifstream remote(root.port(kGuest, guest_port) + ".remote");
    std::string offered;
    remote >> offered;
    CHECK(offered == "0");

    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, guest_port);
    REQUIRE(bound.ok());
    CHECK(ch->bound_ports() == 1);
    CHECK(fs::exists(root.port(0, bound->port())));
    guest.chan().send({1});
    guest.chan().recv();  // the guest notified

    REQUIRE(readable(ch->fd(), kWaitMs));
    CHECK(pending_of(*ch) == std::vector<Port>{bound->port()});
    CHECK(pending_of(*ch).empty());
    CHECK_FALSE(readable(ch->fd(), 0));

    CHECK(bound->notify().ok());
    guest.chan().recv();  // the guest saw it
    guest.chan().send({3});
    CHECK(guest.wait() == 0);
}

TEST_CASE("notifies coalesce into one event, and never fail") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        auto port = ch->bind_unbound(0);
        G_REQUIRE(port.ok());
        c.send({port->port()});
        c.recv();
        for (int i = 0; i < 1000; ++i) G_REQUIRE(port->notify().ok());
        c.send({1});
        c.recv();  // the backend notified 1000 times
        G_REQUIRE(wait_pending(*ch) == std::vector<Port>{port->port()});
        G_REQUIRE(pending_of(*ch).empty());
        G_REQUIRE(!readable(ch->fd(), 0));
        c.send({2});
        c.recv();
    });
    const Port guest_port = guest.chan().recv().at(0);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, guest_port);
    REQUIRE(bound.ok());
    guest.chan().send({1});
    guest.chan().recv();

    // Our port is connected to the guest's socket, so the kernel queues the
    // guest's datagrams up to its send buffer, not net.unix.max_dgram_qlen:
    // a few hundred, drained 256 per pending() call, so one event per 256
    // (each meaning "look again"), and then nothing.
    size_t events = 0;
    for (int calls = 0; calls < 100 && readable(ch->fd(), events == 0 ? kWaitMs : 0); ++calls) {
        const auto fired = pending_of(*ch);
        CHECK((fired.empty() || fired == std::vector<Port>{bound->port()}));
        events += fired.size();
    }
    CHECK(events >= 1);
    CHECK(events <= 1000 / 256 + 1);
    CHECK(pending_of(*ch).empty());
    CHECK_FALSE(readable(ch->fd(), 0));

    for (int i = 0; i < 1000; ++i) REQUIRE(bound->notify().ok());
    guest.chan().send({1});
    guest.chan().recv();
    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a notify before the backend binds is dropped, not delivered later") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        auto port = ch->bind_unbound(0);
        G_REQUIRE(port.ok());
        G_REQUIRE(port->notify().ok());  // nobody bound yet
        G_REQUIRE(pending_of(*ch).empty());
        c.send({port->port()});
        c.recv();  // now bound
        G_REQUIRE(pending_of(*ch).empty());
        c.send({1});
        c.recv();
        G_REQUIRE(port->notify().ok());  // a real one, to show the channel works
        c.send({2});
        c.recv();
    });
    const Port guest_port = guest.chan().recv().at(0);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, guest_port);
    REQUIRE(bound.ok());
    guest.chan().send({1});
    guest.chan().recv();
    // The early notify went nowhere: no queue could be holding it.
    CHECK_FALSE(readable(ch->fd(), 0));
    CHECK(pending_of(*ch).empty());
    guest.chan().send({1});
    guest.chan().recv();
    CHECK(wait_pending(*ch) == std::vector<Port>{bound->port()});
    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}

TEST_CASE("CLOSE: the guest notices the backend unbinding; later notifies are dropped; a new BIND revives") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        auto port = ch->bind_unbound(0);
        G_REQUIRE(port.ok());
        c.send({port->port()});
        c.recv();  // bound and notified
        G_REQUIRE(wait_pending(*ch) == std::vector<Port>{port->port()});
        c.send({1});
        c.recv();  // the backend unbound
        G_REQUIRE(wait_pending(*ch) == std::vector<Port>{port->port()});  // the CLOSE
        G_REQUIRE(port->notify().ok());                                   // dropped
        G_REQUIRE(pending_of(*ch).empty());
        c.send({2});
        c.recv();  // a restarted backend bound again
        G_REQUIRE(port->notify().ok());  // learns the new peer, delivers
        c.send({3});
        c.recv();
        port->reset();  // the guest unbinds: socket and offer disappear
        G_REQUIRE(ch->bound_ports() == 0);
        c.send({4});
        c.recv();
    });
    const Port guest_port = guest.chan().recv().at(0);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, guest_port);
    REQUIRE(bound.ok());
    const Port q = bound->port();
    REQUIRE(bound->notify().ok());
    guest.chan().send({1});
    guest.chan().recv();

    bound->reset();
    CHECK(ch->bound_ports() == 0);
    CHECK_FALSE(fs::exists(root.port(0, q)));
    guest.chan().send({1});
    guest.chan().recv();
    CHECK(pending_of(*ch).empty());

    auto ch2 = backend->open_event_channel();  // "restarted"
    auto again = bind_now(*ch2, kGuest, guest_port);
    REQUIRE(again.ok());
    guest.chan().send({2});
    guest.chan().recv();
    CHECK(wait_pending(*ch2) == std::vector<Port>{again->port()});

    guest.chan().send({3});
    guest.chan().recv();
    CHECK_FALSE(fs::exists(root.port(kGuest, guest_port)));
    CHECK_FALSE(fs::exists(root.port(kGuest, guest_port) + ".remote"));
    // Unbinding sent CLOSE to us: the port fires and notifies are dropped.
    CHECK(wait_pending(*ch2) == std::vector<Port>{again->port()});
    CHECK(again->notify().ok());
    guest.chan().send({4});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a backend killed without CLOSE: the guest's notify still succeeds and fires the port") {
    TempRoot root;
    const std::string dir = root.dir;
    // Here the forked process is the backend, the test process the guest.
    auto plat = xp::open_sim_platform(root.dir, kGuest);
    auto ch = plat->open_event_channel();
    auto port = ch->bind_unbound(0);
    REQUIRE(port.ok());
    const Port p = port->port();
    Process backend([dir, p](Chan& c) {
        auto be = xp::open_sim_platform(dir, 0);
        auto bch = be->open_event_channel();
        auto bound = bind_now(*bch, kGuest, p);
        G_REQUIRE(bound.ok());
        c.send({bound->port()});
        c.recv();  // never comes: killed
    });
    const Port q = backend.chan().recv().at(0);
    backend.kill_now();
    CHECK(fs::exists(root.port(0, q)));  // left behind, nobody bound

    CHECK(port->notify().ok());  // learns the peer, finds it dead
    CHECK(wait_pending(*ch) == std::vector<Port>{p});
    CHECK(port->notify().ok());
    CHECK(pending_of(*ch).empty());

    // A new backend reclaims the stale socket path and binds.
    Process backend2([dir, p](Chan& c) {
        auto be = xp::open_sim_platform(dir, 0);
        auto bch = be->open_event_channel();
        auto bound = bind_now(*bch, kGuest, p);
        G_REQUIRE(bound.ok());
        c.send({bound->port()});
        G_REQUIRE(wait_pending(*bch) == std::vector<Port>{bound->port()});
        c.send({1});
        c.recv();
    });
    CHECK(backend2.chan().recv().at(0) == q);
    CHECK(port->notify().ok());
    backend2.chan().recv();
    backend2.chan().send({1});
    CHECK(backend2.wait() == 0);
}

TEST_CASE("bind_interdomain is refused unless .remote names us") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        std::vector<xp::BoundPort> ports;
        for (int i = 0; i < 7; ++i) {
            auto p = ch->bind_unbound(i == 0 ? 7 : 0);
            G_REQUIRE(p.ok());
            ports.push_back(std::move(p.value()));
        }
        const std::string base = dir + "/dom5/evtchn/";
        auto set_remote = [&](size_t i, const std::string& text) {
            std::ofstream(base + std::to_string(ports[i].port()) + ".remote", std::ios::trunc) << text;
        };
        set_remote(1, "abc");
        set_remote(2, "");
        set_remote(3, "0 ");
        set_remote(4, "99999999999999999999");
        // 5: a symlink to a file that says 0
        const std::string r5 = base + std::to_string(ports[5].port()) + ".remote";
        std::ofstream(dir + "/says0") << "0";
        ::unlink(r5.c_str());
        G_REQUIRE(::symlink((dir + "/says0").c_str(), r5.c_str()) == 0);
        set_remote(6, "0\n");  // fine
        std::vector<uint32_t> msg;
        for (auto& p : ports) msg.push_back(p.port());
        c.send(msg);
        c.recv();
    });
    const auto ports = guest.chan().recv();
    REQUIRE(ports.size() == 7);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    for (size_t i = 0; i < 6; ++i) {
        CAPTURE(i);
        CHECK(bind_now(*ch, kGuest, ports[i]).error() == EINVAL);
    }
    CHECK(bind_now(*ch, kGuest, 999).error() == EINVAL);  // no such port
    CHECK(bind_now(*ch, kGuest, 0).error() == EINVAL);
    CHECK(bind_now(*ch, 40000, 1).error() == EINVAL);
    CHECK(bind_now(*ch, 6, 1).error() == EINVAL);  // no such domain
    CHECK(ch->bound_ports() == 0);
    CHECK(bind_now(*ch, kGuest, ports[6]).ok());
    guest.chan().send({1});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a guest cannot steer a BIND to another guest's port through links") {
    TempRoot root;
    const std::string dir = root.dir;
    // One process plays both the victim (domain 6) and the attacker (domain 5).
    Process guests([dir](Chan& c) {
        auto victim = xp::open_sim_platform(dir, 6);
        auto vch = victim->open_event_channel();
        auto vport = vch->bind_unbound(0);
        G_REQUIRE(vport.ok());
        const std::string p = std::to_string(vport->port());
        auto attacker = xp::open_sim_platform(dir, kGuest);
        const std::string ev5 = dir + "/dom5/evtchn";
        // 1: dom5/evtchn is a symlink to dom6/evtchn.
        G_REQUIRE(::rmdir(ev5.c_str()) == 0);
        G_REQUIRE(::symlink((dir + "/dom6/evtchn").c_str(), ev5.c_str()) == 0);
        c.send({vport->port()});
        c.recv();
        // 2: a hard link to the victim's socket, offered to domain 0.
        G_REQUIRE(::unlink(ev5.c_str()) == 0);
        G_REQUIRE(::mkdir(ev5.c_str(), 0777) == 0);
        G_REQUIRE(::link((dir + "/dom6/evtchn/" + p).c_str(), (ev5 + "/" + p).c_str()) == 0);
        std::ofstream(ev5 + "/" + p + ".remote") << "0";
        c.send({1});
        c.recv();
        // 3: a symlink for the socket alone.
        G_REQUIRE(::unlink((ev5 + "/" + p).c_str()) == 0);
        G_REQUIRE(::symlink((dir + "/dom6/evtchn/" + p).c_str(), (ev5 + "/" + p).c_str()) == 0);
        c.send({2});
        c.recv();
        G_REQUIRE(vport->notify().ok());  // the victim's own binding is intact
        c.send({3});
        c.recv();
    });
    const Port p = guests.chan().recv().at(0);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    CHECK(bind_now(*ch, kGuest, p).error() == EINVAL);
    guests.chan().send({0});
    guests.chan().recv();
    CHECK(bind_now(*ch, kGuest, p).error() == EINVAL);
    guests.chan().send({0});
    guests.chan().recv();
    CHECK(bind_now(*ch, kGuest, p).error() == EINVAL);
    CHECK(ch->bound_ports() == 0);
    auto legit = bind_now(*ch, 6, p);
    REQUIRE(legit.ok());
    guests.chan().send({0});
    guests.chan().recv();
    CHECK(wait_pending(*ch) == std::vector<Port>{legit->port()});
    guests.chan().send({0});
    CHECK(guests.wait() == 0);
}

TEST_CASE("garbage datagrams are ignored and do not break the port") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        auto port = ch->bind_unbound(0);
        G_REQUIRE(port.ok());
        const Port p = port->port();
        c.send({p});
        const Port q = c.recv().at(0);
        G_REQUIRE(pending_of(*ch).empty());  // takes the BIND
        const std::string be = dir + "/dom0/evtchn/" + std::to_string(q);

        // The backend's port is connected to ours: the kernel turns away
        // everybody else's datagrams. (The garbage our own port socket
        // could send it is the next test's.)
        const std::string big(4096, 'g');
        G_REQUIRE(!send_raw(be, "", 0) && errno == EPERM);
        G_REQUIRE(!send_raw(be, big.data(), big.size()) && errno == EPERM);
        G_REQUIRE(!send_ev(be, kMagic, kNotify, kGuest, p) && errno == EPERM);
        G_REQUIRE(!send_ev(be, kMagic, kClose, kGuest, p) && errno == EPERM);
        c.send({1});
        c.recv();
        G_REQUIRE(port->notify().ok());  // the real thing still works
        c.send({3});
        c.recv();  // the backend got it, and forged junk at us
        G_REQUIRE(readable(ch->fd(), kWaitMs));
        G_REQUIRE(pending_of(*ch).empty());  // forged BIND from 7, forged NOTIFY, junk
        G_REQUIRE(port->notify().ok());      // still reaches the real backend
        c.send({4});
        c.recv();  // the backend notified for real
        G_REQUIRE(wait_pending(*ch) == std::vector<Port>{p});
        c.send({5});
        c.recv();
    });
    const Port p = guest.chan().recv().at(0);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, p);
    REQUIRE(bound.ok());
    const Port q = bound->port();
    guest.chan().send({q});

    guest.chan().recv();
    CHECK_FALSE(readable(ch->fd(), 0));  // nothing arrived
    CHECK(pending_of(*ch).empty());
    guest.chan().send({0});
    guest.chan().recv();
    CHECK(wait_pending(*ch) == std::vector<Port>{q});

    const std::string gp = root.port(kGuest, p);
    CHECK(send_ev(gp, kMagic, kBind, 7, 99));         // forged BIND from a domain not offered
    CHECK(send_ev(gp, kMagic, kNotify, 0, q + 5));    // NOTIFY not from the peer
    CHECK(send_raw(gp, "junk", 4));
    guest.chan().send({0});
    guest.chan().recv();
    CHECK(wait_pending(*ch) == std::vector<Port>{q});
    CHECK(bound->notify().ok());
    guest.chan().send({0});
    guest.chan().recv();
    guest.chan().send({0});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a datagram counts only when sent from the socket of the end it names") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        auto port = ch->bind_unbound(0);
        auto decoy = ch->bind_unbound(0);
        G_REQUIRE(port.ok());
        G_REQUIRE(decoy.ok());
        c.send({port->port(), decoy->port()});
        c.recv();                             // both bound; forged datagrams sent to `port`
        G_REQUIRE(pending_of(*ch).empty());   // takes both BINDs, ignores the forgeries
        G_REQUIRE(port->notify().ok());       // must reach the real backend port
        c.send({1});
        c.recv();  // the backend forged at its own end, then notified for real
        G_REQUIRE(wait_pending(*ch) == std::vector<Port>{port->port()});
        c.send({2});
        c.recv();
    });
    const auto ports = guest.chan().recv();
    const Port p = ports.at(0), p2 = ports.at(1);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, p);
    auto other = bind_now(*ch, kGuest, p2);  // a real dom0 socket to redirect the guest to
    REQUIRE(bound.ok());
    REQUIRE(other.ok());
    const Port q = bound->port(), q2 = other->port();

    // At the guest's port: BINDs that would move its peer to our other port,
    // from an unnamed socket and from sockets bound elsewhere, and a CLOSE.
    const std::string gp = root.port(kGuest, p);
    CHECK(send_ev(gp, kMagic, kBind, 0, q2));
    CHECK(send_ev(gp, kMagic, kClose, 0, q));
    {
        BoundSocket elsewhere(root.dir + "/elsewhere");
        BoundSocket wrong_port(root.port(0, 4000));  // dom0's directory, but not port q2
        CHECK(elsewhere.send_ev(gp, kBind, 0, q2));
        CHECK(wrong_port.send_ev(gp, kBind, 0, q2));
        CHECK(wrong_port.send_ev(gp, kClose, 0, q));
    }
    guest.chan().send({1});
    guest.chan().recv();
    CHECK(wait_pending(*ch) == std::vector<Port>{q});  // its peer is still q

    // At our port: NOTIFY and CLOSE claiming to be the guest's port p. Our
    // port is connected to p's socket, so the kernel refuses them all.
    const std::string bp = root.port(0, q);
    auto refused = [](bool sent) { return !sent && errno == EPERM; };
    CHECK(refused(send_ev(bp, kMagic, kNotify, kGuest, p)));
    CHECK(refused(send_ev(bp, kMagic, kClose, kGuest, p)));
    {
        BoundSocket elsewhere(root.dom(kGuest) + "/not-a-port");
        BoundSocket wrong_port(root.port(kGuest, 4000));
        CHECK(refused(elsewhere.send_ev(bp, kNotify, kGuest, p)));
        CHECK(refused(elsewhere.send_ev(bp, kClose, kGuest, p)));
        CHECK(refused(wrong_port.send_ev(bp, kNotify, kGuest, p)));
        CHECK(refused(wrong_port.send_ev(bp, kClose, kGuest, p)));
    }
    CHECK_FALSE(readable(ch->fd(), 0));
    CHECK(pending_of(*ch).empty());     // no event from any of them
    CHECK(bound->notify().ok());        // and the peer is not marked gone
    guest.chan().send({2});
    guest.chan().recv();
    guest.chan().send({3});
    CHECK(guest.wait() == 0);
}

// ====================================== backend ports: connected to their peer

namespace {

using Words = std::vector<uint32_t>;

// A hand-made guest end, as a hostile guest can make one: a socket at
// DIR/dom5/evtchn/<p> offered to domain 0.
std::unique_ptr<BoundSocket> offered_socket(const TempRoot& root, Port p) {
    fs::create_directories(root.dom(kGuest) + "/evtchn");
    auto s = std::make_unique<BoundSocket>(root.port(kGuest, p));
    write_file(root.port(kGuest, p) + ".remote", "0");
    return s;
}

// Our open descriptors, and how many of them are open by a name under `dir`
// (an O_PATH pin, say; sockets read "socket:[inode]").
size_t open_fds() {
    size_t n = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator("/proc/self/fd")) ++n;
    return n - 1;  // the iterator's own
}
size_t fds_naming(const std::string& dir) {
    size_t n = 0;
    for (const auto& e : fs::directory_iterator("/proc/self/fd")) {
        std::error_code ec;
        const fs::path target = fs::read_symlink(e.path(), ec);
        if (!ec && target.string().rfind(dir + "/", 0) == 0) ++n;
    }
    return n;
}

}  // namespace

TEST_CASE("a backend port is connected to its peer: nobody else reaches it, and the peer's garbage is ignored") {
    TempRoot root;
    auto peer = offered_socket(root, 1);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, 1);
    REQUIRE(bound.ok());
    const Port q = bound->port();
    const std::string bp = root.port(0, q);
    CHECK(peer->recv_ev() == Words{kMagic, kBind, 0, q});

    // Anybody else is turned away by the kernel.
    auto refused = [](bool sent) { return !sent && errno == EPERM; };
    CHECK(refused(send_ev(bp, kMagic, kNotify, kGuest, 1)));
    {
        BoundSocket other_port(root.port(kGuest, 2));
        CHECK(refused(other_port.send_ev(bp, kNotify, kGuest, 1)));
        CHECK(refused(other_port.send_ev(bp, kClose, kGuest, 1)));
    }
    CHECK_FALSE(readable(ch->fd(), 0));

    // The peer's own garbage (two batches, each below net.unix.max_dgram_qlen
    // whichever limit applies): drained, ignored, no event.
    const std::string big(4096, 'g');
    const uint32_t bad_magic[4] = {0x12345678, kNotify, kGuest, 1};
    CHECK(peer->send_bytes(bp, "", 0));
    CHECK(peer->send_bytes(bp, big.data(), 15));
    CHECK(peer->send_bytes(bp, big.data(), 17));
    CHECK(peer->send_bytes(bp, big.data(), big.size()));
    CHECK(peer->send_bytes(bp, bad_magic, sizeof bad_magic));
    CHECK(peer->send_ev(bp, 0, kGuest, 1));   // op 0
    CHECK(peer->send_ev(bp, 99, kGuest, 1));  // unknown op
    REQUIRE(readable(ch->fd(), kWaitMs));
    CHECK(pending_of(*ch).empty());
    CHECK_FALSE(readable(ch->fd(), 0));
    CHECK(peer->send_ev(bp, kNotify, kGuest, 2));  // names another port
    CHECK(peer->send_ev(bp, kNotify, 6, 1));       // names another domain
    CHECK(peer->send_ev(bp, kBind, kGuest, 1));    // a backend port takes no BIND
    CHECK(peer->send_ev(bp, kClose, kGuest, 2));
    CHECK(peer->send_ev(bp, kClose, 6, 1));
    REQUIRE(readable(ch->fd(), kWaitMs));
    CHECK(pending_of(*ch).empty());
    CHECK_FALSE(readable(ch->fd(), 0));

    // The real thing, both ways.
    CHECK(peer->send_ev(bp, kNotify, kGuest, 1));
    CHECK(wait_pending(*ch) == std::vector<Port>{q});
    CHECK(bound->notify().ok());
    CHECK(peer->recv_ev() == Words{kMagic, kNotify, 0, q});

    // Our own sender check stays: a socket bound under another name and then
    // renamed into place is the peer to the kernel, but its datagrams do not
    // come from the socket of the end they name.
    BoundSocket renamed(root.dom(kGuest) + "/evtchn/elsewhere");
    renamed.rename_to(root.port(kGuest, 3));
    write_file(root.port(kGuest, 3) + ".remote", "0");
    auto third = bind_now(*ch, kGuest, 3);
    REQUIRE(third.ok());
    CHECK(renamed.recv_ev() == Words{kMagic, kBind, 0, third->port()});
    CHECK(renamed.send_ev(root.port(0, third->port()), kNotify, kGuest, 3));
    REQUIRE(readable(ch->fd(), kWaitMs));
    CHECK(pending_of(*ch).empty());

    // A CLOSE from the peer: the port fires, later notifies are dropped, and
    // unbinding owes it no CLOSE.
    CHECK(peer->send_ev(bp, kClose, kGuest, 1));
    CHECK(wait_pending(*ch) == std::vector<Port>{q});
    CHECK(bound->notify().ok());
    bound->reset();
    CHECK_FALSE(peer->recv_ev().has_value());
}

TEST_CASE("a backend port costs one descriptor: binding N ports adds exactly N, unbinding returns them") {
    TempRoot root;
    constexpr Port kPorts = 100;
    std::vector<std::unique_ptr<BoundSocket>> guest;
    for (Port p = 1; p <= kPorts; ++p) guest.push_back(offered_socket(root, p));
    auto backend = xp::open_sim_platform(root.dir, 0);
    rt::Reactor reactor;

    const size_t before = open_fds();
    auto ch = backend->open_event_channel();
    const size_t fixed = open_fds() - before;
    CHECK(fixed == 3);  // its epoll set, the wake eventfd, the CLOSE retry timer
    std::vector<xp::BoundPort> ports;
    for (Port p = 1; p <= kPorts; ++p) {
        auto bound = reactor.run_until(ch->bind_interdomain(reactor, kGuest, p));
        REQUIRE(bound.ok());
        ports.push_back(std::move(bound.value()));
    }
    CHECK(open_fds() == before + fixed + kPorts);
    CHECK(fds_naming(root.dir) == 0);  // no pin of the guest's sockets, nor of anything else there

    // And each works both ways.
    for (Port i = 0; i < kPorts; ++i) {
        CAPTURE(i);
        const Port q = ports[i].port();
        CHECK(guest[i]->recv_ev() == Words{kMagic, kBind, 0, q});
        CHECK(ports[i].notify().ok());
        CHECK(guest[i]->recv_ev() == Words{kMagic, kNotify, 0, q});
        CHECK(guest[i]->send_ev(root.port(0, q), kNotify, kGuest, i + 1));
        CHECK(wait_pending(*ch) == std::vector<Port>{q});
    }
    CHECK(open_fds() == before + fixed + kPorts);

    ports.clear();
    CHECK(open_fds() == before + fixed);
    ch.reset();
    CHECK(open_fds() == before);
}

TEST_CASE("a guest socket that dies, then is made again at its path: peer gone, the newcomer gets nothing") {
    TempRoot root;
    auto first = offered_socket(root, 1);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, 1);
    REQUIRE(bound.ok());
    const Port q = bound->port();
    const std::string bp = root.port(0, q);
    CHECK(first->recv_ev() == Words{kMagic, kBind, 0, q});

    first.reset();  // the guest's socket closes (a restarted frontend)...
    auto newcomer = offered_socket(root, 1);  // ...and its successor binds the same path
    // Not the socket our port is connected to: the kernel turns it away.
    const bool sent = newcomer->send_ev(bp, kNotify, kGuest, 1);
    const int why = errno;
    CHECK_FALSE(sent);
    CHECK(why == EPERM);
    CHECK_FALSE(readable(ch->fd(), 0));

    // Our next notify finds our peer gone (ECONNREFUSED): as for a CLOSE,
    // the port fires once and later notifies are dropped.
    CHECK(bound->notify().ok());
    CHECK(wait_pending(*ch) == std::vector<Port>{q});
    CHECK(bound->notify().ok());
    CHECK(pending_of(*ch).empty());
    CHECK_FALSE(newcomer->recv_ev().has_value());

    // Having found the peer dead, the kernel disconnected our socket, so the
    // newcomer's datagrams arrive now: ignored, drained, nothing spins.
    for (int i = 0; i < 3; ++i) CHECK(newcomer->send_ev(bp, kNotify, kGuest, 1));
    CHECK(newcomer->send_ev(bp, kClose, kGuest, 1));
    REQUIRE(readable(ch->fd(), kWaitMs));
    CHECK(pending_of(*ch).empty());
    CHECK_FALSE(readable(ch->fd(), 0));
    CHECK(bound->notify().ok());
    bound->reset();  // no CLOSE: the peer it was for is gone
    CHECK_FALSE(newcomer->recv_ev().has_value());

    // The newcomer's own offer binds afresh.
    auto again = bind_now(*ch, kGuest, 1);
    REQUIRE(again.ok());
    CHECK(newcomer->recv_ev() == Words{kMagic, kBind, 0, again->port()});
    CHECK(newcomer->send_ev(root.port(0, again->port()), kNotify, kGuest, 1));
    CHECK(wait_pending(*ch) == std::vector<Port>{again->port()});
    CHECK(again->notify().ok());
    CHECK(newcomer->recv_ev() == Words{kMagic, kNotify, 0, again->port()});
}

TEST_CASE("a guest that swaps its socket file after the bind cannot redirect our notifications") {
    TempRoot root;
    auto peer = offered_socket(root, 1);
    BoundSocket victim(root.dir + "/victim");  // say, /dev/log
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, 1);
    REQUIRE(bound.ok());
    const Port q = bound->port();
    CHECK(peer->recv_ev() == Words{kMagic, kBind, 0, q});

    const std::string path = root.port(kGuest, 1);
    REQUIRE(::unlink(path.c_str()) == 0);
    REQUIRE(::symlink((root.dir + "/victim").c_str(), path.c_str()) == 0);
    CHECK(bound->notify().ok());
    CHECK(peer->recv_ev() == Words{kMagic, kNotify, 0, q});  // still the socket it bound to
    CHECK_FALSE(victim.recv_ev().has_value());
    peer.reset();  // it closes: the port's peer is gone, and still nothing goes to the victim
    CHECK(bound->notify().ok());
    CHECK(wait_pending(*ch) == std::vector<Port>{q});
    bound->reset();
    CHECK_FALSE(victim.recv_ev().has_value());
}

TEST_CASE("a peer that connects its socket to our port and away again leaves an error that costs nothing") {
    TempRoot root;
    auto peer = offered_socket(root, 1);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, 1);
    REQUIRE(bound.ok());
    const Port q = bound->port();
    const std::string bp = root.port(0, q);
    CHECK(peer->recv_ev() == Words{kMagic, kBind, 0, q});

    // Connected to ours, with a datagram of ours queued on it, the peer
    // disconnects: Linux then leaves ECONNRESET pending on our socket, for
    // whichever of recv() and send() comes next.
    auto raise_error = [&] {
        REQUIRE(peer->connect_to(bp));
        REQUIRE(bound->notify().ok());
        REQUIRE(peer->connect_to(""));  // drops what was queued on it
    };
    // 1: a notify comes next. It goes through, and the peer is not gone.
    raise_error();
    CHECK(bound->notify().ok());
    CHECK(peer->recv_ev() == Words{kMagic, kNotify, 0, q});
    CHECK(pending_of(*ch).empty());
    CHECK_FALSE(readable(ch->fd(), 0));
    // 2: pending() comes next, with the peer's NOTIFY queued behind the
    // error: one call reports it, and then nothing is left.
    REQUIRE(peer->connect_to(bp));
    REQUIRE(bound->notify().ok());
    CHECK(peer->send_ev(bp, kNotify, kGuest, 1));
    REQUIRE(peer->connect_to(""));
    REQUIRE(readable(ch->fd(), kWaitMs));
    CHECK(pending_of(*ch) == std::vector<Port>{q});
    CHECK(pending_of(*ch).empty());
    CHECK_FALSE(readable(ch->fd(), 0));
    CHECK(bound->notify().ok());
    CHECK(peer->recv_ev() == Words{kMagic, kNotify, 0, q});
}

// ============================================== BIND and CLOSE on a full queue

namespace {

// Fills the receive queue of the socket at `path` with junk until it takes
// no more (net.unix.max_dgram_qlen datagrams), as a guest can do to itself.
size_t fill_queue(const std::string& path) {
    size_t n = 0;
    while (n < 100000 && send_raw(path, "x", 1)) ++n;
    return n;
}

struct BindOutcome {
    std::optional<xensock::Result<xp::BoundPort>> result;
    Clock::time_point finished;
};

rt::Task<void> bind_into(rt::Reactor& r, xp::EventChannel& ch, Port remote_port, rt::CancelToken cancel,
                         BindOutcome& out) {
    auto result = co_await ch.bind_interdomain(r, kGuest, remote_port, cancel);
    out.result.emplace(std::move(result));
    out.finished = Clock::now();
}

// Waits on the reactor (bounded) until `port` of `ch` fires.
rt::Task<bool> port_fires(rt::Reactor& r, xp::EventChannel& ch, Port port) {
    const auto give_up = Clock::now() + std::chrono::milliseconds(kWaitMs);
    std::vector<Port> fired;
    while (Clock::now() < give_up) {
        auto op = r.poll(ch.fd(), POLLIN);
        op.timeout(100ms);
        (void)co_await op;
        fired.clear();
        ch.pending(fired);
        if (std::find(fired.begin(), fired.end(), port) != fired.end()) co_return true;
    }
    co_return false;
}

rt::Task<void> wait_for(rt::Reactor& r, const BindOutcome& outcome) {
    const auto give_up = Clock::now() + std::chrono::milliseconds(kWaitMs);
    while (!outcome.result && Clock::now() < give_up) {
        auto nap = r.sleep_for(5ms);
        co_await nap;
    }
}

// The backend's side: binds the guest's port p1, whose queue is full, and
// while that bind waits has the guest notify port p2, bound on the same
// channel, three times. `pings` counts the notifications that arrived while
// the bind was still waiting: all three unless the bind held up the thread.
// With `drain_after`, the guest drains p1 that long after the bind started.
rt::Task<void> bind_while_pinged(rt::Reactor& r, xp::EventChannel& ch, Chan& guest, Port p1, Port q2,
                                 std::optional<std::chrono::milliseconds> drain_after, BindOutcome& outcome,
                                 int& pings) {
    const auto started = Clock::now();
    r.spawn(bind_into(r, ch, p1, {}, outcome));
    for (int i = 0; i < 3; ++i) {
        guest.send({1});
        const bool fired = co_await port_fires(r, ch, q2);
        if (fired && !outcome.result) ++pings;
    }
    if (drain_after && !outcome.result) {
        auto nap = r.sleep_for(started + *drain_after - Clock::now());
        co_await nap;
        guest.send({2});
    }
    co_await wait_for(r, outcome);
}

// A guest with two ports offered to the backend, driven by orders: 1 notify
// p2, 2 drain (pending()), 3 notify p1 and answer, 0 exit.
std::function<void(Chan&)> two_port_guest(const std::string& dir) {
    return [dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        auto p1 = ch->bind_unbound(0);
        auto p2 = ch->bind_unbound(0);
        G_REQUIRE(p1.ok());
        G_REQUIRE(p2.ok());
        c.send({p1->port(), p2->port()});
        for (;;) {
            const auto order = c.recv().at(0);
            if (order == 0) return;
            if (order == 1) G_REQUIRE(p2->notify().ok());
            if (order == 2) (void)pending_of(*ch);  // takes p1's junk: room for the BIND
            if (order == 3) {
                G_REQUIRE(p1->notify().ok());  // learns the peer from the BIND, notifies it
                c.send({3});
            }
        }
    };
}

size_t entries_in(const std::string& dir) {
    size_t n = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++n;
    return n;
}

}  // namespace

TEST_CASE("a BIND to a full queue waits on the reactor, not the thread, and goes through once the guest drains") {
    TempRoot root;
    Process guest(two_port_guest(root.dir));
    const auto ports = guest.chan().recv();
    const Port p1 = ports.at(0), p2 = ports.at(1);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    rt::Reactor r;
    auto other = r.run_until(ch->bind_interdomain(r, kGuest, p2));
    REQUIRE(other.ok());
    REQUIRE(fill_queue(root.port(kGuest, p1)) > 0);

    BindOutcome outcome;
    int pings = 0;
    const auto started = Clock::now();
    r.run_until(bind_while_pinged(r, *ch, guest.chan(), p1, other->port(), 200ms, outcome, pings));
    REQUIRE(outcome.result.has_value());
    CHECK(pings == 3);  // port p2 was served while the bind waited
    REQUIRE(outcome.result->ok());
    CHECK(outcome.finished - started >= 200ms);  // it did wait for the drain

    const Port q1 = (*outcome.result)->port();
    guest.chan().send({3});
    CHECK(r.run_until(port_fires(r, *ch, q1)));  // the guest got the BIND: the binding works
    guest.chan().recv();
    guest.chan().send({0});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a BIND to a queue that stays full fails after a second, without holding up the thread") {
    TempRoot root;
    Process guest(two_port_guest(root.dir));
    const auto ports = guest.chan().recv();
    const Port p1 = ports.at(0), p2 = ports.at(1);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    rt::Reactor r;
    auto other = r.run_until(ch->bind_interdomain(r, kGuest, p2));
    REQUIRE(other.ok());
    REQUIRE(fill_queue(root.port(kGuest, p1)) > 0);

    BindOutcome outcome;
    int pings = 0;
    const auto started = Clock::now();
    r.run_until(bind_while_pinged(r, *ch, guest.chan(), p1, other->port(), std::nullopt, outcome, pings));
    REQUIRE(outcome.result.has_value());
    CHECK(pings == 3);
    CHECK(outcome.result->error() == ETIMEDOUT);
    CHECK(outcome.finished - started >= 1s);  // the contract's second of retries
    CHECK(ch->bound_ports() == 1);
    CHECK(entries_in(root.dom(0) + "/evtchn") == 1);  // the failed port's socket is gone

    // Every try counts in full: a second bind to the same guest waits its
    // second too, and goes through when the guest drains meanwhile.
    BindOutcome again;
    pings = 0;
    r.run_until(bind_while_pinged(r, *ch, guest.chan(), p1, other->port(), 300ms, again, pings));
    REQUIRE(again.result.has_value());
    CHECK(pings == 3);
    CHECK(again.result->ok());
    guest.chan().send({0});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a BIND waiting for room ends with ECANCELED when cancelled") {
    TempRoot root;
    Process guest(two_port_guest(root.dir));
    const Port p1 = guest.chan().recv().at(0);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    rt::Reactor r;
    REQUIRE(fill_queue(root.port(kGuest, p1)) > 0);
    rt::CancelSource cancel;
    BindOutcome outcome;
    r.spawn(bind_into(r, *ch, p1, cancel.token(), outcome));
    r.post([&cancel] { cancel.cancel(); });  // once the bind is waiting
    r.run_until(wait_for(r, outcome));
    REQUIRE(outcome.result.has_value());
    CHECK(outcome.result->error() == ECANCELED);
    CHECK(ch->bound_ports() == 0);
    CHECK(entries_in(root.dom(0) + "/evtchn") == 0);
    guest.chan().send({0});
    CHECK(guest.wait() == 0);
}

TEST_CASE("a CLOSE to a full queue is retried in the background: unbinding does not wait for it") {
    TempRoot root;
    const std::string dir = root.dir;
    Process guest([dir](Chan& c) {
        auto plat = xp::open_sim_platform(dir, kGuest);
        auto ch = plat->open_event_channel();
        auto port = ch->bind_unbound(0);
        G_REQUIRE(port.ok());
        c.send({port->port()});
        c.recv();                            // bound, queue filled, unbound
        G_REQUIRE(pending_of(*ch).empty());  // the BIND and the junk: room for the CLOSE
        G_REQUIRE(wait_pending(*ch) == std::vector<Port>{port->port()});  // the CLOSE came
        c.send({1});
        c.recv();
    });
    const Port p = guest.chan().recv().at(0);
    auto backend = xp::open_sim_platform(root.dir, 0);
    auto ch = backend->open_event_channel();
    auto bound = bind_now(*ch, kGuest, p);
    REQUIRE(bound.ok());
    const Port q = bound->port();
    REQUIRE(fill_queue(root.port(kGuest, p)) > 0);

    bound->reset();  // its CLOSE does not fit: must not wait here
    CHECK(ch->bound_ports() == 0);
    // Kept for the guest until the CLOSE is in: it has not read the BIND yet.
    CHECK(fs::exists(root.port(0, q)));
    guest.chan().send({1});  // only now does the guest drain
    // Serve the channel as its owner does, until the guest saw the CLOSE.
    const auto give_up = Clock::now() + 2 * std::chrono::milliseconds(kWaitMs);
    while (!readable(guest.chan().fd(), 0) && Clock::now() < give_up) {
        if (readable(ch->fd(), 10)) CHECK(pending_of(*ch).empty());
    }
    guest.chan().recv();
    // Delivered, the CLOSE frees the port and its number.
    CHECK_FALSE(fs::exists(root.port(0, q)));
    auto again = bind_now(*ch, kGuest, p);
    REQUIRE(again.ok());
    CHECK(again->port() == q);
    guest.chan().send({2});
    CHECK(guest.wait() == 0);
}
