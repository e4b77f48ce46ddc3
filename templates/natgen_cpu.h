// natgen CPU kernels: the shared C++ body that every generated CPU instance instantiates.
//
// A generated instance (templates/cpu_na.cpp.j2) fixes the compile-time facts of its spec (element type,
// kernel size, head_dim, per-dim causal mask, query tile) through `Config` and wraps the per-unit work in a
// function built for several ISAs (target_clones: AVX-512, AVX2+FMA, baseline x86-64), chosen at load time
// from the CPU's features. Everything the kernels read arrives through one `Args` block of 8-byte fields
// (generated from codegen/abi.py; the runtime packs it from the manifest's layout); the entry point is one
// extern "C" function named after the spec, taking that block, which ctypes calls with the GIL released.
//
// Work decomposition. Dilation splits every axis into interleaved groups that never see each other, so a
// query tile is a box of group-LOCAL coordinates inside one group combination; its keys are then a dense
// box too (the union of the tile's windows), gathered once per tile into contiguous buffers.
// - Forward (namespace fwd): vectorized over keys. Per query, its window's keys along the last axis come in
//   runs of V ("segments"); scores are FMAs of a broadcast query channel against a segment of transposed
//   keys, P.V broadcast probabilities against row-major value rows. A query computes exactly its own keys,
//   which matters near borders, where windows are clamped. Specialized instances (constant K and head_dim,
//   no causal axis) gather the union at fixed strides instead (FixedFwd, fixed_tile), so every key and
//   value offset from a query's window corner is a compile-time constant, take the softmax in base 2, and
//   work on 2 x 2 query blocks: the scores of the two queries stacked on axis 1 together (each key vector
//   loaded once for both), P.V of the two side by side on the last axis together (each value row loaded
//   once for both). In 2-D their tiles grow up to 4x taller on axis 1 where the problem has units enough for
//   the threads. This path is built once, for AVX2+FMA (NATGEN_FIXED_TARGET), not per clone.
// - Backward: vectorized over queries. One vector holds V neighbouring queries along the last axis
//   ("lanes"), whose windows are one box shifted by a key per lane, so the key of lane j at window (row,
//   column) is column + j of a union row: one contiguous vector load per (row, column, channel) from keys and
//   values gathered transposed per union row. S, dP, dS, dQ are element-wise across lanes, and dK/dV are
//   summed per key over the lanes that saw it, so each key row is read and written once per window row. Near
//   borders a group reads a few more columns and masks each lane to its own window.
// Extra tokens are the same keys for every query, inside the same softmax. prod(K) is small, so all scores
// of a query are computed first, then one max/exp pass (no online rescaling).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <thread>
#include <tuple>
#include <type_traits>
#include <omp.h>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NATGEN_NO_CLONES)
#define NATGEN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NATGEN_CLONES
#endif
// The fixed-shape kernels (constant K and head_dim) are built once, for AVX2+FMA, not per clone of the unit
// function (three clones of them took 6 s of compile time), and called where the CPU has AVX2 and FMA.
// NATGEN_PIN(v) keeps a vector in a register: without it GCC folds one load into every FMA that reads it
// (a value row used by two queries was loaded twice, and the loads, not the FMAs, set the pace).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NATGEN_NO_CLONES)
#define NATGEN_FIXED_TARGET __attribute__((noinline, target("arch=x86-64-v3")))
#define NATGEN_FIXED_ISA() (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
#define NATGEN_PIN(v) asm("" : "+x"(v))
#else
#define NATGEN_FIXED_TARGET __attribute__((noinline))
#define NATGEN_FIXED_ISA() true
#define NATGEN_PIN(v) ((void)0)
#endif
#define NATGEN_INLINE inline __attribute__((always_inline))
#define NATGEN_EXPORT __attribute__((visibility("default")))

