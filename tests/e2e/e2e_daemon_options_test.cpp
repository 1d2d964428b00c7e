// xensockd's start-up validation of --max-ring-order against the protocols
// it serves: order 0 leaves a PVCalls guest no usable data ring (usage
// error, exit 2); 1..3 work for PVCalls but not for Linux's pvcalls-front,
// which refuses max-page-order < 4 (a warning). The daemon is run for real;
// its --sim root does not exist, so a start that passes validation stops at
// the platform (exit 3) without serving anything.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Run {
    int exit_code = -1;  // 128+signal if killed
    std::string output;  // stdout and stderr
};

Run run_xensockd(std::vector<std::string> args) {
    const char* bin = std::getenv("XENSOCK_XENSOCKD");
    if (!bin) throw std::runtime_error("XENSOCK_XENSOCKD is not set (meson sets it for tests)");
    args.insert(args.begin(), bin);
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        ::dup2(fds[1], 1);
        ::dup2(fds[1], 2);
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        ::execv(bin, argv.data());
        ::_exit(127);
    }
    ::close(fds[1]);
    Run run;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    char buf[4096];
    while (true) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            ::kill(pid, SIGKILL);
            break;
        }
        pollfd p{fds[0], POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
        const ssize_t n = ::read(fds[0], buf, sizeof buf);
        if (n <= 0) break;  // EOF: the daemon exited
        run.output.append(buf, static_cast<size_t>(n));
    }
    ::close(fds[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return run;
}

bool contains(const std::string& text, const std::string& what) { return text.find(what) != std::string::npos; }

const std::string kNoSimRoot = "/nonexistent/xensock-option-test";

}  // namespace

TEST_CASE("xensockd --max-ring-order 0 is a usage error when pvcalls is served") {
    for (const char* protocols : {"pvcalls", "xensock,pvcalls"}) {
        CAPTURE(protocols);
        const Run r = run_xensockd({"--sim", kNoSimRoot, "--protocols", protocols, "--max-ring-order", "0"});
        CAPTURE(r.output);
        CHECK(r.exit_code == 2);
        CHECK(contains(r.output, "--max-ring-order 0 leaves pvcalls guests no data ring (pvcalls needs ring order 1 or more)"));
        CHECK_FALSE(contains(r.output, "sim root"));  // refused before touching the platform
    }
}

TEST_CASE("xensockd --max-ring-order 0 is fine for xensock alone; 1..3 with pvcalls only warn") {
    {
        const Run r = run_xensockd({"--sim", kNoSimRoot, "--protocols", "xensock", "--max-ring-order", "0"});
        CAPTURE(r.output);
        CHECK(r.exit_code == 3);  // validation passed; the missing sim root stops it
        CHECK_FALSE(contains(r.output, "max-ring-order"));
    }
    for (const char* order : {"1", "3"}) {
        CAPTURE(order);
        const Run r = run_xensockd({"--sim", kNoSimRoot, "--max-ring-order", order});
        CAPTURE(r.output);
        CHECK(r.exit_code == 3);
        CHECK(contains(r.output, std::string("--max-ring-order ") + order + " is below 4: Linux's pvcalls-front"));
    }
    {
        const Run r = run_xensockd({"--sim", kNoSimRoot, "--max-ring-order", "4"});
        CAPTURE(r.output);
        CHECK(r.exit_code == 3);
        CHECK_FALSE(contains(r.output, "max-ring-order"));
    }
}
