// Sim grant tables (shared/spec/sim-platform.md, "Grant tables"): the
// backend's GrantMapper over another domain's DIR/dom<D>/{gnttab,mem}, and the
// guest's GrantSharer over its own.
//
// Everything in a granter's files is hostile input: every entry is read once
// into a local and validated there, files are opened without following
// symlinks and must be plain files, and a frame is mapped only if it lies
// inside `mem` at the time of the map. What a guest can still do afterwards,
// shrink `mem` under a live mapping, is caught by the SIGBUS guard below.
#include "sim_internal.hpp"

#include "xensock/util/log.hpp"

#include <endian.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <new>
#include <system_error>
#include <unordered_map>
#include <unordered_set>

namespace xensock::platform::sim {

namespace {

// ------------------------------------------------------------ SIGBUS guard
//
// Why: a guest may ftruncate its `mem` after the backend mapped one of its
// frames. The next access to that page raises SIGBUS (BUS_ADRERR), which
// would kill xensockd, i.e. every guest's service. On Xen a mapped page stays
// alive whatever its owner does, so the faithful and cheap fix is to keep the
// address valid: on SIGBUS inside a live grant mapping the handler maps an
// anonymous zero page over the faulting page (same protection) and returns;
// the access is retried and succeeds. The guest only loses its own data.
// Faults anywhere else go to the previous disposition (core dump as before,
// or a sanitizer's handler). Kernel-side accesses (io_uring reads and
// writes into a truncated page) fail with EFAULT and raise no signal.
//
// The registry of live mappings is made of lock-free slots, so the handler
// reads it without locks or allocation. Slots come in chunks, allocated as
// more mappings go live and never freed (a chunk the handler may be reading
// never goes away), up to a fixed number of chunks: far more mappings than
// the kernel allows a process by default (vm.max_map_count, 65530). A map
// that would go beyond is refused with ENOMEM: an unguarded mapping could
// crash the process. Claiming and freeing slots takes a mutex (never the
// handler). The guard assumes nobody replaces the SIGBUS handler later.

constexpr size_t kGuardChunkSlots = 4096;
constexpr size_t kGuardMaxChunks = 64;  // 262144 live mappings

struct GuardSlot {
    std::atomic<uintptr_t> begin{0};  // 0 free, else start address
    std::atomic<uintptr_t> end{0};    // end address | 1 if writable (ends are page aligned)
};
static_assert(std::atomic<uintptr_t>::is_always_lock_free);
static_assert(std::atomic<GuardSlot*>::is_always_lock_free);

std::atomic<GuardSlot*> g_chunks[kGuardMaxChunks];
std::atomic<size_t> g_slots_high{0};  // slots at or above this index were never used
std::mutex g_guard_mu;                // claiming and freeing slots, growing
size_t g_chunk_count = 0;             // g_guard_mu
// g_guard_mu; capacity for every slot. Never destroyed: a mapping may be
// unmapped from a static destructor.
std::vector<uint32_t>& g_free_slots = *new std::vector<uint32_t>;
struct sigaction g_previous_sigbus {};
std::once_flag g_guard_once;
bool g_guard_full_logged = false;  // g_guard_mu

GuardSlot& guard_slot(size_t i) noexcept {
    return g_chunks[i / kGuardChunkSlots].load(std::memory_order_acquire)[i % kGuardChunkSlots];
}

void chain_previous_sigbus(int sig, siginfo_t* info, void* uctx) {
    const struct sigaction& prev = g_previous_sigbus;
    if ((prev.sa_flags & SA_SIGINFO) != 0) {
        if (prev.sa_sigaction != nullptr) {
            prev.sa_sigaction(sig, info, uctx);
            return;
        }
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
        return;
    }
    const bool sent = info == nullptr || info->si_code <= 0;  // kill(2) and friends, not a fault
    if (sent && prev.sa_handler == SIG_IGN && (prev.sa_flags & SA_SIGINFO) == 0) return;
    // Default action: for a fault, returning re-executes the access, which
    // now dies the ordinary way; a sent signal is raised again.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(sig, &dfl, nullptr);
    if (sent) ::raise(sig);
}

void on_sigbus(int sig, siginfo_t* info, void* uctx) {
    const int saved_errno = errno;
    if (info != nullptr && info->si_code == BUS_ADRERR) {
        const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
        // Every slot below `high` is in a chunk published before it.
        const size_t high = g_slots_high.load(std::memory_order_acquire);
        for (size_t i = 0; i < high; ++i) {
            const GuardSlot& slot = guard_slot(i);
            const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
            if (begin == 0) continue;
            const uintptr_t end = slot.end.load(std::memory_order_relaxed);
            if (addr < begin || addr >= (end & ~uintptr_t{1})) continue;
            const int prot = (end & 1) != 0 ? PROT_READ | PROT_WRITE : PROT_READ;
            void* page = reinterpret_cast<void*>(addr & ~uintptr_t{kPageSize - 1});
            // mmap is a plain system call: safe here in practice on Linux.
            if (::mmap(page, kPageSize, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
                errno = saved_errno;
                return;
            }
            break;
        }
    }
    errno = saved_errno;
    chain_previous_sigbus(sig, info, uctx);
}

void install_sigbus_guard() {
    std::call_once(g_guard_once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (::sigaction(SIGBUS, &sa, &g_previous_sigbus) != 0) {
            log::warn("sim grants: cannot install the SIGBUS guard ({}); a guest that shrinks its memory "
                      "under a mapping can crash this process", errno_text(errno));
        }
    });
}

// One more chunk of free slots; false if at the limit or out of memory.
bool guard_grow() noexcept {  // g_guard_mu held
    if (g_chunk_count == kGuardMaxChunks) {
        if (!g_guard_full_logged) {
            g_guard_full_logged = true;
            try {
                log::warn("sim grants: {} live mappings, the most the SIGBUS guard covers; refusing more (ENOMEM)",
                          kGuardMaxChunks * kGuardChunkSlots);
            } catch (...) {
            }
        }
        return false;
    }
    auto* chunk = new (std::nothrow) GuardSlot[kGuardChunkSlots];
    if (chunk == nullptr) return false;
    const size_t first = g_chunk_count * kGuardChunkSlots;
    try {
        g_free_slots.reserve(first + kGuardChunkSlots);  // guard_remove() must never allocate
    } catch (...) {
        delete[] chunk;
        return false;
    }
    g_chunks[g_chunk_count].store(chunk, std::memory_order_release);
    ++g_chunk_count;
    for (size_t i = kGuardChunkSlots; i-- > 0;) g_free_slots.push_back(static_cast<uint32_t>(first + i));
    return true;
}

// Guards [addr, addr+bytes): returns the slot, or -1 if none is left (the
// caller must then not hand the mapping out).
int guard_add(void* addr, size_t bytes, bool writable) noexcept {
    const auto begin = reinterpret_cast<uintptr_t>(addr);
    std::lock_guard lock(g_guard_mu);
    if (g_free_slots.empty() && !guard_grow()) return -1;
    const uint32_t i = g_free_slots.back();  // lowest first: keeps the handler's scan short
    g_free_slots.pop_back();
    GuardSlot& slot = guard_slot(i);
    slot.end.store((begin + bytes) | (writable ? 1 : 0), std::memory_order_relaxed);
    slot.begin.store(begin, std::memory_order_release);
    if (g_slots_high.load(std::memory_order_relaxed) < i + 1) g_slots_high.store(i + 1, std::memory_order_release);
    return static_cast<int>(i);
}

void guard_remove(int slot) noexcept {
    if (slot < 0) return;
    std::lock_guard lock(g_guard_mu);
    guard_slot(static_cast<size_t>(slot)).begin.store(0, std::memory_order_release);
    g_free_slots.push_back(static_cast<uint32_t>(slot));  // capacity reserved in guard_grow()
}

// ----------------------------------------------------------- small helpers

// Address space for `bytes`, inaccessible until frames are mapped over it
// with MAP_FIXED; unmapped again unless released.
class Reservation {
public:
    explicit Reservation(size_t bytes) noexcept : bytes_(bytes) {
        void* p = ::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        addr_ = p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
    }
    Reservation(const Reservation&) = delete;
    Reservation& operator=(const Reservation&) = delete;
    ~Reservation() {
        if (addr_ != nullptr) ::munmap(addr_, bytes_);
    }
    std::byte* get() const noexcept { return addr_; }
    std::byte* release() noexcept { return std::exchange(addr_, nullptr); }

private:
    std::byte* addr_ = nullptr;
    size_t bytes_;
};

// Opens `name` below `dirfd` if it is a plain file with one link: a guest
// could otherwise point its `mem` at some other file (a symlink, a hard link)
// and have the backend map and write it.
UniqueFd open_plain_file(int dirfd, const char* name, int flags, struct stat& st) noexcept {
    UniqueFd fd(::openat(dirfd, name, flags | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
    if (!fd) return fd;
    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_nlink != 1) return UniqueFd();
    return fd;
}

// --------------------------------------------------------- GrantMapper

class SimGrantMapper final : public GrantMapper {
public:
    explicit SimGrantMapper(std::shared_ptr<Context> ctx) : ctx_(std::move(ctx)) { install_sigbus_guard(); }
    ~SimGrantMapper() override {
        // A GrantMapping must not outlive its mapper; its pages stay mapped.
        if (live_.load() != 0) log::warn("sim grants: mapper closed with {} live mappings", live_.load());
    }

    Result<GrantMapping> map(DomId granter, std::span<const GrantRef> refs, bool writable) override;
    size_t live_mappings() const noexcept override { return live_.load(std::memory_order_relaxed); }

protected:
    void unmap(void* addr, size_t pages) noexcept override;

private:
    // One granter's open files, kept while their inodes stay the same (a
    // restarted guest recreates its directory, hence new inodes).
    struct DomainFiles {
        UniqueFd mem;
        UniqueFd gnttab;
        dev_t mem_dev = 0, gnttab_dev = 0;
        ino_t mem_ino = 0, gnttab_ino = 0;
    };
    static constexpr size_t kMaxCachedDomains = 1024;

    Result<DomainFiles*> domain_files(DomId granter);  // mu_ held

    std::shared_ptr<Context> ctx_;
    std::mutex mu_;  // a mapper may be shared by worker threads
    std::unordered_map<DomId, DomainFiles> files_;
    std::unordered_map<void*, int> guard_slots_;  // mapping address -> SIGBUS guard slot
    // Files of a granter stay open only while we map something of it: a
    // dead guest's mem and gnttab must not stay pinned by our fds.
    std::unordered_map<void*, DomId> granter_of_;
    std::unordered_map<DomId, size_t> live_by_granter_;
    void forget_if_unused(DomId granter) noexcept {  // mu_ held
        auto it = live_by_granter_.find(granter);
        if (it == live_by_granter_.end() || it->second == 0) {
            files_.erase(granter);
            if (it != live_by_granter_.end()) live_by_granter_.erase(it);
        }
    }
    std::atomic<size_t> live_{0};
};

Result<SimGrantMapper::DomainFiles*> SimGrantMapper::domain_files(DomId granter) {
    const std::string dir = dom_dir(ctx_->root, granter);
    const UniqueFd dirfd(::open(dir.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    struct stat mem_st {}, gnttab_st {};
    if (!dirfd || ::fstatat(dirfd.get(), "mem", &mem_st, AT_SYMLINK_NOFOLLOW) != 0 ||
        ::fstatat(dirfd.get(), "gnttab", &gnttab_st, AT_SYMLINK_NOFOLLOW) != 0) {
        files_.erase(granter);
        log::debug("sim grants: domain {} has no {}/{{mem,gnttab}}", granter, dir);
        return Errno{EINVAL};
    }
    auto it = files_.find(granter);
    if (it != files_.end() && it->second.mem_dev == mem_st.st_dev && it->second.mem_ino == mem_st.st_ino &&
        it->second.gnttab_dev == gnttab_st.st_dev && it->second.gnttab_ino == gnttab_st.st_ino) {
        return &it->second;
    }

    // First use, or the guest recreated its files: (re)open them. The inode
    // recorded is the one opened, so a swap in between is only seen next time.
    DomainFiles f;
    f.mem = open_plain_file(dirfd.get(), "mem", O_RDWR, mem_st);
    f.gnttab = open_plain_file(dirfd.get(), "gnttab", O_RDONLY, gnttab_st);
    if (!f.mem || !f.gnttab) {
        files_.erase(granter);
        log::debug("sim grants: domain {}: mem or gnttab in {} is not a plain file we can open", granter, dir);
        return Errno{EINVAL};
    }
    f.mem_dev = mem_st.st_dev;
    f.mem_ino = mem_st.st_ino;
    f.gnttab_dev = gnttab_st.st_dev;
    f.gnttab_ino = gnttab_st.st_ino;
    if (it != files_.end()) {
        it->second = std::move(f);
        return &it->second;
    }
    if (files_.size() >= kMaxCachedDomains) files_.erase(files_.begin());  // bound the fds we keep
    return &files_.emplace(granter, std::move(f)).first->second;
}

Result<GrantMapping> SimGrantMapper::map(DomId granter, std::span<const GrantRef> refs, bool writable) {
    if (refs.empty() || refs.size() > kMaxMapPages || granter > kMaxDomId) return Errno{EINVAL};

    std::lock_guard lock(mu_);
    struct ForgetOnFailure {
        SimGrantMapper& self;
        DomId granter;
        bool mapped = false;
        ~ForgetOnFailure() {
            if (!mapped) self.forget_if_unused(granter);
        }
    } forget{*this, granter};
    auto files = domain_files(granter);
    if (!files) return Errno{files.error()};
    const DomainFiles& f = *files.value();

    // Validate every entry before mapping anything; each is read exactly once.
    // Runs of consecutive refs are read with one pread.
    unsigned char entries[kMaxMapPages * kGrantEntrySize];
    for (size_t i = 0; i < refs.size();) {
        if (refs[i] >= kGrantEntries) return Errno{EINVAL};
        size_t run = 1;
        while (i + run < refs.size() && refs[i + run] == refs[i] + run && refs[i + run] < kGrantEntries) ++run;
        const size_t want = run * kGrantEntrySize;
        const ssize_t n = ::pread(f.gnttab.get(), entries + i * kGrantEntrySize, want,
                                  static_cast<off_t>(refs[i]) * kGrantEntrySize);
        if (n != static_cast<ssize_t>(want)) return Errno{EINVAL};  // the granter shrank its table
        i += run;
    }
    off_t offsets[kMaxMapPages];
    for (size_t i = 0; i < refs.size(); ++i) {
        const unsigned char* raw = entries + i * kGrantEntrySize;
        uint16_t flags = 0, domid = 0;
        uint32_t frame = 0;
        std::memcpy(&flags, raw + 0, sizeof flags);
        std::memcpy(&domid, raw + 2, sizeof domid);
        std::memcpy(&frame, raw + 4, sizeof frame);
        flags = le16toh(flags);
        domid = le16toh(domid);
        frame = le32toh(frame);
        // Refs 0..7 are not special-cased: Xen maps them too if the granter
        // wrote a valid entry there (xenstored maps ref 1); our sharer never does.
        if ((flags & kGtfTypeMask) != kGtfPermitAccess || DomId{domid} != ctx_->self) return Errno{EPERM};
        if (writable && (flags & kGtfReadonly) != 0) return Errno{EPERM};
        offsets[i] = static_cast<off_t>(frame) * static_cast<off_t>(kPageSize);  // < 2^44: no overflow
    }
    struct stat st {};
    if (::fstat(f.mem.get(), &st) != 0) return last_errno();
    for (size_t i = 0; i < refs.size(); ++i) {
        if (offsets[i] + static_cast<off_t>(kPageSize) > st.st_size) return Errno{EINVAL};
    }

    const size_t bytes = refs.size() * kPageSize;
    Reservation range(bytes);
    if (range.get() == nullptr) return last_errno();
    const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
    // One mmap per run of consecutive frames (a ring's pages usually are),
    // as gntdev maps all refs of one request at once.
    for (size_t i = 0; i < refs.size();) {
        size_t run = 1;
        while (i + run < refs.size() && offsets[i + run] == offsets[i] + static_cast<off_t>(run * kPageSize)) ++run;
        void* want = range.get() + i * kPageSize;
        if (::mmap(want, run * kPageSize, prot, MAP_SHARED | MAP_FIXED, f.mem.get(), offsets[i]) == MAP_FAILED) {
            const int err = errno;
            log::debug("sim grants: mmap of domain {} frames {}+{} failed: {}", granter, offsets[i] / kPageSize, run,
                       errno_text(err));
            return Errno{err == EACCES ? EPERM : err};  // the Reservation unmaps everything
        }
        i += run;
    }
    const int slot = guard_add(range.get(), bytes, writable);
    if (slot < 0) return Errno{ENOMEM};  // unguarded, a shrinking granter could crash us
    try {
        guard_slots_.emplace(range.get(), slot);
        granter_of_.emplace(range.get(), granter);
    } catch (...) {
        guard_slots_.erase(range.get());
        guard_remove(slot);
        throw;
    }
    ++live_by_granter_[granter];
    forget.mapped = true;
    live_.fetch_add(1, std::memory_order_relaxed);
    return GrantMapping(this, range.release(), refs.size());
}

void SimGrantMapper::unmap(void* addr, size_t pages) noexcept {
    std::lock_guard lock(mu_);
    if (auto it = guard_slots_.find(addr); it != guard_slots_.end()) {
        guard_remove(it->second);  // before munmap: the range may be reused at once
        guard_slots_.erase(it);
    }
    if (auto it = granter_of_.find(addr); it != granter_of_.end()) {
        const DomId granter = it->second;
        granter_of_.erase(it);
        if (auto live = live_by_granter_.find(granter); live != live_by_granter_.end() && live->second > 0)
            --live->second;
        forget_if_unused(granter);
    }
    if (::munmap(addr, pages * kPageSize) != 0) {
        try {
            log::warn("sim grants: munmap({}, {} pages): {}", addr, pages, errno_text(errno));
        } catch (...) {
        }
    }
    live_.fetch_sub(1, std::memory_order_relaxed);
}

}  // namespace

// ------------------------------------------------------------- GrantSharer

// This domain's own memory and grant table, shared by every GrantSharer of
// one platform (one domain = one process: a second process of the same
// domain would allocate the same refs).
//
// Frames are not reused when their grant ends: a backend may keep mapping
// an ended grant (the contract allows it; on Xen the page would not be
// freed while mapped), and a reused frame would show it, and let it write,
// whatever is granted next, perhaps to another domain. So frames are handed
// out in increasing order, and a freed frame's memory goes back to the
// system by punching a hole in `mem` (a stale mapping then reads zeros, and
// what it writes lands in a frame nobody uses). Only when the frame space
// is spent (2^32 frames, the grant entry's field: 16 TiB granted over the
// domain's life; or earlier, if the file system will not let `mem` grow)
// does allocation wrap around to the lowest frames no grant uses, each
// emptied again first. Live frames are bounded by the refs (32760 at most).
struct SharerState {
    static constexpr uint64_t kFrameSpace = uint64_t{1} << 32;

    std::mutex mu;
    UniqueFd mem;
    std::byte* table = nullptr;          // DIR/dom<self>/gnttab, mapped shared
    std::vector<GrantRef> free_refs;     // stack, lowest ref on top
    std::vector<uint32_t> ref_frame;     // frame behind each granted ref (our copy, not the table's)
    std::unordered_set<uint32_t> live_frames;  // frames behind a grant now
    uint64_t next_frame = 0;             // where the next frame is looked for
    uint64_t frame_limit = kFrameSpace;  // lowered if `mem` cannot grow further
    uint64_t used_frames = 0;            // frames below this were handed out before
    bool wrapped = false;                // next_frame went round once: skip live frames
    bool can_punch = true;               // the file system frees a hole's memory

    SharerState() = default;
    SharerState(const SharerState&) = delete;
    SharerState& operator=(const SharerState&) = delete;
    ~SharerState() {
        if (table != nullptr) ::munmap(table, kGrantTableBytes);
    }
};

namespace {

[[noreturn]] void sharer_fail(const std::string& what, int err) {
    throw std::system_error(err, std::generic_category(), "sim grant sharer: " + what);
}

void warn_once_noexcept(int err) noexcept {
    try {
        log::warn("sim grant sharer: cannot punch holes in the memory file ({}): freed pages keep their memory "
                  "until the domain restarts; put the sim root on tmpfs", errno_text(err));
    } catch (...) {
    }
}

// Empties this domain's memory and grant table (ending any grant a previous
// process of this domain left) and maps the table.
std::shared_ptr<SharerState> open_sharer_state(const Context& ctx) {
    auto s = std::make_shared<SharerState>();
    const std::string dir = dom_dir(ctx.root, ctx.self);
    const std::string mem_path = dir + "/mem";
    const std::string table_path = dir + "/gnttab";

    s->mem = UniqueFd(::open(mem_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0666));
    if (!s->mem) sharer_fail("open " + mem_path, errno);
    if (::ftruncate(s->mem.get(), 0) != 0) sharer_fail("ftruncate " + mem_path, errno);

    const UniqueFd table(::open(table_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0666));
    if (!table) sharer_fail("open " + table_path, errno);
    if (::ftruncate(table.get(), 0) != 0 || ::ftruncate(table.get(), static_cast<off_t>(kGrantTableBytes)) != 0) {
        sharer_fail("ftruncate " + table_path, errno);
    }
    void* p = ::mmap(nullptr, kGrantTableBytes, PROT_READ | PROT_WRITE, MAP_SHARED, table.get(), 0);
    if (p == MAP_FAILED) sharer_fail("mmap " + table_path, errno);
    s->table = static_cast<std::byte*>(p);

    s->free_refs.reserve(kGrantEntries);
    for (GrantRef r = kGrantEntries; r-- > kReservedRefs;) s->free_refs.push_back(r);
    s->ref_frame.assign(kGrantEntries, 0);
    s->live_frames.reserve(kGrantEntries);
    return s;
}

// Runs of consecutive frames in `frames`, in order: fn(first, count).
template <typename Fn>
void for_each_run(const std::vector<uint32_t>& frames, Fn&& fn) {
    for (size_t i = 0; i < frames.size();) {
        size_t run = 1;
        while (i + run < frames.size() && frames[i + run] == frames[i] + run) ++run;
        fn(i, run);
        i += run;
    }
}

off_t frame_offset(uint64_t frame) { return static_cast<off_t>(frame * kPageSize); }

// Frees the memory behind frames [first, first+count) of `mem`; they read
// as zeros afterwards. False if the file system cannot.
bool punch_frames(SharerState& s, uint32_t first, size_t count) noexcept {
    if (!s.can_punch) return false;
    if (::fallocate(s.mem.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, frame_offset(first),
                    static_cast<off_t>(count * kPageSize)) == 0) {
        return true;
    }
    s.can_punch = false;
    warn_once_noexcept(errno);
    return false;
}

// Picks `pages` frames (see SharerState); false if none are left at all.
bool pick_frames(SharerState& s, size_t pages, std::vector<uint32_t>& out) {
    out.clear();
    uint64_t looked_at = 0;
    while (out.size() < pages) {
        if (s.next_frame >= s.frame_limit) {
            s.next_frame = 0;
            s.wrapped = true;
        }
        if (++looked_at > s.frame_limit) return false;
        const auto frame = static_cast<uint32_t>(s.next_frame++);
        if (s.wrapped && s.live_frames.contains(frame)) continue;
        out.push_back(frame);
    }
    return true;
}

// Gives `frames` memory in `mem` (growing it as needed), empty: fresh frames
// are, a frame used before is emptied first. fallocate, not ftruncate: on a
// full tmpfs the first touch of a sparse page would be a SIGBUS instead of
// this error. `zero_after_map` is set if some frame could not be emptied
// here (no hole punching). EFBIG: `mem` cannot grow that far.
int back_frames(SharerState& s, const std::vector<uint32_t>& frames, bool& zero_after_map) {
    int err = 0;
    for_each_run(frames, [&](size_t i, size_t run) {
        if (err != 0) return;
        const uint32_t first = frames[i];
        if (first < s.used_frames && !punch_frames(s, first, run)) zero_after_map = true;
        const off_t at = frame_offset(first);
        const auto len = static_cast<off_t>(run * kPageSize);
        if (::fallocate(s.mem.get(), 0, at, len) != 0) {
            err = errno;
            struct stat st {};
            if (err == EOPNOTSUPP && ::fstat(s.mem.get(), &st) == 0) {
                err = st.st_size >= at + len || ::ftruncate(s.mem.get(), at + len) == 0 ? 0 : errno;
            }
            if (err != 0) return;
        }
        s.used_frames = std::max<uint64_t>(s.used_frames, uint64_t{first} + run);
    });
    return err;
}

uint16_t* entry_flags(std::byte* table, GrantRef r) { return reinterpret_cast<uint16_t*>(table + r * kGrantEntrySize); }
uint16_t* entry_domid(std::byte* table, GrantRef r) {
    return reinterpret_cast<uint16_t*>(table + r * kGrantEntrySize + 2);
}
uint32_t* entry_frame(std::byte* table, GrantRef r) {
    return reinterpret_cast<uint32_t*>(table + r * kGrantEntrySize + 4);
}

class SimGrantSharer final : public GrantSharer {
public:
    explicit SimGrantSharer(std::shared_ptr<SharerState> state) : state_(std::move(state)) {}

    Result<SharedPages> share(DomId to, size_t pages, bool writable) override;

protected:
    void unshare(void* addr, const std::vector<GrantRef>& refs) noexcept override;

private:
    std::shared_ptr<SharerState> state_;
};

Result<SharedPages> SimGrantSharer::share(DomId to, size_t pages, bool writable) {
    if (pages == 0 || pages > kMaxMapPages || to > kMaxDomId) return Errno{EINVAL};
    SharerState& s = *state_;
    std::lock_guard lock(s.mu);
    if (s.free_refs.size() < pages) return Errno{ENOSPC};

    std::vector<uint32_t> frames;
    std::vector<GrantRef> refs;
    bool zero_after_map = false;
    try {
        frames.reserve(pages);
        refs.reserve(pages);
        for (int attempt = 0;; ++attempt) {
            if (!pick_frames(s, pages, frames)) return Errno{ENOMEM};
            const int err = back_frames(s, frames, zero_after_map);
            if (err == 0) break;
            if (err == EFBIG && attempt < 2 && s.used_frames > 0) {
                // The file system's (or RLIMIT_FSIZE's) limit on `mem`: the
                // frame space ends here; go round to the lowest free frames.
                log::info("sim grant sharer: memory file cannot grow past {} frames; reusing freed frames from now on",
                          s.used_frames);
                s.frame_limit = s.used_frames;
                s.next_frame = s.frame_limit;
                continue;
            }
            log::warn("sim grant sharer: cannot back {} pages with memory: {}", pages, errno_text(err));
            return Errno{ENOMEM};
        }
        for (const uint32_t f : frames) s.live_frames.insert(f);
    } catch (const std::bad_alloc&) {
        for (const uint32_t f : frames) s.live_frames.erase(f);
        return Errno{ENOMEM};
    }

    Reservation range(pages * kPageSize);
    bool mapped = range.get() != nullptr;
    for_each_run(frames, [&](size_t i, size_t run) {
        if (!mapped) return;
        mapped = ::mmap(range.get() + i * kPageSize, run * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                        s.mem.get(), frame_offset(frames[i])) != MAP_FAILED;
    });
    if (!mapped) {  // the Reservation unmaps whatever was mapped
        for (const uint32_t f : frames) s.live_frames.erase(f);
        return Errno{ENOMEM};
    }
    // Only frames used before, and only where no hole could empty them.
    if (zero_after_map) std::memset(range.get(), 0, pages * kPageSize);

    const uint16_t flags = static_cast<uint16_t>(kGtfPermitAccess | (writable ? 0 : kGtfReadonly));
    for (size_t i = 0; i < pages; ++i) {
        const GrantRef r = s.free_refs.back();
        s.free_refs.pop_back();
        refs.push_back(r);
        s.ref_frame[r] = frames[i];
        // Xen's order: frame and domid, a write barrier, then flags.
        std::atomic_ref<uint32_t>(*entry_frame(s.table, r)).store(htole32(frames[i]), std::memory_order_relaxed);
        std::atomic_ref<uint16_t>(*entry_domid(s.table, r)).store(htole16(static_cast<uint16_t>(to)),
                                                                   std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_release);
        std::atomic_ref<uint16_t>(*entry_flags(s.table, r)).store(htole16(flags), std::memory_order_relaxed);
    }
    return SharedPages(this, range.release(), std::move(refs));
}

void SimGrantSharer::unshare(void* addr, const std::vector<GrantRef>& refs) noexcept {
    SharerState& s = *state_;
    std::lock_guard lock(s.mu);
    for (const GrantRef r : refs) std::atomic_ref<uint16_t>(*entry_flags(s.table, r)).store(0, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    ::munmap(addr, refs.size() * kPageSize);
    // The memory goes back; the frames are not handed out again (see
    // SharerState), so a backend still mapping one sees zeros, never a
    // later grant. One hole per run of consecutive frames; nothing here
    // allocates (erase, and a stack whose capacity was reserved at start).
    uint32_t run_first = 0;
    size_t run_length = 0;
    for (const GrantRef r : refs) {
        const uint32_t frame = s.ref_frame[r];
        s.live_frames.erase(frame);
        s.free_refs.push_back(r);
        if (run_length > 0 && frame == run_first + run_length) {
            ++run_length;
            continue;
        }
        if (run_length > 0) (void)punch_frames(s, run_first, run_length);
        run_first = frame;
        run_length = 1;
    }
    if (run_length > 0) (void)punch_frames(s, run_first, run_length);
}

}  // namespace

std::unique_ptr<GrantMapper> make_grant_mapper(std::shared_ptr<Context> ctx) {
    return std::make_unique<SimGrantMapper>(std::move(ctx));
}

std::unique_ptr<GrantSharer> make_grant_sharer(std::shared_ptr<Context> ctx) {
    std::shared_ptr<SharerState> state;
    {
        std::lock_guard lock(ctx->sharer_mu);
        if (!ctx->sharer) ctx->sharer = open_sharer_state(*ctx);
        state = ctx->sharer;
    }
    return std::make_unique<SimGrantSharer>(std::move(state));
}

}  // namespace xensock::platform::sim