namespace natgen {

// `Args`, the argument block, is defined by each generated instance before it includes this header: it is
// produced from the declarative ABI (codegen/abi.py, ABI "cpu"), whose layout the manifest records for the
// runtime's packer.

template <typename T> struct VecTraits;
template <> struct VecTraits<float> {
    typedef float type __attribute__((vector_size(32)));
    typedef int32_t itype __attribute__((vector_size(32)));
    static constexpr int width = 8;
};
template <> struct VecTraits<double> {
    typedef double type __attribute__((vector_size(32)));
    typedef int64_t itype __attribute__((vector_size(32)));
    static constexpr int width = 4;
};

// p rounded up to a cache line (buffers allocated with a line of slack)
template <typename T> NATGEN_INLINE T* line_aligned(T* p) {
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}
template <typename T> NATGEN_INLINE typename VecTraits<T>::type load(const T* p) {
    typename VecTraits<T>::type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
template <typename T> NATGEN_INLINE void store(T* p, typename VecTraits<T>::type v) {
    std::memcpy(p, &v, sizeof(v));
}
// SEMANTICS.md's 1-D rule in group-local coordinates (ii = i // D, group length Lg).
NATGEN_INLINE void window_1d(int64_t ii, int64_t Lg, int64_t K, int64_t S, bool causal, int64_t& start,
                             int64_t& end) {
    const int64_t left = K / 2, right = K / 2 + (K % 2) - 1;
    if (!causal) {
        const int64_t c = std::min((ii / S) * S + S / 2, Lg - 1);
        start = std::max<int64_t>(c - left, 0);
        if (c + right >= Lg) start += Lg - right - c - 1;
        end = start + K;
    } else {
        const int64_t c = std::min((ii / S) * S + S - 1, Lg - 1);
        start = std::max<int64_t>(c - left - right, 0);
        end = std::min(ii + 1, Lg);
    }
}

// Compile-time facts of one instance; 0 means "runtime value" (the spec said "any").
template <typename T_, int K0_, int K1_, int K2_, int HD_, bool C0_, bool C1_, bool C2_, int T0_, int T1_,
          int T2_>
struct Config {
    typedef T_ T;
    static constexpr int K[3] = {K0_, K1_, K2_};
    static constexpr int HD = HD_;  // head_dim of q/k and of v (specialized instances need them equal)
    static constexpr bool C[3] = {C0_, C1_, C2_};
    static constexpr int TILE[3] = {T0_, T1_, T2_};
};

// Compile-time layout of the specialized forward (namespace fwd, fixed_tile): constant K and head_dim,
// no causal axis. The tile's key union is gathered at fixed strides (ROWS0 x ROWS1 union rows of ROWLEN
// columns), so every key a query reads sits at a compile-time offset from the query's window corner: the
// inner loops address keys and values with one pointer and immediate displacements.
template <class Cfg> struct FixedFwd {
    typedef typename Cfg::T T;
    static constexpr int V = VecTraits<T>::width;
    static constexpr bool enabled = Cfg::K[0] > 0 && Cfg::K[1] > 0 && Cfg::K[2] > 0 && Cfg::HD > 0 &&
                                    Cfg::HD % V == 0 && !Cfg::C[0] && !Cfg::C[1] && !Cfg::C[2];
    static constexpr int K0 = enabled ? Cfg::K[0] : 1, K1 = enabled ? Cfg::K[1] : 1, K2 = enabled ? Cfg::K[2] : 1;
    static constexpr int HD = enabled ? Cfg::HD : V;
    static constexpr int CH = (K2 + V - 1) / V;        // key vectors per window row
    static constexpr int LAST = K2 - (CH - 1) * V;     // real keys in a row's last vector
    // 2-D instances (one tile row on axis 0) may run tiles of up to GROW x TILE[1] rows on axis 1 (make_plan
    // picks the factor): a taller tile gathers fewer keys per query (cpu-2d: 0.317 -> 0.299 ms, 8 -> 32 rows).
    static constexpr int GROW = Cfg::TILE[0] == 1 && Cfg::TILE[1] > 1 ? 4 : 1;
    static constexpr int ROWS0 = Cfg::TILE[0] + K0 - 1, ROWS1 = Cfg::TILE[1] * GROW + K1 - 1;
    static constexpr int ROWLEN = (Cfg::TILE[2] + CH * V - 1 + V - 1) / V * V;
    static constexpr int PLANE = ROWS1 * ROWLEN;
    static constexpr int KEYS = ROWS0 * PLANE;         // key slots of a tile: the channel stride of kt
    static constexpr int ROWS = K0 * K1;               // window rows of a query
    static constexpr int NSEG = ROWS * CH;
};

// Per axis, per dilation group: every query's window and every tile's key union (group-local coordinates).
struct AxisGroup {
    int64_t group, length;
    std::vector<int64_t> start, end;         // per local query
    std::vector<int64_t> tile_lo, tile_hi;   // per tile: key union [lo, hi) (hi may pass `length`: zeros)
    std::vector<int64_t> tile_hi_k;          // per tile: max(start + K): the forward reads whole windows
};

struct Plan {
    const Args* a;
    int64_t K[3], tile[3], tokens, hd, hdv, n_extra;
    std::vector<AxisGroup> axes[3];
    std::vector<std::pair<int, int>> items[3];  // (group index, tile index) per axis
    int64_t max_union[3];
    int64_t dims;              // max(hd, hdv): channels per union row block in the gather buffers
    int64_t gather_capacity;   // elements of a gather buffer (union rows x dims x padded row stride)
    int64_t key_capacity;      // key positions of the backward's key-grad buffers (union + extras)
    int64_t max_rows, max_cols;
    // per-query forward (namespace fwd): key vectors of `chunks` x V slots per window row
    int64_t fwd_union[3], chunks, extra_padded, hdv_padded, fwd_capacity, max_segments;
    bool fixed;                // the specialized forward's fixed layout serves this problem (FixedFwd)
    int64_t fixed_keys;        // its key slots per tile (0 when it does not)
};

// Tiles of `tile` queries over the dilation groups of axis d.
inline int64_t tiles_on_axis(const Args& a, int d, int64_t tile) {
    int64_t n = 0;
    for (int64_t g = 0; g < std::min(a.dilation[d], a.length[d]); ++g) {
        const int64_t length = a.length[d] / a.dilation[d] + (g < a.length[d] % a.dilation[d] ? 1 : 0);
        n += (length + tile - 1) / tile;
    }
    return n;
}

template <class Cfg> Plan make_plan(const Args& a, bool forward) {
    typedef typename Cfg::T T;
    constexpr int V = VecTraits<T>::width;
    Plan p;
    p.a = &a;
    p.tokens = a.length[0] * a.length[1] * a.length[2];
    p.hd = a.head_dim;
    p.hdv = a.head_dim_v;
    p.n_extra = a.n_extra;
    for (int d = 0; d < 3; ++d) p.tile[d] = std::min<int64_t>(Cfg::TILE[d], a.length[d]);
    if (forward && FixedFwd<Cfg>::enabled) {
        // the tallest tile (FixedFwd::GROW) that still leaves the threads 4 units each
        const int64_t others = a.batch * a.heads * tiles_on_axis(a, 0, p.tile[0]) * tiles_on_axis(a, 2, p.tile[2]);
        for (int64_t grow = FixedFwd<Cfg>::GROW; grow > 1; grow /= 2)
            if (others * tiles_on_axis(a, 1, Cfg::TILE[1] * grow) >= 4 * a.threads) {
                p.tile[1] = std::min<int64_t>(Cfg::TILE[1] * grow, a.length[1]);
                break;
            }
    }
    // 2-D backward: tiles 4x taller on axis 1 (its unit is a whole dilation group, so a taller tile costs no
    // parallelism): fewer gathers and key-grad flushes a query (cpu-2d 0.99 -> 0.94 ms, 14x14 x 16 heads
    // x batch 4 4.98 -> 4.50 ms)
    if (!forward && Cfg::TILE[0] == 1 && Cfg::TILE[1] > 1)
        p.tile[1] = std::min<int64_t>(Cfg::TILE[1] * 4, a.length[1]);
    for (int d = 0; d < 3; ++d) {
        p.K[d] = Cfg::K[d] ? Cfg::K[d] : a.kernel[d];
        p.max_union[d] = 1;
        p.fwd_union[d] = 1;
        for (int64_t g = 0; g < std::min(a.dilation[d], a.length[d]); ++g) {
            AxisGroup ax;
            ax.group = g;
            ax.length = a.length[d] / a.dilation[d] + (g < a.length[d] % a.dilation[d] ? 1 : 0);
            ax.start.resize(ax.length);
            ax.end.resize(ax.length);
            for (int64_t i = 0; i < ax.length; ++i)
                window_1d(i, ax.length, p.K[d], a.stride[d], Cfg::C[d], ax.start[i], ax.end[i]);
            for (int64_t t0 = 0; t0 < ax.length; t0 += p.tile[d]) {
                int64_t lo = ax.start[t0], hi = 0, hi_k = 0;
                for (int64_t i = t0; i < std::min(t0 + p.tile[d], ax.length); ++i) {
                    lo = std::min(lo, ax.start[i]);
                    hi = std::max(hi, ax.end[i]);
                    hi_k = std::max(hi_k, ax.start[i] + p.K[d]);
                }
                ax.tile_hi_k.push_back(hi_k);
                p.fwd_union[d] = std::max(p.fwd_union[d], hi_k - lo);
                p.items[d].emplace_back(static_cast<int>(p.axes[d].size()), static_cast<int>(ax.tile_lo.size()));
                ax.tile_lo.push_back(lo);
                ax.tile_hi.push_back(hi);
                p.max_union[d] = std::max(p.max_union[d], hi - lo);
            }
            p.axes[d].push_back(std::move(ax));
        }
    }
    constexpr int64_t line = 64 / sizeof(T);
    const int64_t rs = (p.max_union[2] + 2 * (V - 1) + line - 1) / line * line;
    p.dims = std::max(p.hd, p.hdv);
    p.gather_capacity = p.max_union[0] * p.max_union[1] * p.dims * rs;
    p.key_capacity = p.max_union[0] * p.max_union[1] * rs + p.n_extra;
    p.max_rows = p.K[0] * p.K[1];
    p.max_cols = p.max_union[2] + V;
    p.chunks = (p.K[2] + V - 1) / V;
    p.extra_padded = (p.n_extra + V - 1) / V * V;
    p.hdv_padded = (p.hdv + V - 1) / V * V;
    p.fwd_capacity = p.fwd_union[0] * p.fwd_union[1] * (p.fwd_union[2] + p.chunks * V - p.K[2]) + p.extra_padded;
    p.max_segments = p.K[0] * p.K[1] * p.chunks + p.extra_padded / V;
    typedef FixedFwd<Cfg> F;
    // strided problems can have wider key unions than TILE + K - 1 (tiles that split a stride group)
    p.fixed = F::enabled && p.n_extra == 0 && p.hd == F::HD && p.hdv == F::HD && p.fwd_union[0] <= F::ROWS0 &&
              p.fwd_union[1] <= F::ROWS1 && p.fwd_union[2] + F::CH * V - F::K2 <= F::ROWLEN;
    p.fixed_keys = p.fixed ? F::KEYS : 0;
    return p;
}

// Buffers of the per-query forward (namespace fwd below).
template <typename T> struct FwdScratch {
    std::vector<T> kt, vu, scores, probs, acc;
    std::vector<int> bases, valid;  // per segment: its first key, its real keys (lanes [0, valid))
    std::vector<T> zeros;
    std::vector<const T*> rows;
    int64_t sized_for[5] = {-1, -1, -1, -1, -1};  // the capacities below were last sized for
    void reserve(const Plan& p) {
        constexpr int V = VecTraits<T>::width;
        const int64_t n = p.fwd_capacity;
        const int64_t facts[5] = {n, p.hd, p.hdv_padded, p.fixed_keys, p.max_segments};
        if (std::equal(facts, facts + 5, sized_for)) return;  // the same shapes as the last call on this thread
        std::copy(facts, facts + 5, sized_for);
        kt.assign(std::max(p.hd * n, p.hd * p.fixed_keys) + 64 / sizeof(T), T(0));  // + room to align
        vu.assign(std::max(p.hdv_padded * n, p.hdv * p.fixed_keys) + 64 / sizeof(T), T(0));
        acc.assign(p.hdv_padded + V, T(0));
        scores.assign(2 * p.max_segments * V, T(0));  // the fixed forward's query pairs
        probs.assign(4 * p.max_segments * V, T(0));   // and its 2 x 2 query blocks
        valid.assign(p.max_segments, 0);
        bases.assign(p.max_segments, 0);
        zeros.assign(std::max(p.hd, p.hdv_padded), T(0));
        rows.assign(n, nullptr);
    }
};

// Cache-line aligned storage for the backward's buffers: union rows (strides of whole lines) then start on a
// line, so interior lane loads never straddle one, and no vector of a lane buffer does (malloc aligns to 16).
template <typename T> struct LineAlloc {
    typedef T value_type;
    LineAlloc() = default;
    template <class U> LineAlloc(const LineAlloc<U>&) {}
    T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U> bool operator==(const LineAlloc<U>&) const { return true; }
    template <class U> bool operator!=(const LineAlloc<U>&) const { return false; }
};
template <typename T> using LineVec = std::vector<T, LineAlloc<T>>;

// Thread-private buffers, sized once per thread for the largest tile. Lane buffers hold V queries side by
// side: x[channel * V + lane].
template <typename T> struct Scratch {
    LineVec<T> kt, vt, ekt, evt;             // key / value unions ([row][channel][column]), extras [channel][e]
    LineVec<T> dkr, dvr;                     // backward: key grads per union position, row-major
    LineVec<T> qt, dot, ot;                  // lane buffers: queries, output cotangents, outputs / dq
    LineVec<T> xr;                           // backward, fixed shape: q and dO rows of a lane group [2][V][dims]
    LineVec<T> sc, pr, dp;                   // per (window row, column) and extra token: one vector of lanes
    std::vector<char> colmask;               // per column: an itype vector of the lanes whose window contains it
    std::vector<int64_t> row_off, key_off;   // per window row: its column 0 in kt/vt and in dkr/dvr
    std::vector<T> zeros, sink;
    std::vector<T> extra_grads;  // backward: this unit's extra-token grads [n_extra][hd + hdv]
    FwdScratch<T> fwd;
    void reserve(const Plan& p, bool backward) {
        constexpr int V = VecTraits<T>::width;
        if (!backward) {
            fwd.reserve(p);
            return;
        }
        const int64_t dims = p.dims;
        kt.assign(p.gather_capacity, T(0));
        vt.assign(p.gather_capacity, T(0));
        ekt.assign(p.hd * p.n_extra, T(0));
        evt.assign(p.hdv * p.n_extra, T(0));
        if (backward) {
            dkr.assign(p.hd * p.key_capacity, T(0));
            dvr.assign(p.hdv * p.key_capacity, T(0));
        }
        qt.assign(dims * V, T(0));
        dot.assign(dims * V, T(0));
        ot.assign(dims * V, T(0));
        xr.assign(2 * V * dims, T(0));
        const int64_t vectors = p.max_rows * p.max_cols + p.n_extra;
        sc.assign(vectors * V, T(0));
        pr.assign(vectors * V, T(0));
        dp.assign(vectors * V, T(0));
        colmask.assign(p.max_cols * sizeof(typename VecTraits<T>::itype), 0);
        row_off.assign(p.max_rows, 0);
        key_off.assign(p.max_rows, 0);
        zeros.assign(dims + V, T(0));
        sink.assign(dims + V, T(0));
    }
};

// ------------------------------------------------------------------------------------- transposes
// In-register transpose of an 8x8 float block: x[l] (row l) -> x[j] (column j).
NATGEN_INLINE void transpose8(VecTraits<float>::type* x) {
    typedef VecTraits<float>::type Vec;
    typedef VecTraits<float>::itype IVec;
    Vec y[8];
    for (int l = 0; l < 8; l += 2) {  // unpacklo / unpackhi
        y[l] = __builtin_shuffle(x[l], x[l + 1], IVec{0, 8, 1, 9, 4, 12, 5, 13});
        y[l + 1] = __builtin_shuffle(x[l], x[l + 1], IVec{2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int l = 0; l < 8; l += 4) {  // 64-bit pairs
        for (int k = 0; k < 2; ++k) {
            x[l + k] = __builtin_shuffle(y[l + k], y[l + k + 2], IVec{0, 1, 8, 9, 4, 5, 12, 13});
            x[l + k + 2] = __builtin_shuffle(y[l + k], y[l + k + 2], IVec{2, 3, 10, 11, 6, 7, 14, 15});
        }
    }
    // x[0] = rows 0-3 channels {0, 4}, x[2] = {1, 5}, x[1] = {2, 6}, x[3] = {3, 7}; x[4..8) rows 4-7 likewise
    const int order[4] = {0, 2, 1, 3};
    for (int j = 0; j < 4; ++j) {
        const Vec a = x[order[j]], b = x[4 + order[j]];
        y[j] = __builtin_shuffle(a, b, IVec{0, 1, 2, 3, 8, 9, 10, 11});
        y[j + 4] = __builtin_shuffle(a, b, IVec{4, 5, 6, 7, 12, 13, 14, 15});
    }
    for (int j = 0; j < 8; ++j) x[j] = y[j];
}

// dst[d * ld + j] = r[j][d] for d < n, j < V: V rows side by side (a lane buffer when ld = V).
template <typename T>
NATGEN_INLINE void rows_to_lanes(const T* const* r, int64_t n, T* __restrict dst, int64_t ld) {
    constexpr int V = VecTraits<T>::width;
    int64_t d = 0;
    if constexpr (sizeof(T) == 4) {
        typedef typename VecTraits<T>::type Vec;
        for (; d + 8 <= n; d += 8) {
            Vec x[8];
            for (int l = 0; l < 8; ++l) x[l] = load<T>(r[l] + d);
            transpose8(x);
            for (int j = 0; j < 8; ++j) store<T>(dst + (d + j) * ld, x[j]);
        }
    }
    for (; d < n; ++d)
        for (int j = 0; j < V; ++j) dst[d * ld + j] = r[j][d];
}

// r[j][d] = src[d * V + j] for d < n, j < V (the inverse of rows_to_lanes).
template <typename T>
NATGEN_INLINE void lanes_to_rows(const T* __restrict src, int64_t n, T* const* r) {
    constexpr int V = VecTraits<T>::width;
    int64_t d = 0;
    if constexpr (sizeof(T) == 4) {
        typedef typename VecTraits<T>::type Vec;
        for (; d + 8 <= n; d += 8) {
            Vec x[8];
            for (int l = 0; l < 8; ++l) x[l] = load<T>(src + (d + l) * V);
            transpose8(x);
            for (int j = 0; j < 8; ++j) store<T>(r[j] + d, x[j]);
        }
    }
    for (; d < n; ++d)
        for (int j = 0; j < V; ++j) r[j][d] = src[d * V + j];
}

// ------------------------------------------------------------------------------------- lane kernels
// The query side is vectorized: a vector holds V neighbouring queries along the last axis ("lanes"). Lane j's
// key at window row r and column c sits at union position row_off[r] + c + j, so every (row, column) is one
// contiguous vector load from a transposed union buffer, and softmax is element-wise across vectors.

// out[(r * cols + c0 + c)] = sum_d x[d] * buf[d * ld + row_off[r] + c0 + c + lane]: NR rows x NC columns of
// scores in registers (NR * NC <= 14 accumulators, one x vector).
template <typename T, int NR, int NC, int HD>
NATGEN_INLINE void lane_dot_block(const T* __restrict x, const T* __restrict buf, int64_t ld,
                                  const int64_t* __restrict row_off, int64_t c0, int64_t n, int64_t cols,
                                  T* __restrict out) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    Vec acc[NR][NC];
    const T* base[NR];
    for (int r = 0; r < NR; ++r) {
        base[r] = buf + row_off[r] + c0;
        for (int c = 0; c < NC; ++c) acc[r][c] = Vec{};
    }
    const int64_t count = HD ? HD : n;
    for (int64_t d = 0; d < count; ++d) {
        const Vec xv = load<T>(x + d * V);
        const int64_t off = d * ld;
        for (int r = 0; r < NR; ++r)
            for (int c = 0; c < NC; ++c) acc[r][c] += xv * load<T>(base[r] + off + c);
    }
    for (int r = 0; r < NR; ++r)
        for (int c = 0; c < NC; ++c) store<T>(out + (r * cols + c0 + c) * V, acc[r][c]);
}

template <typename T, int NC, int HD>
NATGEN_INLINE void lane_dot_cols(const T* x, const T* buf, int64_t ld, const int64_t* row_off, int64_t rows,
                                 int64_t c0, int64_t n, int64_t cols, T* out) {
    constexpr int V = VecTraits<T>::width;
    constexpr int NR = NC >= 8 ? 1 : NC >= 5 ? 2 : NC == 4 ? 3 : NC == 3 ? 4 : NC == 2 ? 6 : 12;
    int64_t r = 0;
    for (; r + NR <= rows; r += NR)
        lane_dot_block<T, NR, NC, HD>(x, buf, ld, row_off + r, c0, n, cols, out + r * cols * V);
    for (; r < rows; ++r) lane_dot_block<T, 1, NC, HD>(x, buf, ld, row_off + r, c0, n, cols, out + r * cols * V);
}

// Scores of V lanes against every (window row, column), then against the extra tokens (the same keys for
// every lane: broadcasts from ebuf[d * n_extra + e]).
template <typename T, int HD>
NATGEN_INLINE void lane_dot(const T* x, const T* buf, int64_t ld, const int64_t* row_off, int64_t rows,
                            int64_t cols, const T* ebuf, int64_t n_extra, int64_t n, T* out) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
        switch (std::min<int64_t>(8, cols - c0)) {
            case 1: lane_dot_cols<T, 1, HD>(x, buf, ld, row_off, rows, c0, n, cols, out); break;
            case 2: lane_dot_cols<T, 2, HD>(x, buf, ld, row_off, rows, c0, n, cols, out); break;
            case 3: lane_dot_cols<T, 3, HD>(x, buf, ld, row_off, rows, c0, n, cols, out); break;
            case 4: lane_dot_cols<T, 4, HD>(x, buf, ld, row_off, rows, c0, n, cols, out); break;
            case 5: lane_dot_cols<T, 5, HD>(x, buf, ld, row_off, rows, c0, n, cols, out); break;
            case 6: lane_dot_cols<T, 6, HD>(x, buf, ld, row_off, rows, c0, n, cols, out); break;
            case 7: lane_dot_cols<T, 7, HD>(x, buf, ld, row_off, rows, c0, n, cols, out); break;
            default: lane_dot_cols<T, 8, HD>(x, buf, ld, row_off, rows, c0, n, cols, out); break;
        }
    }
    const int64_t count = HD ? HD : n;
    T* eout = out + rows * cols * V;
    for (int64_t e = 0; e < n_extra; ++e) {
        Vec acc = Vec{};
        for (int64_t d = 0; d < count; ++d) acc += load<T>(x + d * V) * ebuf[d * n_extra + e];
        store<T>(eout + e * V, acc);
    }
}

// out[ch * V] = sum over (row, column) and extra tokens of w[...] * buf[ch * ld + key + lane], for NE channels:
// P.V (w = probabilities, buf = transposed values) and dQ (w = dS, buf = transposed keys).
template <typename T, int NE>
NATGEN_INLINE void lane_acc_block(const T* __restrict w, const T* __restrict buf, int64_t ld,
                                  const int64_t* __restrict row_off, int64_t rows, int64_t cols,
                                  const T* __restrict ebuf, int64_t n_extra, T* __restrict out) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    Vec acc[NE];
    const T* ch[NE];
    for (int e = 0; e < NE; ++e) {
        acc[e] = Vec{};
        ch[e] = buf + e * ld;
    }
    const T* wp = w;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = row_off[r];
        for (int64_t c = 0; c < cols; ++c, wp += V) {
            const Vec wv = load<T>(wp);
            for (int e = 0; e < NE; ++e) acc[e] += wv * load<T>(ch[e] + o + c);
        }
    }
    for (int64_t x = 0; x < n_extra; ++x, wp += V) {
        const Vec wv = load<T>(wp);
        for (int e = 0; e < NE; ++e) acc[e] += wv * ebuf[e * n_extra + x];
    }
    for (int e = 0; e < NE; ++e) store<T>(out + e * V, acc[e]);
}

