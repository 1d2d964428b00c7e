// Shared by the fuzz targets: an invariant check that aborts (so libFuzzer
// and the standalone driver both report it as a crash, with the input), and
// a reader that turns the fuzzer's bytes into values, zeros past the end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace xensock::fuzz {

[[noreturn]] inline void invariant_failed(const char* what, const char* file, int line) {
    std::fprintf(stderr, "fuzz invariant failed at %s:%d: %s\n", file, line, what);
    std::abort();
}

#define FUZZ_CHECK(cond)                                                        \
    do {                                                                        \
        if (!(cond)) ::xensock::fuzz::invariant_failed(#cond, __FILE__, __LINE__); \
    } while (0)

class Input {
public:
    Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}

    bool empty() const { return pos_ >= size_; }
    size_t remaining() const { return empty() ? 0 : size_ - pos_; }

    // Fills `out` with the next `n` bytes, zeros once the input runs out.
    void bytes(void* out, size_t n) {
        if (n == 0) return;  // out may be null (an empty vector's data())
        const size_t take = n < remaining() ? n : remaining();
        if (take > 0) std::memcpy(out, data_ + pos_, take);
        std::memset(static_cast<uint8_t*>(out) + take, 0, n - take);
        pos_ += take;
    }
    template <typename T>
    T get() {
        T v;
        bytes(&v, sizeof v);
        return v;
    }
    uint8_t u8() { return get<uint8_t>(); }
    uint32_t u32() { return get<uint32_t>(); }
    uint64_t u64() { return get<uint64_t>(); }

private:
    const uint8_t* data_;
    size_t size_;
    size_t pos_ = 0;
};

// Little-endian field of a byte buffer (x86_64 is what the protocols fix).
template <typename T>
T load_at(const void* base, size_t offset) {
    T v;
    std::memcpy(&v, static_cast<const uint8_t*>(base) + offset, sizeof v);
    return v;
}

}  // namespace xensock::fuzz
