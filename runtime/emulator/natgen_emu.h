// natgen_emu.h: run CUDA kernel source on the CPU (the emulation half of templates/natgen_device.cuh).
//
// Compiled by g++ into exactly ONE translation unit per emulated module (the wrapper that
// natgen.emulator generates), so it defines its globals and its assembly here, not in a .cpp.
//
// Model
//   * Blocks run one after another. Inside a block every CUDA thread is a fiber on its own mmap'ed
//     stack (guard page below it), scheduled cooperatively on the calling OS thread. A fiber runs until
//     it reaches a synchronisation point (__syncthreads, a warp collective) or returns.
//   * __syncthreads is a barrier over the block's live fibers, identified by its call site
//     (file:line); warp collectives (shuffles, ballots, __syncwarp, mma, ldmatrix) are barriers over
//     the lanes named in their mask, and the last lane to arrive computes every lane's result.
//   * Faults never unwind through a fiber: a fiber that detects one records it and switches back
//     to the scheduler for good; SIGSEGV/SIGBUS/SIGFPE/SIGABRT (and the timeout timer) are caught
//     on an alternate signal stack and siglongjmp to the launch frame.
//   * Because fibers are cooperative on one OS thread, shared memory can be plain static storage:
//     `__shared__` expands to a static in the `natgen_shared` section (one instance, reused by
//     every block), and atomics are ordinary read-modify-writes.
#pragma once
#ifndef NATGEN_EMU_H
#define NATGEN_EMU_H

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <pthread.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(NATGEN_EMU_UCONTEXT)
#define NATGEN_EMU_UCONTEXT 1  // portable fallback: correct, just slower (sigprocmask per switch)
#endif
#ifdef NATGEN_EMU_UCONTEXT
#include <ucontext.h>
#endif

// Runtime code that a kernel calls, and that touches shared memory on a thread's behalf, is never
// instrumented in a sanitized build (natgen_emu_check.h): it reports its accesses itself. ENTRY also keeps
// such a function out of line, so that the instrumentation of the kernel cannot reach into it and
// __builtin_return_address(0) is the kernel's call site.
#define NATGEN_EMU_NOSAN __attribute__((no_sanitize_thread))
#ifdef NATGEN_EMU_SANITIZE
#define NATGEN_EMU_ENTRY __attribute__((noinline, no_sanitize_thread))
#else
#define NATGEN_EMU_ENTRY inline
#endif

// ------------------------------------------------------------------------------------------------
// CUDA language surface
// ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// libstdc++ spells __attribute__((__noinline__)), so the CUDA keyword can only be a no-op here
#define __noinline__
#define __launch_bounds__(...)
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
// One instance per program == one per block, since blocks run one after another. The section lets
// the launcher size (227 KB limit) and poison static shared memory between blocks.
#define __shared__ __attribute__((section("natgen_shared"))) static
#ifndef warpSize
#define warpSize 32
#endif

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) int2 { int x, y; };
struct int3 { int x, y, z; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Set by the scheduler before it switches into a fiber. Plain (not static) globals so the compiler
// must reload them after every opaque call, i.e. after every synchronisation point.
uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

// ------------------------------------------------------------------------------------------------
// half / bfloat16: storage types with round-to-nearest-even conversions (bit-exact with CUDA)
// ------------------------------------------------------------------------------------------------
namespace natgen_emu {
inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t float_to_half_bits(float value) {
    const uint32_t f = float_bits(value);
    const uint16_t sign = uint16_t((f & 0x80000000u) >> 16);
    uint32_t f_exp = f & 0x7f800000u;
    if (f_exp >= 0x47800000u) {                       // |x| >= 65536, inf or nan
        if (f_exp == 0x7f800000u && (f & 0x007fffffu)) return 0x7fffu;  // CUDA's canonical NaN
        return uint16_t(sign | 0x7c00u);
    }
    if (f_exp <= 0x38000000u) {                       // result is subnormal or zero
        if (f_exp < 0x33000000u) return sign;
        f_exp >>= 23;
        uint32_t f_sig = 0x00800000u + (f & 0x007fffffu);
        const uint32_t lost_low = f & 0x000007ffu;    // bits the extra shift below drops
        f_sig >>= (113 - f_exp);
        if ((f_sig & 0x00003fffu) != 0x00001000u || lost_low) f_sig += 0x00001000u;
        return uint16_t(sign + (f_sig >> 13));
    }
    const uint32_t h_exp = (f_exp - 0x38000000u) >> 13;
    uint32_t f_sig = f & 0x007fffffu;
    if ((f_sig & 0x00003fffu) != 0x00001000u) f_sig += 0x00001000u;  // ties to even
    return uint16_t(sign + h_exp + (f_sig >> 13));    // a carry rounds up into the exponent (inf ok)
}
inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return bits_float(sign);
        float v = std::ldexp(float(mant), -24);
        return sign ? -v : v;
    }
    return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
inline uint16_t float_to_bf16_bits(float value) {
    const uint32_t u = float_bits(value);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // CUDA's canonical NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }
}  // namespace natgen_emu

struct __half {
    uint16_t __x;
    __half() = default;
    __half(float f) : __x(natgen_emu::float_to_half_bits(f)) {}
    __half(double f) : __x(natgen_emu::float_to_half_bits(float(f))) {}
    __half(int i) : __x(natgen_emu::float_to_half_bits(float(i))) {}
    operator float() const { return natgen_emu::half_bits_to_float(__x); }
};
typedef __half half;
struct __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(natgen_emu::float_to_bf16_bits(f)) {}
    __nv_bfloat16(double f) : __x(natgen_emu::float_to_bf16_bits(float(f))) {}
    __nv_bfloat16(int i) : __x(natgen_emu::float_to_bf16_bits(float(i))) {}
    operator float() const { return natgen_emu::bf16_bits_to_float(__x); }
};
typedef __nv_bfloat16 nv_bfloat16;
struct alignas(4) __half2 { __half x, y; };
typedef __half2 half2;
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __nv_bfloat162 nv_bfloat162;

// Arithmetic is done in float and rounded once: float has more than 2p+2 bits for both formats, so
// this equals the correctly rounded half/bf16 operation (what the hardware instructions give).
#define NATGEN_EMU_LOWP_OPS(T)                                                                   \
    inline T operator+(T a, T b) { return T(float(a) + float(b)); }                             \
    inline T operator-(T a, T b) { return T(float(a) - float(b)); }                             \
    inline T operator*(T a, T b) { return T(float(a) * float(b)); }                             \
    inline T operator/(T a, T b) { return T(float(a) / float(b)); }                             \
    inline T operator-(T a) { T r; r.__x = uint16_t(a.__x ^ 0x8000u); return r; }              \
    inline T& operator+=(T& a, T b) { return a = a + b; }                                       \
    inline T& operator-=(T& a, T b) { return a = a - b; }                                       \
    inline T& operator*=(T& a, T b) { return a = a * b; }                                       \
    inline T& operator/=(T& a, T b) { return a = a / b; }                                       \
    inline bool operator==(T a, T b) { return float(a) == float(b); }                           \
    inline bool operator!=(T a, T b) { return float(a) != float(b); }                           \
    inline bool operator<(T a, T b) { return float(a) < float(b); }                             \
    inline bool operator>(T a, T b) { return float(a) > float(b); }                             \
    inline bool operator<=(T a, T b) { return float(a) <= float(b); }                           \
    inline bool operator>=(T a, T b) { return float(a) >= float(b); }