template <typename T>
NATGEN_INLINE void lane_acc(const T* w, const T* buf, int64_t ld, const int64_t* row_off, int64_t rows,
                            int64_t cols, const T* ebuf, int64_t n_extra, int64_t channels, T* out) {
    constexpr int V = VecTraits<T>::width;
    // channel blocks of 8, then 4, then 1 (fewer instantiations, less compile time; head dims are
    // usually multiples of 8)
    int64_t e0 = 0;
    for (; e0 + 8 <= channels; e0 += 8)
        lane_acc_block<T, 8>(w, buf + e0 * ld, ld, row_off, rows, cols, ebuf + e0 * n_extra, n_extra, out + e0 * V);
    for (; e0 + 4 <= channels; e0 += 4)
        lane_acc_block<T, 4>(w, buf + e0 * ld, ld, row_off, rows, cols, ebuf + e0 * n_extra, n_extra, out + e0 * V);
    for (; e0 < channels; ++e0)
        lane_acc_block<T, 1>(w, buf + e0 * ld, ld, row_off, rows, cols, ebuf + e0 * n_extra, n_extra, out + e0 * V);
}

// Key-side accumulation (dK, dV) into row-major union rows: key position row_off[r] + t receives, from every
// lane j with column c = t - j, w[(r, c)][j] * x[j][0..dim). Summing per key in registers first means each
// destination row is read and written once per window row (no overlapping read-modify-writes).
template <typename T, int NVEC>
NATGEN_INLINE void skew_block(const T* __restrict w, const T* const* x, int lanes, const int64_t* row_off,
                              int64_t rows, int64_t cols, int64_t ebase, int64_t n_extra, int64_t d0, T alpha,
                              T* __restrict dst, int64_t dim) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    for (int64_t r = 0; r < rows; ++r) {
        const T* wr = w + r * cols * V;
        for (int64_t t = 0; t < cols + lanes - 1; ++t) {
            Vec acc[NVEC];
            for (int v = 0; v < NVEC; ++v) acc[v] = Vec{};
            const int64_t jlo = std::max<int64_t>(0, t - cols + 1), jhi = std::min<int64_t>(lanes, t + 1);
            for (int64_t j = jlo; j < jhi; ++j) {
                const T wj = wr[(t - j) * V + j];
                const T* xj = x[j] + d0;
                for (int v = 0; v < NVEC; ++v) acc[v] += wj * load<T>(xj + v * V);
            }
            T* o = dst + (row_off[r] + t) * dim + d0;
            for (int v = 0; v < NVEC; ++v) store<T>(o + v * V, load<T>(o + v * V) + alpha * acc[v]);
        }
    }
    const T* we = w + rows * cols * V;
    for (int64_t e = 0; e < n_extra; ++e) {
        Vec acc[NVEC];
        for (int v = 0; v < NVEC; ++v) acc[v] = Vec{};
        for (int j = 0; j < lanes; ++j) {
            const T wj = we[e * V + j];
            for (int v = 0; v < NVEC; ++v) acc[v] += wj * load<T>(x[j] + d0 + v * V);
        }
        T* o = dst + (ebase + e) * dim + d0;
        for (int v = 0; v < NVEC; ++v) store<T>(o + v * V, load<T>(o + v * V) + alpha * acc[v]);
    }
}

template <typename T>
NATGEN_INLINE void skew_acc(const T* w, const T* const* x, int lanes, const int64_t* row_off, int64_t rows,
                            int64_t cols, int64_t ebase, int64_t n_extra, T alpha, T* dst, int64_t dim) {
    constexpr int V = VecTraits<T>::width;
    const int64_t vec_dim = dim / V * V;
    // blocks of 4 vectors, then single vectors: two instantiations keep the backward's compile time down
    // (one per block size 1..8 tripled it) at no cost for head dims that are multiples of 4 vectors
    int64_t d0 = 0;
    for (; d0 + 4 * V <= vec_dim; d0 += 4 * V)
        skew_block<T, 4>(w, x, lanes, row_off, rows, cols, ebase, n_extra, d0, alpha, dst, dim);
    for (; d0 < vec_dim; d0 += V)
        skew_block<T, 1>(w, x, lanes, row_off, rows, cols, ebase, n_extra, d0, alpha, dst, dim);
    for (int64_t d = vec_dim; d < dim; ++d) {  // channels past the last full vector
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c)
                for (int j = 0; j < lanes; ++j)
                    dst[(row_off[r] + c + j) * dim + d] += alpha * w[(r * cols + c) * V + j] * x[j][d];
        for (int64_t e = 0; e < n_extra; ++e)
            for (int j = 0; j < lanes; ++j)
                dst[(ebase + e) * dim + d] += alpha * w[(rows * cols + e) * V + j] * x[j][d];
    }
}

// exp for the softmax: Cephes' expf (range reduction by ln2 in two parts, degree-5 polynomial, ~1 ulp for
// x <= 0) in vector arithmetic, so every clone gets it at full width; f64 goes lane by lane through std::exp.
NATGEN_INLINE VecTraits<float>::type exp_vec(VecTraits<float>::type x) {
    typedef VecTraits<float>::type Vec;
    typedef int32_t IVec __attribute__((vector_size(32)));
    x = x < -87.0f ? Vec{} - 87.0f : x;
    x = x > 88.0f ? Vec{} + 88.0f : x;
    const Vec fx = x * 1.44269504088896341f + 0.5f;
    IVec n = __builtin_convertvector(fx, IVec);
    n += (__builtin_convertvector(n, Vec) > fx);  // a true comparison is -1: floor for negative values
    const Vec nf = __builtin_convertvector(n, Vec);
    x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    Vec y = Vec{} + 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    const IVec bits = (n + 127) << 23;
    Vec scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return y * scale;
}
// f64 transcendentals go lane by lane through libm
NATGEN_INLINE VecTraits<double>::type lanewise(VecTraits<double>::type x, double (*fn)(double)) {
    for (int i = 0; i < VecTraits<double>::width; ++i) x[i] = fn(x[i]);
    return x;
}
NATGEN_INLINE VecTraits<double>::type exp_vec(VecTraits<double>::type x) { return lanewise(x, std::exp); }

// 2^y for y <= 0 (the specialized forward's softmax, whose scores are pre-scaled by log2(e)): y = n + f with n
// = round(y) by the 1.5 * 2^23 trick (whose low mantissa bits are then n), 2^f on |f| <= 1/2 by its degree-6
// Taylor polynomial (relative error <= 1.7e-7), and n added into the exponent. Below -126 the result is 2^-126
// times the polynomial, i.e. a value the softmax rounds away against its max term (whose 2^y is 1).
NATGEN_INLINE VecTraits<float>::type exp2_vec(VecTraits<float>::type y) {
    typedef VecTraits<float>::type Vec;
    typedef VecTraits<float>::itype IVec;
    y = y < -126.0f ? Vec{} - 126.0f : y;
    const Vec t = y + 12582912.0f;
    const Vec f = y - (t - 12582912.0f);
    Vec e = Vec{} + 1.5403530393381606e-4f;      // ln2^6 / 720
    e = e * f + 1.3333558146428443e-3f;          // ln2^5 / 120
    e = e * f + 9.6181291076284772e-3f;          // ln2^4 / 24
    e = e * f + 5.5504108664821580e-2f;          // ln2^3 / 6
    e = e * f + 2.4022650695910071e-1f;          // ln2^2 / 2
    e = e * f + 6.9314718055994531e-1f;          // ln2
    e = e * f + 1.0f;
    IVec tb, eb;
    std::memcpy(&tb, &t, sizeof(tb));
    std::memcpy(&eb, &e, sizeof(eb));
    eb += (tb - 0x4B400000) << 23;
    std::memcpy(&e, &eb, sizeof(e));
    return e;
}
NATGEN_INLINE VecTraits<double>::type exp2_vec(VecTraits<double>::type y) { return lanewise(y, std::exp2); }

// log2(x) for finite x > 0 (the specialized forward's log-sum-exp, 8 queries at a time): x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), log2(m) = 2 atanh(t) / ln2 with t = (m - 1) / (m + 1), |t| <= 0.172, by its series to
// t^9 (truncation error < 4e-10).
NATGEN_INLINE VecTraits<float>::type log2_vec(VecTraits<float>::type x) {
    typedef VecTraits<float>::type Vec;
    typedef VecTraits<float>::itype IVec;
    IVec bits;
    std::memcpy(&bits, &x, sizeof(bits));
    IVec e = ((bits >> 23) & 0xff) - 127;
    IVec mb = (bits & 0x7fffff) | 0x3f800000;
    Vec m;
    std::memcpy(&m, &mb, sizeof(m));
    const IVec big = m > 1.41421356f;  // -1 where true
    m = big ? m * 0.5f : m;
    e -= big;
    const Vec t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
    Vec s = Vec{} + 0.11111111f;
    s = s * t2 + 0.14285714f;
    s = s * t2 + 0.2f;
    s = s * t2 + 0.33333333f;
    s = s * t2 + 1.0f;
    return __builtin_convertvector(e, Vec) + (s * t) * 2.88539008f;  // 2 / ln2
}
NATGEN_INLINE VecTraits<double>::type log2_vec(VecTraits<double>::type x) { return lanewise(x, std::log2); }

// Horizontal max / sum of one vector.
template <typename Vec> NATGEN_INLINE auto hmax(Vec x) {
    auto m = x[0];
    for (int i = 1; i < int(sizeof(Vec) / sizeof(m)); ++i) m = std::max(m, x[i]);
    return m;
}
NATGEN_INLINE float hmax(VecTraits<float>::type x) {
    typedef VecTraits<float>::itype IVec;
    x = x > __builtin_shuffle(x, IVec{4, 5, 6, 7, 0, 1, 2, 3}) ? x : __builtin_shuffle(x, IVec{4, 5, 6, 7, 0, 1, 2, 3});
    x = x > __builtin_shuffle(x, IVec{2, 3, 0, 1, 6, 7, 4, 5}) ? x : __builtin_shuffle(x, IVec{2, 3, 0, 1, 6, 7, 4, 5});
    x = x > __builtin_shuffle(x, IVec{1, 0, 3, 2, 5, 4, 7, 6}) ? x : __builtin_shuffle(x, IVec{1, 0, 3, 2, 5, 4, 7, 6});
    return x[0];
}
template <typename Vec> NATGEN_INLINE auto hsum(Vec x) {
    auto m = x[0];
    for (int i = 1; i < int(sizeof(Vec) / sizeof(m)); ++i) m += x[i];
    return m;
}
NATGEN_INLINE float hsum(VecTraits<float>::type x) {
    typedef VecTraits<float>::itype IVec;
    x += __builtin_shuffle(x, IVec{4, 5, 6, 7, 0, 1, 2, 3});
    x += __builtin_shuffle(x, IVec{2, 3, 0, 1, 6, 7, 4, 5});
    x += __builtin_shuffle(x, IVec{1, 0, 3, 2, 5, 4, 7, 6});
    return x[0];
}

// ------------------------------------------------------------------------------------- tiles
struct TileRef {
    int64_t b, h;
    const AxisGroup* ax[3];
    int tile[3];
};

// Gather buffers hold the tile's key union as [union row][channel][column]: one union row (a line of keys
// along the last axis) is a block of `dims` channel rows, each a stride `rs` rounded up to a cache line. A
// lane group touches, per window row, one such block (at K=7, h=32: 1.8 KB), so its keys and values stay in
// L1, and interior column loads never straddle a cache line. A lane group reads, for every column, V keys
// starting at the column, so near a border (where the lanes' windows are clamped and differ) it reads up to
// V-1 keys past the union on either side: the rows get exactly the zero padding (lpad) their groups need.
struct TileGeometry {
    int64_t lo[3], extent[3], lpad, row_len, rs, nrows, bs, keys;
};

template <class Cfg> NATGEN_INLINE TileGeometry tile_geometry(const Plan& p, const TileRef& t) {
    typedef typename Cfg::T T;
    constexpr int V = VecTraits<T>::width;
    constexpr int64_t line = 64 / sizeof(T);
    TileGeometry g;
    for (int d = 0; d < 3; ++d) {
        g.lo[d] = t.ax[d]->tile_lo[t.tile[d]];
        g.extent[d] = t.ax[d]->tile_hi[t.tile[d]] - g.lo[d];
    }
    const AxisGroup& ax2 = *t.ax[2];
    const int64_t q0 = int64_t(t.tile[2]) * p.tile[2], q1 = std::min(q0 + p.tile[2], ax2.length);
    int64_t read_lo = g.lo[2], read_hi = g.lo[2] + g.extent[2];
    for (int64_t i = q0; i < q1; ++i) {
        const int64_t lane = (i - q0) % V;
        read_lo = std::min(read_lo, ax2.start[i] - lane);
        read_hi = std::max(read_hi, ax2.end[i] - lane + V - 1);
    }
    g.lpad = g.lo[2] - read_lo;
    g.row_len = read_hi - read_lo;
    g.rs = (g.row_len + line - 1) / line * line;
    g.nrows = g.extent[0] * g.extent[1];
    g.bs = p.dims * g.rs;
    g.keys = g.nrows * g.rs;
    return g;
}

// Union row `ur` -> the token of its column 0 on the last axis (false when the row lies past an axis end).
NATGEN_INLINE bool union_row_token(const Args& a, const TileRef& t, const TileGeometry& g, int64_t ur,
                                   int64_t& token) {
    const int64_t l0 = g.lo[0] + ur / g.extent[1], l1 = g.lo[1] + ur % g.extent[1];
    token = ((l0 * a.dilation[0] + t.ax[0]->group) * a.length[1] + l1 * a.dilation[1] + t.ax[1]->group) *
            a.length[2] + t.ax[2]->group;
    return l0 < t.ax[0]->length && l1 < t.ax[1]->length;
}

// Column u2 of a union row -> its group-local index on the last axis (false for padding).
NATGEN_INLINE bool union_column(const TileRef& t, const TileGeometry& g, int64_t u2, int64_t& l2) {
    const int64_t x = u2 - g.lpad;
    l2 = g.lo[2] + x;
    return x >= 0 && x < g.extent[2] && l2 < t.ax[2]->length;
}

