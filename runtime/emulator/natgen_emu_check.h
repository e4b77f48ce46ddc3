// natgen_emu_check.h: racecheck and initcheck for emulated kernels (included by natgen_emu.h).
//
// A kernel module built with NATGEN_EMU_SANITIZE is compiled with -fsanitize=thread, which makes the
// compiler call __tsan_read4(p), __tsan_write16(p), ... before every memory access of the kernel code.
// No ThreadSanitizer runtime is linked: the hooks at the end of this file are those functions, and all
// they do is look at shared memory (and, with racecheck=global, the launch's tensors) through a shadow
// cell per byte. Runtime code that touches shared memory on a thread's behalf (ldmatrix, cp.async landing,
// atomics) is not instrumented and reports its accesses explicitly through access().
//
// Ordering model (what makes two accesses by different threads "synchronised"):
//   * __syncthreads: every completed barrier starts a new epoch (a number unique across blocks and
//     launches), and any two accesses of a block in different epochs are ordered;
//   * warp collectives (__syncwarp, shuffles, votes, ldmatrix, mma): every lane carries a Lamport clock;
//     a collective sets all its lanes' clocks to one more than their maximum. An access at clock a is
//     ordered before a later access of a lane of the same warp, same epoch, whose clock is > a. Every
//     happens-before chain raises the clock, so a reported race is always real; only chains through
//     partial-mask collectives can hide one;
//   * nothing else: different warps in one epoch, or (global memory) different blocks, are unordered.
// A conflict is a write/write or write/read pair of one byte by different threads that is not ordered.
// Atomics are checked against the plain accesses of other threads (like a write) and are not recorded
// as accesses themselves, so atomics never race with each other.
// Not seen: accesses inside library calls the compiler leaves as calls (a memcpy of a size it does not
// know), and ordering through fences and flags (__threadfence + a spin on a flag is reported as a race).
#pragma once
#ifndef NATGEN_EMU_CHECK_H
#define NATGEN_EMU_CHECK_H

#include <dlfcn.h>

