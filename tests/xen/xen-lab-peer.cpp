// xen-lab-peer: dom0's side of the real-Xen lab's data checks (plain host
// sockets; xensockd bridges the guests' sockets to them).
//
//   xen-lab-peer echo LABEL PORT BYTES [MARKDIR]
//     Listens on 127.0.0.1:PORT and echoes every connection (one thread
//     each). Unless BYTES is 0, the first connection is the guest's
//     connect-echo transfer: its BYTES bytes are checked against the pattern
//     of "LABEL/echo" and one line
//     `XENSOCK-CHECK PASS|FAIL LABEL/dom0-echo-received` is printed at its
//     end of stream. Every connection's end is printed as
//     `XENSOCK-PEER LABEL conn N closed ...` and, with MARKDIR, recorded as
//     the file MARKDIR/LABEL-connN.closed.
//
//   xen-lab-peer client LABEL PORT BYTES TIMEOUT_S
//     Connects to 127.0.0.1:PORT (the guest's listening socket, bound in
//     dom0 by xensockd), retrying until TIMEOUT_S; sends BYTES bytes of the
//     pattern of "LABEL/accept" while reading the echo, checks every echoed
//     byte and the end of stream, and prints
//     `XENSOCK-CHECK PASS|FAIL LABEL/dom0-client`. Exit code 0 on PASS.
#include "lab_common.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

using namespace xensock;
using Clock = std::chrono::steady_clock;

namespace {

void say(const char* fmt_text, const std::string& a, const std::string& b = {}) {
    std::printf(fmt_text, a.c_str(), b.c_str());
    std::fflush(stdout);
}

std::string hex(uint64_t v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
    return buf;
}

sockaddr_in loopback(uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

bool write_all(int fd, const std::byte* p, size_t n) {
    while (n > 0) {
        const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        p += k;
        n -= static_cast<size_t>(k);
    }
    return true;
}

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void echo_connection(int fd, std::string label, int number, uint64_t expect_bytes, std::string markdir) {
    const uint64_t seed = lab::seed_of(label + "/echo");
    const bool checked = number == 1 && expect_bytes > 0;
    std::vector<std::byte> buf(256 * 1024), want(256 * 1024);
    lab::StreamSum sum;
    uint64_t total = 0;
    std::string why;
    const auto t0 = Clock::now();
    while (true) {
        const ssize_t k = ::recv(fd, buf.data(), buf.size(), 0);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
            why = std::string("recv: ") + std::strerror(errno);
            break;
        }
        if (k == 0) break;
        if (checked && why.empty()) {
            const size_t n = static_cast<size_t>(k);
            const size_t bad = lab::pattern_mismatch(buf.data(), n, total, seed, want.data());
            if (bad != n) why = "byte " + std::to_string(total + bad) + " differs from the pattern";
        }
        sum.update(buf.data(), static_cast<size_t>(k));
        total += static_cast<uint64_t>(k);
        if (!write_all(fd, buf.data(), static_cast<size_t>(k))) {
            if (why.empty()) why = std::string("send: ") + std::strerror(errno);
            break;
        }
    }
    ::close(fd);
    if (checked) {
        if (why.empty() && total != expect_bytes)
            why = "received " + std::to_string(total) + " bytes, expected " + std::to_string(expect_bytes);
        if (why.empty() && sum.value() != lab::pattern_sum(expect_bytes, seed)) why = "checksum differs";
        if (why.empty()) {
            say("XENSOCK-CHECK PASS %s/dom0-echo-received (%s)\n", label,
                std::to_string(total) + " bytes from the guest verified in dom0 and echoed, checksum " +
                    hex(sum.value()));
        } else {
            say("XENSOCK-CHECK FAIL %s/dom0-echo-received: %s\n", label, why);
        }
    }
    char line[256];
    std::snprintf(line, sizeof line, "conn %d closed after %llu bytes, %.1f s%s%s", number,
                  static_cast<unsigned long long>(total), since(t0), why.empty() || checked ? "" : ": ",
                  why.empty() || checked ? "" : why.c_str());
    say("XENSOCK-PEER %s %s\n", label, line);
    if (!markdir.empty()) std::ofstream(markdir + "/" + label + "-conn" + std::to_string(number) + ".closed") << total;
}

int run_echo(const std::string& label, uint16_t port, uint64_t bytes, const std::string& markdir) {
    const int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int one = 1;
    ::setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    const auto a = loopback(port);
    if (::bind(lfd, reinterpret_cast<const sockaddr*>(&a), sizeof a) != 0 || ::listen(lfd, 16) != 0) {
        say("XENSOCK-CHECK FAIL %s/dom0-echo-service: cannot listen on 127.0.0.1:%s\n", label, std::to_string(port));
        return 1;
    }
    say("XENSOCK-PEER %s echo service on 127.0.0.1:%s\n", label, std::to_string(port));
    for (int number = 1;; ++number) {
        const int fd = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) {
                --number;
                continue;
            }
            return 1;
        }
        std::thread(echo_connection, fd, label, number, bytes, markdir).detach();
    }
}

