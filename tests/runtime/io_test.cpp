// I/O through the reactor over real loopback sockets: accept/connect,
// send/recv, readv/writev and sendmsg/recvmsg on wrapped ring iovecs, a 64 MiB
// transfer, poll, sleep_for and per-operation deadlines.
#include "support.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

#include <array>
#include <cstring>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

namespace xensock::rt::test {
namespace {

// Position-sensitive 64-bit FNV-1a: a reordered or dropped chunk changes it.
struct Fnv {
    uint64_t h = 1469598103934665603ull;
    void add(const unsigned char* p, size_t n) {
        for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
    }
};

// Deterministic byte stream, so sender and receiver can both produce it.
struct Pattern {
    uint64_t state = 0x9e3779b97f4a7c15ull;
    void fill(unsigned char* p, size_t n) {
        for (size_t i = 0; i < n; ++i) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            p[i] = static_cast<unsigned char>(state >> 24);
        }
    }
};

Task<int> send_all(Reactor& r, int fd, const void* data, size_t len) {
    const auto* p = static_cast<const unsigned char*>(data);
    size_t done = 0;
    while (done < len) {
        const int n = co_await r.send(fd, p + done, len - done, MSG_NOSIGNAL);
        if (n <= 0) co_return n == 0 ? -EPIPE : n;
        done += static_cast<size_t>(n);
    }
    co_return static_cast<int>(done);
}

Task<int> recv_all(Reactor& r, int fd, void* data, size_t len) {
    auto* p = static_cast<unsigned char*>(data);
    size_t done = 0;
    while (done < len) {
        const int n = co_await r.recv(fd, p + done, len - done);
        if (n <= 0) co_return n == 0 ? -EPIPE : n;
        done += static_cast<size_t>(n);
    }
    co_return static_cast<int>(done);
}

// --- accept + connect + send + recv ----------------------------------------

Task<void> echo_once(Reactor& r, int listen_fd, int& accepted_port) {
    sockaddr_in peer{};
    socklen_t peer_len = sizeof peer;
    const int c = co_await r.accept(listen_fd, reinterpret_cast<sockaddr*>(&peer), &peer_len, SOCK_CLOEXEC);
    REQUIRE(c >= 0);
    Fd conn(c);
    CHECK(peer_len == sizeof peer);
    CHECK(peer.sin_addr.s_addr == htonl(INADDR_LOOPBACK));
    accepted_port = ntohs(peer.sin_port);
    char buf[64];
    const int n = co_await r.recv(conn.get(), buf, sizeof buf);
    REQUIRE(n > 0);
    const int m = co_await send_all(r, conn.get(), buf, static_cast<size_t>(n));
    CHECK(m == n);
}

Task<std::string> client_roundtrip(Reactor& r, sockaddr_in server, int& local_port) {
    Fd s = tcp_socket();
    const int rc = co_await r.connect(s.get(), reinterpret_cast<const sockaddr*>(&server), sizeof server);
    REQUIRE(rc == 0);
    sockaddr_in self{};
    socklen_t len = sizeof self;
    REQUIRE(::getsockname(s.get(), reinterpret_cast<sockaddr*>(&self), &len) == 0);
    local_port = ntohs(self.sin_port);
    constexpr std::string_view msg = "hello, reactor";
    const int sent = co_await send_all(r, s.get(), msg.data(), msg.size());
    CHECK(sent == static_cast<int>(msg.size()));
    std::string reply(msg.size(), '\0');
    const int got = co_await recv_all(r, s.get(), reply.data(), reply.size());
    CHECK(got == static_cast<int>(msg.size()));
    // The server closed after echoing: recv reports EOF as 0.
    char extra;
    const int eof = co_await r.recv(s.get(), &extra, 1);
    CHECK(eof == 0);
    co_return reply;
}

// --- vectored I/O on a wrapped ring ------------------------------------------

// Two iovecs covering [start, start + len) of a ring of `ring.size()` bytes,
// split at the end of the ring: what a data ring hands to readv/writev.
std::array<iovec, 2> ring_iov(std::vector<unsigned char>& ring, size_t start, size_t len) {
    const size_t first = std::min(len, ring.size() - start);
    return {iovec{ring.data() + start, first}, iovec{ring.data(), len - first}};
}

// Drops `n` consumed bytes from the front of an iovec array.
void advance(iovec*& iov, unsigned& count, size_t n) {
    while (n > 0 && count > 0) {
        if (n >= iov->iov_len) {
            n -= iov->iov_len;
            ++iov;
            --count;
        } else {
            iov->iov_base = static_cast<char*>(iov->iov_base) + n;
            iov->iov_len -= n;
            n = 0;
        }
    }
    while (count > 0 && iov->iov_len == 0) {
        ++iov;
        --count;
    }
}

enum class Vec { rw, msg };

Task<int> write_vec(Reactor& r, Vec kind, int fd, std::array<iovec, 2> iov_in) {
    iovec* iov = iov_in.data();
    unsigned count = 2;
    int total = 0;
    while (count > 0) {
        int n;
        if (kind == Vec::rw) {
            n = co_await r.writev(fd, iov, count);
        } else {
            msghdr msg{};
            msg.msg_iov = iov;
            msg.msg_iovlen = count;
            n = co_await r.sendmsg(fd, &msg, MSG_NOSIGNAL);
        }
        if (n <= 0) co_return n == 0 ? -EPIPE : n;
        total += n;
        advance(iov, count, static_cast<size_t>(n));
    }
    co_return total;
}

Task<int> read_vec(Reactor& r, Vec kind, int fd, std::array<iovec, 2> iov_in) {
    iovec* iov = iov_in.data();
    unsigned count = 2;
    int total = 0;
    while (count > 0) {
        int n;
        if (kind == Vec::rw) {
            n = co_await r.readv(fd, iov, count);
        } else {
            msghdr msg{};
            msg.msg_iov = iov;
            msg.msg_iovlen = count;
            n = co_await r.recvmsg(fd, &msg, 0);
        }
        if (n <= 0) co_return n == 0 ? -EPIPE : n;
        total += n;
        advance(iov, count, static_cast<size_t>(n));
    }
    co_return total;
}

Task<void> write_vec_expect(Reactor& r, Vec kind, int fd, std::array<iovec, 2> iov, int expect) {
    const int n = co_await write_vec(r, kind, fd, iov);
    CHECK(n == expect);
}

Task<void> vectored_roundtrip(Reactor& r, Vec kind, int a, int b) {
    constexpr size_t kRing = 4096;
    constexpr size_t kLen = 1000;
    std::vector<unsigned char> tx(kRing), rx(kRing, 0);
    Pattern pat;
    pat.fill(tx.data(), tx.size());
    // Sender's payload wraps at 3500 (596 + 404 bytes); the receiver's ring
    // wraps at a different place (3900: 196 + 804) to catch iovec mix-ups.
    const size_t tx_start = 3500, rx_start = 3900;
    r.spawn(write_vec_expect(r, kind, a, ring_iov(tx, tx_start, kLen), static_cast<int>(kLen)));
    const int got = co_await read_vec(r, kind, b, ring_iov(rx, rx_start, kLen));
    REQUIRE(got == static_cast<int>(kLen));
    for (size_t i = 0; i < kLen; ++i) {
        if (rx[(rx_start + i) % kRing] != tx[(tx_start + i) % kRing]) {
            FAIL_CHECK("byte " << i << " differs");
            break;
        }
    }
    // Nothing outside the two iovecs was written.
    for (size_t i = kLen; i < kRing; ++i) {
        if (rx[(rx_start + i) % kRing] != 0) {
            FAIL_CHECK("byte outside the iovecs written at ring offset " << (rx_start + i) % kRing);
            break;
        }
    }
}

Task<void> readv_advances_file_offset(Reactor& r, int fd) {
    char a[4] = {}, b[4] = {};
    iovec iov[2] = {{a, 2}, {a + 2, 2}};
    const int n1 = co_await r.readv(fd, iov, 2);
    CHECK(n1 == 4);
    iovec iov2[2] = {{b, 1}, {b + 1, 3}};
    const int n2 = co_await r.readv(fd, iov2, 2);
    CHECK(n2 == 4);
    CHECK(std::string_view(a, 4) == "0123");
    CHECK(std::string_view(b, 4) == "4567");
}

// --- 64 MiB transfer ---------------------------------------------------------

constexpr size_t kBulk = 64u << 20;
constexpr size_t kChunk = 256u << 10;

Task<void> bulk_send(Reactor& r, int fd, uint64_t& checksum) {
    std::vector<unsigned char> buf(kChunk);
    Pattern pat;
    Fnv fnv;
    for (size_t sent = 0; sent < kBulk; sent += kChunk) {
        pat.fill(buf.data(), buf.size());
        fnv.add(buf.data(), buf.size());
        const int n = co_await send_all(r, fd, buf.data(), buf.size());
        REQUIRE(n == static_cast<int>(kChunk));
    }
    checksum = fnv.h;
    ::shutdown(fd, SHUT_WR);
}

Task<uint64_t> bulk_recv(Reactor& r, int fd, size_t& total) {
    // Odd-sized reads so chunk boundaries never line up with the sender's.
    std::vector<unsigned char> buf(100003);
    Fnv fnv;
    while (true) {
        const int n = co_await r.recv(fd, buf.data(), buf.size());
        REQUIRE(n >= 0);
        if (n == 0) break;
        fnv.add(buf.data(), static_cast<size_t>(n));
        total += static_cast<size_t>(n);
    }
    co_return fnv.h;
}

// --- poll / sleep / deadlines ------------------------------------------------

Task<void> write_after(Reactor& r, int fd, std::chrono::milliseconds delay, bool& written) {
    // The delay only keeps the poll waiting in the kernel for a while; the
    // checks do not depend on its length.
    const int slept = co_await r.sleep_for(delay);
    CHECK(slept == 0);
    const uint64_t one = 1;
    written = true;
    REQUIRE(::write(fd, &one, sizeof one) == static_cast<ssize_t>(sizeof one));
}

Task<int> poll_in(Reactor& r, int fd, const bool& written) {
    const int mask = co_await r.poll(fd, POLLIN);
    CHECK(written);  // did not return before the data existed
    co_return mask;
}

Task<void> poll_test(Reactor& r, int wait_fd, int write_fd) {
    bool written = false;
    r.spawn(write_after(r, write_fd, 20ms, written));
    const int mask = co_await poll_in(r, wait_fd, written);
    REQUIRE(mask > 0);
    CHECK((mask & POLLIN) != 0);
    // Level-triggered: still readable, so a second poll returns at once.
    const int again = co_await r.poll(wait_fd, POLLIN);
    CHECK((again & POLLIN) != 0);
}

Task<void> sleep_test(Reactor& r) {
    auto t0 = Clock::now();
    const int rc = co_await r.sleep_for(50ms);
    CHECK(rc == 0);
    CHECK(Clock::now() - t0 >= 50ms);
    const int rc0 = co_await r.sleep_for(0ms);
    CHECK(rc0 == 0);
    const int rc_neg = co_await r.sleep_for(-5ms);  // negative means "now"
    CHECK(rc_neg == 0);
}

Task<void> recv_deadline_expires(Reactor& r, int fd) {
    char buf[16];
    const auto t0 = Clock::now();
    const int rc = co_await r.recv(fd, buf, sizeof buf).timeout(100ms);
    const auto elapsed = Clock::now() - t0;
    CHECK(rc == -ETIMEDOUT);
    CHECK(elapsed >= 100ms);
    CHECK(elapsed < 5s);
    // An lvalue awaitable with a deadline works the same way.
    auto op = r.poll(fd, POLLIN);
    op.timeout(30ms);
    const int prc = co_await op;
    CHECK(prc == -ETIMEDOUT);
}

Task<void> send_later(Reactor& r, int fd, std::string_view what) {
    const int slept = co_await r.sleep_for(20ms);
    CHECK(slept == 0);
    const int sent = co_await send_all(r, fd, what.data(), what.size());
    CHECK(sent == static_cast<int>(what.size()));
}

Task<void> recv_beats_deadline(Reactor& r, int rfd, int wfd) {
    r.spawn(send_later(r, wfd, "data"));
    char buf[16];
    const auto t0 = Clock::now();
    const int rc = co_await r.recv(rfd, buf, sizeof buf).timeout(3s);
    CHECK(rc == 4);
    CHECK(Clock::now() - t0 < 3s);
    CHECK(r.in_flight() == 0);
    // The disarmed timer must not hit a later operation in this frame.
    r.spawn(send_later(r, wfd, "more"));
    const int rc2 = co_await r.recv(rfd, buf, sizeof buf).timeout(3s);
    CHECK(rc2 == 4);
}

}  // namespace