// Gathers the tile's key union from [batch, tokens, heads, dim] into dst (layout above) and the extra tokens
// into edst[d * n_extra + e].
template <typename T>
NATGEN_INLINE void gather(const Plan& p, const TileRef& t, const TileGeometry& g, const T* src, const T* extra,
                          int64_t dim, T* dst, T* edst, const T* zeros) {
    const Args& a = *p.a;
    const int64_t heads = a.heads, base = t.b * p.tokens * heads;
    for (int64_t ur = 0; ur < g.nrows; ++ur) {
        int64_t token;
        const bool row_inside = union_row_token(a, t, g, ur, token);
        T* block = dst + ur * g.bs;
        for (int64_t c8 = 0; c8 < g.row_len; c8 += 8) {
            const T* r[8];
            bool empty = true;
            for (int l = 0; l < 8; ++l) {
                int64_t l2;
                const bool inside = row_inside && union_column(t, g, c8 + l, l2);
                r[l] = inside ? src + (base + (token + l2 * a.dilation[2]) * heads + t.h) * dim : zeros;
                empty &= !inside;
            }
            if (empty) {
                for (int64_t d = 0; d < dim; ++d) std::memset(block + d * g.rs + c8, 0, 8 * sizeof(T));
            } else if constexpr (sizeof(T) == 4) {
                rows_to_lanes<T>(r, dim, block + c8, g.rs);
            } else {
                for (int64_t d = 0; d < dim; ++d)
                    for (int l = 0; l < 8; ++l) block[d * g.rs + c8 + l] = r[l][d];
            }
        }
    }
    for (int64_t e = 0; e < p.n_extra; ++e) {
        const T* row = extra + ((t.b * p.n_extra + e) * heads + t.h) * dim;
        for (int64_t d = 0; d < dim; ++d) edst[d * p.n_extra + e] = row[d];
    }
}

// V neighbouring queries along the last axis (group-local l2 .. l2 + lanes) sharing their other coordinates.
template <typename T> struct LaneGroup {
    int lanes;
    bool uniform;              // every lane's window covers exactly columns [0, cols): no masks
    int64_t rows, cols;        // window rows (product over the leading axes), columns along the last axis
    int64_t qrow[VecTraits<T>::width];  // [batch, token, head] row of each lane (clamped for absent lanes)
};

// Fills the group's window rows (row_off) and, when the lanes' windows differ in shape, per-column lane masks.
template <class Cfg>
NATGEN_INLINE LaneGroup<typename Cfg::T> lane_group(const Plan& p, const TileRef& t, const TileGeometry& g,
                                                    int64_t l0, int64_t l1, int64_t l2, int64_t hi2,
                                                    Scratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::itype IVec;
    typedef typename std::remove_reference<decltype(IVec{}[0])>::type I;
    constexpr int V = VecTraits<T>::width;
    const Args& a = *p.a;
    LaneGroup<T> lg;
    lg.lanes = static_cast<int>(std::min<int64_t>(V, hi2 - l2));
    const AxisGroup& ax2 = *t.ax[2];
    int64_t col_lo = INT64_MAX, col_hi = INT64_MIN;
    IVec lo_v, hi_v;
    lg.uniform = true;
    for (int j = 0; j < V; ++j) {
        if (j < lg.lanes) {
            const int64_t slo = ax2.start[l2 + j] - j, shi = ax2.end[l2 + j] - j;
            if (j > 0 && (slo != lo_v[0] || shi != hi_v[0])) lg.uniform = false;
            lo_v[j] = static_cast<I>(slo);
            hi_v[j] = static_cast<I>(shi);
            col_lo = std::min(col_lo, slo);
            col_hi = std::max(col_hi, shi);
        } else {
            lo_v[j] = std::numeric_limits<I>::max();
            hi_v[j] = std::numeric_limits<I>::min();
        }
        const int64_t x2 = (l2 + std::min(j, lg.lanes - 1)) * a.dilation[2] + ax2.group;
        const int64_t x0 = l0 * a.dilation[0] + t.ax[0]->group, x1 = l1 * a.dilation[1] + t.ax[1]->group;
        lg.qrow[j] = (t.b * p.tokens + (x0 * a.length[1] + x1) * a.length[2] + x2) * a.heads + t.h;
    }
    lg.cols = col_hi - col_lo;
    const int64_t s0 = t.ax[0]->start[l0], n0 = t.ax[0]->end[l0] - s0;
    const int64_t s1 = t.ax[1]->start[l1], n1 = t.ax[1]->end[l1] - s1;
    lg.rows = n0 * n1;
    int64_t r = 0;
    for (int64_t a0 = 0; a0 < n0; ++a0)
        for (int64_t a1 = 0; a1 < n1; ++a1, ++r)
        {
            const int64_t ur = (s0 + a0 - g.lo[0]) * g.extent[1] + s1 + a1 - g.lo[1];
            const int64_t col = g.lpad + col_lo - g.lo[2];
            s.row_off[r] = ur * g.bs + col;
            s.key_off[r] = ur * g.rs + col;
        }
    if (!lg.uniform) {
        IVec iota;
        for (int j = 0; j < V; ++j) iota[j] = static_cast<I>(j);
        for (int64_t c = 0; c < lg.cols; ++c) {
            const IVec col = IVec{} + static_cast<I>(col_lo + c);
            const IVec mask = (col >= lo_v) & (col < hi_v);
            std::memcpy(s.colmask.data() + c * sizeof(IVec), &mask, sizeof(IVec));
        }
    }
    return lg;
}

template <typename T>
NATGEN_INLINE void scale_lanes(T* x, int64_t n, T alpha) {
    for (int64_t d = 0; d < n; ++d) store<T>(x + d * VecTraits<T>::width, load<T>(x + d * VecTraits<T>::width) * alpha);
}

template <typename T> NATGEN_INLINE typename VecTraits<T>::itype column_mask(const char* masks, int64_t c) {
    typename VecTraits<T>::itype m;
    std::memcpy(&m, masks + c * sizeof(m), sizeof(m));
    return m;
}

// Row max over the valid (row, column) cells and extra tokens; lanes without any key get 0.
template <typename T>
NATGEN_INLINE typename VecTraits<T>::type lane_max(const T* sc, const LaneGroup<T>& lg, const char* colmask,
                                                   int64_t n_extra) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    const T lowest = -std::numeric_limits<T>::infinity();
    Vec m = Vec{} + lowest;
    for (int64_t r = 0; r < lg.rows; ++r)
        for (int64_t c = 0; c < lg.cols; ++c) {
            Vec x = load<T>(sc + (r * lg.cols + c) * V);
            if (!lg.uniform) x = column_mask<T>(colmask, c) ? x : Vec{} + lowest;
            m = x > m ? x : m;
        }
    const T* se = sc + lg.rows * lg.cols * V;
    for (int64_t e = 0; e < n_extra; ++e) {
        const Vec x = load<T>(se + e * V);
        m = x > m ? x : m;
    }
    return m == lowest ? Vec{} : m;
}

// pr = exp(sc - shift), exactly 0 where a lane's window does not contain the column; returns the lane sums.
template <typename T>
NATGEN_INLINE typename VecTraits<T>::type lane_exp(const T* __restrict sc, const LaneGroup<T>& lg,
                                                   const char* colmask, int64_t n_extra,
                                                   typename VecTraits<T>::type shift, T* __restrict pr) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    Vec l = Vec{};
    for (int64_t r = 0; r < lg.rows; ++r)
        for (int64_t c = 0; c < lg.cols; ++c) {
            const int64_t i = (r * lg.cols + c) * V;
            Vec e = exp_vec(load<T>(sc + i) - shift);
            if (!lg.uniform) e = column_mask<T>(colmask, c) ? e : Vec{};
            store<T>(pr + i, e);
            l += e;
        }
    for (int64_t e = 0, i = lg.rows * lg.cols * V; e < n_extra; ++e, i += V) {
        const Vec x = exp_vec(load<T>(sc + i) - shift);
        store<T>(pr + i, x);
        l += x;
    }
    return l;
}

// ------------------------------------------------------------------------------------- forward, per query
// The forward vectorizes over keys instead: per query, its window's keys along the last axis in runs of V
// ("segments"), scores as FMAs of one broadcast query channel against a segment of transposed keys, P.V as
// broadcast probabilities against row-major value rows. Measured against the lane scheme of the backward
// (on 2 AMD EPYC cores): equal in the interior (cpu-2d 0.62 ms both) and much faster where windows are
// clamped (nat-2d, 14x14: 1.7 vs 2.7 ms), since a query computes exactly its own keys; the backward keeps the
// lane scheme, whose per-key dK/dV accumulation is what makes it 2x faster there.
namespace fwd {

template <typename T> NATGEN_INLINE typename VecTraits<T>::itype lane_mask(int n) {
    typedef typename VecTraits<T>::itype IVec;
    IVec iota;
    for (int i = 0; i < VecTraits<T>::width; ++i) iota[i] = i;
    return iota < (IVec{} + n);
}

// out[s][0..V) = sum_d x[d] * buf[d*stride + bases[s] + 0..V): NB segments' scores kept in registers.
template <typename T, int NB, int HD>
NATGEN_INLINE void dot_block(const T* __restrict buf, int64_t stride, const int* __restrict bases,
                             const T* __restrict x, int64_t n, T* __restrict out) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    Vec acc[NB];
    for (int s = 0; s < NB; ++s) acc[s] = Vec{};
    const int64_t count = HD ? HD : n;
    for (int64_t d = 0; d < count; ++d) {
        const T xd = x[d];
        const T* row = buf + d * stride;
        for (int s = 0; s < NB; ++s) acc[s] += xd * load<T>(row + bases[s]);
    }
    for (int s = 0; s < NB; ++s) store<T>(out + s * V, acc[s]);
}

template <typename T, int HD>
NATGEN_INLINE void dot_segments(const T* buf, int64_t stride, const int* bases, int nseg, const T* x, int64_t n,
                                T* out) {
    constexpr int V = VecTraits<T>::width;
    int s = 0;
    for (; s + 8 <= nseg; s += 8) dot_block<T, 8, HD>(buf, stride, bases + s, x, n, out + s * V);
    switch (nseg - s) {
        case 1: dot_block<T, 1, HD>(buf, stride, bases + s, x, n, out + s * V); break;
        case 2: dot_block<T, 2, HD>(buf, stride, bases + s, x, n, out + s * V); break;
        case 3: dot_block<T, 3, HD>(buf, stride, bases + s, x, n, out + s * V); break;
        case 4: dot_block<T, 4, HD>(buf, stride, bases + s, x, n, out + s * V); break;
        case 5: dot_block<T, 5, HD>(buf, stride, bases + s, x, n, out + s * V); break;
        case 6: dot_block<T, 6, HD>(buf, stride, bases + s, x, n, out + s * V); break;
        case 7: dot_block<T, 7, HD>(buf, stride, bases + s, x, n, out + s * V); break;
        default: break;
    }
}

// acc[0..NV*V) = sum over keys of w[key] * rows[key][0..NV*V): P.V with the output row in registers.
template <typename T, int NV>
NATGEN_INLINE void weighted_rows_block(const T* __restrict rows, int64_t ld, const int* __restrict bases,
                                       int nseg, const T* __restrict w, T* __restrict acc_out) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    Vec acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = Vec{};
    for (int s = 0; s < nseg; ++s) {
        const T* ws = w + s * V;
        for (int l = 0; l < V; ++l) {
            const T wl = ws[l];
            if (wl == T(0)) continue;  // padding lanes
            const T* row = rows + (bases[s] + l) * ld;
            for (int j = 0; j < NV; ++j) acc[j] += wl * load<T>(row + j * V);
        }
    }
    for (int j = 0; j < NV; ++j) store<T>(acc_out + j * V, acc[j]);
}

template <typename T>
NATGEN_INLINE void weighted_rows(const T* rows, int64_t ld, const int* bases, int nseg, const T* w, int64_t nvec,
                                 T* out) {
    constexpr int V = VecTraits<T>::width;
    int64_t j = 0;  // output blocks of 8, 4, then single vectors (fewer instantiations)
    for (; j + 8 <= nvec; j += 8) weighted_rows_block<T, 8>(rows + j * V, ld, bases, nseg, w, out + j * V);
    for (; j + 4 <= nvec; j += 4) weighted_rows_block<T, 4>(rows + j * V, ld, bases, nseg, w, out + j * V);
    for (; j < nvec; ++j) weighted_rows_block<T, 1>(rows + j * V, ld, bases, nseg, w, out + j * V);
}

struct Geometry {
    int64_t lo[3], extent[3], row_len, window_elems, total;
};

template <class Cfg> NATGEN_INLINE Geometry geometry(const Plan& p, const TileRef& t) {
    constexpr int V = VecTraits<typename Cfg::T>::width;
    Geometry g;
    for (int d = 0; d < 3; ++d) {
        g.lo[d] = t.ax[d]->tile_lo[t.tile[d]];
        g.extent[d] = t.ax[d]->tile_hi_k[t.tile[d]] - g.lo[d];
    }
    // the last axis gets room for a full vector past any window's end (those lanes are masked)
    g.row_len = g.extent[2] + p.chunks * V - p.K[2];
    g.window_elems = g.extent[0] * g.extent[1] * g.row_len;
    g.total = g.window_elems + p.extra_padded;
    return g;
}

// Gathers the tile's key union (+ extra tokens) from [batch, tokens, heads, dim] into `dst`, either
// transposed (dst[d*ld + u]) or row-major (dst[u*ld + d], rows padded with zeros to `padded_dim`).
// Positions outside the axis (window slack, vector padding) read a zero row.
template <typename T>
NATGEN_INLINE void gather(const Plan& p, const TileRef& t, const Geometry& g, const T* src, const T* extra,
                          int64_t dim, int64_t padded_dim, bool transposed, T* dst, int64_t ld,
                          std::vector<const T*>& rows, const T* zeros) {
    const Args& a = *p.a;
    const int64_t heads = a.heads;
    const int64_t base = t.b * p.tokens * heads;
    int64_t u = 0;
    for (int64_t u0 = 0; u0 < g.extent[0]; ++u0) {
        const int64_t l0 = g.lo[0] + u0;
        for (int64_t u1 = 0; u1 < g.extent[1]; ++u1) {
            const int64_t l1 = g.lo[1] + u1;
            for (int64_t u2 = 0; u2 < g.row_len; ++u2, ++u) {
                const int64_t l2 = g.lo[2] + u2;
                const bool inside = l0 < t.ax[0]->length && l1 < t.ax[1]->length && u2 < g.extent[2] &&
                                    l2 < t.ax[2]->length;
                if (!inside) { rows[u] = zeros; continue; }
                const int64_t x0 = l0 * a.dilation[0] + t.ax[0]->group;
                const int64_t x1 = l1 * a.dilation[1] + t.ax[1]->group;
                const int64_t x2 = l2 * a.dilation[2] + t.ax[2]->group;
                rows[u] = src + (base + ((x0 * a.length[1] + x1) * a.length[2] + x2) * heads + t.h) * dim;
            }
        }
    }
    for (int64_t e = 0; e < p.extra_padded; ++e, ++u)
        rows[u] = e < p.n_extra ? extra + ((t.b * p.n_extra + e) * heads + t.h) * dim : zeros;
    const int64_t n = u;
    if (transposed) {
        int64_t u8 = 0;
        for (; u8 + 8 <= n; u8 += 8) {
            if constexpr (sizeof(T) == 4) {
                rows_to_lanes<T>(rows.data() + u8, dim, dst + u8, ld);  // 8x8 blocks transposed in registers
            } else {
                for (int64_t d = 0; d < dim; ++d)
                    for (int l = 0; l < 8; ++l) dst[d * ld + u8 + l] = rows[u8 + l][d];
            }
        }
        for (; u8 < n; ++u8)
            for (int64_t d = 0; d < dim; ++d) dst[d * ld + u8] = rows[u8][d];
    } else {
        for (int64_t i = 0; i < n; ++i) {
            T* out = dst + i * ld;
            std::memcpy(out, rows[i], dim * sizeof(T));
            for (int64_t d = dim; d < padded_dim; ++d) out[d] = T(0);
        }
    }
}