NATGEN_EMU_LOWP_OPS(__half)
NATGEN_EMU_LOWP_OPS(__nv_bfloat16)
#undef NATGEN_EMU_LOWP_OPS

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hfma(__half a, __half b, __half c) { return __half(std::fma(float(a), float(b), float(c))); }
inline __half2 __float22half2_rn(float2 v) { return {__half(v.x), __half(v.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline float2 __half22float2(__half2 v) { return {float(v.x), float(v.y)}; }
inline float __low2float(__half2 v) { return float(v.x); }
inline float __high2float(__half2 v) { return float(v.y); }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }
inline __half2 __hadd2(__half2 a, __half2 b) { return {a.x + b.x, a.y + b.y}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {a.x * b.x, a.y * b.y}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }
inline __half2 operator+(__half2 a, __half2 b) { return __hadd2(a, b); }
inline __half2 operator*(__half2 a, __half2 b) { return __hmul2(a, b); }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.__x = u; return h; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {float(v.x), float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return float(v.y); }
inline __nv_bfloat162 operator+(__nv_bfloat162 a, __nv_bfloat162 b) { return {a.x + b.x, a.y + b.y}; }
inline __nv_bfloat162 operator*(__nv_bfloat162 a, __nv_bfloat162 b) { return {a.x * b.x, a.y * b.y}; }

// ------------------------------------------------------------------------------------------------
// Math intrinsics (the fast-math variants compute the accurate libm value)
// ------------------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float2int_rn(float f) { return int(nearbyintf(f)); }
inline int __float2int_rz(float f) { return int(f); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
// CUDA declares integer min/max in the global namespace.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ------------------------------------------------------------------------------------------------
// Runtime state
// ------------------------------------------------------------------------------------------------
namespace natgen_emu {

enum FaultKind : int {
    FAULT_NONE = 0, FAULT_BARRIER, FAULT_DEADLOCK, FAULT_WARP, FAULT_SHARED_MEMORY, FAULT_MEMORY,
    FAULT_STACK_OVERFLOW, FAULT_ARITHMETIC, FAULT_ABORT, FAULT_TIMEOUT, FAULT_LAUNCH_CONFIG, FAULT_RACE,
    FAULT_UNINIT,
};
enum FiberState : int { RUNNABLE = 0, WAIT_BARRIER, WAIT_WARP, EXITED };
enum WarpOp : int {
    OP_SYNCWARP = 1, OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR, OP_BALLOT, OP_ANY, OP_ALL,
    OP_MMA_F16, OP_MMA_BF16, OP_MMA_TF32, OP_LDMATRIX,
};
inline const char* op_name(int op) {
    switch (op) {
        case OP_SYNCWARP: return "__syncwarp";
        case OP_SHFL_IDX: return "__shfl_sync";
        case OP_SHFL_UP: return "__shfl_up_sync";
        case OP_SHFL_DOWN: return "__shfl_down_sync";
        case OP_SHFL_XOR: return "__shfl_xor_sync";
        case OP_BALLOT: return "__ballot_sync";
        case OP_ANY: return "__any_sync";
        case OP_ALL: return "__all_sync";
        case OP_MMA_F16: return "ng::mma_m16n8k16_f16f32";
        case OP_MMA_BF16: return "ng::mma_m16n8k16_bf16f32";
        case OP_MMA_TF32: return "ng::mma_m16n8k8_tf32f32";
        case OP_LDMATRIX: return "ng::ldmatrix";
    }
    return "?";
}

struct Fiber {
    void* sp;
#ifdef NATGEN_EMU_UCONTEXT
    ucontext_t uc;
#endif
    unsigned char* stack_lo;  // lowest usable byte; the guard page lies just below
    size_t stack_bytes;
    uint3 tid;
    int linear, warp, lane;
    int state;
    int bar_line;
    const char* bar_file;
    int bar_pred;
    // warp-collective slot: what this lane brings, and what it gets back
    int op, op_line, arg, width;
    unsigned mask;
    uint64_t value, result;
    const void* ptrs[4];
    void* out;
    // racecheck: Lamport clock over the warp's collectives; pc of a pending ldmatrix (natgen_emu_check.h)
    uint32_t clock, pc;
    // cp.async copies issued and not landed yet, in issue order; groups committed so far
    std::vector<struct AsyncCopy> async;
    uint32_t async_committed;
};
struct AsyncCopy {
    unsigned char* dst;
    unsigned char data[16];
    uint32_t bytes, group, pc;
};

struct WarpGroup { unsigned mask, arrived; int op, line; };
struct WarpState {
    unsigned exists, exited;
    WarpGroup groups[32];
    int ngroups;
};

struct GuardedRegion {
    unsigned char* map;
    size_t map_bytes;
    unsigned char* data;   // what the kernel sees; its end abuts the upper guard page
    size_t nbytes;
    std::string label;
};

struct Fault {
    int kind = FAULT_NONE;
    std::string message;
    uint3 block{0, 0, 0}, thread{0, 0, 0};
    bool has_thread = false;
    uint3 other_block{0, 0, 0}, other_thread{0, 0, 0};  // the other thread of a race
    bool has_other = false;
};

struct Runtime {
    // launch
    void (*kernel)(const unsigned char*) = nullptr;
    const unsigned char* params = nullptr;
    bool checked = true, has_seed = false;
    uint64_t rng = 0;
    double deadline = 0;  // CLOCK_MONOTONIC seconds; 0 = none
    // block
    std::vector<Fiber> fibers;
    std::vector<WarpState> warps;
    std::vector<Fiber*> runq;
    size_t runq_head = 0;
    std::vector<Fiber*> scratch;
    int nthreads = 0, live = 0, exited = 0;
    Fiber* first_exited = nullptr;
    int bar_waiting = 0, bar_line = 0, bar_gen = 0;
    const char* bar_file = nullptr;
    Fiber* bar_first = nullptr;
    int bar_count[2] = {0, 0};
    // scheduler
    Fiber* current = nullptr;
    void* sched_sp = nullptr;
#ifdef NATGEN_EMU_UCONTEXT
    ucontext_t sched_uc;
#endif
    Fault fault;
    // memory
    unsigned char* stack_pool = nullptr;
    size_t stack_pool_bytes = 0, stack_bytes = 0;
    int stack_pool_count = 0;
    std::vector<GuardedRegion> regions;
    unsigned char* dyn_map = nullptr;
    size_t dyn_map_bytes = 0;
    unsigned char* dyn_data = nullptr;
    size_t dyn_bytes = 0;
    // signals
    sigjmp_buf jump;
    volatile sig_atomic_t active = 0;
    pthread_t thread;
    volatile int sig = 0, sig_write = -1;
    void* volatile sig_addr = nullptr;
};
Runtime g_rt;

extern "C" __attribute__((weak, visibility("hidden"))) unsigned char __start_natgen_shared[];
extern "C" __attribute__((weak, visibility("hidden"))) unsigned char __stop_natgen_shared[];
NATGEN_EMU_NOSAN inline size_t static_shared_bytes() {
    return __start_natgen_shared ? size_t(__stop_natgen_shared - __start_natgen_shared) : 0;
}
constexpr size_t kMaxSharedBytes = 227 * 1024;

inline size_t page_size() { return size_t(sysconf(_SC_PAGESIZE)); }
inline size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

inline double now_seconds() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
inline uint64_t next_random() {  // splitmix64
    uint64_t z = (g_rt.rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
inline void shuffle_if_seeded(Fiber** first, size_t n) {
    if (!g_rt.has_seed) return;
    for (size_t i = n; i > 1; --i) std::swap(first[i - 1], first[next_random() % i]);
}
inline std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
NATGEN_EMU_NOSAN inline std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}
NATGEN_EMU_NOSAN inline std::string tid_str(const Fiber* f) {
    return format("(%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
}

// ------------------------------------------------------------------------------------------------
// Context switch
// ------------------------------------------------------------------------------------------------
extern "C" __attribute__((visibility("hidden"), noinline, used)) void natgen_emu_fiber_main();

#ifndef NATGEN_EMU_UCONTEXT
// Saves the callee-saved registers of the System V ABI and the stack pointer; no signal mask, no
// FPU control words (kernels never change them), hence about ten instructions per switch.
extern "C" void natgen_emu_switch(void** save_sp, void* load_sp);
extern "C" void natgen_emu_fiber_start();
asm(R"(
    .text
    .p2align 4
    .globl natgen_emu_switch
    .hidden natgen_emu_switch
    .type natgen_emu_switch,@function
natgen_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size natgen_emu_switch, .-natgen_emu_switch

    .p2align 4
    .globl natgen_emu_fiber_start
    .hidden natgen_emu_fiber_start
    .type natgen_emu_fiber_start,@function
natgen_emu_fiber_start:
    call natgen_emu_fiber_main
    ud2
    .size natgen_emu_fiber_start, .-natgen_emu_fiber_start
)");

inline void prepare_fiber(Fiber* f, size_t stagger) {
    // 16-aligned top, staggered so that the fibers' hot stack lines do not all share cache sets
    uintptr_t top = (uintptr_t(f->stack_lo) + f->stack_bytes - stagger) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 72);  // 6 registers + return address, see below
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    sp[6] = reinterpret_cast<void*>(&natgen_emu_fiber_start);  // at top-24: rsp%16==0 at its call
    f->sp = sp;
}
inline void switch_to_fiber(Fiber* f) { natgen_emu_switch(&g_rt.sched_sp, f->sp); }
inline void switch_to_scheduler(Fiber* f) { natgen_emu_switch(&f->sp, g_rt.sched_sp); }
#else
extern "C" inline void natgen_emu_fiber_trampoline() { natgen_emu_fiber_main(); }
inline void prepare_fiber(Fiber* f, size_t stagger) {
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack_lo;
    f->uc.uc_stack.ss_size = f->stack_bytes - stagger;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, natgen_emu_fiber_trampoline, 0);
}
inline void switch_to_fiber(Fiber* f) { swapcontext(&g_rt.sched_uc, &f->uc); }
inline void switch_to_scheduler(Fiber* f) { swapcontext(&f->uc, &g_rt.sched_uc); }
#endif

// A fault found inside a fiber: record it (as thread `who`'s) and leave the running fiber for good
// (never unwinds its stack). `who` differs from the running fiber when the last lane of a warp
// collective finds the fault of another lane.
[[noreturn]] NATGEN_EMU_NOSAN inline void fiber_fault_as(const Fiber* who, int kind, const std::string& message) {
    Fiber* f = g_rt.current;
    if (g_rt.fault.kind == FAULT_NONE) {
        g_rt.fault.kind = kind;
        g_rt.fault.message = message;
        g_rt.fault.block = blockIdx;
        if (who) { g_rt.fault.thread = who->tid; g_rt.fault.has_thread = true; }
    }
    switch_to_scheduler(f);
    __builtin_unreachable();
}
[[noreturn]] inline void fiber_fault(int kind, const std::string& message) { fiber_fault_as(g_rt.current, kind, message); }

inline void make_runnable(Fiber* f) {
    f->state = RUNNABLE;
    g_rt.runq.push_back(f);
}

}  // namespace natgen_emu
#include "natgen_emu_check.h"
namespace natgen_emu {

// ------------------------------------------------------------------------------------------------
// __syncthreads
// ------------------------------------------------------------------------------------------------
NATGEN_EMU_ENTRY int block_barrier(const char* file, int line, int pred) {
    Fiber* f = g_rt.current;
    if (g_rt.exited > 0) {
        fiber_fault(FAULT_BARRIER,
                    format("__syncthreads at %s:%d is not reached by every thread of the block: "
                           "%d thread(s) already exited, e.g. thread %s",
                           file, line, g_rt.exited, tid_str(g_rt.first_exited).c_str()));
    }
    if (g_rt.bar_waiting == 0) {
        g_rt.bar_file = file;
        g_rt.bar_line = line;
        g_rt.bar_first = f;
    } else if (g_rt.bar_line != line || std::strcmp(g_rt.bar_file, file) != 0) {
        fiber_fault(FAULT_BARRIER,
                    format("threads wait at different __syncthreads: this thread at %s:%d, "
                           "thread %s at %s:%d",
                           file, line, tid_str(g_rt.bar_first).c_str(), g_rt.bar_file, g_rt.bar_line));
    }
    const int parity = g_rt.bar_gen & 1;
    g_rt.bar_count[parity] += pred ? 1 : 0;
    f->state = WAIT_BARRIER;
    f->bar_file = file;
    f->bar_line = line;
    if (++g_rt.bar_waiting == g_rt.live) {
        g_rt.scratch.clear();
        for (Fiber& other : g_rt.fibers)
            if (other.state == WAIT_BARRIER) g_rt.scratch.push_back(&other);
        shuffle_if_seeded(g_rt.scratch.data(), g_rt.scratch.size());
        for (Fiber* other : g_rt.scratch) make_runnable(other);
        g_rt.bar_waiting = 0;
        g_rt.bar_gen++;
        check_barrier_done();
        g_rt.bar_count[parity ^ 1] = 0;
    }
    switch_to_scheduler(f);
    return g_rt.bar_count[parity];
}

// ------------------------------------------------------------------------------------------------
// Warp collectives: the last lane to arrive computes every lane's result
// ------------------------------------------------------------------------------------------------
// (NOSAN: the lane that resolves a collective touches other lanes' operands, ldmatrix rows in shared
// memory among them; those reads are reported for the lane they belong to, never for the resolver.)
NATGEN_EMU_NOSAN inline Fiber* lane_fiber(int warp, int lane) { return &g_rt.fibers[size_t(warp) * 32 + size_t(lane)]; }

NATGEN_EMU_NOSAN inline void resolve_shuffle(int warp, const WarpGroup& g) {
    for (int lane = 0; lane < 32; ++lane) {
        if (!(g.mask >> lane & 1u)) continue;
        Fiber* f = lane_fiber(warp, lane);
        const int width = f->width;
        if (width < 1 || width > 32 || (width & (width - 1)))
            fiber_fault(FAULT_WARP, format("%s with width=%d: width must be a power of two in [1, 32] "
                                           "(lane %d)", op_name(g.op), width, lane));
        // PTX shfl semantics: segmask/clamp exactly as the CUDA intrinsics encode them
        const int segmask = (32 - width) & 31;
        const int min_lane = lane & segmask;
        const int max_lane = g.op == OP_SHFL_UP ? min_lane : (min_lane | (31 & ~segmask));
        const int b = f->arg & 31;
        int j;
        bool in_range;
        switch (g.op) {
            case OP_SHFL_UP: j = lane - b; in_range = j >= max_lane; break;
            case OP_SHFL_DOWN: j = lane + b; in_range = j <= max_lane; break;
            case OP_SHFL_XOR: j = lane ^ b; in_range = j <= max_lane; break;
            default: j = min_lane | (b & ~segmask); in_range = j <= max_lane; break;
        }
        if (!in_range) j = lane;
        if (!(g.mask >> j & 1u))
            fiber_fault(FAULT_WARP, format("%s: lane %d reads lane %d, which is not in mask 0x%08x "
                                           "(or does not exist)", op_name(g.op), lane, j, g.mask));
        f->result = lane_fiber(warp, j)->value;
    }
}

NATGEN_EMU_NOSAN inline void resolve_vote(int warp, const WarpGroup& g) {
    unsigned ballot = 0;
    for (int lane = 0; lane < 32; ++lane)
        if ((g.mask >> lane & 1u) && lane_fiber(warp, lane)->value) ballot |= 1u << lane;
    uint64_t r = ballot;
    if (g.op == OP_ANY) r = ballot != 0;
    if (g.op == OP_ALL) r = ballot == g.mask;
    for (int lane = 0; lane < 32; ++lane)
        if (g.mask >> lane & 1u) lane_fiber(warp, lane)->result = r;
}

inline float lowp_to_float(uint32_t bits16, int op) {
    return op == OP_MMA_BF16 ? bf16_bits_to_float(uint16_t(bits16)) : half_bits_to_float(uint16_t(bits16));
}

// Fragment layouts from the PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"
// and "... mma.m16n8k8" (.tf32). groupID = lane >> 2, tig = lane % 4:
//   A f16/bf16 (16x16): a_i, i=0..7 (reg i/2, half i%2): row = g + 8*((i>>1)&1), col = 2*tig + (i&1) + 8*(i>=4)
//   B f16/bf16 (16x8):  b_i, i=0..3: row = 2*tig + (i&1) + 8*(i>=2), col = g
//   A tf32 (16x8):      a_i, i=0..3: row = g + 8*(i&1), col = tig + 4*(i>=2)
//   B tf32 (8x8):       b_i, i=0..1: row = tig + 4*i, col = g
//   C/D f32 (16x8):     c_i, i=0..3: row = g + 8*(i>=2), col = 2*tig + (i&1)
// Products of f16/bf16/tf32 values are exact in float; sums are accumulated in double and rounded
// once (the hardware's internal order is unspecified; results agree to float rounding).
NATGEN_EMU_NOSAN inline void resolve_mma(int warp, const WarpGroup& g) {
    const bool tf32 = g.op == OP_MMA_TF32;
    const int K = tf32 ? 8 : 16;
    float A[16][16], B[16][8];
    double C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        Fiber* f = lane_fiber(warp, lane);
        const uint32_t* a = static_cast<const uint32_t*>(f->ptrs[0]);
        const uint32_t* b = static_cast<const uint32_t*>(f->ptrs[1]);
        const float* c = static_cast<const float*>(f->ptrs[2]);
        const int gid = lane >> 2, tig = lane & 3;
        if (tf32) {
            for (int i = 0; i < 4; ++i)  // the tensor core ignores the low 13 mantissa bits
                A[gid + 8 * (i & 1)][tig + 4 * (i >= 2)] = bits_float(a[i] & 0xffffe000u);
            for (int i = 0; i < 2; ++i) B[tig + 4 * i][gid] = bits_float(b[i] & 0xffffe000u);
        } else {
            for (int i = 0; i < 8; ++i) {
                const uint32_t bits = (a[i >> 1] >> (16 * (i & 1))) & 0xffffu;
                A[gid + 8 * ((i >> 1) & 1)][2 * tig + (i & 1) + 8 * (i >= 4)] = lowp_to_float(bits, g.op);
            }
            for (int i = 0; i < 4; ++i) {
                const uint32_t bits = (b[i >> 1] >> (16 * (i & 1))) & 0xffffu;
                B[2 * tig + (i & 1) + 8 * (i >= 2)][gid] = lowp_to_float(bits, g.op);
            }
        }
        for (int i = 0; i < 4; ++i) C[gid + 8 * (i >= 2)][2 * tig + (i & 1)] = c[i];
    }
    float D[16][8];
    for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 8; ++col) {
            double acc = C[r][col];
            for (int k = 0; k < K; ++k) acc += double(A[r][k]) * double(B[k][col]);
            D[r][col] = float(acc);
        }
    for (int lane = 0; lane < 32; ++lane) {  // after all reads: d may alias c
        float* d = static_cast<float*>(lane_fiber(warp, lane)->out);
        const int gid = lane >> 2, tig = lane & 3;
        for (int i = 0; i < 4; ++i) d[i] = D[gid + 8 * (i >= 2)][2 * tig + (i & 1)];
    }
}

NATGEN_EMU_NOSAN inline bool in_shared_memory(const void* p, size_t bytes) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (__start_natgen_shared && c >= __start_natgen_shared && c + bytes <= __stop_natgen_shared) return true;
    return c >= g_rt.dyn_data && c + bytes <= g_rt.dyn_data + g_rt.dyn_bytes;
}

// ldmatrix .m8n8 .b16 (PTX ISA "ldmatrix"): lanes 8m..8m+7 give the row addresses of matrix m
// (16 bytes each); lane t receives, per matrix, the pair (row t/4, cols 2*(t%4), +1), or with
// .trans the pair (rows 2*(t%4), +1 ; col t/4); the lower column/row lands in the low 16 bits.
NATGEN_EMU_NOSAN inline void resolve_ldmatrix(int warp, const WarpGroup& g) {
    Fiber* first = lane_fiber(warp, 0);
    const int num = first->arg & 7;
    const bool trans = (first->arg >> 3) & 1;
    uint16_t M[4][8][8];
    for (int m = 0; m < num; ++m)
        for (int r = 0; r < 8; ++r) {
            Fiber* f = lane_fiber(warp, m * 8 + r);
            const void* row = f->ptrs[0];
            if (reinterpret_cast<uintptr_t>(row) & 15u)
                fiber_fault(FAULT_WARP, format("ldmatrix: lane %d passes row address %p, which is not "
                                               "16-byte aligned", m * 8 + r, row));
            if (g_rt.checked && !in_shared_memory(row, 16))
                fiber_fault(FAULT_WARP, format("ldmatrix: lane %d passes row address %p, which is not in "
                                               "shared memory", m * 8 + r, row));
            access(f, row, 16, ACCESS_READ, f->pc);
            std::memcpy(M[m][r], row, 16);
        }
    for (int lane = 0; lane < 32; ++lane) {
        uint32_t* out = static_cast<uint32_t*>(lane_fiber(warp, lane)->out);
        const int r = lane >> 2, c = 2 * (lane & 3);
        for (int m = 0; m < num; ++m) {
            const uint16_t lo = trans ? M[m][c][r] : M[m][r][c];
            const uint16_t hi = trans ? M[m][c + 1][r] : M[m][r][c + 1];
            out[m] = uint32_t(lo) | (uint32_t(hi) << 16);
        }
    }
}

NATGEN_EMU_ENTRY uint64_t warp_collective(int op, unsigned mask, int line) {
    Fiber* f = g_rt.current;
    WarpState& w = g_rt.warps[size_t(f->warp)];
    const unsigned bit = 1u << f->lane;
    if (!(mask & bit))
        fiber_fault(FAULT_WARP, format("%s (line %d) called by lane %d with mask 0x%08x, which does not "
                                       "include the calling lane", op_name(op), line, f->lane, mask));
    mask &= w.exists;  // lanes past the end of a partial last warp do not exist
    const bool full_warp = op == OP_MMA_F16 || op == OP_MMA_BF16 || op == OP_MMA_TF32 || op == OP_LDMATRIX;
    if (full_warp && w.exists != 0xffffffffu)
        fiber_fault(FAULT_WARP, format("%s needs all 32 lanes of the warp, but warp %d has only %d "
                                       "threads", op_name(op), f->warp, __builtin_popcount(w.exists)));
    if (mask & w.exited)
        fiber_fault(FAULT_WARP, format("%s (line %d) waits for lane %d (mask 0x%08x), which already exited",
                                       op_name(op), line, __builtin_ctz(mask & w.exited), mask));
    WarpGroup* g = nullptr;
    for (int i = 0; i < w.ngroups; ++i) {
        WarpGroup& cand = w.groups[i];
        if (cand.mask == mask) { g = &cand; break; }
        if (cand.mask & mask)
            fiber_fault(FAULT_WARP, format("lane %d calls %s (line %d) with mask 0x%08x while lanes of "
                                           "mask 0x%08x wait in %s (line %d)", f->lane, op_name(op), line,
                                           mask, cand.mask, op_name(cand.op), cand.line));
    }
    if (!g) {
        g = &w.groups[w.ngroups++];
        *g = WarpGroup{mask, 0u, op, line};
    } else if (g->op != op) {
        fiber_fault(FAULT_WARP, format("lane %d calls %s (line %d) while other lanes of mask 0x%08x wait in "
                                       "%s (line %d)", f->lane, op_name(op), line, mask, op_name(g->op), g->line));
    }
    f->op = op;
    f->op_line = line;
    f->state = WAIT_WARP;
    g->arrived |= bit;
    if (g->arrived == g->mask) {
        const WarpGroup done = *g;
        *g = w.groups[--w.ngroups];
        if (g_check.active) check_warp_join(f->warp, done.mask);  // before ldmatrix reads: they follow the join
        switch (done.op) {
            case OP_SHFL_IDX: case OP_SHFL_UP: case OP_SHFL_DOWN: case OP_SHFL_XOR:
                resolve_shuffle(f->warp, done); break;
            case OP_BALLOT: case OP_ANY: case OP_ALL: resolve_vote(f->warp, done); break;
            case OP_MMA_F16: case OP_MMA_BF16: case OP_MMA_TF32: resolve_mma(f->warp, done); break;
            case OP_LDMATRIX: resolve_ldmatrix(f->warp, done); break;
            default: break;
        }
        g_rt.scratch.clear();
        for (int lane = 0; lane < 32; ++lane)
            if (done.mask >> lane & 1u) g_rt.scratch.push_back(lane_fiber(f->warp, lane));
        shuffle_if_seeded(g_rt.scratch.data(), g_rt.scratch.size());
        for (Fiber* other : g_rt.scratch) make_runnable(other);
    }
    switch_to_scheduler(f);
    return f->result;
}

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
inline T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}
template <class T>
inline T shuffle(int op, unsigned mask, T var, int arg, int width, int line) {
    Fiber* f = g_rt.current;
    f->value = to_bits(var);
    f->arg = arg;
    f->width = width;
    return from_bits<T>(warp_collective(op, mask, line));
}