namespace natgen_emu {

constexpr uint32_t kNone = 0xffffffffu;

// Shadow of one byte. Thread ids are grid-linear (block_linear * threads_per_block + thread_linear);
// pcs are offsets of the accessing instruction in the kernel module (symbolized on the Python side).
struct Cell {
    uint32_t init;                            // block epoch of the block that last wrote it (initcheck)
    uint32_t w_epoch, w_clock, w_tid, w_pc;   // the last plain write
    uint32_t r_epoch;                         // epoch of the reads below; all of them are in it
    uint32_t r1_clock, r1_tid, r1_pc;         // the reader of warp W (the first warp that read in r_epoch)
    uint32_t r2_clock, r2_tid, r2_pc;         //   with the highest clock, and the next highest other one
    uint32_t rx_tid, rx_pc;                   // a reader of another warp than W, if any
    uint32_t rf_epoch, rf_tid, rf_pc;         // a reader of an earlier block of this launch (global memory)
    uint32_t p_epoch, p_tid, p_pc;            // a cp.async in flight to this byte (p_epoch == block epoch)
};

// ATOMIC: checked like a write against other threads' plain accesses, counts as initializing, and is not
// recorded (atomics do not race with atomics); ATOMIC_NO_READ: the same for one that ignores the old value
// (atomicExch); ISSUE: checked like a write, records nothing (a cp.async destination at issue).
enum AccessKind : int { ACCESS_READ = 0, ACCESS_WRITE, ACCESS_ATOMIC, ACCESS_ATOMIC_NO_READ, ACCESS_ISSUE };

struct ShadowRegion {  // a tensor of the launch, for racecheck=global
    unsigned char* data;
    size_t nbytes;
    std::string label;
    Cell* cells;
    size_t map_bytes;
};

struct CheckState {
    int racecheck = 0;       // 0 off, 1 shared memory, 2 shared and global memory
    bool initcheck = false;
    bool active = false;     // checks on for the running launch
    uint32_t epoch = 0;      // current epoch (global counter)
    uint32_t block_epoch = 0, launch_epoch = 0;
    uint32_t block_linear = 0;
    uintptr_t module_base = 0;
    Cell* smem = nullptr;    // static shared bytes first, then the dynamic ones
    size_t smem_cells = 0, smem_map_bytes = 0;
    std::vector<ShadowRegion> regions;
    // the same as a plain array: the hooks must not call (instrumented, out-of-line) library code
    ShadowRegion* region_list = nullptr;
    size_t nregions = 0;
};
CheckState g_check;

NATGEN_EMU_NOSAN inline bool sanitized_build() {
#ifdef NATGEN_EMU_SANITIZE
    return true;
#else
    return false;
#endif
}

NATGEN_EMU_NOSAN inline uint32_t pc_offset(const void* return_address) {
    return uint32_t(reinterpret_cast<uintptr_t>(return_address) - g_check.module_base);
}

NATGEN_EMU_NOSAN inline uint32_t thread_id(const Fiber* f) { return g_check.block_linear * uint32_t(g_rt.nthreads) + uint32_t(f->linear); }

NATGEN_EMU_NOSAN inline Cell* map_cells(size_t count, size_t* map_bytes) {
    *map_bytes = round_up(std::max<size_t>(count, 1) * sizeof(Cell), page_size());
    void* mem = mmap(nullptr, *map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return mem == MAP_FAILED ? nullptr : static_cast<Cell*>(mem);
}

// Called by launch(); false when shadow memory cannot be mapped.
NATGEN_EMU_NOSAN inline bool check_begin(int racecheck, bool initcheck, const std::vector<std::pair<unsigned char*, size_t>>& tensors,
                        const std::vector<std::string>& labels) {
    g_check.racecheck = racecheck;
    g_check.initcheck = initcheck;
    g_check.active = racecheck > 0 || initcheck;
    if (!g_check.active) return true;
    if (!g_check.module_base) {
        Dl_info info;
        if (dladdr(reinterpret_cast<void*>(&check_begin), &info) && info.dli_fbase)
            g_check.module_base = reinterpret_cast<uintptr_t>(info.dli_fbase);
    }
    const size_t need = static_shared_bytes() + kMaxSharedBytes;
    if (!g_check.smem) {
        g_check.smem = map_cells(need, &g_check.smem_map_bytes);
        if (!g_check.smem) return false;
        g_check.smem_cells = need;
    }
    if (g_check.epoch > 0xf0000000u) {  // epochs are about to wrap: forget everything and restart
        std::memset(static_cast<void*>(g_check.smem), 0, g_check.smem_cells * sizeof(Cell));
        g_check.epoch = 0;
    }
    g_check.launch_epoch = ++g_check.epoch;
    if (racecheck >= 2) {
        for (size_t i = 0; i < tensors.size(); ++i) {
            ShadowRegion r{tensors[i].first, tensors[i].second, labels[i], nullptr, 0};
            r.cells = map_cells(r.nbytes, &r.map_bytes);
            if (!r.cells) return false;
            g_check.regions.push_back(r);
        }
        g_check.region_list = g_check.regions.data();
        g_check.nregions = g_check.regions.size();
    }
    return true;
}

NATGEN_EMU_NOSAN inline void check_end() {
    for (ShadowRegion& r : g_check.regions) munmap(r.cells, r.map_bytes);
    g_check.regions.clear();
    g_check.region_list = nullptr;
    g_check.nregions = 0;
    g_check.active = false;
}

NATGEN_EMU_NOSAN inline void check_block_start(uint32_t block_linear) {
    g_check.block_linear = block_linear;
    g_check.block_epoch = ++g_check.epoch;
}

NATGEN_EMU_NOSAN inline void check_barrier_done() { ++g_check.epoch; }

// Lanes of one warp collective (mask) leave it with one more than their highest clock.
NATGEN_EMU_NOSAN inline void check_warp_join(int warp, unsigned mask) {
    uint32_t top = 0;
    for (int lane = 0; lane < 32; ++lane)
        if (mask >> lane & 1u) top = std::max(top, g_rt.fibers[size_t(warp) * 32 + size_t(lane)].clock);
    for (int lane = 0; lane < 32; ++lane)
        if (mask >> lane & 1u) g_rt.fibers[size_t(warp) * 32 + size_t(lane)].clock = top + 1;
}

// ------------------------------------------------------------------------------------------ reports
NATGEN_EMU_NOSAN inline std::string thread_text(uint32_t tid) {
    const uint32_t n = uint32_t(g_rt.nthreads), linear = tid % n, block = tid / n;
    const uint3 t{linear % blockDim.x, (linear / blockDim.x) % blockDim.y, linear / (blockDim.x * blockDim.y)};
    std::string s = format("thread (%u,%u,%u)", t.x, t.y, t.z);
    if (block != g_check.block_linear) {
        const uint3 b{block % gridDim.x, (block / gridDim.x) % gridDim.y, block / (gridDim.x * gridDim.y)};
        s += format(" of block (%u,%u,%u)", b.x, b.y, b.z);
    }
    return s;
}

// Where a byte lives, in words the Python side finishes: {smem:N} names the static shared variable.
NATGEN_EMU_NOSAN inline std::string where_text(const unsigned char* p) {
    if (__start_natgen_shared && p >= __start_natgen_shared && p < __stop_natgen_shared)
        return format("static shared memory {smem:%zx}", size_t(p - __start_natgen_shared));
    if (p >= g_rt.dyn_data && p < g_rt.dyn_data + g_rt.dyn_bytes)
        return format("dynamic shared memory byte offset %zu", size_t(p - g_rt.dyn_data));
    for (const ShadowRegion& r : g_check.regions)
        if (p >= r.data && p < r.data + r.nbytes)
            return format("global memory byte offset %zu of argument %s", size_t(p - r.data), r.label.c_str());
    return format("address %p", static_cast<const void*>(p));
}

NATGEN_EMU_NOSAN inline const char* kind_text(int kind) {
    switch (kind) {
        case ACCESS_READ: return "read";
        case ACCESS_WRITE: return "write";
        case ACCESS_ISSUE: return "cp.async";
        default: return "atomic";
    }
}

[[noreturn]] NATGEN_EMU_NOSAN inline void race(Fiber* f, const unsigned char* p, int kind, uint32_t pc, const char* other_kind,
                              uint32_t other_tid, uint32_t other_pc, const char* why) {
    if (g_rt.fault.kind == FAULT_NONE) {
        const uint32_t n = uint32_t(g_rt.nthreads), linear = other_tid % n, block = other_tid / n;
        g_rt.fault.other_thread = uint3{linear % blockDim.x, (linear / blockDim.x) % blockDim.y,
                                        linear / (blockDim.x * blockDim.y)};
        g_rt.fault.other_block = uint3{block % gridDim.x, (block / gridDim.x) % gridDim.y,
                                       block / (gridDim.x * gridDim.y)};
        g_rt.fault.has_other = true;
    }
    fiber_fault_as(f, FAULT_RACE,
                format("race on %s: %s by thread %s at {pc:%x} after a %s by %s at {pc:%x}, %s",
                       where_text(p).c_str(), kind_text(kind), tid_str(f).c_str(), pc, other_kind,
                       thread_text(other_tid).c_str(), other_pc, why));
}

// Why two unordered accesses are not synchronised (for the message).
NATGEN_EMU_NOSAN inline const char* unordered_reason(const Fiber* f, uint32_t other_epoch, uint32_t other_tid) {
    if (other_epoch < g_check.block_epoch) return "in different blocks of one launch (only atomics may share bytes)";
    const int other_warp = int(other_tid % uint32_t(g_rt.nthreads)) / 32;
    if (other_warp != f->warp) return "with no __syncthreads between them";
    return "with no __syncthreads or warp synchronisation (__syncwarp, shuffle, ballot) between them";
}

// Is an earlier access (epoch, tid, clock) ordered before the current thread's access? `floor` is the
// first epoch that still matters (the block's for shared memory, the launch's for global memory).
NATGEN_EMU_NOSAN inline bool ordered(uint32_t epoch, uint32_t tid, uint32_t clock, uint32_t me, const Fiber* f, uint32_t floor) {
    if (epoch < floor || tid == me) return true;
    if (epoch < g_check.epoch) return epoch >= g_check.block_epoch;  // earlier epoch: same block, or another block
    return int(tid % uint32_t(g_rt.nthreads)) / 32 == f->warp && f->clock > clock;
}

NATGEN_EMU_NOSAN inline void check_byte(Cell& c, Fiber* f, const unsigned char* p, int kind, uint32_t pc, bool shared) {
    const uint32_t E = g_check.epoch, me = thread_id(f);
    const uint32_t floor = shared ? g_check.block_epoch : g_check.launch_epoch;
    const bool reads = kind == ACCESS_READ || kind == ACCESS_ATOMIC;
    if (g_check.racecheck) {
        if (shared && c.p_epoch == g_check.block_epoch && c.p_tid != kNone)
            race(f, p, kind, pc, "cp.async", c.p_tid, c.p_pc,
                 "which is still in flight: the issuing thread has not reached the cp_async_wait that lands it");
        if (c.w_epoch >= floor && !ordered(c.w_epoch, c.w_tid, c.w_clock, me, f, floor))
            race(f, p, kind, pc, "write", c.w_tid, c.w_pc, unordered_reason(f, c.w_epoch, c.w_tid));
        if (kind != ACCESS_READ) {  // a write (or atomic) must come after every read of other threads
            if (c.r_epoch == E) {
                const bool my_warp_is_w = int(c.r1_tid % uint32_t(g_rt.nthreads)) / 32 == f->warp;
                if (!my_warp_is_w)
                    race(f, p, kind, pc, "read", c.r1_tid, c.r1_pc, unordered_reason(f, E, c.r1_tid));
                if (c.rx_tid != kNone)
                    race(f, p, kind, pc, "read", c.rx_tid, c.rx_pc, unordered_reason(f, E, c.rx_tid));
                if (c.r1_tid != me && f->clock <= c.r1_clock)
                    race(f, p, kind, pc, "read", c.r1_tid, c.r1_pc, unordered_reason(f, E, c.r1_tid));
                if (c.r1_tid == me && c.r2_tid != kNone && f->clock <= c.r2_clock)
                    race(f, p, kind, pc, "read", c.r2_tid, c.r2_pc, unordered_reason(f, E, c.r2_tid));
            } else if (c.r_epoch >= floor && c.r_epoch < g_check.block_epoch) {
                race(f, p, kind, pc, "read", c.r1_tid, c.r1_pc, unordered_reason(f, c.r_epoch, c.r1_tid));
            }
            if (!shared && c.rf_epoch >= floor && c.rf_epoch < g_check.block_epoch)
                race(f, p, kind, pc, "read", c.rf_tid, c.rf_pc, unordered_reason(f, c.rf_epoch, c.rf_tid));
        }
    }
    // after the race checks: a read of a cp.async destination in flight is reported as that race
    if (shared && g_check.initcheck && reads && c.init != g_check.block_epoch)
        fiber_fault_as(f, FAULT_UNINIT, format("%s of %s by thread %s at {pc:%x}, which no thread of the block has "
                                         "written in this launch", kind == ACCESS_READ ? "read" : "atomic read",
                                         where_text(p).c_str(), tid_str(f).c_str(), pc));
    if (kind == ACCESS_READ) {
        if (!g_check.racecheck) return;
        if (c.r_epoch != E) {
            if (!shared && c.r_epoch >= floor && c.r_epoch < g_check.block_epoch)
                c.rf_epoch = c.r_epoch, c.rf_tid = c.r1_tid, c.rf_pc = c.r1_pc;
            c.r_epoch = E;
            c.r1_tid = me, c.r1_clock = f->clock, c.r1_pc = pc;
            c.r2_tid = kNone;
            c.rx_tid = kNone;
        } else if (int(c.r1_tid % uint32_t(g_rt.nthreads)) / 32 != f->warp) {
            if (c.rx_tid == kNone) c.rx_tid = me, c.rx_pc = pc;
        } else if (c.r1_tid == me) {
            c.r1_clock = f->clock, c.r1_pc = pc;
        } else if (f->clock >= c.r1_clock) {
            c.r2_tid = c.r1_tid, c.r2_clock = c.r1_clock, c.r2_pc = c.r1_pc;
            c.r1_tid = me, c.r1_clock = f->clock, c.r1_pc = pc;
        } else if (c.r2_tid == kNone || c.r2_tid == me || f->clock >= c.r2_clock) {
            c.r2_tid = me, c.r2_clock = f->clock, c.r2_pc = pc;
        }
        return;
    }
    if (kind == ACCESS_ISSUE) return;
    c.init = g_check.block_epoch;
    if (kind == ACCESS_WRITE) c.w_epoch = E, c.w_clock = f->clock, c.w_tid = me, c.w_pc = pc;
}

// The shadow cells of [p, p+n), or nullptr when the bytes are not checked.
NATGEN_EMU_NOSAN inline Cell* cells_of(const unsigned char* p, size_t n, bool* shared) {
    const size_t s = static_shared_bytes();
    if (__start_natgen_shared && p >= __start_natgen_shared && p + n <= __stop_natgen_shared) {
        *shared = true;
        return g_check.smem + (p - __start_natgen_shared);
    }
    if (p >= g_rt.dyn_data && p + n <= g_rt.dyn_data + g_rt.dyn_bytes) {
        *shared = true;
        return g_check.smem + s + (p - g_rt.dyn_data);
    }
    for (size_t i = 0; i < g_check.nregions; ++i) {
        const ShadowRegion& r = g_check.region_list[i];
        if (p >= r.data && p + n <= r.data + r.nbytes) {
            *shared = false;
            return r.cells + (p - r.data);
        }
    }
    return nullptr;
}

// An access of n bytes at p by thread f (the running one, or a lane of a collective the runtime resolves).
NATGEN_EMU_NOSAN inline void access(Fiber* f, const void* address, size_t n, int kind, uint32_t pc) {
    if (!g_check.active || !f) return;
    const unsigned char* p = static_cast<const unsigned char*>(address);
    bool shared = false;
    Cell* cells = cells_of(p, n, &shared);
    if (!cells) return;
    for (size_t i = 0; i < n; ++i) check_byte(cells[i], f, p + i, kind, pc, shared);
}

// cp.async bookkeeping: the destination is in flight from issue until the copy lands.
NATGEN_EMU_NOSAN inline void check_async_issue(Fiber* f, unsigned char* dst, size_t n, uint32_t pc) {
    if (!g_check.active || !g_check.racecheck) return;
    bool shared = false;
    Cell* cells = cells_of(dst, n, &shared);
    if (!cells || !shared) return;
    for (size_t i = 0; i < n; ++i) {
        Cell& c = cells[i];
        if (c.p_epoch == g_check.block_epoch && c.p_tid != kNone)
            race(f, dst + i, ACCESS_WRITE, pc, "cp.async", c.p_tid, c.p_pc,
                 "a second cp.async to a destination that an earlier one has not landed on yet");
    }
    access(f, dst, n, ACCESS_ISSUE, pc);  // the WAW/WAR checks of a write, at issue
    for (size_t i = 0; i < n; ++i) cells[i].p_epoch = g_check.block_epoch, cells[i].p_tid = thread_id(f), cells[i].p_pc = pc;
}
NATGEN_EMU_NOSAN inline void check_async_land(Fiber* f, unsigned char* dst, size_t n, uint32_t pc) {
    if (!g_check.active) return;
    bool shared = false;
    Cell* cells = cells_of(dst, n, &shared);
    if (!cells) return;
    for (size_t i = 0; i < n; ++i) cells[i].p_tid = kNone;
    access(f, dst, n, ACCESS_WRITE, pc);
}

}  // namespace natgen_emu

// ------------------------------------------------------------------------------------------------
// The -fsanitize=thread instrumentation ABI (only the entry points GCC and Clang emit for plain code).
// asm labels keep the C++ names apart from the compiler's built-in declarations of these symbols.
// ------------------------------------------------------------------------------------------------
#ifdef NATGEN_EMU_SANITIZE
#define NATGEN_EMU_HOOK(name, params)                                                                      \
    extern "C" NATGEN_EMU_NOSAN __attribute__((visibility("hidden"), used)) void natgen_emu_hook_##name params \
        __asm__("__tsan_" #name);                                                                          \
    extern "C" NATGEN_EMU_NOSAN __attribute__((visibility("hidden"), used)) void natgen_emu_hook_##name params
#define NATGEN_EMU_HOOK_SIZE(n)                                                                                     \
    NATGEN_EMU_HOOK(read##n, (void* p)) {                                                                           \
        if (::natgen_emu::g_check.active)                                                                           \
            ::natgen_emu::access(::natgen_emu::g_rt.current, p, n, ::natgen_emu::ACCESS_READ,                       \
                                 ::natgen_emu::pc_offset(__builtin_return_address(0)));                             \
    }                                                                                                               \
    NATGEN_EMU_HOOK(write##n, (void* p)) {                                                                          \
        if (::natgen_emu::g_check.active)                                                                           \
            ::natgen_emu::access(::natgen_emu::g_rt.current, p, n, ::natgen_emu::ACCESS_WRITE,                      \
                                 ::natgen_emu::pc_offset(__builtin_return_address(0)));                             \
    }                                                                                                               \
    NATGEN_EMU_HOOK(unaligned_read##n, (void* p)) {                                                                 \
        if (::natgen_emu::g_check.active)                                                                           \
            ::natgen_emu::access(::natgen_emu::g_rt.current, p, n, ::natgen_emu::ACCESS_READ,                       \
                                 ::natgen_emu::pc_offset(__builtin_return_address(0)));                             \
    }                                                                                                               \
    NATGEN_EMU_HOOK(unaligned_write##n, (void* p)) {                                                                \
        if (::natgen_emu::g_check.active)                                                                           \
            ::natgen_emu::access(::natgen_emu::g_rt.current, p, n, ::natgen_emu::ACCESS_WRITE,                      \
                                 ::natgen_emu::pc_offset(__builtin_return_address(0)));                             \
    }
NATGEN_EMU_HOOK_SIZE(1)
NATGEN_EMU_HOOK_SIZE(2)
NATGEN_EMU_HOOK_SIZE(4)
NATGEN_EMU_HOOK_SIZE(8)
NATGEN_EMU_HOOK_SIZE(16)
#undef NATGEN_EMU_HOOK_SIZE
NATGEN_EMU_HOOK(read_range, (void* p, long n)) {
    if (::natgen_emu::g_check.active && n > 0)
        ::natgen_emu::access(::natgen_emu::g_rt.current, p, size_t(n), ::natgen_emu::ACCESS_READ,
                             ::natgen_emu::pc_offset(__builtin_return_address(0)));
}
NATGEN_EMU_HOOK(write_range, (void* p, long n)) {
    if (::natgen_emu::g_check.active && n > 0)
        ::natgen_emu::access(::natgen_emu::g_rt.current, p, size_t(n), ::natgen_emu::ACCESS_WRITE,
                             ::natgen_emu::pc_offset(__builtin_return_address(0)));
}
// Atomic builtins (the guards of function-local statics): plain accesses on the one OS thread.
#define NATGEN_EMU_HOOK_ATOMIC(bits, T)                                                                    \
    extern "C" NATGEN_EMU_NOSAN __attribute__((visibility("hidden"), used)) T natgen_emu_hook_load##bits( \
        const volatile T* a, int) __asm__("__tsan_atomic" #bits "_load");                                \
    extern "C" NATGEN_EMU_NOSAN __attribute__((visibility("hidden"), used)) T natgen_emu_hook_load##bits( \
        const volatile T* a, int) { return *a; }                                                          \
    NATGEN_EMU_HOOK(atomic##bits##_store, (volatile T * a, T v, int)) { *a = v; }
NATGEN_EMU_HOOK_ATOMIC(8, char)
NATGEN_EMU_HOOK_ATOMIC(16, short)
NATGEN_EMU_HOOK_ATOMIC(32, int)
NATGEN_EMU_HOOK_ATOMIC(64, long long)
#undef NATGEN_EMU_HOOK_ATOMIC
NATGEN_EMU_HOOK(init, ()) {}
NATGEN_EMU_HOOK(func_entry, (void*)) {}
NATGEN_EMU_HOOK(func_exit, (void*)) {}
NATGEN_EMU_HOOK(vptr_update, (void**, void*)) {}
NATGEN_EMU_HOOK(vptr_read, (void**)) {}
#undef NATGEN_EMU_HOOK
#endif  // NATGEN_EMU_SANITIZE

#endif  // NATGEN_EMU_CHECK_H