int run_client(const std::string& label, uint16_t port, uint64_t bytes, int timeout_s) {
    const uint64_t seed = lab::seed_of(label + "/accept");
    const auto t0 = Clock::now();
    int fd = -1;
    int last = 0;
    while (since(t0) < timeout_s) {
        fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        const auto a = loopback(port);
        if (::connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof a) == 0) break;
        last = errno;
        ::close(fd);
        fd = -1;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (fd < 0) {
        say("XENSOCK-CHECK FAIL %s/dom0-client: %s\n", label,
            "could not connect to the guest's listening socket 127.0.0.1:" + std::to_string(port) + " within " +
                std::to_string(timeout_s) + " s (last error: " + std::strerror(last) + ")");
        return 1;
    }
    const double connected_after = since(t0);
    const auto t1 = Clock::now();
    std::atomic<bool> send_ok{true};
    std::thread writer([&] {
        std::vector<std::byte> chunk(128 * 1024);
        for (uint64_t off = 0; off < bytes; off += chunk.size()) {
            const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), bytes - off));
            lab::fill_pattern(chunk.data(), n, off, seed);
            if (!write_all(fd, chunk.data(), n)) {
                send_ok = false;
                break;
            }
        }
        ::shutdown(fd, SHUT_WR);  // the guest sees the end of stream
    });
    std::vector<std::byte> buf(128 * 1024), want(128 * 1024);
    lab::StreamSum sum;
    uint64_t total = 0;
    std::string why;
    while (true) {
        const ssize_t k = ::recv(fd, buf.data(), buf.size(), 0);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
            why = std::string("recv: ") + std::strerror(errno) + " after " + std::to_string(total) + " bytes";
            break;
        }
        if (k == 0) break;
        const size_t n = static_cast<size_t>(k);
        const size_t bad = lab::pattern_mismatch(buf.data(), n, total, seed, want.data());
        if (bad != n) {
            why = "echoed byte " + std::to_string(total + bad) + " differs from the pattern";
            break;
        }
        sum.update(buf.data(), n);
        total += n;
    }
    writer.join();
    ::close(fd);
    if (why.empty() && !send_ok) why = "sending to the guest failed";
    if (why.empty() && total != bytes)
        why = "the echo ended after " + std::to_string(total) + " bytes, expected " + std::to_string(bytes);
    if (why.empty()) {
        char detail[256];
        std::snprintf(detail, sizeof detail,
                      "connected after %.1f s; %llu bytes sent and their echo verified in %.1f s, checksum %s",
                      connected_after, static_cast<unsigned long long>(total), since(t1), hex(sum.value()).c_str());
        say("XENSOCK-CHECK PASS %s/dom0-client (%s)\n", label, detail);
        return 0;
    }
    say("XENSOCK-CHECK FAIL %s/dom0-client: %s\n", label, why);
    return 1;
}

}  // namespace

int main(int argc, char** argv) {
    std::signal(SIGPIPE, SIG_IGN);
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "echo" && (argc == 5 || argc == 6)) {
        return run_echo(argv[2], static_cast<uint16_t>(std::atoi(argv[3])), std::strtoull(argv[4], nullptr, 0),
                        argc == 6 ? argv[5] : "");
    }
    if (mode == "client" && argc == 6) {
        return run_client(argv[2], static_cast<uint16_t>(std::atoi(argv[3])), std::strtoull(argv[4], nullptr, 0),
                          std::atoi(argv[5]));
    }
    std::fprintf(stderr,
                 "usage: xen-lab-peer echo LABEL PORT BYTES [MARKDIR]\n"
                 "       xen-lab-peer client LABEL PORT BYTES TIMEOUT_S\n");
    return 2;
}