// Warp-collective entry points used by ng:: in natgen_device.cuh.
inline void mma_sync(int op, float* d, const uint32_t* a, const uint32_t* b, const float* c, int line) {
    Fiber* f = g_rt.current;
    f->ptrs[0] = a; f->ptrs[1] = b; f->ptrs[2] = c;
    f->out = d;
    warp_collective(op, 0xffffffffu, line);
}
NATGEN_EMU_ENTRY void ldmatrix_sync(uint32_t* regs, const void* row, int num, bool trans, int line) {
    Fiber* f = g_rt.current;
    f->pc = g_check.active ? pc_offset(__builtin_return_address(0)) : 0;
    f->ptrs[0] = row;
    f->out = regs;
    f->arg = num | (trans ? 8 : 0);
    warp_collective(OP_LDMATRIX, 0xffffffffu, line);
}

// cp.async (PTX ISA "cp.async", "cp.async.wait_group"): a copy reads its source when it is issued (so a
// bad source address faults on the issuing thread) and lands in shared memory only at the first
// cp_async_wait<N> of the issuing thread that leaves at most N of its committed groups pending; copies
// not committed yet never land. Until then the destination keeps its old bytes (poison, if nothing wrote
// them), and with racecheck any access to it is a race.
NATGEN_EMU_ENTRY void cp_async(void* smem, const void* gmem, int bytes, int src_bytes) {
    Fiber* f = g_rt.current;
    const uint32_t pc = g_check.active ? pc_offset(__builtin_return_address(0)) : 0;
    if (reinterpret_cast<uintptr_t>(smem) % unsigned(bytes) || reinterpret_cast<uintptr_t>(gmem) % unsigned(bytes))
        fiber_fault(FAULT_MEMORY, format("cp.async of %d bytes from %p to %p: both addresses must be %d-byte "
                                         "aligned", bytes, gmem, smem, bytes));
    if (g_rt.checked && !in_shared_memory(smem, size_t(bytes)))
        fiber_fault(FAULT_MEMORY, format("cp.async destination %p is not in shared memory (%d bytes)", smem, bytes));
    const int n = src_bytes < 0 ? 0 : (src_bytes > bytes ? bytes : src_bytes);
    AsyncCopy copy{static_cast<unsigned char*>(smem), {}, uint32_t(bytes), f->async_committed, pc};
    if (n) {
        access(f, gmem, size_t(n), ACCESS_READ, pc);
        std::memcpy(copy.data, gmem, size_t(n));
    }
    check_async_issue(f, copy.dst, size_t(bytes), pc);
    f->async.push_back(copy);
}
NATGEN_EMU_ENTRY void cp_async_commit() { g_rt.current->async_committed++; }
NATGEN_EMU_ENTRY void cp_async_wait(int pending_groups) {
    Fiber* f = g_rt.current;
    size_t kept = 0;
    for (size_t i = 0; i < f->async.size(); ++i) {
        AsyncCopy& c = f->async[i];
        if (uint64_t(c.group) + uint64_t(pending_groups) < uint64_t(f->async_committed)) {
            check_async_land(f, c.dst, c.bytes, c.pc);
            std::memcpy(c.dst, c.data, c.bytes);
        } else {
            f->async[kept++] = c;
        }
    }
    f->async.resize(kept);
}

