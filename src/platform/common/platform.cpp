// open_platform(): sim when asked for (--sim DIR or XENSOCK_SIM_DIR), else
// real Xen when this is a Xen domain, else a clear error saying what to do.
#include "xensock/platform/platform.hpp"

#include "xensock/util/log.hpp"

#include <cstdlib>
#include <stdexcept>
#include <string>

#include <unistd.h>

namespace xensock::platform {

std::unique_ptr<Platform> open_platform(const PlatformOptions& options) {
    if (!options.sim_dir.empty()) {
        log::debug("platform: sim at {} (--sim), domain {}", options.sim_dir, options.sim_domid);
        return open_sim_platform(options.sim_dir, options.sim_domid);
    }
    if (const char* dir = std::getenv("XENSOCK_SIM_DIR"); dir && *dir) {
        log::debug("platform: sim at {} (XENSOCK_SIM_DIR), domain {}", dir, options.sim_domid);
        return open_sim_platform(dir, options.sim_domid);
    }
    // The grant-device node exists in every Xen domain whose kernel has
    // xen-gntdev loaded (dom0 and guests alike); without it nothing works.
    if (::access("/dev/xen/gntdev", F_OK) == 0) {
        log::debug("platform: real Xen");
        return open_xen_platform();
    }
    throw std::runtime_error(
        "no /dev/xen/gntdev: not running in a Xen domain (or the xen-gntdev module is not loaded); "
        "use --sim DIR (or set XENSOCK_SIM_DIR)");
}

}  // namespace xensock::platform