TEST_SUITE("io") {

TEST_CASE("accept, connect, send and recv through the reactor") {
    Watchdog wd;
    Reactor r;
    Listener l = listen_loopback();
    int accepted_port = -1, local_port = -2;
    r.spawn(echo_once(r, l.fd.get(), accepted_port));
    CHECK(r.run_until(client_roundtrip(r, l.addr, local_port)) == "hello, reactor");
    CHECK(accepted_port == local_port);  // accept filled in the peer address
    CHECK(r.in_flight() == 0);
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("readv/writev with two iovecs across the ring's wrap-around") {
    Watchdog wd;
    Reactor r;
    auto [a, b] = tcp_pair();
    r.run_until(vectored_roundtrip(r, Vec::rw, a.get(), b.get()));
    CHECK(r.in_flight() == 0);
}

TEST_CASE("sendmsg/recvmsg with two iovecs across the ring's wrap-around") {
    Watchdog wd;
    Reactor r;
    auto [a, b] = tcp_pair();
    r.run_until(vectored_roundtrip(r, Vec::msg, a.get(), b.get()));
    CHECK(r.in_flight() == 0);
}

TEST_CASE("readv continues at the file position, like readv(2)") {
    Watchdog wd;
    Reactor r;
    Fd f(::memfd_create("xensock-rt-readv", MFD_CLOEXEC));
    REQUIRE(f.get() >= 0);
    REQUIRE(::write(f.get(), "0123456789", 10) == 10);
    REQUIRE(::lseek(f.get(), 0, SEEK_SET) == 0);
    r.run_until(readv_advances_file_offset(r, f.get()));
}

TEST_CASE("64 MiB between two coroutines on one reactor, checksummed") {
    Watchdog wd(45s);
    Reactor r;
    auto [a, b] = tcp_pair();
    uint64_t sent_sum = 0;
    size_t total = 0;
    r.spawn(bulk_send(r, a.get(), sent_sum));
    const uint64_t got_sum = r.run_until(bulk_recv(r, b.get(), total));
    CHECK(total == kBulk);
    CHECK(sent_sum != 0);
    CHECK(got_sum == sent_sum);
    CHECK(r.in_flight() == 0);
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("poll on an eventfd and on a pipe") {
    Watchdog wd;
    Reactor r;
    SUBCASE("eventfd") {
        Fd efd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        REQUIRE(efd.get() >= 0);
        r.run_until(poll_test(r, efd.get(), efd.get()));
    }
    SUBCASE("pipe") {
        int p[2];
        REQUIRE(::pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
        Fd rd(p[0]), wr(p[1]);
        r.run_until(poll_test(r, rd.get(), wr.get()));
    }
    CHECK(r.in_flight() == 0);
}

TEST_CASE("sleep_for returns 0 once the time has passed") {
    Watchdog wd;
    Reactor r;
    r.run_until(sleep_test(r));
    CHECK(r.in_flight() == 0);
}

TEST_CASE("a deadline on a recv that never gets data returns -ETIMEDOUT") {
    Watchdog wd;
    Reactor r;
    auto [a, b] = tcp_pair();
    r.run_until(recv_deadline_expires(r, b.get()));
    CHECK(r.in_flight() == 0);
    CHECK(r.live_tasks() == 0);
}

TEST_CASE("a deadline does not fire when the data arrives first") {
    Watchdog wd;
    Reactor r;
    auto [a, b] = tcp_pair();
    r.run_until(recv_beats_deadline(r, b.get(), a.get()));
    CHECK(r.in_flight() == 0);
}

}  // TEST_SUITE
}  // namespace xensock::rt::test