// ------------------------------------------------------------------------------------------------
// Dynamic shared memory. The base moves per launch so that its end abuts a guard page; code reads
// it through a reference to a per-type pointer that every launch updates.
// ------------------------------------------------------------------------------------------------
typedef void (*DynSmemSetter)(unsigned char*);
inline std::vector<DynSmemSetter>& dyn_smem_setters() {
    static std::vector<DynSmemSetter> setters;
    return setters;
}
template <class T>
struct DynSmemPtr {
    static T* ptr;
    static void set(unsigned char* base) { ptr = reinterpret_cast<T*>(base); }
};
template <class T>
T* DynSmemPtr<T>::ptr = nullptr;
template <class T>
inline T* const& dynamic_shared_as() {
    static const bool registered = (dyn_smem_setters().push_back(&DynSmemPtr<T>::set),
                                    DynSmemPtr<T>::set(g_rt.dyn_data), true);
    (void)registered;
    return DynSmemPtr<T>::ptr;
}

// ------------------------------------------------------------------------------------------------
// Fiber body and scheduler
// ------------------------------------------------------------------------------------------------
NATGEN_EMU_NOSAN inline void on_fiber_exit(Fiber* f) {
    f->state = EXITED;
    g_rt.live--;
    g_rt.exited++;
    if (!g_rt.first_exited) g_rt.first_exited = f;
    WarpState& w = g_rt.warps[size_t(f->warp)];
    w.exited |= 1u << f->lane;
    for (int i = 0; i < w.ngroups; ++i)
        if (w.groups[i].mask >> f->lane & 1u)
            fiber_fault(FAULT_WARP, format("lane %d exited while lanes of mask 0x%08x wait for it in %s (line %d)",
                                           f->lane, w.groups[i].mask, op_name(w.groups[i].op), w.groups[i].line));
    if (g_rt.bar_waiting > 0)
        fiber_fault(FAULT_BARRIER, format("thread exited while %d thread(s) wait at __syncthreads at %s:%d "
                                          "(e.g. thread %s): __syncthreads is not reached by every thread",
                                          g_rt.bar_waiting, g_rt.bar_file, g_rt.bar_line,
                                          tid_str(g_rt.bar_first).c_str()));
}

}  // namespace natgen_emu

