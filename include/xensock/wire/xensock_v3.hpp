// XenSock draft v3 wire layouts (shared/seeds/xensock-protocol-draft-v3.md,
// with the errata in shared/spec/protocols.md: the #defines are
// authoritative, ENOTSUPP is 524, the data interface is one struct).
// Every size and offset is pinned by a static_assert.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xensock::wire::xensock_v3 {

inline constexpr const char* kNodeName = "xensock";

enum : uint32_t { SOCKET = 0, CONNECT = 1, RELEASE = 2, BIND = 3, LISTEN = 4, ACCEPT = 5, POLL = 6 };

struct Request {
    uint32_t id;
    uint32_t cmd;
    uint64_t sockid;
    union {
        struct {
            uint32_t domain;
            uint32_t type;
            uint32_t protocol;
        } socket;
        struct {
            uint8_t addr[28];
            uint32_t len;
            uint32_t flags;
            uint32_t ref;
            uint32_t evtchn;
        } connect;
        struct {
            uint8_t addr[28];
            uint32_t len;
        } bind;
        struct {
            uint32_t backlog;
        } listen;
        struct {
            uint64_t sockid;
            uint32_t ref;
            uint32_t evtchn;
        } accept;
        uint8_t dummy[48];
    } u;
};
static_assert(sizeof(Request) == 64);
static_assert(offsetof(Request, id) == 0);
static_assert(offsetof(Request, cmd) == 4);
static_assert(offsetof(Request, sockid) == 8);
static_assert(offsetof(Request, u) == 16);
static_assert(offsetof(Request, u.socket.domain) == 16);
static_assert(offsetof(Request, u.socket.type) == 20);
static_assert(offsetof(Request, u.socket.protocol) == 24);
static_assert(offsetof(Request, u.connect.addr) == 16);
static_assert(offsetof(Request, u.connect.len) == 44);
static_assert(offsetof(Request, u.connect.flags) == 48);
static_assert(offsetof(Request, u.connect.ref) == 52);
static_assert(offsetof(Request, u.connect.evtchn) == 56);
static_assert(offsetof(Request, u.bind.addr) == 16);
static_assert(offsetof(Request, u.bind.len) == 44);
static_assert(offsetof(Request, u.listen.backlog) == 16);
static_assert(offsetof(Request, u.accept.sockid) == 16);
static_assert(offsetof(Request, u.accept.ref) == 24);
static_assert(offsetof(Request, u.accept.evtchn) == 28);

// x86_64 natural layout: 20 bytes of fields, 24 with tail padding.
struct Response {
    uint32_t id;
    uint32_t cmd;
    uint64_t sockid;
    int32_t ret;
};
static_assert(sizeof(Response) == 24);
static_assert(offsetof(Response, id) == 0);
static_assert(offsetof(Response, cmd) == 4);
static_assert(offsetof(Response, sockid) == 8);
static_assert(offsetof(Response, ret) == 16);

struct DataIntf {
    uint32_t in_cons, in_prod;
    uint32_t out_cons, out_prod;
    int32_t in_error, out_error;
    uint32_t ring_order;
    uint32_t ref[1];  // first of 1 << ring_order grant refs (C flexible array)
};
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
static_assert(offsetof(DataIntf, in_cons) == 0);
static_assert(offsetof(DataIntf, in_prod) == 4);
static_assert(offsetof(DataIntf, out_cons) == 8);
static_assert(offsetof(DataIntf, out_prod) == 12);
static_assert(offsetof(DataIntf, in_error) == 16);
static_assert(offsetof(DataIntf, out_error) == 20);
static_assert(offsetof(DataIntf, ring_order) == 24);
static_assert(offsetof(DataIntf, ref) == 28);
#pragma GCC diagnostic pop

inline constexpr unsigned kMinRingOrder = 0;

}  // namespace xensock::wire::xensock_v3
