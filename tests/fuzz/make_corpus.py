#!/usr/bin/env python3
# Writes the seed corpus, corpus/<target>/*, for the fuzz targets: a few
# small inputs per target that reach each of its paths (the layouts each
# target reads are described at the top of its source). Re-run after
# changing an input layout:  tests/fuzz/make_corpus.py
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, 'corpus', target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)


def u8(v): return struct.pack('<B', v & 0xFF)
def u16(v): return struct.pack('<H', v & 0xFFFF)
def u32(v): return struct.pack('<I', v & 0xFFFFFFFF)
def u64(v): return struct.pack('<Q', v & 0xFFFFFFFFFFFFFFFF)
def i32(v): return struct.pack('<i', v)


# ---------------------------------------------------------------- profiles
# [profile][slot 64][mask 64][req_id cmd id ret][node values, NUL-separated]
def slot(req_id, cmd, sockid, payload):
    s = u32(req_id) + u32(cmd) + u64(sockid) + payload
    return s + b'\xff' * (64 - len(s))


payloads = {
    0: u32(2) + u32(1) + u32(0),                                    # socket AF_INET SOCK_STREAM 0
    1: bytes(range(1, 29)) + u32(16) + u32(0) + u32(4242) + u32(9),  # connect
    2: u8(1),                                                        # release, reuse=1
    3: bytes(range(1, 29)) + u32(16),                                # bind
    4: u32(128),                                                     # listen
    5: u64(0xCAFE) + u32(77) + u32(8),                               # accept
    6: b'',                                                          # poll
    77: b'',                                                         # unknown
    0xFFFFFFFF: b'',                                                 # unknown, odd
}
nodes = [b'1\x005\x0017\x006', b'2\x00\x01\x0017\x00x', b'1\x004294967295\x004294967296\x00009',
         b'\x01\x00 1\x00+2\x0010']
for prof in (0, 1):
    for n, (cmd, payload) in enumerate(payloads.items()):
        data = (u8(prof) + slot(0xFFFFFFFF if cmd > 6 else n + 1, cmd, 0xFFFFFFFFFFFFFFFF if cmd > 6 else 100 + n,
                                payload)
                + b'\xff' * 64 + u32(n) + u32(cmd) + u64(1 << 63) + i32(-524) + nodes[n % len(nodes)])
        write('profiles', f'{"pvcalls" if prof else "xensock"}-cmd{cmd}', data)

# ------------------------------------------------------------ command-ring
# [profile] then ops: op < 0x80 -> backend op % 7, else frontend op % 6.
B_REQPROD, B_SCRIBBLE, B_TAKE, B_FINAL, B_ANSWER, B_PUSH, B_RSPEVENT = range(7)
F_RSPPROD, F_SCRIBBLE, F_PUSH, F_TAKE, F_FINAL, F_REQEVENT = (0x80 | i for i in range(6))


def near(delta): return u8(0) + u8(delta)        # hostile_index: near the model's index
def anything(v): return u8(1) + u32(v)           # hostile_index: any value


def answer(req_id): return u8(B_ANSWER) + u32(req_id) + u32(1) + u64(5) + i32(0)


rounds = b''
for r in range(12):  # 3 requests per round: wraps the 32 slots
    rounds += u8(B_FINAL) + u8(B_REQPROD) + near(3) + u8(B_TAKE) + u8(3)
    rounds += answer(r * 3) + answer(r * 3 + 1) + answer(r * 3 + 2) + u8(B_PUSH)
write('command-ring', 'backend-rounds', u8(0) + rounds)
write('command-ring', 'backend-hostile-prod',
      u8(1) + u8(B_REQPROD) + anything(0x80000000) + u8(B_TAKE) + u8(5) + u8(B_REQPROD) + near(33) + u8(B_TAKE)
      + u8(1) + u8(B_REQPROD) + near(32) + u8(B_TAKE) + u8(32) + u8(B_TAKE) + u8(0) + answer(1) + u8(B_PUSH))
write('command-ring', 'backend-scribble',
      u8(0) + u8(B_SCRIBBLE) + u16(0) + u8(16) + b'\x04\x00\x00\x00' * 4 + u8(B_TAKE) + u8(4) + answer(9)
      + u8(B_RSPEVENT) + near(1) + u8(B_PUSH) + u8(B_FINAL))
front = b''
for r in range(10):
    front += u8(F_PUSH) + u32(r) + u32(99) + u64(r) + u8(F_PUSH) + u32(r + 100) + u32(0xFFFFFFFF) + u64(0)
    front += u8(F_FINAL) + u8(F_RSPPROD) + near(2) + u8(F_TAKE) + u8(F_REQEVENT) + near(1)