extern "C" void natgen_emu_fiber_main() {
    using namespace natgen_emu;
    g_rt.kernel(g_rt.params);
    Fiber* f = g_rt.current;
    on_fiber_exit(f);
    switch_to_scheduler(f);
    __builtin_trap();
}

namespace natgen_emu {

inline std::string describe_deadlock() {
    int at_barrier = 0, at_warp = 0;
    const Fiber* warp_example = nullptr;
    for (const Fiber& f : g_rt.fibers) {
        if (f.state == WAIT_BARRIER) at_barrier++;
        if (f.state == WAIT_WARP) { at_warp++; if (!warp_example) warp_example = &f; }
    }
    std::string s = format("deadlock: no thread can make progress (%d waiting at __syncthreads", at_barrier);
    if (at_barrier) s += format(" at %s:%d", g_rt.bar_file, g_rt.bar_line);
    s += format(", %d in warp collectives", at_warp);
    if (warp_example) {
        const WarpState& w = g_rt.warps[size_t(warp_example->warp)];
        for (int i = 0; i < w.ngroups; ++i)
            if (w.groups[i].mask >> warp_example->lane & 1u)
                s += format(", e.g. warp %d in %s (line %d) with mask 0x%08x where only lanes 0x%08x arrived",
                            warp_example->warp, op_name(w.groups[i].op), w.groups[i].line, w.groups[i].mask,
                            w.groups[i].arrived);
    }
    return s + ")";
}

inline void set_fault(int kind, const std::string& message, const Fiber* f) {
    if (g_rt.fault.kind != FAULT_NONE) return;
    g_rt.fault.kind = kind;
    g_rt.fault.message = message;
    g_rt.fault.block = blockIdx;
    if (f) { g_rt.fault.thread = f->tid; g_rt.fault.has_thread = true; }
}

NATGEN_EMU_NOSAN inline void poison_shared_memory() {
    if (__start_natgen_shared) std::memset(__start_natgen_shared, 0xff, static_shared_bytes());
    if (g_rt.dyn_bytes) std::memset(g_rt.dyn_data, 0xff, g_rt.dyn_bytes);
}

inline void run_block(uint32_t block_linear) {
    const int n = g_rt.nthreads;
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    if (g_rt.checked) poison_shared_memory();
    if (g_check.active) check_block_start(block_linear);
    g_rt.live = n;
    g_rt.exited = 0;
    g_rt.first_exited = nullptr;
    g_rt.bar_waiting = 0;
    g_rt.bar_gen = 0;
    g_rt.bar_count[0] = g_rt.bar_count[1] = 0;
    for (WarpState& w : g_rt.warps) { w.exited = 0; w.ngroups = 0; }
    g_rt.runq.clear();
    g_rt.runq_head = 0;
    for (int i = 0; i < n; ++i) {
        Fiber* f = &g_rt.fibers[size_t(i)];
        f->state = RUNNABLE;
        f->clock = 1;
        f->async.clear();  // copies a thread never waited for die with its block, as on the device
        f->async_committed = 0;
        prepare_fiber(f, (size_t(i) * 192) % page);
        g_rt.runq.push_back(f);
    }
    shuffle_if_seeded(g_rt.runq.data(), g_rt.runq.size());
    unsigned long long switches = 0;
    while (g_rt.fault.kind == FAULT_NONE) {
        if (g_rt.runq_head == g_rt.runq.size()) {
            g_rt.runq.clear();
            g_rt.runq_head = 0;
            if (g_rt.live > 0) set_fault(FAULT_DEADLOCK, describe_deadlock(), nullptr);
            break;
        }
        Fiber* f = g_rt.runq[g_rt.runq_head++];
        g_rt.current = f;
        threadIdx = f->tid;
        switch_to_fiber(f);
        g_rt.current = nullptr;
        if (g_rt.deadline > 0 && (++switches & 255u) == 0 && now_seconds() > g_rt.deadline)
            set_fault(FAULT_TIMEOUT, "launch exceeded its timeout", nullptr);
    }
}

// ------------------------------------------------------------------------------------------------
// Memory: fiber stacks, guarded copies of global arguments, dynamic shared memory
// ------------------------------------------------------------------------------------------------
// Below every fiber stack; 64 KB so that a large frame cannot jump over it (the build also uses
// -fstack-clash-protection, which probes every page of a big frame).
constexpr size_t kStackGuardBytes = 64 * 1024;

inline bool ensure_stacks(int count) {
    size_t stack_kb = 256;
    if (const char* env = std::getenv("NATGEN_EMULATOR_STACK_KB")) stack_kb = size_t(std::max(16L, std::atol(env)));
    const size_t page = page_size();
    const size_t stack_bytes = round_up(stack_kb * 1024, page);
    if (g_rt.stack_pool && g_rt.stack_pool_count >= count && g_rt.stack_bytes == stack_bytes) return true;
    if (g_rt.stack_pool) munmap(g_rt.stack_pool, g_rt.stack_pool_bytes);
    const size_t slot = stack_bytes + kStackGuardBytes;
    const size_t total = slot * size_t(count);
    void* mem = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) { g_rt.stack_pool = nullptr; return false; }
    g_rt.stack_pool = static_cast<unsigned char*>(mem);
    g_rt.stack_pool_bytes = total;
    g_rt.stack_pool_count = count;
    g_rt.stack_bytes = stack_bytes;
    for (int i = 0; i < count; ++i) mprotect(g_rt.stack_pool + slot * size_t(i), kStackGuardBytes, PROT_NONE);
    return true;
}