// Segments of one query: runs of up to V adjacent keys along the last axis, then the extra tokens.
template <class Cfg>
NATGEN_INLINE int query_segments(const Plan& p, const TileRef& t, const Geometry& g, const int64_t* local,
                                 int* bases, int* valid) {
    constexpr int V = VecTraits<typename Cfg::T>::width;
    int64_t start[3], count[3];
    for (int d = 0; d < 3; ++d) {
        start[d] = t.ax[d]->start[local[d]] - g.lo[d];
        count[d] = t.ax[d]->end[local[d]] - t.ax[d]->start[local[d]];
    }
    int n = 0;
    for (int64_t a0 = 0; a0 < count[0]; ++a0) {
        for (int64_t a1 = 0; a1 < count[1]; ++a1) {
            const int64_t row = ((start[0] + a0) * g.extent[1] + start[1] + a1) * g.row_len + start[2];
            for (int64_t c = 0; c < p.chunks; ++c) {
                const int64_t left = count[2] - c * V;
                if (left <= 0) break;
                bases[n] = static_cast<int>(row + c * V);
                valid[n] = static_cast<int>(std::min<int64_t>(left, V));
                ++n;
            }
        }
    }
    for (int64_t e = 0; e < p.extra_padded; e += V) {
        bases[n] = static_cast<int>(g.window_elems + e);
        valid[n] = static_cast<int>(std::min<int64_t>(std::max<int64_t>(p.n_extra - e, 0), V));
        ++n;
    }
    return n;
}

// Softmax over the valid slots: probs = exp(x - m) (0 on padding) with x = score * scale; returns the row
// max m and the sum l.
template <typename T>
NATGEN_INLINE void softmax_slots(const T* __restrict scores, const int* __restrict valid, int nseg, T scale,
                                 T* __restrict probs, T& m, T& l) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    const T lowest = -std::numeric_limits<T>::infinity();
    Vec vmax = Vec{} + lowest;
    for (int s = 0; s < nseg; ++s) {
        const Vec x = load<T>(scores + s * V) * scale;
        const Vec masked = lane_mask<T>(valid[s]) ? x : Vec{} + lowest;
        vmax = masked > vmax ? masked : vmax;
    }
    T row_max = lowest;
    for (int i = 0; i < V; ++i) row_max = std::max(row_max, vmax[i]);
    Vec vsum = Vec{};
    for (int s = 0; s < nseg; ++s) {
        const Vec e = exp_vec(load<T>(scores + s * V) * scale - row_max);
        const Vec pe = lane_mask<T>(valid[s]) ? e : Vec{};
        store<T>(probs + s * V, pe);
        vsum += pe;
    }
    T sum = 0;
    for (int i = 0; i < V; ++i) sum += vsum[i];
    m = row_max;
    l = sum;
}

// ---- The specialized forward (FixedFwd: constant K and head_dim, no causal axis, no extra tokens). Same
// algorithm as forward_tile below, but the tile's union is gathered at fixed strides, so every key and value
// a query reads lies at a compile-time offset from its window corner: one pointer, immediate displacements,
// unrolled channel loops (the runtime-offset version spent its hot loop reloading spilled offsets).

// kt[d * KEYS + slot] (keys transposed) and vu[slot * HD + d] (values row-major) for the union slots
// slot = (u0 * ROWS1 + u1) * ROWLEN + u2. Key columns past the union read zeros; slots no query reads keep
// whatever an earlier tile left (only masked score lanes read them; values there are never read).
template <class Cfg>
NATGEN_INLINE void fixed_gather(const Plan& p, const TileRef& t, const Geometry& g, typename Cfg::T* __restrict kt,
                                typename Cfg::T* __restrict vu, const typename Cfg::T* zeros) {
    typedef typename Cfg::T T;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    const Args& a = *p.a;
    const T* k = reinterpret_cast<const T*>(a.k);
    const T* v = reinterpret_cast<const T*>(a.v);
    const int64_t heads = a.heads, step = a.dilation[2] * heads;
    const int64_t first2 = g.lo[2] * a.dilation[2] + t.ax[2]->group;
    const int64_t cols = g.extent[2];
    const T* rows[F::ROWLEN];
    for (int64_t u2 = cols; u2 < F::ROWLEN; ++u2) rows[u2] = zeros;
    for (int64_t u0 = 0; u0 < g.extent[0]; ++u0) {
        const int64_t x0 = (g.lo[0] + u0) * a.dilation[0] + t.ax[0]->group;
        for (int64_t u1 = 0; u1 < g.extent[1]; ++u1) {
            const int64_t x1 = (g.lo[1] + u1) * a.dilation[1] + t.ax[1]->group;
            const int64_t first = (t.b * p.tokens + (x0 * a.length[1] + x1) * a.length[2] + first2) * heads + t.h;
            const int64_t slot = u0 * F::PLANE + u1 * F::ROWLEN;
            for (int64_t u2 = 0; u2 < cols; ++u2) {
                const int64_t row = (first + u2 * step) * F::HD;
                rows[u2] = k + row;
                std::memcpy(vu + (slot + u2) * F::HD, v + row, F::HD * sizeof(T));
            }
            for (int64_t c = 0; c < cols; c += V) rows_to_lanes<T>(rows + c, F::HD, kt + slot + c, F::KEYS);
        }
    }
}

// Scores of window rows [R0, K1) of one window plane, in blocks of up to 12 accumulators held in registers.
// (Two accumulator sets over even / odd channels, against FMA latency, measured slower: 0.93 vs 1.00 ms.)
template <class Cfg, int R0>
NATGEN_INLINE void fixed_dot_rows(const typename Cfg::T* __restrict kb, const typename Cfg::T* __restrict x,
                                  typename Cfg::T* __restrict sc) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    constexpr int NB = std::min(std::max(1, 12 / F::CH), F::K1 - R0);
    Vec acc[NB * F::CH];
    for (int i = 0; i < NB * F::CH; ++i) acc[i] = Vec{};
#pragma GCC unroll 4
    for (int d = 0; d < F::HD; ++d) {
        const T xd = x[d];  // a scalar times a vector: one broadcast load
        const T* row = kb + d * F::KEYS + R0 * F::ROWLEN;
#pragma GCC unroll 64
        for (int r = 0; r < NB; ++r)
#pragma GCC unroll 16
            for (int c = 0; c < F::CH; ++c) acc[r * F::CH + c] += xd * load<T>(row + r * F::ROWLEN + c * V);
    }
    for (int i = 0; i < NB * F::CH; ++i) store<T>(sc + (R0 * F::CH + i) * V, acc[i]);
    if constexpr (R0 + NB < F::K1) fixed_dot_rows<Cfg, R0 + NB>(kb, x, sc);
}

// P.V of one query for output vectors [J0, HD / V), in blocks of up to 4 accumulators; padding lanes are
// skipped at compile time. (Accumulator sets taking turns over the keys measured slower.)
template <class Cfg, int J0>
NATGEN_INLINE void fixed_pv(const typename Cfg::T* __restrict vb, const typename Cfg::T* __restrict pr,
                            typename Cfg::T* __restrict o, typename Cfg::T inv) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    constexpr int NVB = std::min(4, F::HD / V - J0);
    Vec acc[NVB];
    for (int j = 0; j < NVB; ++j) acc[j] = Vec{};
    for (int a0 = 0; a0 < F::K0; ++a0)
        for (int a1 = 0; a1 < F::K1; ++a1) {
            const T* vr = vb + (a0 * F::PLANE + a1 * F::ROWLEN) * F::HD + J0 * V;
            const T* w = pr + (a0 * F::K1 + a1) * F::CH * V;
#pragma GCC unroll 64
            for (int n = 0; n < F::K2; ++n) {
                const T wl = w[n];
#pragma GCC unroll 8
                for (int j = 0; j < NVB; ++j) acc[j] += wl * load<T>(vr + n * F::HD + j * V);
            }
        }
    for (int j = 0; j < NVB; ++j) store<T>(o + (J0 + j) * V, acc[j] * inv);
    if constexpr (J0 + NVB < F::HD / V) fixed_pv<Cfg, J0 + NVB>(vb, pr, o, inv);
}

// P.V of two queries side by side on the last axis (B = A's neighbour), whose windows are the same rows
// shifted by DELTA (1 in the interior, 0 where B's window is clamped onto A's): each value row is loaded once
// for both. Within a window row, key n of A is value slot n and key n - DELTA of B.
template <class Cfg, int NVB, int DELTA>
NATGEN_INLINE void fixed_pv2_row(const typename Cfg::T* __restrict vr, const typename Cfg::T* __restrict wa,
                                 const typename Cfg::T* __restrict wb, typename VecTraits<typename Cfg::T>::type* acc_a,
                                 typename VecTraits<typename Cfg::T>::type* acc_b) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
#pragma GCC unroll 64
    for (int n = 0; n < F::K2 + DELTA; ++n) {
        const T* vp = vr + n * F::HD;
        if (n < F::K2 && n >= DELTA) {
            const T xa = wa[n], xb = wb[n - DELTA];
#pragma GCC unroll 8
            for (int j = 0; j < NVB; ++j) {
                Vec vv = load<T>(vp + j * V);
                NATGEN_PIN(vv);
                acc_a[j] += xa * vv;
                acc_b[j] += xb * vv;
            }
        } else if (n < F::K2) {
            const T xa = wa[n];
#pragma GCC unroll 8
            for (int j = 0; j < NVB; ++j) acc_a[j] += xa * load<T>(vp + j * V);
        } else {
            const T xb = wb[n - DELTA];
#pragma GCC unroll 8
            for (int j = 0; j < NVB; ++j) acc_b[j] += xb * load<T>(vp + j * V);
        }
    }
}

template <class Cfg, int J0, int DELTA>
NATGEN_FIXED_TARGET void fixed_pv2(const typename Cfg::T* __restrict vb, const typename Cfg::T* __restrict pa,
                             const typename Cfg::T* __restrict pb, typename Cfg::T* __restrict oa,
                             typename Cfg::T* __restrict ob, typename Cfg::T inv_a, typename Cfg::T inv_b) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    constexpr int NVB = std::min(4, F::HD / V - J0);
    Vec acc_a[NVB], acc_b[NVB];
    for (int j = 0; j < NVB; ++j) acc_a[j] = acc_b[j] = Vec{};
    for (int a0 = 0; a0 < F::K0; ++a0)
        for (int a1 = 0; a1 < F::K1; ++a1) {
            const int64_t w = (a0 * F::K1 + a1) * F::CH * V;
            fixed_pv2_row<Cfg, NVB, DELTA>(vb + (a0 * F::PLANE + a1 * F::ROWLEN) * F::HD + J0 * V, pa + w, pb + w,
                                           acc_a, acc_b);
        }
    for (int j = 0; j < NVB; ++j) {
        store<T>(oa + (J0 + j) * V, acc_a[j] * inv_a);
        store<T>(ob + (J0 + j) * V, acc_b[j] * inv_b);
    }
    if constexpr (J0 + NVB < F::HD / V) fixed_pv2<Cfg, J0 + NVB, DELTA>(vb, pa, pb, oa, ob, inv_a, inv_b);
}

// Scores of two queries stacked on axis 1 (B below A), rows [U0, K1 + DV) of their window union in one plane:
// B's window is A's shifted down by DV rows (1 in the interior, 0 where B's window is clamped onto A's), so
// each key vector is loaded once for both: 2 FMAs a load where one query alone does 1 (and twice the
// independent accumulator chains against FMA latency).
template <class Cfg, int DV, int U0>
NATGEN_INLINE void fixed_dot_rows2(const typename Cfg::T* __restrict kb, const typename Cfg::T* __restrict xa,
                                   const typename Cfg::T* __restrict xb, typename Cfg::T* __restrict sca,
                                   typename Cfg::T* __restrict scb) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    constexpr int NU = F::K1 + DV;
    constexpr int NB = std::min(std::max(1, 4 / F::CH), NU - U0);  // 8 spilled
    Vec acc_a[NB * F::CH], acc_b[NB * F::CH];
    for (int i = 0; i < NB * F::CH; ++i) acc_a[i] = acc_b[i] = Vec{};
#pragma GCC unroll 4
    for (int d = 0; d < F::HD; ++d) {
        const T ad = xa[d], bd = xb[d];
        const T* row = kb + d * F::KEYS + U0 * F::ROWLEN;
#pragma GCC unroll 64
        for (int u = 0; u < NB; ++u)
#pragma GCC unroll 16
            for (int c = 0; c < F::CH; ++c) {
                const Vec kv = load<T>(row + u * F::ROWLEN + c * V);
                if (U0 + u < F::K1) acc_a[u * F::CH + c] += ad * kv;
                if (U0 + u >= DV) acc_b[u * F::CH + c] += bd * kv;
            }
    }
#pragma GCC unroll 64
    for (int u = 0; u < NB; ++u)
