// The guest side of xensock: a userspace frontend for XenSock v3 and PVCalls
// v1, used by tests, the demo, the benchmarks (many guest processes, many
// connections each) and the real-Xen guest program.
//
// One Guest per guest process (per domain and protocol), living on one
// rt::Reactor; no threads. The Guest performs the frontend half of the
// xenbus handshake on the device directory the toolstack created, owns the
// command ring and one data ring per connected socket, and runs two
// background coroutines: one dispatching event-channel notifications (command
// responses, data-ring kicks), one watching the backend's xenbus state.
//
// Errors follow the runtime's convention: socket operations return 0 / a
// byte count, or a negative errno. What the backend answered is passed on as
// it answered it (negative errnos); failures of the library itself:
//   -EBADF      unknown socket id, or the socket was released meanwhile
//   -ENOTCONN   the backend left Connected (closed, restarted, detached)
//   -ECANCELED  the Guest is closing
//   -ETIMEDOUT  the operation's optional timeout expired
//   -EIO        the backend broke the protocol (indexes a ring apart, ...)
//
// Lifetime: call close() and let every operation finish before destroying
// the Guest. Destroying it without close() releases everything at once
// (grants, ports) without telling the backend — like a crashed domain.
#pragma once

#include "xensock/platform/platform.hpp"
#include "xensock/platform/xenstore.hpp"
#include "xensock/runtime/cancel.hpp"
#include "xensock/runtime/reactor.hpp"
#include "xensock/runtime/task.hpp"
#include "xensock/util/result.hpp"
#include "xensock/wire/data_ring.hpp"
#include "xensock/wire/profile.hpp"
#include "xensock/wire/xen_ring.hpp"

#include <netinet/in.h>
#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace xensock::frontend {

using platform::DomId;
using platform::Port;

// ------------------------------------------------------------ data rings
// The guest's two steps on a data ring, as pure functions over memory so they
// can be tested without a backend. Both follow the protocol exactly and read
// every shared index once, validating it (a hostile backend must not crash
// or confuse the guest).

// One data ring as mapped by the guest.
struct RingHalves {
    wire::DataIntfView intf;
    std::byte* in = nullptr;   // first half of the ring pages: backend produces
    std::byte* out = nullptr;  // second half: the guest produces
    uint32_t size = 0;         // bytes per direction, a power of two
};

// A peer-written error (either sign; the seed's text says positive, Linux
// writes negative) as a negative errno; -EIO for values no errno has.
int normalize_ring_error(int32_t value) noexcept;

// Producer on OUT: read cons/prod/error, full barrier, stop on error, copy
// as much as fits (wrapping), write barrier, bump out_prod. The caller
// notifies. Returns bytes queued (> 0), -EAGAIN if the ring is full, the
// normalized out_error, or -EIO if the indexes are more than a ring apart.
// Returns 0 only for empty `data`.
ssize_t produce_out(RingHalves ring, std::span<const std::byte> data) noexcept;

// Consumer on IN: read error, read barrier, read prod/cons, copy what is
// there (wrapping), full barrier, bump in_cons. The caller notifies. Returns
// bytes copied (> 0); once the ring is empty: 0 if in_error is ENOTCONN
// (orderly shutdown), the normalized in_error if set, else -EAGAIN. -EIO if
// the indexes are more than a ring apart. Returns 0 for empty `buf`.
ssize_t consume_in(RingHalves ring, std::span<std::byte> buf) noexcept;

// Copies into / out of a circular buffer of `size` bytes (power of two) at
// free-running index `index`, wrapping at the end. len <= size.
void copy_to_ring(std::byte* base, uint32_t size, uint32_t index, const std::byte* src, uint32_t len) noexcept;
void copy_from_ring(const std::byte* base, uint32_t size, uint32_t index, std::byte* dst, uint32_t len) noexcept;

// ------------------------------------------------------------- addresses

// A Linux sockaddr_in for addr:port ("127.0.0.1"); nullopt if unparsable.
std::optional<sockaddr_in> ipv4(std::string_view addr, uint16_t port);

// ------------------------------------------------------------------ guest

