// The real-Xen platform where it can be tested without a hypervisor: on a
// machine that is not a Xen domain, asking for it fails with a message that
// names the missing /dev/xen device and points at --sim.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "xensock/platform/platform.hpp"
#include "xensock/platform/xenstore.hpp"

#include <cerrno>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <string>
#include <system_error>

#include <unistd.h>

namespace {

namespace xp = xensock::platform;

bool in_xen_domain() { return ::access("/dev/xen", F_OK) == 0; }

template <typename F>
std::string failure_of(F&& open) {
    try {
        auto platform = open();
        return "opened platform " + (platform ? platform->name() : std::string("(null)"));
    } catch (const std::exception& e) {
        return e.what();
    }
}

}  // namespace

TEST_CASE("open_xen_platform() outside Xen names /dev/xen and --sim") {
    if (in_xen_domain()) {
        MESSAGE("/dev/xen exists: this is a Xen domain, nothing to check here");
        return;
    }
    const std::string what = failure_of([] { return xp::open_xen_platform(); });
    INFO("error: " << what);
    CHECK(what.find("/dev/xen/") != std::string::npos);
    CHECK(what.find("--sim") != std::string::npos);
}

TEST_CASE("open_platform({}) without XENSOCK_SIM_DIR outside Xen names /dev/xen and --sim") {
    if (in_xen_domain()) {
        MESSAGE("/dev/xen exists: this is a Xen domain, nothing to check here");
        return;
    }
    ::unsetenv("XENSOCK_SIM_DIR");
    const std::string what = failure_of([] { return xp::open_platform({}); });
    INFO("error: " << what);
    CHECK(what.find("/dev/xen/gntdev") != std::string::npos);
    CHECK(what.find("--sim") != std::string::npos);
    CHECK(what.find("XENSOCK_SIM_DIR") != std::string::npos);

    // An empty XENSOCK_SIM_DIR counts as unset.
    ::setenv("XENSOCK_SIM_DIR", "", 1);
    CHECK(failure_of([] { return xp::open_platform({}); }) == what);
    ::unsetenv("XENSOCK_SIM_DIR");
}

TEST_CASE("open_platform() picks sim for --sim DIR, then XENSOCK_SIM_DIR") {
    char tmpl[] = "/dev/shm/xs-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    const std::string dir = tmpl;
    char other_tmpl[] = "/dev/shm/xs-XXXXXX";
    REQUIRE(::mkdtemp(other_tmpl));
    const std::string other = other_tmpl;

    ::unsetenv("XENSOCK_SIM_DIR");
    xp::PlatformOptions options;
    options.sim_dir = dir;
    auto platform = xp::open_platform(options);
    REQUIRE(platform);
    CHECK(platform->name() == "sim:" + dir);
    platform.reset();

    ::setenv("XENSOCK_SIM_DIR", dir.c_str(), 1);
    platform = xp::open_platform({});
    REQUIRE(platform);
    CHECK(platform->name() == "sim:" + dir);
    platform.reset();

    // --sim wins over the environment.
    options.sim_dir = other;
    platform = xp::open_platform(options);
    REQUIRE(platform);
    CHECK(platform->name() == "sim:" + other);
    platform.reset();
    ::unsetenv("XENSOCK_SIM_DIR");

    std::filesystem::remove_all(dir);
    std::filesystem::remove_all(other);
}

TEST_CASE("XenStore() outside Xen says there is no xenstore and points at --sim") {
    ::unsetenv("XENSTORED_PATH");
    ::unsetenv("XENSTORED_RUNDIR");
    if (in_xen_domain() || ::access("/var/run/xenstored/socket", F_OK) == 0) {
        MESSAGE("a xenstore is reachable here, nothing to check");
        return;
    }
    try {
        xp::XenStore xs;
        FAIL("opened a xenstore");
    } catch (const std::system_error& e) {
        const std::string what = e.what();
        INFO("error: " << what);
        CHECK(what.find("/dev/xen/xenbus") != std::string::npos);
        CHECK(what.find("/var/run/xenstored/socket") != std::string::npos);
        CHECK(what.find("--sim") != std::string::npos);
    }
}