inline void free_regions() {
    for (GuardedRegion& r : g_rt.regions) munmap(r.map, r.map_bytes);
    g_rt.regions.clear();
}

// [guard page][... data ...][guard page]: the data ends (16-byte aligned) right at the upper guard,
// so the first out-of-bounds access past the end faults; accesses far below the start hit the lower one.
inline unsigned char* add_region(const void* host, size_t nbytes, const std::string& label) {
    const size_t page = page_size();
    const size_t padded = round_up(nbytes, 16);
    const size_t data_pages = round_up(std::max<size_t>(padded, 1), page);
    const size_t map_bytes = data_pages + 2 * page;
    void* mem = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return nullptr;
    GuardedRegion r;
    r.map = static_cast<unsigned char*>(mem);
    r.map_bytes = map_bytes;
    r.data = r.map + page + data_pages - padded;
    r.nbytes = nbytes;
    r.label = label;
    mprotect(r.map, page, PROT_NONE);
    mprotect(r.map + page + data_pages, page, PROT_NONE);
    if (nbytes) std::memcpy(r.data, host, nbytes);
    if (padded > nbytes) std::memset(r.data + nbytes, 0xff, padded - nbytes);
    g_rt.regions.push_back(r);
    return r.data;
}

inline bool setup_dynamic_shared(size_t bytes) {
    const size_t page = page_size();
    if (!g_rt.dyn_map) {
        g_rt.dyn_map_bytes = round_up(kMaxSharedBytes, page) + 2 * page;
        void* mem = mmap(nullptr, g_rt.dyn_map_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) { g_rt.dyn_map = nullptr; return false; }
        g_rt.dyn_map = static_cast<unsigned char*>(mem);
    }
    unsigned char* guard = g_rt.dyn_map + g_rt.dyn_map_bytes - page;
    const size_t padded = round_up(bytes, 16);
    unsigned char* data = guard - padded;
    unsigned char* first_page = g_rt.dyn_map + (size_t(data - g_rt.dyn_map) / page) * page;
    mprotect(g_rt.dyn_map, size_t(first_page - g_rt.dyn_map), PROT_NONE);
    if (guard > first_page) mprotect(first_page, size_t(guard - first_page), PROT_READ | PROT_WRITE);
    g_rt.dyn_data = data;
    g_rt.dyn_bytes = bytes;
    for (DynSmemSetter set : dyn_smem_setters()) set(data);
    return true;
}

// ------------------------------------------------------------------------------------------------
// Signals: turn faults of kernel code into launch faults
// ------------------------------------------------------------------------------------------------
struct SignalSetup {
    struct sigaction old_segv, old_bus, old_fpe, old_abrt, old_alrm, old_ill;
    stack_t old_stack;
    void* alt_stack = nullptr;
    size_t alt_bytes = 0;
    timer_t timer;
    bool has_timer = false;
};

inline struct sigaction* old_action(SignalSetup* s, int sig);
SignalSetup* g_signals = nullptr;

