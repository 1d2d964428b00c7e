// PVCalls v1 wire layouts (xen.git docs/misc/pvcalls.pandoc; the reference
// header is /usr/include/xen/io/pvcalls.h). Request payload offsets equal
// XenSock v3's; the response and data interface page differ.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xensock::wire::pvcalls_v1 {

inline constexpr const char* kNodeName = "pvcalls";

enum : uint32_t { SOCKET = 0, CONNECT = 1, RELEASE = 2, BIND = 3, LISTEN = 4, ACCEPT = 5, POLL = 6 };

struct Request {
    uint32_t req_id;
    uint32_t cmd;
    union {
        struct {
            uint64_t id;
            uint32_t domain;
            uint32_t type;
            uint32_t protocol;
            uint8_t pad[4];
        } socket;
        struct {
            uint64_t id;
            uint8_t addr[28];
            uint32_t len;
            uint32_t flags;
            uint32_t ref;
            uint32_t evtchn;
            uint8_t pad[4];
        } connect;
        struct {
            uint64_t id;
            uint8_t reuse;
            uint8_t pad[7];
        } release;
        struct {
            uint64_t id;
            uint8_t addr[28];
            uint32_t len;
        } bind;
        struct {
            uint64_t id;
            uint32_t backlog;
            uint8_t pad[4];
        } listen;
        struct {
            uint64_t id;
            uint64_t id_new;
            uint32_t ref;
            uint32_t evtchn;
        } accept;
        struct {
            uint64_t id;
        } poll;
        uint8_t dummy[56];
    } u;
};
static_assert(sizeof(Request) == 64);
static_assert(offsetof(Request, req_id) == 0);
static_assert(offsetof(Request, cmd) == 4);
static_assert(offsetof(Request, u) == 8);
static_assert(offsetof(Request, u.socket.id) == 8);
static_assert(offsetof(Request, u.socket.domain) == 16);
static_assert(offsetof(Request, u.socket.type) == 20);
static_assert(offsetof(Request, u.socket.protocol) == 24);
static_assert(offsetof(Request, u.socket.pad) == 28);
static_assert(offsetof(Request, u.connect.addr) == 16);
static_assert(offsetof(Request, u.connect.len) == 44);
static_assert(offsetof(Request, u.connect.flags) == 48);
static_assert(offsetof(Request, u.connect.ref) == 52);
static_assert(offsetof(Request, u.connect.evtchn) == 56);
static_assert(offsetof(Request, u.connect.pad) == 60);
static_assert(offsetof(Request, u.release.reuse) == 16);
static_assert(offsetof(Request, u.bind.addr) == 16);
static_assert(offsetof(Request, u.bind.len) == 44);
static_assert(offsetof(Request, u.listen.backlog) == 16);
static_assert(offsetof(Request, u.accept.id_new) == 16);
static_assert(offsetof(Request, u.accept.ref) == 24);
static_assert(offsetof(Request, u.accept.evtchn) == 28);
static_assert(offsetof(Request, u.poll.id) == 8);

struct Response {
    uint32_t req_id;
    uint32_t cmd;
    int32_t ret;
    uint32_t pad;
    uint64_t id;  // for accept: the listening socket's id
};
static_assert(sizeof(Response) == 24);
static_assert(offsetof(Response, req_id) == 0);
static_assert(offsetof(Response, cmd) == 4);
static_assert(offsetof(Response, ret) == 8);
static_assert(offsetof(Response, pad) == 12);
static_assert(offsetof(Response, id) == 16);

struct DataIntf {
    uint32_t in_cons, in_prod;
    int32_t in_error;
    uint8_t pad1[52];
    uint32_t out_cons, out_prod;
    int32_t out_error;
    uint8_t pad2[52];
    uint32_t ring_order;
    uint32_t ref[1];  // first of 1 << ring_order grant refs
};
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
static_assert(offsetof(DataIntf, in_cons) == 0);
static_assert(offsetof(DataIntf, in_prod) == 4);
static_assert(offsetof(DataIntf, in_error) == 8);
static_assert(offsetof(DataIntf, out_cons) == 64);
static_assert(offsetof(DataIntf, out_prod) == 68);
static_assert(offsetof(DataIntf, out_error) == 72);
static_assert(offsetof(DataIntf, ring_order) == 128);
static_assert(offsetof(DataIntf, ref) == 132);
#pragma GCC diagnostic pop

inline constexpr unsigned kMinRingOrder = 1;
// Linux's pvcalls-front refuses a backend whose max-page-order is below
// this (it uses order 4 for every data ring: 32 KiB per direction).
inline constexpr unsigned kLinuxFrontMinMaxPageOrder = 4;
inline constexpr const char* kVersion = "1";

}  // namespace xensock::wire::pvcalls_v1