struct GuestOptions {
    DomId backend = 0;
    const wire::ProtocolProfile* profile = nullptr;  // required
    // Data ring order for connect/accept; 0 = the largest the backend allows,
    // capped at 6 (and at least the protocol's minimum).
    unsigned ring_order = 0;
    // Bounds every xenbus wait: attach's handshake and close's.
    std::chrono::milliseconds connect_timeout{10000};
    // Data rings kept after the backend let go of them (a RELEASE, or a
    // failed CONNECT/ACCEPT, was answered): still granted, their port still
    // allocated, ready for the next connect/accept of the same order. Saves
    // allocating, zeroing, granting and ending 1 + 2^order pages and an
    // event-channel port per connection (PVCalls: RELEASE says reuse = 1).
    // 0: free every ring at once.
    size_t ring_pool = 8;
};

// Per-connect/accept overrides, mostly for tests.
struct RingOptions {
    // Ring order; any value up to wire::kHardMaxRingOrder is sent as asked
    // (to test the backend's refusal). Default: the Guest's order.
    std::optional<unsigned> order;
    // Initial value of all four indexes, e.g. 0xFFFFF000 to cross the u32
    // wrap early. The backend starts from what the page holds.
    uint32_t start_index = 0;
    // Sent in the request instead of the ring's own interface-page ref /
    // event-channel port (the ring is still allocated and freed as usual):
    // to test the backend's refusal of bad refs and ports.
    std::optional<uint32_t> ref_override;
    std::optional<uint32_t> evtchn_override;
};

enum class SocketState { created, bound, listening, connecting, connected, accepting, releasing };
std::string_view socket_state_name(SocketState s) noexcept;

struct SocketInfo {
    uint64_t id = 0;
    SocketState state = SocketState::created;
    bool has_ring = false;
    unsigned ring_order = 0;
    Port port = 0;           // local event-channel port of the data ring
    uint32_t intf_ref = 0;   // grant ref of the data interface page
    uint64_t bytes_sent = 0, bytes_received = 0;
};

struct GuestStats {
    uint64_t requests = 0;            // pushed onto the command ring
    uint64_t responses = 0;           // matched to a waiting request
    uint64_t ignored_responses = 0;   // unknown req_id (late after timeout, or a bad backend)
    uint64_t command_notifies = 0;    // notifications sent for the command ring
    uint64_t data_notifies = 0;       // notifications sent for data rings
    uint64_t rings_reused = 0;        // connect/accept served from the ring pool
    uint64_t events = 0;              // ports that fired
    uint64_t bytes_sent = 0, bytes_received = 0;
};

// Thrown by call() when its timeout expires.
class CallTimeout : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class Guest {
public:
    // The frontend half of the xenbus handshake on this domain's device
    // directory (created by the toolstack; waited for if not there yet):
    // resets our state to Initialising if a previous incarnation left another
    // one, waits for the backend's InitWait, reads its nodes, shares the
    // command ring page, allocates the command port, publishes the protocol's
    // frontend nodes with state Initialised (one transaction), waits for the
    // backend's Connected, writes Connected. Every wait is a xenstore watch
    // bounded by connect_timeout. Throws std::runtime_error saying what
    // failed (and the states seen) on any failure.
    static rt::Task<std::unique_ptr<Guest>> attach(rt::Reactor& reactor, platform::Platform& platform,
                                                   GuestOptions options);

    ~Guest();
    Guest(const Guest&) = delete;
    Guest& operator=(const Guest&) = delete;

    // Orderly shutdown: state Closing, wait (bounded) for the backend to be
    // Closing or Closed (it has unmapped everything), state Closed, then end
    // every grant and unbind every port. Pending operations complete with
    // -ECANCELED. Idempotent. Never throws; a backend that does not answer
    // in time is logged and the resources are released anyway.
    rt::Task<void> close();

    // ---------------------------------------------------------- raw commands
    // Sends `req` as it is (req_id is filled in; everything else, including
    // a raw_cmd for Command::unknown, is the caller's) and waits for the
    // response with the same req_id, in whatever order responses come.
    // timeout 0 = wait forever. Throws CallTimeout on timeout, and
    // std::runtime_error if the backend left Connected or the Guest closes.
    // A response that arrives after its timeout is counted and dropped.
    rt::Task<wire::Response> call(wire::Request req, std::chrono::milliseconds timeout = {});
    // Same, but a timeout is std::nullopt instead of an exception.
    rt::Task<std::optional<wire::Response>> try_call(wire::Request req, std::chrono::milliseconds timeout);