NATGEN_EMU_NOSAN inline void signal_handler(int sig, siginfo_t* info, void* uctx) {
    if (!g_rt.active || !pthread_equal(pthread_self(), g_rt.thread)) {
        if (sig == SIGALRM) return;
        struct sigaction* old = old_action(g_signals, sig);
        if (old && (old->sa_flags & SA_SIGINFO) && old->sa_sigaction) { old->sa_sigaction(sig, info, uctx); return; }
        if (old && old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) { old->sa_handler(sig); return; }
        signal(sig, SIG_DFL);  // returning re-executes the faulting instruction under the default action
        return;
    }
    if (sig == SIGALRM && !g_rt.current) return;  // the scheduler notices the deadline by itself
    g_rt.sig = sig;
    g_rt.sig_addr = info->si_addr;
    g_rt.sig_write = -1;
#if defined(__x86_64__) && defined(REG_ERR)
    if (sig == SIGSEGV && uctx)
        g_rt.sig_write = (static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#endif
    siglongjmp(g_rt.jump, 1);
}

inline struct sigaction* old_action(SignalSetup* s, int sig) {
    if (!s) return nullptr;
    switch (sig) {
        case SIGSEGV: return &s->old_segv;
        case SIGBUS: return &s->old_bus;
        case SIGFPE: return &s->old_fpe;
        case SIGABRT: return &s->old_abrt;
        case SIGILL: return &s->old_ill;
        case SIGALRM: return &s->old_alrm;
    }
    return nullptr;
}

inline void install_signals(SignalSetup& s, double timeout) {
    g_signals = &s;
    s.alt_bytes = 256 * 1024;
    s.alt_stack = mmap(nullptr, s.alt_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    stack_t st{};
    st.ss_sp = s.alt_stack;
    st.ss_size = s.alt_bytes;
    sigaltstack(&st, &s.old_stack);
    struct sigaction sa{};
    sa.sa_sigaction = signal_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &s.old_segv);
    sigaction(SIGBUS, &sa, &s.old_bus);
    sigaction(SIGFPE, &sa, &s.old_fpe);
    sigaction(SIGABRT, &sa, &s.old_abrt);
    sigaction(SIGILL, &sa, &s.old_ill);
    sigaction(SIGALRM, &sa, &s.old_alrm);
    if (timeout > 0) {
        // Thread-directed, so a kernel spinning without ever synchronising is interrupted in place.
        struct sigevent sev{};
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = SIGALRM;
        sev._sigev_un._tid = gettid();
        if (timer_create(CLOCK_MONOTONIC, &sev, &s.timer) == 0) {
            s.has_timer = true;
            struct itimerspec its{};
            its.it_value.tv_sec = time_t(timeout);
            its.it_value.tv_nsec = long((timeout - double(time_t(timeout))) * 1e9) + 1;
            its.it_interval.tv_nsec = 10 * 1000 * 1000;  // re-fire in case it lands in the scheduler
            timer_settime(s.timer, 0, &its, nullptr);
        }
    }
}

inline void restore_signals(SignalSetup& s) {
    if (s.has_timer) timer_delete(s.timer);
    sigaction(SIGSEGV, &s.old_segv, nullptr);
    sigaction(SIGBUS, &s.old_bus, nullptr);
    sigaction(SIGFPE, &s.old_fpe, nullptr);
    sigaction(SIGABRT, &s.old_abrt, nullptr);
    sigaction(SIGILL, &s.old_ill, nullptr);
    sigaction(SIGALRM, &s.old_alrm, nullptr);
    sigaltstack(&s.old_stack, nullptr);
    munmap(s.alt_stack, s.alt_bytes);
    g_signals = nullptr;
}

inline bool is_stack_overflow(const unsigned char* addr) {
    const Fiber* f = g_rt.current;
    if (f && addr < f->stack_lo && addr + kStackGuardBytes >= f->stack_lo) return true;
    if (!g_rt.stack_pool || addr < g_rt.stack_pool || addr >= g_rt.stack_pool + g_rt.stack_pool_bytes) return false;
    return size_t(addr - g_rt.stack_pool) % (g_rt.stack_bytes + kStackGuardBytes) < kStackGuardBytes;
}

inline std::string describe_signal() {
    const int sig = g_rt.sig;
    const unsigned char* addr = static_cast<const unsigned char*>(g_rt.sig_addr);
    const char* access = g_rt.sig_write == 1 ? "store" : (g_rt.sig_write == 0 ? "load" : "access");
    if (sig == SIGALRM) return "launch exceeded its timeout (the thread was interrupted while running)";
    if (sig == SIGFPE) return "arithmetic fault (SIGFPE: integer division by zero or overflow)";
    if (sig == SIGABRT) return "kernel aborted (SIGABRT: failed assert() or abort())";
    if (sig == SIGILL) return "illegal instruction (SIGILL: __trap() or __builtin_trap())";
    for (const GuardedRegion& r : g_rt.regions) {
        if (addr >= r.map && addr < r.map + r.map_bytes) {
            const long long offset = (long long)(addr - r.data);
            return format("out-of-bounds global %s at byte offset %lld of argument %s, which holds %zu bytes",
                          access, offset, r.label.c_str(), r.nbytes);
        }
    }
    if (g_rt.dyn_map && addr >= g_rt.dyn_map && addr < g_rt.dyn_map + g_rt.dyn_map_bytes) {
        const long long offset = (long long)(addr - g_rt.dyn_data);
        return format("dynamic shared memory %s at byte offset %lld, outside the launch's shared_mem=%zu bytes",
                      access, offset, g_rt.dyn_bytes);
    }
    if (is_stack_overflow(addr))
        return format("stack overflow: a thread used more than its %zu KB fiber stack (raise "
                      "NATGEN_EMULATOR_STACK_KB)", g_rt.stack_bytes / 1024);
    return format("invalid memory %s at address %p (%s; not inside any argument passed to the launch)", access,
                  static_cast<const void*>(addr), sig == SIGBUS ? "SIGBUS" : "SIGSEGV");
}

inline int signal_fault_kind() {
    switch (g_rt.sig) {
        case SIGALRM: return FAULT_TIMEOUT;
        case SIGFPE: return FAULT_ARITHMETIC;
        case SIGABRT: case SIGILL: return FAULT_ABORT;
    }
    const unsigned char* addr = static_cast<const unsigned char*>(g_rt.sig_addr);
    if (g_rt.dyn_map && addr >= g_rt.dyn_map && addr < g_rt.dyn_map + g_rt.dyn_map_bytes) return FAULT_SHARED_MEMORY;
    if (is_stack_overflow(addr)) return FAULT_STACK_OVERFLOW;
    return FAULT_MEMORY;
}

// ------------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------------
struct PointerFixup {
    size_t blob_offset;   // where the pointer lives in the parameter blob
    int region;           // index into the regions passed to launch
    size_t region_offset; // pointer = region data + region_offset
};
struct RegionSpec {
    uintptr_t host;
    size_t nbytes;
    std::string label;
};

inline Fault launch(void (*kernel)(const unsigned char*), std::vector<unsigned char>& blob, dim3 grid, dim3 block,
                    size_t shared_mem, bool has_seed, uint64_t seed, bool checked, double timeout,
                    const std::vector<RegionSpec>& region_specs, const std::vector<PointerFixup>& fixups,
                    int racecheck, bool initcheck) {
    g_rt.fault = Fault();
    auto config_fault = [](int kind, const std::string& msg) {
        Fault f;
        f.kind = kind;
        f.message = msg;
        return f;
    };
    const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
    if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
        return config_fault(FAULT_LAUNCH_CONFIG, "grid and block dimensions must all be >= 1");
    if (nthreads > 1024 || block.z > 64)
        return config_fault(FAULT_LAUNCH_CONFIG,
                            format("block (%u,%u,%u) has %llu threads; CUDA allows at most 1024 (and z <= 64)",
                                   block.x, block.y, block.z, nthreads));
    if (grid.y > 65535 || grid.z > 65535)
        return config_fault(FAULT_LAUNCH_CONFIG, "grid y and z must be <= 65535");
    if (shared_mem > kMaxSharedBytes || shared_mem + static_shared_bytes() > kMaxSharedBytes)
        return config_fault(FAULT_SHARED_MEMORY,
                            format("shared memory request of %zu dynamic + %zu static bytes exceeds the "
                                   "227 KB (%zu bytes) per-block limit",
                                   shared_mem, static_shared_bytes(), kMaxSharedBytes));
    if (!ensure_stacks(int(nthreads)) || !setup_dynamic_shared(shared_mem))
        return config_fault(FAULT_LAUNCH_CONFIG, "could not map memory for fiber stacks / shared memory");

    std::vector<unsigned char*> region_data;
    if (checked) {
        for (const RegionSpec& spec : region_specs) {
            unsigned char* data = add_region(reinterpret_cast<const void*>(spec.host), spec.nbytes, spec.label);
            if (!data) { free_regions(); return config_fault(FAULT_LAUNCH_CONFIG, "mmap failed for a guarded copy"); }
            region_data.push_back(data);
        }
    } else {
        for (const RegionSpec& spec : region_specs) region_data.push_back(reinterpret_cast<unsigned char*>(spec.host));
    }
    for (const PointerFixup& fix : fixups) {
        unsigned char* p = region_data[size_t(fix.region)] + fix.region_offset;
        std::memcpy(blob.data() + fix.blob_offset, &p, sizeof p);
    }
    if ((racecheck || initcheck) && !sanitized_build()) {
        if (checked) free_regions();
        return config_fault(FAULT_LAUNCH_CONFIG, "racecheck/initcheck need the module built with the checks");
    }
    {
        std::vector<std::pair<unsigned char*, size_t>> tensors;
        std::vector<std::string> labels;
        for (size_t i = 0; i < region_specs.size(); ++i) {
            tensors.emplace_back(region_data[i], region_specs[i].nbytes);
            labels.push_back(region_specs[i].label);
        }
        if (!check_begin(racecheck, initcheck, tensors, labels)) {
            check_end();
            if (checked) free_regions();
            return config_fault(FAULT_LAUNCH_CONFIG, "could not map shadow memory for racecheck/initcheck");
        }
    }

    g_rt.kernel = kernel;
    g_rt.params = blob.data();
    g_rt.checked = checked;
    g_rt.nthreads = int(nthreads);
    g_rt.fibers.assign(size_t(nthreads), Fiber());
    for (int i = 0; i < int(nthreads); ++i) {
        Fiber& f = g_rt.fibers[size_t(i)];
        f.stack_lo = g_rt.stack_pool + size_t(i) * (g_rt.stack_bytes + kStackGuardBytes) + kStackGuardBytes;
        f.stack_bytes = g_rt.stack_bytes;
        f.tid = uint3{unsigned(i) % block.x, (unsigned(i) / block.x) % block.y, unsigned(i) / (block.x * block.y)};
        f.linear = i;
        f.warp = i / 32;
        f.lane = i % 32;
    }
    const int nwarps = int((nthreads + 31) / 32);
    g_rt.warps.assign(size_t(nwarps), WarpState());
    for (int w = 0; w < nwarps; ++w) {
        const int lanes = int(std::min<unsigned long long>(32, nthreads - 32ull * unsigned(w)));
        g_rt.warps[size_t(w)].exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    g_rt.runq.reserve(size_t(nthreads) * 2);
    g_rt.scratch.reserve(size_t(nthreads));
    blockDim = block;
    gridDim = grid;
    g_rt.has_seed = has_seed;
    g_rt.deadline = timeout > 0 ? now_seconds() + timeout : 0;

    SignalSetup signals;
    g_rt.thread = pthread_self();
    g_rt.sig = 0;
    install_signals(signals, timeout);
    g_rt.active = 1;
    if (sigsetjmp(g_rt.jump, 1) == 0) {
        for (unsigned bz = 0; bz < grid.z && g_rt.fault.kind == FAULT_NONE; ++bz)
            for (unsigned by = 0; by < grid.y && g_rt.fault.kind == FAULT_NONE; ++by)
                for (unsigned bx = 0; bx < grid.x && g_rt.fault.kind == FAULT_NONE; ++bx) {
                    blockIdx = uint3{bx, by, bz};
                    g_rt.rng = seed ^ (0x9e3779b97f4a7c15ull * (1ull + bx + 65536ull * (by + 65536ull * bz)));
                    run_block(bx + grid.x * (by + grid.y * bz));
                }
    } else {
        g_rt.active = 0;
        set_fault(signal_fault_kind(), describe_signal(), g_rt.current);
    }
    g_rt.active = 0;
    g_rt.current = nullptr;
    restore_signals(signals);
    check_end();

    if (checked) {
        if (g_rt.fault.kind == FAULT_NONE)
            for (size_t i = 0; i < region_specs.size(); ++i)
                if (region_specs[i].nbytes)
                    std::memcpy(reinterpret_cast<void*>(region_specs[i].host), region_data[i], region_specs[i].nbytes);
        free_regions();
    }
    return g_rt.fault;
}

// ------------------------------------------------------------------------------------------------
// Kernel parameter descriptions (the Python side packs the blob from these)
// ------------------------------------------------------------------------------------------------
template <class T> struct TypeCode { static constexpr const char* value = "?"; };
#define NATGEN_EMU_TYPECODE(T, code) template <> struct TypeCode<T> { static constexpr const char* value = code; };
NATGEN_EMU_TYPECODE(float, "f32")
NATGEN_EMU_TYPECODE(double, "f64")
NATGEN_EMU_TYPECODE(__half, "f16")
NATGEN_EMU_TYPECODE(__nv_bfloat16, "bf16")
NATGEN_EMU_TYPECODE(__half2, "f16x2")
NATGEN_EMU_TYPECODE(__nv_bfloat162, "bf16x2")
NATGEN_EMU_TYPECODE(float2, "f32x2")
NATGEN_EMU_TYPECODE(float4, "f32x4")
NATGEN_EMU_TYPECODE(int2, "i32x2")
NATGEN_EMU_TYPECODE(int4, "i32x4")
NATGEN_EMU_TYPECODE(uint2, "u32x2")
NATGEN_EMU_TYPECODE(uint4, "u32x4")
NATGEN_EMU_TYPECODE(bool, "bool")
NATGEN_EMU_TYPECODE(signed char, "i8")
NATGEN_EMU_TYPECODE(unsigned char, "u8")
NATGEN_EMU_TYPECODE(char, std::is_signed<char>::value ? "i8" : "u8")
NATGEN_EMU_TYPECODE(short, "i16")
NATGEN_EMU_TYPECODE(unsigned short, "u16")
NATGEN_EMU_TYPECODE(int, "i32")
NATGEN_EMU_TYPECODE(unsigned int, "u32")
NATGEN_EMU_TYPECODE(long, sizeof(long) == 8 ? "i64" : "i32")
NATGEN_EMU_TYPECODE(unsigned long, sizeof(long) == 8 ? "u64" : "u32")
NATGEN_EMU_TYPECODE(long long, "i64")
NATGEN_EMU_TYPECODE(unsigned long long, "u64")
NATGEN_EMU_TYPECODE(void, "void")
#undef NATGEN_EMU_TYPECODE

struct ParamInfo {
    bool is_pointer;
    const char* code;  // pointee type for pointers
    size_t size, offset;
};
struct KernelEntry {
    const char* name;
    void (*call)(const unsigned char*);
    std::vector<ParamInfo> params;
    size_t blob_size;
};

template <class T>
ParamInfo param_info() {
    using D = std::decay_t<T>;
    if constexpr (std::is_pointer<D>::value)
        return ParamInfo{true, TypeCode<std::remove_cv_t<std::remove_pointer_t<D>>>::value, sizeof(D), 0};
    else
        return ParamInfo{false, TypeCode<std::remove_cv_t<D>>::value, sizeof(D), 0};
}
template <class... Args>
std::vector<size_t> param_offsets() {
    std::vector<size_t> offsets;
    size_t at = 0;
    ((at = round_up(at, alignof(std::decay_t<Args>)), offsets.push_back(at), at += sizeof(std::decay_t<Args>)), ...);
    offsets.push_back(at);  // total
    return offsets;
}
template <class T>
inline std::decay_t<T> load_param(const unsigned char* blob, size_t offset) {
    std::decay_t<T> v;
    std::memcpy(static_cast<void*>(&v), blob + offset, sizeof v);
    return v;
}

template <class Sig, Sig F> struct KernelCaller;
template <class... Args, void (*F)(Args...)>
struct KernelCaller<void (*)(Args...), F> {
    static const std::vector<size_t>& offsets() {
        static const std::vector<size_t> o = param_offsets<Args...>();
        return o;
    }
    template <size_t... I>
    static void call_impl(const unsigned char* blob, std::index_sequence<I...>) {
        const std::vector<size_t>& o = offsets();
        F(load_param<Args>(blob, o[I])...);
    }
    static void call(const unsigned char* blob) { call_impl(blob, std::index_sequence_for<Args...>{}); }
    static KernelEntry entry(const char* name) {
        KernelEntry e{name, &call, {param_info<Args>()...}, 0};
        const std::vector<size_t>& o = offsets();
        for (size_t i = 0; i < e.params.size(); ++i) e.params[i].offset = o[i];
        e.blob_size = o.back();
        return e;
    }
};
#define NATGEN_EMU_KERNEL(name) ::natgen_emu::KernelCaller<decltype(&name), &name>::entry(#name)

}  // namespace natgen_emu

// ------------------------------------------------------------------------------------------------
// CUDA intrinsics in the global namespace
// ------------------------------------------------------------------------------------------------
#define __syncthreads() ((void)::natgen_emu::block_barrier(__FILE__, __LINE__, 0))
#define __syncthreads_count(pred) ::natgen_emu::block_barrier(__FILE__, __LINE__, (pred) ? 1 : 0)
#define __syncthreads_and(pred) (::natgen_emu::block_barrier(__FILE__, __LINE__, (pred) ? 1 : 0) == ::natgen_emu::g_rt.live)
#define __syncthreads_or(pred) (::natgen_emu::block_barrier(__FILE__, __LINE__, (pred) ? 1 : 0) != 0)
#define __syncwarp(...) ((void)::natgen_emu::warp_collective(::natgen_emu::OP_SYNCWARP, ::natgen_emu::syncwarp_mask(__VA_ARGS__), __LINE__))
#define __shfl_sync(mask, var, src, ...) ::natgen_emu::shuffle(::natgen_emu::OP_SHFL_IDX, (mask), (var), int(src), ::natgen_emu::shfl_width(__VA_ARGS__), __LINE__)
#define __shfl_up_sync(mask, var, delta, ...) ::natgen_emu::shuffle(::natgen_emu::OP_SHFL_UP, (mask), (var), int(delta), ::natgen_emu::shfl_width(__VA_ARGS__), __LINE__)
#define __shfl_down_sync(mask, var, delta, ...) ::natgen_emu::shuffle(::natgen_emu::OP_SHFL_DOWN, (mask), (var), int(delta), ::natgen_emu::shfl_width(__VA_ARGS__), __LINE__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) ::natgen_emu::shuffle(::natgen_emu::OP_SHFL_XOR, (mask), (var), int(lane_mask), ::natgen_emu::shfl_width(__VA_ARGS__), __LINE__)
#define __ballot_sync(mask, pred) unsigned(::natgen_emu::vote(::natgen_emu::OP_BALLOT, (mask), (pred), __LINE__))
#define __any_sync(mask, pred) int(::natgen_emu::vote(::natgen_emu::OP_ANY, (mask), (pred), __LINE__))
#define __all_sync(mask, pred) int(::natgen_emu::vote(::natgen_emu::OP_ALL, (mask), (pred), __LINE__))
#define __trap() __builtin_trap()
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)

