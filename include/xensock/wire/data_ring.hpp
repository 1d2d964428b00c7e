// Access to a data interface page through a profile's layout. Every load of a
// guest-written field is a single atomic load; the caller keeps the value in
// a local and validates it before use.
#pragma once

#include "xensock/wire/profile.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace xensock::wire {

class DataIntfView {
public:
    DataIntfView() = default;
    DataIntfView(void* page, const DataIntfLayout& layout)
        : page_(static_cast<std::byte*>(page)), layout_(&layout) {}

    uint32_t in_cons() const { return load(layout_->in_cons); }
    uint32_t in_prod() const { return load(layout_->in_prod); }
    uint32_t out_cons() const { return load(layout_->out_cons); }
    uint32_t out_prod() const { return load(layout_->out_prod); }
    int32_t in_error() const { return static_cast<int32_t>(load(layout_->in_error)); }
    int32_t out_error() const { return static_cast<int32_t>(load(layout_->out_error)); }
    uint32_t ring_order() const { return load(layout_->ring_order); }
    uint32_t ref(uint32_t i) const { return load(layout_->refs + 4 * i); }

    void set_in_prod(uint32_t v) { store(layout_->in_prod, v); }
    void set_in_cons(uint32_t v) { store(layout_->in_cons, v); }
    void set_out_prod(uint32_t v) { store(layout_->out_prod, v); }
    void set_out_cons(uint32_t v) { store(layout_->out_cons, v); }
    void set_in_error(int32_t v) { store(layout_->in_error, static_cast<uint32_t>(v)); }
    void set_out_error(int32_t v) { store(layout_->out_error, static_cast<uint32_t>(v)); }
    void set_ring_order(uint32_t v) { store(layout_->ring_order, v); }
    void set_ref(uint32_t i, uint32_t v) { store(layout_->refs + 4 * i, v); }

    static void full_barrier() { std::atomic_thread_fence(std::memory_order_seq_cst); }

private:
    uint32_t* field(uint32_t offset) const { return reinterpret_cast<uint32_t*>(page_ + offset); }
    uint32_t load(uint32_t offset) const { return __atomic_load_n(field(offset), __ATOMIC_ACQUIRE); }
    void store(uint32_t offset, uint32_t v) const { __atomic_store_n(field(offset), v, __ATOMIC_RELEASE); }

    std::byte* page_ = nullptr;
    const DataIntfLayout* layout_ = nullptr;
};

// Bytes queued between a consumer and producer index, or -1 if they are more
// than a ring apart (only a broken or hostile peer does that).
inline int64_t ring_queued(uint32_t prod, uint32_t cons, uint32_t ring_size) {
    const uint32_t queued = prod - cons;  // modular: indexes are free-running
    return queued > ring_size ? -1 : static_cast<int64_t>(queued);
}

}  // namespace xensock::wire