    // --------------------------------------------------------------- sockets
    // Socket ids are chosen here, unique per Guest, in [1, 2^32); raw call()
    // users wanting their own ids should pick them above that.

    // SOCKET(AF_INET, SOCK_STREAM, 0). On success `id` is the new socket.
    rt::Task<int> socket(uint64_t& id);
    // Allocates a data ring (1 interface page + 2^order pages, shared with
    // the backend; one unbound port) and sends CONNECT; on failure the ring
    // is freed. -EISCONN if already connected, -EALREADY while connecting.
    rt::Task<int> connect(uint64_t id, const sockaddr_in& addr, RingOptions ring = {});
    rt::Task<int> bind(uint64_t id, const sockaddr_in& addr);
    rt::Task<int> listen(uint64_t id, uint32_t backlog = 128);
    // Allocates a data ring for a new socket and sends ACCEPT; the backend
    // answers once a connection was accepted. On success `new_id` is the
    // connected socket.
    rt::Task<int> accept(uint64_t listen_id, uint64_t& new_id, RingOptions ring = {});
    // POLL on a passive socket: completes when a connection is queued.
    rt::Task<int> poll(uint64_t listen_id);
    // RELEASE; then frees the data ring and port (the backend has unmapped
    // them before answering). Bytes already queued in the out half are still
    // delivered by the backend. Blocked send()/recv() on the socket return
    // -EBADF. The socket is forgotten whatever the answer.
    rt::Task<int> release(uint64_t id);
    // shutdown(2) on a connected socket, done locally: neither protocol has
    // a shutdown command, so nothing is sent to the backend.
    //   SHUT_RD    recv() returns 0 from now on; bytes already queued and
    //              bytes still arriving are discarded (and consumed, so the
    //              peer is never stalled by a reader that left).
    //   SHUT_WR    send() fails with -EPIPE from now on; bytes already
    //              queued are still delivered.
    //   SHUT_RDWR  both.
    // The peer does NOT see end-of-stream at SHUT_WR: the only end-of-stream
    // the protocols can signal is RELEASE, which is close(2) — release() the
    // socket when done writing (queued bytes still go out first).
    // Returns 0; -EBADF unknown id (or released), -ENOTCONN not connected,
    // -EINVAL bad `how`. Blocked send()/recv() on the socket wake up.
    int shutdown(uint64_t id, int how);

    // ------------------------------------------------------------ data path
    // One sender and one receiver per socket at a time. timeout 0 = none.

    // Queues up to data.size() bytes on the out half, waiting while it is
    // full; returns how many (> 0), or -errno (out_error, -ENOTCONN, ...).
    rt::Task<ssize_t> send(uint64_t id, std::span<const std::byte> data, std::chrono::milliseconds timeout = {});
    // Takes up to buf.size() bytes from the in half, waiting while it is
    // empty; returns how many (> 0), 0 on the peer's orderly shutdown once
    // every byte before it was read, or -errno.
    rt::Task<ssize_t> recv(uint64_t id, std::span<std::byte> buf, std::chrono::milliseconds timeout = {});
    // All of data, or -errno (bytes queued before the error stay queued).
    rt::Task<ssize_t> send_all(uint64_t id, std::span<const std::byte> data, std::chrono::milliseconds timeout = {});
    // Fills buf; returns buf.size(), fewer at end of stream, or -errno.
    // The timeout bounds the whole call.
    rt::Task<ssize_t> recv_exact(uint64_t id, std::span<std::byte> buf, std::chrono::milliseconds timeout = {});

    // ------------------------------------------------- introspection, tests
    DomId domid() const noexcept { return domid_; }
    DomId backend_id() const noexcept { return options_.backend; }
    const wire::ProtocolProfile& profile() const noexcept { return *options_.profile; }
    const std::string& frontend_path() const noexcept { return frontend_path_; }
    const std::string& backend_path() const noexcept { return backend_path_; }
    unsigned max_ring_order() const noexcept { return backend_max_order_; }  // as the backend published
    unsigned ring_order() const noexcept { return ring_order_; }              // used by default
    Port command_port() const noexcept { return cmd_port_.port(); }
    uint32_t command_ring_ref() const;
    bool connected() const noexcept { return state_ == State::connected && !backend_gone_; }
    bool backend_gone() const noexcept { return backend_gone_; }
    // Last backend xenbus state seen (0 if its node is missing).
    int backend_state() const noexcept { return backend_state_; }
    size_t socket_count() const noexcept { return sockets_.size(); }
    size_t pending_calls() const noexcept { return pending_.size(); }
    const GuestStats& stats() const noexcept { return stats_; }

