// The toolstack role against the sim's real xenstored: attach writes what
// libxl writes (nodes and permissions), detach follows libxl's removal
// (online 0, Closing, bounded wait for Closed, remove both directories).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "xensock/platform/sim_xenstored.hpp"
#include "xensock/platform/xenstore.hpp"
#include "xensock/toolstack/toolstack.hpp"
#include "xensock/wire/profile.hpp"

#include <poll.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>

namespace {

using namespace xensock;
using namespace std::chrono_literals;
namespace sim = xensock::platform::sim;
using Clock = std::chrono::steady_clock;

struct SimRoot {
    std::string dir;
    std::optional<sim::XenstoredProcess> xenstored;

    SimRoot() {
        char tmpl[] = "/dev/shm/xs-XXXXXX";
        if (!::mkdtemp(tmpl)) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
        dir = tmpl;
        try {
            xenstored.emplace(sim::XenstoredProcess::start(dir, sim::default_xenstored_paths()));
        } catch (...) {
            std::error_code ec;
            std::filesystem::remove_all(dir, ec);
            throw;
        }
    }
    ~SimRoot() {
        xenstored.reset();
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);
    }
    SimRoot(const SimRoot&) = delete;
    SimRoot& operator=(const SimRoot&) = delete;

    std::unique_ptr<platform::XenStore> open() const {
        return std::make_unique<platform::XenStore>(xenstored->socket_path());
    }
};

bool same(const std::vector<platform::XsPermission>& got, const std::vector<platform::XsPermission>& want) {
    if (got.size() != want.size()) return false;
    for (size_t i = 0; i < got.size(); ++i)
        if (got[i].domid != want[i].domid || got[i].access != want[i].access) return false;
    return true;
}

std::string show(const std::optional<std::vector<platform::XsPermission>>& perms) {
    if (!perms) return "(none)";
    std::string s;
    for (const auto& p : *perms) s += std::string(1, p.access) + std::to_string(p.domid) + " ";
    return s;
}

// A stand-in backend on its own connection: when the toolstack says
// Closing, it says Closed (after `delay`), as xensockd does.
class FakeBackend {
public:
    FakeBackend(const SimRoot& root, std::string be_dir, std::chrono::milliseconds delay)
        : xs_(root.open()), dir_(std::move(be_dir)), delay_(delay) {
        REQUIRE(xs_->watch(dir_ + "/state", "fake").ok());
        thread_ = std::thread([this] { run(); });
    }
    ~FakeBackend() {
        stop_ = true;
        thread_.join();
    }
    bool answered() const { return answered_; }

private:
    void run() {
        while (!stop_) {
            pollfd pfd{xs_->fd(), POLLIN, 0};
            (void)::poll(&pfd, 1, 50);
            while (xs_->read_watch()) {
            }
            auto state = xs_->read(dir_ + "/state");
            if (state && *state == "5" && !answered_) {
                std::this_thread::sleep_for(delay_);
                // Before the write: detach may return (and the test look) the
                // moment state 6 is there.
                answered_ = true;
                (void)xs_->write(dir_ + "/state", "6");
            }
        }
    }
    std::unique_ptr<platform::XenStore> xs_;
    std::string dir_;
    std::chrono::milliseconds delay_;
    std::atomic<bool> stop_{false}, answered_{false};
    std::thread thread_;
};

}  // namespace

TEST_CASE("toolstack: paths") {
    CHECK(toolstack::frontend_dir(wire::pvcalls_v1_profile(), 7) == "/local/domain/7/device/pvcalls/0");
    CHECK(toolstack::backend_dir(wire::pvcalls_v1_profile(), 7) == "/local/domain/0/backend/pvcalls/7/0");
    CHECK(toolstack::frontend_dir(wire::xensock_v3_profile(), 12) == "/local/domain/12/device/xensock/0");
    CHECK(toolstack::backend_dir(wire::xensock_v3_profile(), 12, 3) == "/local/domain/3/backend/xensock/12/0");
}

TEST_CASE("toolstack: attach writes libxl's nodes and permissions; a second attach is EEXIST") {
    SimRoot root;
    auto xs = root.open();
    for (const wire::ProtocolProfile* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        const platform::DomId guest = 5;
        const std::string fe = toolstack::frontend_dir(*profile, guest);
        const std::string be = toolstack::backend_dir(*profile, guest);

        std::string why;
        REQUIRE_MESSAGE(toolstack::attach(*xs, *profile, guest, 0, &why).ok(), why);

        CHECK(xs->read(fe + "/backend") == be);
        CHECK(xs->read(fe + "/backend-id") == "0");
        CHECK(xs->read(fe + "/state") == "1");
        CHECK(xs->read(be + "/frontend") == fe);
        CHECK(xs->read(be + "/frontend-id") == "5");
        CHECK(xs->read(be + "/online") == "1");
        CHECK(xs->read(be + "/state") == "1");
        // Only the toolstack's nodes: the protocol's are the two ends' business.
        auto fe_nodes = xs->directory(fe);
        REQUIRE(fe_nodes);
        CHECK(fe_nodes->size() == 3);
        auto be_nodes = xs->directory(be);
        REQUIRE(be_nodes);
        CHECK(be_nodes->size() == 4);

        // Frontend: owner the guest, backend may read; backend: the reverse.
        const auto fe_perms = xs->get_permissions(fe);
        CHECK_MESSAGE(fe_perms, "no permissions on " << fe);
        if (fe_perms) CHECK_MESSAGE(same(*fe_perms, {{5, 'n'}, {0, 'r'}}), show(fe_perms));
        const auto be_perms = xs->get_permissions(be);
        if (be_perms) CHECK_MESSAGE(same(*be_perms, {{0, 'n'}, {5, 'r'}}), show(be_perms));
        // Children inherit them.
        const auto state_perms = xs->get_permissions(fe + "/state");
        if (state_perms) CHECK_MESSAGE(same(*state_perms, {{5, 'n'}, {0, 'r'}}), show(state_perms));

        Status again = toolstack::attach(*xs, *profile, guest, 0, &why);
        CHECK(again.error() == EEXIST);
        CHECK(why.find("already") != std::string::npos);
        // Nothing was touched by the refused attach.
        CHECK(xs->read(fe + "/state") == "1");

        // A leftover backend directory alone also counts as attached.
        REQUIRE(xs->rm(fe).ok());
        CHECK(toolstack::attach(*xs, *profile, guest, 0, &why).error() == EEXIST);
        CHECK_FALSE(xs->read(fe));
        REQUIRE(xs->rm(be).ok());
        CHECK(toolstack::attach(*xs, *profile, guest, 0, &why).ok());
        REQUIRE(xs->rm(fe).ok());
        REQUIRE(xs->rm(be).ok());
    }
    std::string why;
    CHECK(toolstack::attach(*xs, wire::pvcalls_v1_profile(), 0, 0, &why).error() == EINVAL);
}