#pragma GCC unroll 16
        for (int c = 0; c < F::CH; ++c) {
            if (U0 + u < F::K1) store<T>(sca + ((U0 + u) * F::CH + c) * V, acc_a[u * F::CH + c]);
            if (U0 + u >= DV) store<T>(scb + ((U0 + u - DV) * F::CH + c) * V, acc_b[u * F::CH + c]);
        }
    if constexpr (U0 + NB < NU) fixed_dot_rows2<Cfg, DV, U0 + NB>(kb, xa, xb, sca, scb);
}

// Softmax of one query's scores: pr = 2^(y - m2) over its window (padding lanes 0), y = score * scale2;
// returns m2 and the sum l. The scaled scores stay in registers (the exponent's argument is one FMA).
template <class Cfg>
NATGEN_INLINE void fixed_probs(const typename Cfg::T* __restrict sc, typename Cfg::T scale2,
                               typename Cfg::T* __restrict pr, typename Cfg::T& m2, typename Cfg::T& l) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    const T lowest = -std::numeric_limits<T>::infinity();
    const auto last = lane_mask<T>(F::LAST);
    Vec vmax = Vec{} + lowest;
    for (int r = 0; r < F::ROWS; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < F::CH; ++c) {
            Vec y = load<T>(sc + (r * F::CH + c) * V) * scale2;
            if (c == F::CH - 1 && F::LAST < V) y = last ? y : Vec{} + lowest;
            vmax = y > vmax ? y : vmax;
        }
    m2 = hmax(vmax);
    const T minus_m2 = -m2;
    Vec vsum = Vec{};
    for (int r = 0; r < F::ROWS; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < F::CH; ++c) {
            Vec e = exp2_vec(load<T>(sc + (r * F::CH + c) * V) * scale2 + minus_m2);
            if (c == F::CH - 1 && F::LAST < V) e = last ? e : Vec{};
            store<T>(pr + (r * F::CH + c) * V, e);
            vsum += e;
        }
    l = hsum(vsum);
}

// Scores and softmax of one query (sc: NSEG vectors of scratch).
template <class Cfg>
NATGEN_INLINE void fixed_softmax(const typename Cfg::T* __restrict kb, const typename Cfg::T* __restrict x,
                                 typename Cfg::T scale2, typename Cfg::T* __restrict sc,
                                 typename Cfg::T* __restrict pr, typename Cfg::T& m2, typename Cfg::T& l) {
    typedef FixedFwd<Cfg> F;
    for (int a0 = 0; a0 < F::K0; ++a0) fixed_dot_rows<Cfg, 0>(kb + a0 * F::PLANE, x, sc + a0 * F::K1 * F::CH * F::V);
    fixed_probs<Cfg>(sc, scale2, pr, m2, l);
}

// The same for two queries stacked on axis 1 (see fixed_dot_rows2; sc: 2 * NSEG vectors of scratch).
template <class Cfg, int DV>
NATGEN_FIXED_TARGET void fixed_softmax2(const typename Cfg::T* __restrict kb, const typename Cfg::T* __restrict xa,
                                  const typename Cfg::T* __restrict xb, typename Cfg::T scale2,
                                  typename Cfg::T* __restrict sc, typename Cfg::T* __restrict pra,
                                  typename Cfg::T* __restrict prb, typename Cfg::T* m2, typename Cfg::T* l) {
    typedef FixedFwd<Cfg> F;
    constexpr int NS = F::NSEG * F::V;
    for (int a0 = 0; a0 < F::K0; ++a0)
        fixed_dot_rows2<Cfg, DV, 0>(kb + a0 * F::PLANE, xa, xb, sc + a0 * F::K1 * F::CH * F::V,
                                    sc + NS + a0 * F::K1 * F::CH * F::V);
    fixed_probs<Cfg>(sc, scale2, pra, m2[0], l[0]);
    fixed_probs<Cfg>(sc + NS, scale2, prb, m2[1], l[1]);
}

template <class Cfg>
NATGEN_FIXED_TARGET void fixed_tile(const Plan& p, const TileRef& t, FwdScratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef typename VecTraits<T>::itype IVec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    const Args& a = *p.a;
    const T* q = reinterpret_cast<const T*>(a.q);
    T* out = reinterpret_cast<T*>(a.out);
    T* lse = reinterpret_cast<T*>(a.lse);
    const Geometry g = geometry<Cfg>(p, t);
    T* kt = line_aligned(s.kt.data());
    T* vu = line_aligned(s.vu.data());
    fixed_gather<Cfg>(p, t, g, kt, vu, s.zeros.data());
    T* sc = s.scores.data();
    T* pr = s.probs.data();
    const T scale2 = static_cast<T>(a.scale * 1.4426950408889634);  // log2(e)
    constexpr int ROW_SLOTS = (Cfg::TILE[2] + V - 1) / V * V;
    constexpr int NS = F::NSEG * V;
    alignas(64) T row_m2[2][ROW_SLOTS], row_l[2][ROW_SLOTS];
    for (int i = 0; i < ROW_SLOTS; ++i) row_m2[0][i] = row_l[0][i] = row_m2[1][i] = row_l[1][i] = T(1);
    int64_t lo[3], hi[3];
    for (int d = 0; d < 3; ++d) {
        lo[d] = int64_t(t.tile[d]) * p.tile[d];
        hi[d] = std::min(lo[d] + p.tile[d], t.ax[d]->length);
    }
    const int64_t step2 = a.dilation[2] * a.heads;
    // queries in 2 x 2 blocks (two rows of axis 1, two neighbours on the last axis): scores of the two queries
    // stacked on axis 1 together (fixed_softmax2), P.V of the two side by side on the last axis together
    for (int64_t l0 = lo[0]; l0 < hi[0]; ++l0)
    for (int64_t l1 = lo[1]; l1 < hi[1]; l1 += 2) {
        const int nr = l1 + 1 < hi[1] ? 2 : 1;
        const int64_t x0 = l0 * a.dilation[0] + t.ax[0]->group;
        int64_t corner01[2], row01[2];
        for (int i = 0; i < nr; ++i) {
            const int64_t x1 = (l1 + i) * a.dilation[1] + t.ax[1]->group;
            corner01[i] = ((t.ax[0]->start[l0] - g.lo[0]) * F::ROWS1 + t.ax[1]->start[l1 + i] - g.lo[1]) * F::ROWLEN -
                          g.lo[2];
            row01[i] = (t.b * p.tokens + (x0 * a.length[1] + x1) * a.length[2] + t.ax[2]->group) * a.heads + t.h;
        }
        const int64_t dv = nr == 2 ? (corner01[1] - corner01[0]) / F::ROWLEN : -1;
        for (int64_t l2 = lo[2]; l2 < hi[2]; l2 += 2) {
            const int n = l2 + 1 < hi[2] ? 2 : 1;
            int64_t row[2][2], corner[2][2];
            T inv[2][2];
            for (int k = 0; k < n; ++k) {
                const int64_t slot = l2 + k - lo[2];
                for (int i = 0; i < nr; ++i) {
                    row[i][k] = row01[i] + (l2 + k) * step2;
                    corner[i][k] = corner01[i] + t.ax[2]->start[l2 + k];
                }
                T m2[2], l[2];
                if (dv == 1)
                    fixed_softmax2<Cfg, 1>(kt + corner[0][k], q + row[0][k] * F::HD, q + row[1][k] * F::HD, scale2, sc,
                                           pr + k * NS, pr + (2 + k) * NS, m2, l);
                else if (dv == 0)
                    fixed_softmax2<Cfg, 0>(kt + corner[0][k], q + row[0][k] * F::HD, q + row[1][k] * F::HD, scale2, sc,
                                           pr + k * NS, pr + (2 + k) * NS, m2, l);
                else
                    for (int i = 0; i < nr; ++i)
                        fixed_softmax<Cfg>(kt + corner[i][k], q + row[i][k] * F::HD, scale2, sc, pr + (2 * i + k) * NS,
                                           m2[i], l[i]);
                for (int i = 0; i < nr; ++i) {
                    inv[i][k] = T(1) / l[i];
                    row_m2[i][slot] = m2[i];
                    row_l[i][slot] = l[i];
                }
            }
            for (int i = 0; i < nr; ++i) {
                const T* pa = pr + 2 * i * NS;
                const int64_t delta = n == 2 ? corner[i][1] - corner[i][0] : -1;
                if (delta == 1)
                    fixed_pv2<Cfg, 0, 1>(vu + corner[i][0] * F::HD, pa, pa + NS, out + row[i][0] * F::HD,
                                         out + row[i][1] * F::HD, inv[i][0], inv[i][1]);
                else if (delta == 0)
                    fixed_pv2<Cfg, 0, 0>(vu + corner[i][0] * F::HD, pa, pa + NS, out + row[i][0] * F::HD,
                                         out + row[i][1] * F::HD, inv[i][0], inv[i][1]);
                else
                    for (int k = 0; k < n; ++k)
                        fixed_pv<Cfg, 0>(vu + corner[i][k] * F::HD, pa + k * NS, out + row[i][k] * F::HD, inv[i][k]);
            }
        }
        // log-sum-exp of the rows' queries, V at a time: ln2 * (m2 + log2(l))
        if (lse)
            for (int i = 0; i < nr; ++i)
                for (int64_t c = 0; c < hi[2] - lo[2]; c += V) {
                    const Vec y = (load<T>(row_m2[i] + c) + log2_vec(load<T>(row_l[i] + c))) * T(0.6931471805599453);
                    for (int j = 0; j < V && c + j < hi[2] - lo[2]; ++j)
                        lse[row01[i] + (lo[2] + c + j) * step2] = y[j];
                }
    }
}

template <class Cfg> NATGEN_INLINE void forward_tile(const Plan& p, const TileRef& t, FwdScratch<typename Cfg::T>& s) {
    if constexpr (FixedFwd<Cfg>::enabled) {
        if (p.fixed && NATGEN_FIXED_ISA()) {
            fixed_tile<Cfg>(p, t, s);
            return;
        }
    }
    typedef typename Cfg::T T;
    constexpr int V = VecTraits<T>::width;
    const Args& a = *p.a;
    const T* q = reinterpret_cast<const T*>(a.q);
    T* out = reinterpret_cast<T*>(a.out);
    T* lse = reinterpret_cast<T*>(a.lse);
    const Geometry g = geometry<Cfg>(p, t);
    gather<T>(p, t, g, reinterpret_cast<const T*>(a.k), reinterpret_cast<const T*>(a.extra_k), p.hd, p.hd, true,
              s.kt.data(), g.total, s.rows, s.zeros.data());
    gather<T>(p, t, g, reinterpret_cast<const T*>(a.v), reinterpret_cast<const T*>(a.extra_v), p.hdv,
              p.hdv_padded, false, s.vu.data(), p.hdv_padded, s.rows, s.zeros.data());
    const T scale = static_cast<T>(a.scale);
    int64_t lo[3], hi[3], local[3];
    for (int d = 0; d < 3; ++d) {
        lo[d] = int64_t(t.tile[d]) * p.tile[d];
        hi[d] = std::min(lo[d] + p.tile[d], t.ax[d]->length);
    }
    for (local[0] = lo[0]; local[0] < hi[0]; ++local[0])
    for (local[1] = lo[1]; local[1] < hi[1]; ++local[1])
    for (local[2] = lo[2]; local[2] < hi[2]; ++local[2]) {
        const int64_t x0 = local[0] * a.dilation[0] + t.ax[0]->group;
        const int64_t x1 = local[1] * a.dilation[1] + t.ax[1]->group;
        const int64_t x2 = local[2] * a.dilation[2] + t.ax[2]->group;
        const int64_t row = (t.b * p.tokens + (x0 * a.length[1] + x1) * a.length[2] + x2) * a.heads + t.h;
        const int nseg = query_segments<Cfg>(p, t, g, local, s.bases.data(), s.valid.data());
        dot_segments<T, Cfg::HD>(s.kt.data(), g.total, s.bases.data(), nseg, q + row * p.hd, p.hd,
                                 s.scores.data());
        T m, l;
        softmax_slots<T>(s.scores.data(), s.valid.data(), nseg, scale, s.probs.data(), m, l);
        weighted_rows<T>(s.vu.data(), p.hdv_padded, s.bases.data(), nseg, s.probs.data(), p.hdv_padded / V,
                         s.acc.data());
        const T inv = T(1) / l;
        T* o = out + row * p.hdv;
        for (int64_t d = 0; d < p.hdv; ++d) o[d] = s.acc[d] * inv;
        if (lse) lse[row] = m + std::log(l);
    }
}

}  // namespace fwd

// ------------------------------------------------------------------------------------- backward, fixed shape
// Instances whose kernel size and head_dim are compile-time (and not causal) run the lane groups whose lanes'
// windows are one box shifted by a key per lane (the interior: `uniform`, all V lanes) through kernels in which
// every count is a constant: in a tile whose union rows have the stride RS (every interior tile of one lane
// group's width), a window row is BS = HD * RS elements after the previous one, so every (row, column,
// channel) load is a constant displacement from one base pointer, and the key grads of a window row are
// HD-element rows at constant offsets too. A border group whose lanes' windows span K2 + K2 / 2 columns (it
// holds the K2 / 2 clamped queries of its side: every border group at tile width V, K2 / 2 < V) runs the
// same kernels at that width with its cells outside each lane's window masked (P = dS = 0), partial groups
// too (the absent lanes are all masked). Everything else (extra tokens, strides, causal, other widths) takes
// the general kernels above. Measured on cpu-2d (2 AMD EPYC cores, 1 thread): 2.60 -> 1.85 ms.
template <class Cfg, int NC_ = Cfg::K[2]> struct Fixed {
    typedef typename Cfg::T T;
    static constexpr int V = VecTraits<T>::width;
    static constexpr int K0 = Cfg::K[0], K1 = Cfg::K[1], K2 = Cfg::K[2], HD = Cfg::HD;
    static constexpr bool on = K0 > 0 && K1 > 0 && K2 > 0 && K2 <= 14 && HD > 0 && HD % V == 0 && !Cfg::C[0] &&
                               !Cfg::C[1] && !Cfg::C[2];
    // columns per window row: K2, or for a masked group K2 + K2 / 2 (a border group holding all K2 / 2
    // clamped queries of its side and the shifted ones next to them), whose cells outside a lane's window
    // are masked
    static constexpr int NC = NC_;
    static constexpr bool masked = NC != K2;
    static constexpr int NC_BORDER = K2 + K2 / 2;
    static constexpr bool border_on = on && K2 / 2 > 0 && K2 / 2 < V && NC_BORDER <= 14;
    static constexpr int line = 64 / sizeof(T);
    // a tile of one lane group's width reads NC + V - 1 columns per union row
    static constexpr int RS = (NC + V - 1 + line - 1) / line * line;
    static constexpr int BS = HD * RS;
    static constexpr int CELLS = K0 * K1 * NC;  // (row, column) cells of a window
    static constexpr int KEYS = NC + V - 1;     // key positions a window row's lanes touch
    static constexpr int NR = NC > 7 ? 1 : 14 / NC;  // rows per score block (NR * NC <= 14 accumulators)
    static constexpr int NE = HD % 8 == 0 ? 8 : V;   // channels per dQ block
    static constexpr int DV = (HD / V) % 2 == 0 ? 2 : 1;  // vectors per key-grad block
    static constexpr int KB = DV == 2 ? 4 : 8;            // keys per key-grad block
};