    std::optional<SocketInfo> socket_info(uint64_t id) const;
    // The socket's data interface page, to read or forge indexes.
    std::optional<wire::DataIntfView> data_intf(uint64_t id) const;
    std::optional<RingHalves> data_ring(uint64_t id) const;
    // Kicks the backend on the socket's data-ring port (after forging).
    Status notify_socket(uint64_t id);
    // The command ring's shared header, to read or forge its indexes, and a
    // kick on the command port after forging (tests: a hostile frontend).
    wire::SringHeader* command_ring_header() const noexcept;
    Status notify_command_ring();
    // This Guest's xenstore connection (tests: read or write nodes).
    platform::XenStore& xenstore() noexcept { return *xs_; }

private:
    struct Pending;
    struct DataRing;
    struct Socket;
    struct LoopLatch;
    enum class State { attaching, connected, closing, closed };

    Guest(rt::Reactor& reactor, platform::Platform& platform, GuestOptions options);

    rt::Task<void> handshake();
    // Waits until pred(value of path) holds; returns the last value read and
    // whether pred held before `deadline`.
    template <typename Pred>
    rt::Task<std::pair<bool, std::optional<std::string>>> wait_node(const std::string& path, Pred pred,
                                                                    std::chrono::steady_clock::time_point deadline);
    void start_loops();
    static rt::Task<void> event_loop(Guest* self, std::shared_ptr<LoopLatch> latch, rt::CancelToken token);
    static rt::Task<void> xenstore_loop(Guest* self, std::shared_ptr<LoopLatch> latch, rt::CancelToken token);
    void dispatch(Port port);
    void drain_responses();
    void check_backend_state();
    void on_backend_gone(const char* why);
    void release_everything();

    // Sends req (filling req_id) and waits: 0 with `out` filled, or -errno.
    rt::Task<int> transact(wire::Request& req, wire::Response& out, std::chrono::milliseconds timeout);
    rt::Task<int> simple_command(wire::Request req);

    Result<std::unique_ptr<DataRing>> alloc_ring(const RingOptions& opts);
    void attach_ring(Socket& sock, std::unique_ptr<DataRing> ring);
    void free_ring(Socket& sock) noexcept;
    // After the backend answered for the ring (it unmapped it and unbound
    // its port): into the pool if there is room, else freed.
    void recycle_ring(Socket& sock) noexcept;
    bool pool_has_room() const noexcept;
    std::shared_ptr<Socket> find(uint64_t id) const;
    std::shared_ptr<Socket> new_socket(SocketState state);
    uint32_t next_req_id();

    rt::Reactor* reactor_;
    GuestOptions options_;
    DomId domid_ = 0;
    std::string frontend_path_, backend_path_;
    std::string watch_token_;
    unsigned backend_max_order_ = 0;
    unsigned ring_order_ = 0;
    State state_ = State::attaching;
    bool backend_gone_ = false;
    bool ring_broken_ = false;  // the backend corrupted the command ring
    int backend_state_ = 0;
    bool watching_backend_ = false;

    // Platform handles first: everything below releases through them.
    std::unique_ptr<platform::XenStore> xs_;
    std::unique_ptr<platform::EventChannel> evtchn_;
    std::unique_ptr<platform::GrantSharer> sharer_;

    rt::CancelSource cancel_;  // everything of this Guest; cancelled by close()
    std::shared_ptr<LoopLatch> loops_;

    platform::SharedPages cmd_page_;
    platform::BoundPort cmd_port_;
    wire::FrontRing ring_;
    rt::Event slot_freed_;             // a command-ring slot became free
    rt::Event backend_state_changed_;  // the xenstore loop read a new state
    uint32_t last_req_id_ = 0;
    std::unordered_map<uint32_t, Pending*> pending_;

    uint64_t last_sockid_ = 0;
    std::unordered_map<uint64_t, std::shared_ptr<Socket>> sockets_;
    std::unordered_map<Port, Socket*> by_port_;  // data-ring ports
    std::vector<std::unique_ptr<DataRing>> ring_pool_;  // see GuestOptions::ring_pool

    GuestStats stats_;
    std::vector<Port> fired_;
};

}  // namespace xensock::frontend