write('command-ring', 'frontend-rounds', u8(1) + front)
write('command-ring', 'frontend-lying-backend',
      u8(0) + u8(F_PUSH) + u32(1) + u32(1) + u64(1) + u8(F_RSPPROD) + near(5) + u8(F_TAKE) + u8(F_PUSH)
      + u32(2) + u32(2) + u64(2))

# --------------------------------------------------------------- data-ring
# [setup: bit0 pvcalls, bits1-2 order] then ops % 9.
FIELD, SCRIBBLE, FILL_IN, PRODUCE, CONSUME, QUEUED, NORMALIZE, VIEW, COPIES = range(9)
IN_CONS, IN_PROD, IN_ERROR, OUT_CONS, OUT_PROD, OUT_ERROR, RING_ORDER = range(7)


def set_field(f, kind, *rest): return u8(FIELD) + u8(f) + u8(kind) + b''.join(rest)


for prof in (0, 1):
    for order in (0, 1, 3):
        size = (4096 << order) // 2
        name = f'{"pvcalls" if prof else "xensock"}-order{order}'
        setup = u8(prof | (order << 1))
        # Fill the out half, then find it full; the backend consumes half.
        ops = (u8(PRODUCE) + u16(size) + u8(PRODUCE) + u16(1) + set_field(OUT_CONS, 1, u16(size // 2))
               + u8(PRODUCE) + u16(size) + u8(VIEW))
        # The backend produces 100 bytes, then an orderly shutdown.
        ops += (u8(FILL_IN) + u16(0) + u8(100) + bytes(range(100)) + set_field(IN_PROD, 1, u16(100))
                + u8(CONSUME) + u16(60) + u8(CONSUME) + u16(60) + set_field(IN_ERROR, 2, u8(0))
                + u8(CONSUME) + u16(10))
        write('data-ring', name, setup + ops)
    # Indexes near the u32 wrap, and more than a ring apart.
    write('data-ring', f'{"pvcalls" if prof else "xensock"}-wrap',
          u8(prof | 2) + set_field(OUT_PROD, 0, u32(0xFFFFFFF0)) + set_field(OUT_CONS, 0, u32(0xFFFFFFF0))
          + u8(PRODUCE) + u16(64) + set_field(IN_PROD, 0, u32(0x10)) + set_field(IN_CONS, 0, u32(0xFFFFFFF0))
          + u8(CONSUME) + u16(64) + set_field(IN_PROD, 0, u32(0x7FFFFFFF)) + u8(CONSUME) + u16(1)
          + set_field(OUT_CONS, 0, u32(12345)) + u8(PRODUCE) + u16(1) + set_field(OUT_ERROR, 2, u8(3))
          + u8(PRODUCE) + u16(5) + u8(QUEUED) + u32(5) + u32(0xFFFFFFFF) + u8(12) + u8(NORMALIZE) + i32(-2**31)
          + u8(COPIES) + u32(0xFFFFFFFE) + u16(300) + bytes(300) + u8(SCRIBBLE) + u16(4000) + u8(32) + b'\xff' * 32
          + u8(VIEW))
    # Exactly a ring apart, and one more: full, then -EIO (at_edge: delta, side, from the edge).
    edge = lambda d, side: u8(d) + u8(side) + u8(1)
    write('data-ring', f'{"pvcalls" if prof else "xensock"}-edges',
          u8(prof) + set_field(OUT_PROD, 4, *[edge(0, 0)]) + u8(PRODUCE) + u16(1)
          + set_field(OUT_PROD, 4, edge(1, 0)) + u8(PRODUCE) + u16(1)
          + set_field(IN_PROD, 4, edge(0, 0)) + u8(CONSUME) + u16(1) + set_field(IN_PROD, 4, edge(1, 0))
          + u8(CONSUME) + u16(1) + set_field(IN_CONS, 4, edge(0xFF, 1)) + u8(CONSUME) + u16(1)
          + u8(QUEUED) + u32(0xFFFFFFFF) + u8(11) + u8(1) + u8(1) + u8(0) + u8(1)
          + u8(QUEUED) + u32(7) + u8(11) + u8(1) + u8(0) + u8(0) + u8(1))

# --------------------------------------------------------------- sim-parse
for name, text in [('zero', b'0'), ('max-nl', b'32751\n'), ('too-big', b'32752'), ('two-nl', b'7\n\n'),
                   ('leading-zeros', b'000007'), ('junk', b'1a'), ('empty', b'')]:
    write('sim-parse', name, text)
