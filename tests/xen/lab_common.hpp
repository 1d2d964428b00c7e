// Shared by the real-Xen lab's guest program and its dom0 peer: the byte
// pattern both ends generate and verify, and a streaming 64-bit checksum, so
// that each side checks every byte it receives independently of the other.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string_view>

namespace xensock::lab {

inline uint64_t mix64(uint64_t x) noexcept {  // splitmix64's finalizer
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// A seed from a name ("A/connect"), so both ends agree without talking.
inline uint64_t seed_of(std::string_view name) noexcept {
    uint64_t h = 0xCBF29CE484222325ull;
    for (unsigned char c : name) h = (h ^ c) * 0x100000001B3ull;
    return h;
}

// The pattern's bytes [offset, offset + n): byte i of the stream is byte
// (i % 8) of mix64(seed + i / 8), little-endian.
inline void fill_pattern(std::byte* out, size_t n, uint64_t offset, uint64_t seed) noexcept {
    size_t done = 0;
    while (done < n && ((offset + done) & 7) != 0) {
        const uint64_t i = offset + done;
        out[done++] = static_cast<std::byte>(mix64(seed + i / 8) >> ((i & 7) * 8));
    }
    for (; done + 8 <= n; done += 8) {
        const uint64_t w = mix64(seed + (offset + done) / 8);
        std::memcpy(out + done, &w, 8);
    }
    while (done < n) {
        const uint64_t i = offset + done;
        out[done++] = static_cast<std::byte>(mix64(seed + i / 8) >> ((i & 7) * 8));
    }
}

// First offset (relative to `data`) where data differs from the pattern,
// or n if it matches. `scratch` holds at least n bytes.
inline size_t pattern_mismatch(const std::byte* data, size_t n, uint64_t offset, uint64_t seed,
                               std::byte* scratch) noexcept {
    fill_pattern(scratch, n, offset, seed);
    if (std::memcmp(data, scratch, n) == 0) return n;
    size_t i = 0;
    while (data[i] == scratch[i]) ++i;
    return i;
}

// A 64-bit checksum over a byte stream, independent of how the stream is
// split into chunks: 8-byte little-endian words, the tail zero-padded.
class StreamSum {
public:
    void update(const std::byte* p, size_t n) noexcept {
        bytes_ += n;
        while (n > 0 && fill_ != 0) {
            word_[fill_++] = p[0];
            ++p, --n;
            if (fill_ == 8) absorb_word();
        }
        for (; n >= 8; p += 8, n -= 8) {
            uint64_t w;
            std::memcpy(&w, p, 8);
            absorb(w);
        }
        for (; n > 0; ++p, --n) word_[fill_++] = p[0];
    }
    uint64_t value() const noexcept {
        uint64_t h = h_;
        if (fill_ != 0) {
            std::byte tail[8]{};
            std::memcpy(tail, word_, fill_);
            uint64_t w;
            std::memcpy(&w, tail, 8);
            h = step(h, w);
        }
        return mix64(h ^ bytes_);
    }
    uint64_t bytes() const noexcept { return bytes_; }

private:
    static uint64_t step(uint64_t h, uint64_t w) noexcept {
        h ^= w * 0x87C37B91114253D5ull;
        h = (h << 31) | (h >> 33);
        return h * 0x4CF5AD432745937Full + 0x52DCE729;
    }
    void absorb(uint64_t w) noexcept { h_ = step(h_, w); }
    void absorb_word() noexcept {
        uint64_t w;
        std::memcpy(&w, word_, 8);
        absorb(w);
        fill_ = 0;
    }
    uint64_t h_ = 0x243F6A8885A308D3ull;
    uint64_t bytes_ = 0;
    std::byte word_[8]{};
    size_t fill_ = 0;
};

// The checksum of the first n bytes of a pattern.
inline uint64_t pattern_sum(uint64_t n, uint64_t seed) {
    StreamSum sum;
    std::byte chunk[1 << 14];
    for (uint64_t off = 0; off < n; off += sizeof chunk) {
        const size_t k = static_cast<size_t>(n - off < sizeof chunk ? n - off : sizeof chunk);
        fill_pattern(chunk, k, off, seed);
        sum.update(chunk, k);
    }
    return sum.value();
}

}  // namespace xensock::lab
