// The control plane against an engine in this process, so that a test can
// stall or stop one of its workers (Engine::run_on_worker_for_testing) and
// check that control requests then answer with an error naming the worker,
// in bounded time, instead of hanging or posting to a worker that is gone.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "control.hpp"
#include "sim_env.hpp"

#include "xensock/engine/engine.hpp"
#include "xensock/platform/platform.hpp"
#include "xensock/runtime/reactor.hpp"

#include <nlohmann/json.hpp>

#include <future>
#include <optional>

using namespace xensock;
using namespace xensock::testing;
using nlohmann::json;

namespace {

bool contains(const json& answer, const std::string& text) {
    return answer.contains("error") && answer["error"].is_string() &&
           answer["error"].get<std::string>().find(text) != std::string::npos;
}

// xensockd's engine and control handler, without the daemon around them:
// two workers; domid 2's device is on worker 0, odd domids go to worker 1.
struct InProcessDaemon {
    SimEnv env{SimEnvOptions{.max_ring_order = 6, .workers = 2, .extra_args = {}, .start_daemon = false}};
    std::unique_ptr<platform::Platform> platform;
    std::optional<engine::Engine> engine;
    std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();

    InProcessDaemon() {
        platform::PlatformOptions options;
        options.sim_dir = env.root();
        platform = platform::open_platform(options);
        engine::EngineConfig config;
        config.workers = 2;
        config.control_timeout = std::chrono::milliseconds(300);
        engine.emplace(*platform, config);
        engine->start();
        env.attach(2, wire::xensock_v3_profile());
        REQUIRE(env.wait_for(env.backend_path(2, wire::xensock_v3_profile()) + "/state", "2"));
    }
    json ask(const json& request) { return daemon::ControlServer::handle(*engine, request, started); }
};

}  // namespace

TEST_CASE("a stalled worker: list and kill answer 'worker N is not responding' instead of hanging") {
    InProcessDaemon d;
    std::promise<void> entered, release;
    bool released = false;
    auto free_worker = [&] {
        if (!released) release.set_value();
        released = true;
    };
    REQUIRE(d.engine->run_on_worker_for_testing(1, [&entered, until = release.get_future().share()] {
        entered.set_value();
        until.wait();  // the worker's thread is stuck here
    }));
    entered.get_future().wait();

    for (const json& request : {json{{"op", "list"}}, json{{"op", "stats"}}, json{{"op", "kill"}, {"domid", 3u}}}) {
        CAPTURE(request.dump());
        auto pending = std::async(std::launch::async, [&d, request] { return d.ask(request); });
        const bool answered = pending.wait_for(std::chrono::seconds(30)) == std::future_status::ready;
        if (!answered) free_worker();  // let the hung call finish, then fail
        REQUIRE_MESSAGE(answered, "the control request hung on a stalled worker");
        const json answer = pending.get();
        CHECK(answer["ok"] == false);
        CHECK(answer["code"] == "internal");
        CHECK_MESSAGE(contains(answer, "worker 1 is not responding (no answer within 300 ms)"), answer.dump());
    }
    // The other worker is not held up: domid 2 is on worker 0.
    json answer = d.ask({{"op", "kill"}, {"domid", 2u}, {"sockid", 7u}});
    CHECK_MESSAGE(answer["code"] == "not_found", answer.dump());

    free_worker();
    // Running again, the worker answers; the requests it missed were dropped.
    CHECK(eventually([&] { return d.ask({{"op", "list"}})["ok"] == true; }));
    answer = d.ask({{"op", "list"}});
    REQUIRE(answer["sessions"].size() == 1);
    CHECK(answer["sessions"][0]["domid"] == 2);
    d.engine->stop();
}

TEST_CASE("a worker that ended: requests that need it say so at once, stop() still works") {
    InProcessDaemon d;
    // Its reactor stops without the engine asking: the worker's thread
    // leaves, as after a failure.
    REQUIRE(d.engine->run_on_worker_for_testing(1, [] { rt::Reactor::current()->stop(); }));
    CHECK(eventually([&] { return contains(d.ask({{"op", "list"}}), "worker 1 is not running"); }));
    CHECK(!d.engine->run_on_worker_for_testing(1, [] {}));

    json answer = d.ask({{"op", "list"}});
    CHECK(answer["code"] == "internal");
    CHECK_MESSAGE(contains(answer, "worker 1 is not running (it failed or is stopping; see xensockd's log)"),
                  answer.dump());
    answer = d.ask({{"op", "kill"}, {"domid", 3u}});
    CHECK_MESSAGE(contains(answer, "worker 1 is not running"), answer.dump());
    // Worker 0 still serves its guests.
    answer = d.ask({{"op", "kill"}, {"domid", 2u}, {"sockid", 7u}});
    CHECK_MESSAGE(answer["code"] == "not_found", answer.dump());
    d.engine->stop();
}