namespace natgen_emu {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned mask) { return mask; }
inline int shfl_width() { return 32; }
inline int shfl_width(int width) { return width; }
inline uint64_t vote(int op, unsigned mask, int pred, int line) {
    g_rt.current->value = pred ? 1 : 0;
    return warp_collective(op, mask, line);
}
}  // namespace natgen_emu

inline unsigned __activemask() {
    // Fibers of a warp are not lock-stepped; report the lanes that have not exited.
    const natgen_emu::Fiber* f = natgen_emu::g_rt.current;
    const natgen_emu::WarpState& w = natgen_emu::g_rt.warps[size_t(f->warp)];
    return w.exists & ~w.exited;
}
inline unsigned __lanemask_lt() { return (1u << natgen_emu::g_rt.current->lane) - 1u; }

// Atomics: fibers are cooperative on one OS thread, so a plain read-modify-write is atomic. The value
// parameter is non-deduced so that e.g. atomicAdd(unsigned*, 1) converts like CUDA's overloads do.
namespace natgen_emu { template <class T> struct identity { typedef T type; }; }
// Under the checks an atomic is reported to natgen_emu_check.h (checked against plain accesses, never
// against other atomics).
namespace natgen_emu {
inline void atomic_access(const void* address, size_t bytes, int kind, const void* return_address) {
    if (g_check.active) access(g_rt.current, address, bytes, kind, pc_offset(return_address));
}
}  // namespace natgen_emu
#define NATGEN_EMU_ATOMIC(name, kind, expr)                                                                   \
    template <class T>                                                                                        \
    NATGEN_EMU_ENTRY T name(T* address, typename natgen_emu::identity<T>::type val) {                         \
        natgen_emu::atomic_access(address, sizeof(T), natgen_emu::kind, __builtin_return_address(0));         \
        T old = *address;                                                                                     \
        *address = (expr);                                                                                    \
        return old;                                                                                           \
    }
NATGEN_EMU_ATOMIC(atomicAdd, ACCESS_ATOMIC, old + val)
NATGEN_EMU_ATOMIC(atomicSub, ACCESS_ATOMIC, old - val)
NATGEN_EMU_ATOMIC(atomicExch, ACCESS_ATOMIC_NO_READ, val)
NATGEN_EMU_ATOMIC(atomicMax, ACCESS_ATOMIC, old < val ? val : old)
NATGEN_EMU_ATOMIC(atomicMin, ACCESS_ATOMIC, val < old ? val : old)
NATGEN_EMU_ATOMIC(atomicAnd, ACCESS_ATOMIC, old & val)
NATGEN_EMU_ATOMIC(atomicOr, ACCESS_ATOMIC, old | val)
NATGEN_EMU_ATOMIC(atomicXor, ACCESS_ATOMIC, old ^ val)
#undef NATGEN_EMU_ATOMIC
template <class T>
NATGEN_EMU_ENTRY T atomicCAS(T* address, typename natgen_emu::identity<T>::type compare,
                             typename natgen_emu::identity<T>::type val) {
    natgen_emu::atomic_access(address, sizeof(T), natgen_emu::ACCESS_ATOMIC, __builtin_return_address(0));
    T old = *address;
    if (old == compare) *address = val;
    return old;
}
NATGEN_EMU_ENTRY unsigned atomicInc(unsigned* address, unsigned val) {
    natgen_emu::atomic_access(address, sizeof(unsigned), natgen_emu::ACCESS_ATOMIC, __builtin_return_address(0));
    unsigned old = *address;
    *address = old >= val ? 0u : old + 1u;
    return old;
}

#endif  // NATGEN_EMU_H