// out[(r * NC + c) * V] = sum_d x[d * V] * b[r * BS + d * RS + c + lane] for NR window rows.
template <class F, int NR>
NATGEN_INLINE void fixed_dot_block(const typename F::T* __restrict x, const typename F::T* __restrict b,
                                   typename F::T* __restrict out) {
    typedef typename F::T T;
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = F::V, NC = F::NC;
    Vec acc[NR][NC];
    for (int r = 0; r < NR; ++r)
        for (int c = 0; c < NC; ++c) acc[r][c] = Vec{};
#pragma GCC unroll 4
    for (int d = 0; d < F::HD; ++d) {
        const Vec xv = load<T>(x + d * V);
        for (int r = 0; r < NR; ++r)
            for (int c = 0; c < NC; ++c) acc[r][c] += xv * load<T>(b + r * F::BS + d * F::RS + c);
    }
    for (int r = 0; r < NR; ++r)
        for (int c = 0; c < NC; ++c) store<T>(out + (r * NC + c) * V, acc[r][c]);
}

// Scores of every window cell: row_off[a0 * K1] is the first row of plane a0, its K1 rows follow at BS.
template <class F>
NATGEN_INLINE void fixed_dot(const typename F::T* x, const typename F::T* buf, const int64_t* row_off,
                             typename F::T* out) {
    constexpr int V = F::V;
    for (int a0 = 0; a0 < F::K0; ++a0) {
        const typename F::T* b = buf + row_off[a0 * F::K1];
        typename F::T* o = out + a0 * F::K1 * F::NC * V;
        int r = 0;
        for (; r + F::NR <= F::K1; r += F::NR) fixed_dot_block<F, F::NR>(x, b + r * F::BS, o + r * F::NC * V);
        for (; r < F::K1; ++r) fixed_dot_block<F, 1>(x, b + r * F::BS, o + r * F::NC * V);
    }
}

// out[e * V] = sum over cells of w[cell] * buf[row + e * RS + c + lane] for the NE channels at buf (dQ).
template <class F>
NATGEN_INLINE void fixed_acc(const typename F::T* w, const typename F::T* buf, const int64_t* row_off,
                             typename F::T* out) {
    typedef typename F::T T;
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = F::V, NE = F::NE;
    for (int e0 = 0; e0 < F::HD; e0 += NE) {
        Vec acc[NE];
        for (int e = 0; e < NE; ++e) acc[e] = Vec{};
        const T* wp = w;
        for (int a0 = 0; a0 < F::K0; ++a0) {
            const T* b = buf + row_off[a0 * F::K1] + e0 * F::RS;
            for (int r = 0; r < F::K1; ++r, b += F::BS, wp += F::NC * V) {
#pragma GCC unroll 16
                for (int c = 0; c < F::NC; ++c) {
                    const Vec wv = load<T>(wp + c * V);
                    for (int e = 0; e < NE; ++e) acc[e] += wv * load<T>(b + e * F::RS + c);
                }
            }
        }
        for (int e = 0; e < NE; ++e) store<T>(out + (e0 + e) * V, acc[e]);
    }
}

// Key grads of one window row, keys [T0, T0 + KB) and vectors [v0, v0 + DV) of HD: key t receives from
// lane j (column t - j) w[(t - j) * V + j] * x[j * HD + ...], summed in registers, added to o[t * HD].
template <class F, int T0, int KB>
NATGEN_INLINE void fixed_skew_block(const typename F::T* __restrict w, const typename F::T* __restrict x,
                                    typename F::T* __restrict o) {
    typedef typename F::T T;
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = F::V, DV = F::DV, HD = F::HD;
    Vec acc[KB][DV];
    for (int t = 0; t < KB; ++t)
        for (int v = 0; v < DV; ++v) acc[t][v] = load<T>(o + (T0 + t) * HD + v * V);
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) {
        if (T0 + KB - 1 - j < 0 || T0 - j >= F::NC) continue;
        Vec xv[DV];
        for (int v = 0; v < DV; ++v) xv[v] = load<T>(x + j * HD + v * V);
#pragma GCC unroll 16
        for (int t = 0; t < KB; ++t) {
            const int c = T0 + t - j;
            if (c < 0 || c >= F::NC) continue;
            const T wb = w[c * V + j];  // a scalar times a vector: one broadcast load
            for (int v = 0; v < DV; ++v) acc[t][v] += wb * xv[v];
        }
    }
    for (int t = 0; t < KB; ++t)
        for (int v = 0; v < DV; ++v) store<T>(o + (T0 + t) * HD + v * V, acc[t][v]);
}

template <class F, int T0>
NATGEN_INLINE void fixed_skew_keys(const typename F::T* w, const typename F::T* x, typename F::T* o) {
    if constexpr (T0 < F::KEYS) {
        constexpr int KB = F::KB < F::KEYS - T0 ? F::KB : F::KEYS - T0;
        fixed_skew_block<F, T0, KB>(w, x, o);
        fixed_skew_keys<F, T0 + KB>(w, x, o);
    }
}

// dst[(key_off[row] + t) * HD + ...] += sum over lanes: every window row's keys, every channel.
template <class F>
NATGEN_INLINE void fixed_skew(const typename F::T* w, const typename F::T* x, const int64_t* key_off,
                              typename F::T* dst) {
    typedef typename F::T T;
    constexpr int V = F::V;
    for (int a0 = 0; a0 < F::K0; ++a0)
        for (int r = 0; r < F::K1; ++r) {
            const int row = a0 * F::K1 + r;
            T* o = dst + key_off[a0 * F::K1] * F::HD + r * F::RS * F::HD;
            for (int v0 = 0; v0 < F::HD; v0 += F::DV * V) fixed_skew_keys<F, 0>(w + row * F::NC * V, x + v0, o + v0);
        }
}

// The backward's per-query tensors: q, dO, lse, out, the lse grad (may be null) and dQ.
template <typename T> NATGEN_INLINE std::tuple<const T*, const T*, const T*, const T*, const T*, T*> query_side(
    const Args& a) {
    return {reinterpret_cast<const T*>(a.q), reinterpret_cast<const T*>(a.grad_out),
            reinterpret_cast<const T*>(a.lse), reinterpret_cast<const T*>(a.out),
            reinterpret_cast<const T*>(a.grad_lse), reinterpret_cast<T*>(a.grad_q)};
}

// One lane group through the fixed-shape kernels (NATGEN_FIXED_TARGET: built once, for AVX2+FMA).

template <class Cfg, int NC>
NATGEN_FIXED_TARGET void fixed_group(const Plan& p, const LaneGroup<typename Cfg::T>& lg, Scratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef Fixed<Cfg, NC> F;
    constexpr int V = VecTraits<T>::width;
    constexpr int HD = F::HD;
    const Args& a = *p.a;
    const auto [q, dout, lse, out, grad_lse, dq] = query_side<T>(a);
    const T scale = static_cast<T>(a.scale);
    // q and dO rows side by side (the key grads' operands), then as lanes
    T* xq = s.xr.data();
    T* xo = xq + V * HD;
    const T* qr[V];
    const T* dor[V];
    T* dqr[V];
    for (int j = 0; j < V; ++j) {
        std::memcpy(xq + j * HD, q + lg.qrow[j] * HD, HD * sizeof(T));
        std::memcpy(xo + j * HD, dout + lg.qrow[j] * HD, HD * sizeof(T));
        qr[j] = xq + j * HD;
        dor[j] = xo + j * HD;
        dqr[j] = j < lg.lanes ? dq + lg.qrow[j] * HD : s.sink.data();  // (absent lanes: masked, see below)
    }
    {  // one call site (compile time)
        const T* const* rows[2] = {qr, dor};
        T* lanes[2] = {s.qt.data(), s.dot.data()};
        for (int pass = 0; pass < 2; ++pass) rows_to_lanes<T>(rows[pass], HD, lanes[pass], V);
    }
    scale_lanes<T>(s.qt.data(), HD, scale);
    {  // S = (scale q).k, dP = dO.v
        const T* xs[2] = {s.qt.data(), s.dot.data()};
        const T* bufs[2] = {s.kt.data(), s.vt.data()};
        T* outs[2] = {s.sc.data(), s.dp.data()};
        for (int pass = 0; pass < 2; ++pass) fixed_dot<F>(xs[pass], bufs[pass], s.row_off.data(), outs[pass]);
    }
    T* sc = s.sc.data();
    T* pr = s.pr.data();
    T* ds = s.dp.data();
    // P; in a masked group exactly 0 outside each lane's window (lanes past the group's end have no cell, so
    // their P and dS are 0 and they add nothing to the key grads)
    const char* colmask = s.colmask.data();
    constexpr int ROWS = F::K0 * F::K1;
    Vec shift;
    if (lse) {
        for (int j = 0; j < V; ++j) shift[j] = lse[lg.qrow[j]];
    } else {
        const T lowest = -std::numeric_limits<T>::infinity();
        shift = Vec{} + lowest;
        for (int r = 0; r < ROWS; ++r)
            for (int c = 0; c < NC; ++c) {
                Vec x = load<T>(sc + (r * NC + c) * V);
                if constexpr (F::masked) x = column_mask<T>(colmask, c) ? x : Vec{} + lowest;
                shift = x > shift ? x : shift;
            }
        shift = shift == lowest ? Vec{} : shift;
    }
    Vec sum = Vec{};
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < NC; ++c) {
            const int i = (r * NC + c) * V;
            Vec e = exp_vec(load<T>(sc + i) - shift);
            if constexpr (F::masked) e = column_mask<T>(colmask, c) ? e : Vec{};
            store<T>(pr + i, e);
            sum += e;
        }
    if (!lse) {
        const Vec inv = sum > T(0) ? T(1) / sum : Vec{};
        for (int i = 0; i < F::CELLS; ++i) store<T>(pr + i * V, load<T>(pr + i * V) * inv);
    }
    Vec di;  // rowsum(dO * O), from the rows
    for (int j = 0; j < V; ++j) {
        const T* o = out + lg.qrow[j] * HD;
        Vec a = load<T>(xo + j * HD) * load<T>(o);
        for (int e = V; e < HD; e += V) a += load<T>(xo + j * HD + e) * load<T>(o + e);
        T sum = 0;
        for (int i = 0; i < V; ++i) sum += a[i];
        di[j] = sum;
    }
    if (grad_lse)
        for (int j = 0; j < V; ++j) di[j] -= grad_lse[lg.qrow[j]];
    // dS, scaled: dQ = dS.k and dK = dS^T q need no further scaling
    for (int i = 0; i < F::CELLS; ++i)
        store<T>(ds + i * V, load<T>(pr + i * V) * (load<T>(ds + i * V) - di) * scale);
    fixed_acc<F>(ds, s.kt.data(), s.row_off.data(), s.ot.data());
    lanes_to_rows<T>(s.ot.data(), p.hd, dqr);  // (p.hd == HD; a constant count draws a false warning)
    {  // dK += dS^T q, dV += P^T dO
        const T* ws[2] = {ds, pr};
        const T* xs[2] = {xq, xo};
        T* dsts[2] = {s.dkr.data(), s.dvr.data()};
        for (int pass = 0; pass < 2; ++pass) fixed_skew<F>(ws[pass], xs[pass], s.key_off.data(), dsts[pass]);
    }
}