TEST_CASE("toolstack: detach waits for the backend's Closed, then removes both directories") {
    SimRoot root;
    auto xs = root.open();
    for (const wire::ProtocolProfile* profile : wire::all_profiles()) {
        CAPTURE(profile->name());
        const platform::DomId guest = 9;
        const std::string fe = toolstack::frontend_dir(*profile, guest);
        const std::string be = toolstack::backend_dir(*profile, guest);
        std::string why;
        REQUIRE(toolstack::attach(*xs, *profile, guest, 0, &why).ok());
        {
            FakeBackend backend(root, be, 200ms);
            const auto start = Clock::now();
            Status st = toolstack::detach(*xs, *profile, guest, 0, 5s, &why);
            const auto took = Clock::now() - start;
            CHECK_MESSAGE(st.ok(), why);
            CHECK(backend.answered());
            CHECK(took >= 200ms);  // it did wait for Closed
            CHECK(took < 4s);      // and did not sit out the bound
        }
        CHECK_FALSE(xs->read(fe));
        CHECK_FALSE(xs->read(be));
        // No empty per-guest directory left behind.
        CHECK_FALSE(xs->read("/local/domain/0/backend/" + std::string(profile->name()) + "/9"));

        // Nothing attached any more.
        CHECK(toolstack::detach(*xs, *profile, guest, 0, 100ms, &why).error() == ENOENT);
    }
}

TEST_CASE("toolstack: detach without a backend times out after the bound and still removes the device") {
    SimRoot root;
    auto xs = root.open();
    const auto& profile = wire::xensock_v3_profile();
    const platform::DomId guest = 3;
    const std::string fe = toolstack::frontend_dir(profile, guest);
    const std::string be = toolstack::backend_dir(profile, guest);
    std::string why;
    REQUIRE(toolstack::attach(*xs, profile, guest, 0, &why).ok());

    // Watch what detach writes, from another connection.
    auto observer = root.open();
    const auto start = Clock::now();
    Status st = toolstack::detach(*xs, profile, guest, 0, 300ms, &why);
    const auto took = Clock::now() - start;
    CHECK(st.error() == ETIMEDOUT);
    CHECK(why.find("backend did not reach Closed within 300 ms") != std::string::npos);
    CHECK(took >= 300ms);
    CHECK(took < 3s);
    CHECK_FALSE(xs->read(fe));
    CHECK_FALSE(xs->read(be));
    CHECK_FALSE(observer->read(be));
}

TEST_CASE("toolstack: detach sets online 0 and Closing before waiting") {
    SimRoot root;
    auto xs = root.open();
    const auto& profile = wire::pvcalls_v1_profile();
    const platform::DomId guest = 4;
    const std::string be = toolstack::backend_dir(profile, guest);
    std::string why;
    REQUIRE(toolstack::attach(*xs, profile, guest, 0, &why).ok());

    // An observer that records what it sees when state becomes 5.
    auto obs = root.open();
    REQUIRE(obs->watch(be + "/state", "obs").ok());
    std::atomic<bool> saw_closing{false}, online_was_zero{false};
    std::thread t([&] {
        const auto end = Clock::now() + 3s;
        while (Clock::now() < end && !saw_closing) {
            pollfd pfd{obs->fd(), POLLIN, 0};
            (void)::poll(&pfd, 1, 20);
            while (obs->read_watch()) {
            }
            if (obs->read(be + "/state") == "5") {
                online_was_zero = obs->read(be + "/online") == "0";
                saw_closing = true;
                (void)obs->write(be + "/state", "6");
            }
        }
    });
    Status st = toolstack::detach(*xs, profile, guest, 0, 3s, &why);
    t.join();
    CHECK_MESSAGE(st.ok(), why);
    CHECK(saw_closing);
    CHECK(online_was_zero);

    // A backend already Closed: detach does not wait at all.
    REQUIRE(toolstack::attach(*xs, profile, guest, 0, &why).ok());
    REQUIRE(xs->write(be + "/state", "6").ok());
    const auto start = Clock::now();
    CHECK(toolstack::detach(*xs, profile, guest, 0, 5s, &why).ok());
    CHECK(Clock::now() - start < 1s);
}