// (The query loop below repeats forward_tile's on purpose: a shared helper taking a lambda would move the
// loop body into the lambda, which target_clones does not clone, so it would run the baseline ISA;
// measured 7x slower on cpu-2d.)
//
// One backward unit = one (batch, head, dilation-group combination): it owns every key its queries can see,
// so dK/dV accumulate without races; its tiles run in order.
template <class Cfg> NATGEN_INLINE void backward_tile(const Plan& p, const TileRef& t, Scratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    const Args& a = *p.a;
    const auto [q, dout, lse, out, grad_lse, dq] = query_side<T>(a);
    T* dk = reinterpret_cast<T*>(a.grad_k);
    T* dv = reinterpret_cast<T*>(a.grad_v);
    const TileGeometry g = tile_geometry<Cfg>(p, t);
    gather<T>(p, t, g, reinterpret_cast<const T*>(a.k), reinterpret_cast<const T*>(a.extra_k), p.hd, s.kt.data(),
              s.ekt.data(), s.zeros.data());
    gather<T>(p, t, g, reinterpret_cast<const T*>(a.v), reinterpret_cast<const T*>(a.extra_v), p.hdv, s.vt.data(),
              s.evt.data(), s.zeros.data());
    // (the key-grad buffers are all zero here: zeroed once, and the flush below zeroes what it read)
    const T scale = static_cast<T>(a.scale);
    int64_t lo[3], hi[3];
    for (int d = 0; d < 3; ++d) {
        lo[d] = int64_t(t.tile[d]) * p.tile[d];
        hi[d] = std::min(lo[d] + p.tile[d], t.ax[d]->length);
    }
    for (int64_t l0 = lo[0]; l0 < hi[0]; ++l0)
    for (int64_t l1 = lo[1]; l1 < hi[1]; ++l1)
    for (int64_t l2 = lo[2]; l2 < hi[2]; l2 += V) {
        const LaneGroup<T> lg = lane_group<Cfg>(p, t, g, l0, l1, l2, hi[2], s);
        if constexpr (Fixed<Cfg>::on) {
            typedef Fixed<Cfg> F;
            typedef Fixed<Cfg, F::NC_BORDER> FB;
            if (lg.rows == F::K0 * F::K1 && p.n_extra == 0 && p.hd == Cfg::HD && p.hdv == Cfg::HD && NATGEN_FIXED_ISA()) {
                if (lg.uniform && lg.lanes == V && lg.cols == F::NC && g.rs == F::RS) {
                    fixed_group<Cfg, F::NC>(p, lg, s);
                    continue;
                }
                if constexpr (F::border_on) {
                    if (!lg.uniform && lg.cols == FB::NC && g.rs == FB::RS) {
                        fixed_group<Cfg, FB::NC>(p, lg, s);
                        continue;
                    }
                }
            }
        }
        const T* qr[V];
        const T* dor[V];
        T* dqr[V];
        for (int j = 0; j < V; ++j) {
            const bool real = j < lg.lanes;
            qr[j] = real ? q + lg.qrow[j] * p.hd : s.zeros.data();
            dor[j] = real ? dout + lg.qrow[j] * p.hdv : s.zeros.data();
            dqr[j] = real ? dq + lg.qrow[j] * p.hd : s.sink.data();
        }
        rows_to_lanes<T>(qr, p.hd, s.qt.data(), V);
        scale_lanes<T>(s.qt.data(), p.hd, scale);
        rows_to_lanes<T>(dor, p.hdv, s.dot.data(), V);
        // scores S = (scale q).k and dP = dO.v: one call site in a loop (each inlined call site is a copy of
        // every column-block variant, and compile time)
        {
            const T* xs[2] = {s.qt.data(), s.dot.data()};
            const T* bufs[2] = {s.kt.data(), s.vt.data()};
            const T* ebufs[2] = {s.ekt.data(), s.evt.data()};
            T* outs[2] = {s.sc.data(), s.dp.data()};
            const int64_t dims[2] = {p.hd, p.hdv};
            for (int pass = 0; pass < 2; ++pass)
                lane_dot<T, Cfg::HD>(xs[pass], bufs[pass], g.rs, s.row_off.data(), lg.rows, lg.cols, ebufs[pass],
                                     p.n_extra, dims[pass], outs[pass]);
        }
        T* pr = s.pr.data();
        const int64_t nvec = lg.rows * lg.cols + p.n_extra;
        // P from the saved log-sum-exp; without one (fp64 compute) from the recomputed scores, renormalized
        Vec shift = Vec{};
        if (lse)
            for (int j = 0; j < lg.lanes; ++j) shift[j] = lse[lg.qrow[j]];
        else
            shift = lane_max<T>(s.sc.data(), lg, s.colmask.data(), p.n_extra);
        const Vec sum = lane_exp<T>(s.sc.data(), lg, s.colmask.data(), p.n_extra, shift, pr);
        if (!lse) {
            const Vec inv = T(1) / sum;
            for (int64_t i = 0; i < nvec; ++i) store<T>(pr + i * V, load<T>(pr + i * V) * inv);
        }
        // D_i = rowsum(dO * O); a cotangent on lse adds P_j * dlse_i to dS_j, i.e. subtracts dlse_i from D_i
        const T* orr[V];
        for (int j = 0; j < V; ++j) orr[j] = j < lg.lanes ? out + lg.qrow[j] * p.hdv : s.zeros.data();
        rows_to_lanes<T>(orr, p.hdv, s.ot.data(), V);
        Vec di = Vec{};
        for (int64_t e = 0; e < p.hdv; ++e) di += load<T>(s.dot.data() + e * V) * load<T>(s.ot.data() + e * V);
        if (grad_lse)
            for (int j = 0; j < lg.lanes; ++j) di[j] -= grad_lse[lg.qrow[j]];
        T* ds = s.dp.data();
        for (int64_t i = 0; i < nvec; ++i) store<T>(ds + i * V, load<T>(pr + i * V) * (load<T>(ds + i * V) - di));
        lane_acc<T>(ds, s.kt.data(), g.rs, s.row_off.data(), lg.rows, lg.cols, s.ekt.data(), p.n_extra, p.hd,
                    s.ot.data());
        scale_lanes<T>(s.ot.data(), p.hd, scale);
        lanes_to_rows<T>(s.ot.data(), p.hd, dqr);
        {  // dK += scale dS^T q, dV += P^T dO (one call site, as above)
            const T* ws[2] = {ds, pr};
            const T* const* xs[2] = {qr, dor};
            const T alphas[2] = {scale, T(1)};
            T* dsts[2] = {s.dkr.data(), s.dvr.data()};
            const int64_t dims[2] = {p.hd, p.hdv};
            for (int pass = 0; pass < 2; ++pass)
                skew_acc<T>(ws[pass], xs[pass], lg.lanes, s.key_off.data(), lg.rows, lg.cols, g.keys, p.n_extra,
                            alphas[pass], dsts[pass], dims[pass]);
        }
    }
    // flush the tile's key grads (tiles of one unit overlap, so this adds) and zero every position the tile
    // wrote, for the next tile; a union row's keys are one run of columns
    const int64_t heads = a.heads, base = t.b * p.tokens * heads;
    const int64_t hd = Cfg::HD ? Cfg::HD : p.hd, hdv = Cfg::HD ? Cfg::HD : p.hdv;
    const int64_t u_lo = g.lpad, u_hi = g.lpad + std::min(g.extent[2], t.ax[2]->length - g.lo[2]);
    const int64_t kstride = a.dilation[2] * heads;
    for (int64_t ur = 0; ur < g.nrows; ++ur) {
        int64_t token;
        T* sk = s.dkr.data() + ur * g.rs * hd;
        T* sv = s.dvr.data() + ur * g.rs * hdv;
        if (union_row_token(a, t, g, ur, token)) {
            const int64_t row0 = base + (token + g.lo[2] * a.dilation[2]) * heads + t.h - g.lpad * kstride;
            for (int64_t u2 = u_lo; u2 < u_hi; ++u2) {
                const int64_t row = row0 + u2 * kstride;
                T* dkr = dk + row * hd;
                T* dvr = dv + row * hdv;
                const T* k2 = sk + u2 * hd;
                const T* v2 = sv + u2 * hdv;
                for (int64_t d = 0; d < hd; ++d) dkr[d] += k2[d];
                for (int64_t d = 0; d < hdv; ++d) dvr[d] += v2[d];
            }
        }
        std::memset(sk, 0, g.row_len * hd * sizeof(T));
        std::memset(sv, 0, g.row_len * hdv * sizeof(T));
    }
    for (int64_t e = 0; e < p.n_extra; ++e) {
        T* ek = s.extra_grads.data() + e * (p.hd + p.hdv);
        T* sk = s.dkr.data() + (g.keys + e) * p.hd;
        T* sv = s.dvr.data() + (g.keys + e) * p.hdv;
        for (int64_t d = 0; d < p.hd; ++d) ek[d] += sk[d];
        for (int64_t d = 0; d < p.hdv; ++d) ek[p.hd + d] += sv[d];
        std::memset(sk, 0, p.hd * sizeof(T));
        std::memset(sv, 0, p.hdv * sizeof(T));
    }
}

// ------------------------------------------------------------------------------------- drivers
template <typename T> using UnitFn = void (*)(const Plan&, int64_t, Scratch<T>&);

inline int64_t items_count(const Plan& p) {
    return int64_t(p.items[0].size()) * p.items[1].size() * p.items[2].size();
}

// forward units: (batch, head, tile of every axis); each writes only its own queries
template <class Cfg> NATGEN_INLINE void forward_unit(const Plan& p, int64_t unit, Scratch<typename Cfg::T>& s) {
    TileRef t;
    const int64_t n2 = p.items[2].size(), n1 = p.items[1].size(), n0 = p.items[0].size();
    int64_t r = unit;
    const auto& i2 = p.items[2][r % n2]; r /= n2;
    const auto& i1 = p.items[1][r % n1]; r /= n1;
    const auto& i0 = p.items[0][r % n0]; r /= n0;
    t.h = r % p.a->heads;
    t.b = r / p.a->heads;
    const std::pair<int, int>* items[3] = {&i0, &i1, &i2};
    for (int d = 0; d < 3; ++d) {
        t.ax[d] = &p.axes[d][items[d]->first];
        t.tile[d] = items[d]->second;
    }
    fwd::forward_tile<Cfg>(p, t, s.fwd);
}

// backward units: (batch, head, group of every axis), tiles in order
template <class Cfg> NATGEN_INLINE void backward_unit(const Plan& p, int64_t unit, Scratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    TileRef t;
    const int64_t n2 = p.axes[2].size(), n1 = p.axes[1].size(), n0 = p.axes[0].size();
    int64_t r = unit;
    t.ax[2] = &p.axes[2][r % n2]; r /= n2;
    t.ax[1] = &p.axes[1][r % n1]; r /= n1;
    t.ax[0] = &p.axes[0][r % n0]; r /= n0;
    t.h = r % p.a->heads;
    t.b = r / p.a->heads;
    // this unit owns the key grads of its group combination: zero them here (torch.empty on the Python
    // side), inside the parallel region instead of in a separate pass
    const Args& a = *p.a;
    T* dk = reinterpret_cast<T*>(a.grad_k);
    T* dv = reinterpret_cast<T*>(a.grad_v);
    for (int64_t l0 = 0; l0 < t.ax[0]->length; ++l0)
    for (int64_t l1 = 0; l1 < t.ax[1]->length; ++l1)
    for (int64_t l2 = 0; l2 < t.ax[2]->length; ++l2) {
        const int64_t token = ((l0 * a.dilation[0] + t.ax[0]->group) * a.length[1] + l1 * a.dilation[1] +
                               t.ax[1]->group) * a.length[2] + l2 * a.dilation[2] + t.ax[2]->group;
        const int64_t row = (t.b * p.tokens + token) * a.heads + t.h;
        std::fill(dk + row * p.hd, dk + (row + 1) * p.hd, T(0));
        std::fill(dv + row * p.hdv, dv + (row + 1) * p.hdv, T(0));
    }
    for (t.tile[0] = 0; t.tile[0] < int(t.ax[0]->tile_lo.size()); ++t.tile[0])
    for (t.tile[1] = 0; t.tile[1] < int(t.ax[1]->tile_lo.size()); ++t.tile[1])
    for (t.tile[2] = 0; t.tile[2] < int(t.ax[2]->tile_lo.size()); ++t.tile[2])
        backward_tile<Cfg>(p, t, s);
}

// Runs body(worker, unit) for unit in [0, units) on `threads` OpenMP threads, handing out units one at a
// time. OpenMP on purpose: torch's CPU build loads its own libgomp.so.1 first, so this module's
// `omp parallel` reuses torch's worker pool. A private pool (std::thread) would compete with torch's workers,
// which keep spinning for a while after every torch op: measured on cpu-2d, 1.9 ms right after an SDPA call
// with std::thread vs 0.89 ms with OpenMP (1.11 ms vs 0.90 ms when called in isolation).
template <class Body> void parallel_units(int64_t threads, int64_t units, Body body) {
    const int64_t workers = std::max<int64_t>(1, std::min(threads, units));
    std::atomic<int64_t> next{0};
    auto work = [&](int64_t worker) {
        for (int64_t unit = next.fetch_add(1); unit < units; unit = next.fetch_add(1)) body(worker, unit);
    };
#pragma omp parallel num_threads(workers)
    work(omp_get_thread_num());
}

template <class Cfg> void run_forward(const Args& a, UnitFn<typename Cfg::T> fn) {
    typedef typename Cfg::T T;
    const Plan p = make_plan<Cfg>(a, true);
    const int64_t units = a.batch * a.heads * items_count(p);
    const int64_t workers = std::max<int64_t>(1, std::min(a.threads, units));
    parallel_units(workers, units, [&](int64_t, int64_t unit) {
        // per pool thread, kept between calls: sizing (and zeroing) it on every call cost ~10 us a call on
        // 2 threads. A buffer's stale contents are what an earlier tile of the same call would have left.
        static thread_local Scratch<T> scratch;
        scratch.reserve(p, false);
        fn(p, unit, scratch);
    });
}

template <class Cfg> void run_backward(const Args& a, UnitFn<typename Cfg::T> fn) {
    typedef typename Cfg::T T;
    const Plan p = make_plan<Cfg>(a, false);
    const int64_t groups = int64_t(p.axes[0].size()) * p.axes[1].size() * p.axes[2].size();
    const int64_t units = a.batch * a.heads * groups;
    const int64_t extra_row = p.hd + p.hdv;
    std::vector<T> extra(p.n_extra ? units * p.n_extra * extra_row : 0, T(0));
    const int64_t workers = std::max<int64_t>(1, std::min(a.threads, units));
    std::vector<Scratch<T>> scratch(workers);
    std::vector<char> ready(workers, 0);
    parallel_units(workers, units, [&](int64_t worker, int64_t unit) {
        Scratch<T>& s = scratch[worker];
        if (!ready[worker]) { s.reserve(p, true); ready[worker] = 1; }
        s.extra_grads.assign(p.n_extra * extra_row, T(0));
        fn(p, unit, s);
        if (p.n_extra)
            std::copy(s.extra_grads.begin(), s.extra_grads.end(), extra.begin() + unit * p.n_extra * extra_row);
    });
    if (!p.n_extra) return;
    T* dek = reinterpret_cast<T*>(a.grad_extra_k);
    T* dev = reinterpret_cast<T*>(a.grad_extra_v);
    std::fill(dek, dek + a.batch * p.n_extra * a.heads * p.hd, T(0));
    std::fill(dev, dev + a.batch * p.n_extra * a.heads * p.hdv, T(0));
    for (int64_t unit = 0; unit < units; ++unit) {
        const int64_t bh = unit / groups, b = bh / a.heads, h = bh % a.heads;
        const T* src = extra.data() + unit * p.n_extra * extra_row;
        for (int64_t e = 0; e < p.n_extra; ++e) {
            T* kr = dek + ((b * p.n_extra + e) * a.heads + h) * p.hd;
            T* vr = dev + ((b * p.n_extra + e) * a.heads + h) * p.hdv;
            for (int64_t d = 0; d < p.hd; ++d) kr[d] += src[e * extra_row + d];
            for (int64_t d = 0; d < p.hdv; ++d) vr[d] += src[e * extra_row + p.hd + d];
        }
    }
}

}  // namespace natgen
