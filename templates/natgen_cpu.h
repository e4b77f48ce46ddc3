// natgen CPU kernels: the shared C++ body that every generated CPU instance instantiates.
//
// A generated instance (templates/cpu_na.cpp.j2) fixes the compile-time facts of its spec (element type,
// kernel size, head_dim, per-dim causal mask, query tile) through `Config` and wraps the per-unit work in a
// function built for several ISAs (target_clones: AVX-512, AVX2+FMA, baseline x86-64), chosen at load time
// from the CPU's features. Everything the kernels read arrives through one `Args` block of 8-byte fields
// (the Python side packs the same fields in the same order into an int64 tensor); the entry point is one
// extern "C" function named after the spec, taking that block, which ctypes calls with the GIL released.
//
// Work decomposition. Dilation splits every axis into interleaved groups that never see each other, so a
// query tile is a box of group-LOCAL coordinates inside one group combination; its keys are then a dense
// box too (the union of the tile's windows). That union is gathered once per tile into contiguous buffers:
// keys transposed ([head_dim][union]) so a query's scores are vector FMAs over runs of neighbouring keys
// ("segments": up to V keys that are adjacent along the last axis), values row-major ([union][head_dim]) so
// P.V is a broadcast-FMA per key. Extra tokens are appended to the same buffers after the window union, so
// they are just more segments inside the same softmax. prod(K) is small, so each query computes all its
// scores, then one max/exp pass (no online rescaling).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <omp.h>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NATGEN_NO_CLONES)
#define NATGEN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NATGEN_CLONES
#endif
#define NATGEN_INLINE inline __attribute__((always_inline))
#define NATGEN_EXPORT __attribute__((visibility("default")))

namespace natgen {

// Field order is a contract with runtime/cpu.py (ARG_FIELDS); tests/test_cpu_codegen.py checks it.
struct Args {
    int64_t q, k, v, out, lse, extra_k, extra_v;
    int64_t grad_out, grad_lse, grad_q, grad_k, grad_v, grad_extra_k, grad_extra_v;
    int64_t batch, heads, head_dim, head_dim_v, n_extra, threads;
    int64_t length[3], kernel[3], stride[3], dilation[3], causal[3];
    double scale;
};

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

template <typename T> NATGEN_INLINE typename VecTraits<T>::type load(const T* p) {
    typename VecTraits<T>::type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
template <typename T> NATGEN_INLINE void store(T* p, typename VecTraits<T>::type v) {
    std::memcpy(p, &v, sizeof(v));
}
// lanes [0, n) of a vector: all-ones in the lanes of a real key, 0 in padding lanes. Built in registers
// (per-lane 0/1 floats written by scalar stores and reloaded as one vector stalled on store forwarding).
template <typename T> NATGEN_INLINE typename VecTraits<T>::itype lane_mask(int n) {
    typedef typename VecTraits<T>::itype IVec;
    IVec iota;
    for (int i = 0; i < VecTraits<T>::width; ++i) iota[i] = i;
    return iota < (IVec{} + n);
}
template <typename T> NATGEN_INLINE T hsum(typename VecTraits<T>::type v) {
    T s = 0;
    for (int i = 0; i < VecTraits<T>::width; ++i) s += v[i];
    return s;
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

// Per axis, per dilation group: every query's window and every tile's key union (group-local coordinates).
struct AxisGroup {
    int64_t group, length;
    std::vector<int64_t> start, end;         // per local query
    std::vector<int64_t> tile_lo, tile_hi;   // per tile: key union [lo, hi) (hi may pass `length`: zeros)
};

struct Plan {
    const Args* a;
    int64_t K[3], tile[3], tokens, hd, hdv, hdv_padded, n_extra, extra_padded, chunks;
    std::vector<AxisGroup> axes[3];
    std::vector<std::pair<int, int>> items[3];  // (group index, tile index) per axis
    int64_t max_union[3];
    int64_t union_capacity;  // elements per head_dim row of the gather buffers (window union + extras)
    int64_t max_segments;
};

template <class Cfg> Plan make_plan(const Args& a) {
    typedef typename Cfg::T T;
    constexpr int V = VecTraits<T>::width;
    Plan p;
    p.a = &a;
    p.tokens = a.length[0] * a.length[1] * a.length[2];
    p.hd = a.head_dim;
    p.hdv = a.head_dim_v;
    p.hdv_padded = (p.hdv + V - 1) / V * V;
    p.n_extra = a.n_extra;
    p.extra_padded = (a.n_extra + V - 1) / V * V;
    for (int d = 0; d < 3; ++d) {
        p.K[d] = Cfg::K[d] ? Cfg::K[d] : a.kernel[d];
        p.tile[d] = std::min<int64_t>(Cfg::TILE[d], a.length[d]);
        p.max_union[d] = 1;
        for (int64_t g = 0; g < std::min(a.dilation[d], a.length[d]); ++g) {
            AxisGroup ax;
            ax.group = g;
            ax.length = a.length[d] / a.dilation[d] + (g < a.length[d] % a.dilation[d] ? 1 : 0);
            ax.start.resize(ax.length);
            ax.end.resize(ax.length);
            for (int64_t i = 0; i < ax.length; ++i)
                window_1d(i, ax.length, p.K[d], a.stride[d], Cfg::C[d], ax.start[i], ax.end[i]);
            for (int64_t t0 = 0; t0 < ax.length; t0 += p.tile[d]) {
                int64_t lo = ax.start[t0], hi = 0;
                for (int64_t i = t0; i < std::min(t0 + p.tile[d], ax.length); ++i) {
                    lo = std::min(lo, ax.start[i]);
                    hi = std::max(hi, ax.start[i] + p.K[d]);
                }
                p.items[d].emplace_back(static_cast<int>(p.axes[d].size()), static_cast<int>(ax.tile_lo.size()));
                ax.tile_lo.push_back(lo);
                ax.tile_hi.push_back(hi);
                p.max_union[d] = std::max(p.max_union[d], hi - lo);
            }
            p.axes[d].push_back(std::move(ax));
        }
    }
    p.chunks = (p.K[2] + V - 1) / V;
    const int64_t last = p.max_union[2] + p.chunks * V - p.K[2];
    p.union_capacity = p.max_union[0] * p.max_union[1] * last + p.extra_padded;
    p.max_segments = p.K[0] * p.K[1] * p.chunks + p.extra_padded / V;
    return p;
}

// Thread-private buffers, sized once per thread for the largest tile.
template <typename T> struct Scratch {
    std::vector<T> kt, vt, vu, dkt, dvt, q, dout, scores, probs, dprobs, acc;
    std::vector<int> bases;
    std::vector<int> valid;  // per segment: its real keys (lanes [0, n)); the rest are padding
    std::vector<T> zeros;
    std::vector<const T*> rows;
    std::vector<T> extra_grads;  // backward: this unit's extra-token grads [n_extra][hd + hdv]
    void reserve(const Plan& p, bool backward) {
        const int64_t n = p.union_capacity;
        kt.assign(p.hd * n, T(0));
        if (backward) {
            vt.assign(p.hdv * n, T(0));
            dkt.assign(p.hd * n, T(0));
            dvt.assign(p.hdv * n, T(0));
        } else {
            vu.assign(p.hdv_padded * n, T(0));
        }
        constexpr int V = VecTraits<T>::width;
        q.assign(p.hd + V, T(0));
        dout.assign(p.hdv_padded + V, T(0));
        acc.assign(p.hdv_padded + V, T(0));
        scores.assign(p.max_segments * V, T(0));
        probs.assign(p.max_segments * V, T(0));
        dprobs.assign(p.max_segments * V, T(0));
        valid.assign(p.max_segments, 0);
        bases.assign(p.max_segments, 0);
        zeros.assign(std::max(p.hd, p.hdv_padded), T(0));
        rows.assign(n, nullptr);
    }
};

// ------------------------------------------------------------------------------------- inner loops
// out[s][0..V) = sum_d x[d] * buf[d*stride + bases[s] + 0..V): NB segments' scores kept in registers.
template <typename T, int NB, int HD>
NATGEN_INLINE void dot_block(const T* __restrict buf, int64_t stride, const int* __restrict bases,
                             const T* __restrict x, int64_t n, T* __restrict out) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    Vec acc[NB];
    for (int s = 0; s < NB; ++s) acc[s] = Vec{} ;
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
            if (wl == T(0)) continue;  // masked lanes and padding
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
    for (int64_t j = 0; j < nvec; j += 8) {
        T* o = out + j * V;
        const T* r = rows + j * V;
        switch (std::min<int64_t>(8, nvec - j)) {
            case 1: weighted_rows_block<T, 1>(r, ld, bases, nseg, w, o); break;
            case 2: weighted_rows_block<T, 2>(r, ld, bases, nseg, w, o); break;
            case 3: weighted_rows_block<T, 3>(r, ld, bases, nseg, w, o); break;
            case 4: weighted_rows_block<T, 4>(r, ld, bases, nseg, w, o); break;
            case 5: weighted_rows_block<T, 5>(r, ld, bases, nseg, w, o); break;
            case 6: weighted_rows_block<T, 6>(r, ld, bases, nseg, w, o); break;
            case 7: weighted_rows_block<T, 7>(r, ld, bases, nseg, w, o); break;
            default: weighted_rows_block<T, 8>(r, ld, bases, nseg, w, o); break;
        }
    }
}

// out[d] = alpha * sum_s <w[s], buf[d*stride + bases[s] ..]>: dQ from transposed keys.
template <typename T, int HD>
NATGEN_INLINE void contract_segments(const T* __restrict buf, int64_t stride, const int* __restrict bases, int nseg,
                                     const T* __restrict w, int64_t n, T alpha, T* __restrict out) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    const int64_t count = HD ? HD : n;
    int64_t d = 0;
    for (; d + 4 <= count; d += 4) {
        Vec acc[4] = {Vec{}, Vec{}, Vec{}, Vec{}};
        for (int s = 0; s < nseg; ++s) {
            const Vec ws = load<T>(w + s * V);
            for (int j = 0; j < 4; ++j) acc[j] += ws * load<T>(buf + (d + j) * stride + bases[s]);
        }
        for (int j = 0; j < 4; ++j) out[d + j] = alpha * hsum<T>(acc[j]);
    }
    for (; d < count; ++d) {
        Vec acc = Vec{};
        for (int s = 0; s < nseg; ++s) acc += load<T>(w + s * V) * load<T>(buf + d * stride + bases[s]);
        out[d] = alpha * hsum<T>(acc);
    }
}

// buf[d*stride + bases[s] + l] += alpha * x[d] * w[s][l]: dK and dV into the transposed tile accumulators.
template <typename T, int HD>
NATGEN_INLINE void scatter_segments(T* __restrict buf, int64_t stride, const int* __restrict bases, int nseg,
                                    const T* __restrict w, const T* __restrict x, int64_t n, T alpha) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    const int64_t count = HD ? HD : n;
    for (int s0 = 0; s0 < nseg; s0 += 8) {
        const int nb = std::min(8, nseg - s0);
        Vec ws[8];
        for (int s = 0; s < nb; ++s) ws[s] = load<T>(w + (s0 + s) * V);
        for (int64_t d = 0; d < count; ++d) {
            const T xd = alpha * x[d];
            T* row = buf + d * stride;
            for (int s = 0; s < nb; ++s) {
                T* p = row + bases[s0 + s];
                store<T>(p, load<T>(p) + xd * ws[s]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------- tiles
struct TileRef {
    int64_t b, h;
    const AxisGroup* ax[3];
    int tile[3];
};

struct TileGeometry {
    int64_t lo[3], extent[3], row_len, window_elems, total;
};

template <class Cfg> NATGEN_INLINE TileGeometry tile_geometry(const Plan& p, const TileRef& t) {
    constexpr int V = VecTraits<typename Cfg::T>::width;
    TileGeometry g;
    for (int d = 0; d < 3; ++d) {
        g.lo[d] = t.ax[d]->tile_lo[t.tile[d]];
        g.extent[d] = t.ax[d]->tile_hi[t.tile[d]] - g.lo[d];
    }
    // the last axis gets room for a full vector past any window's end (those lanes are masked)
    g.row_len = g.extent[2] + p.chunks * V - p.K[2];
    g.window_elems = g.extent[0] * g.extent[1] * g.row_len;
    g.total = g.window_elems + p.extra_padded;
    return g;
}

// dst[j*ld + l] = r[l][d + j] for an 8x8 float block.
NATGEN_INLINE void transpose8x8(const float* const* r, int64_t d, float* dst, int64_t ld) {
    typedef VecTraits<float>::type Vec;
    typedef VecTraits<float>::itype IVec;
    Vec x[8], y[8];
    for (int l = 0; l < 8; ++l) x[l] = load<float>(r[l] + d);
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
        store<float>(dst + j * ld, __builtin_shuffle(a, b, IVec{0, 1, 2, 3, 8, 9, 10, 11}));
        store<float>(dst + (j + 4) * ld, __builtin_shuffle(a, b, IVec{4, 5, 6, 7, 12, 13, 14, 15}));
    }
}

// Gathers the tile's key union (+ extra tokens) from [batch, tokens, heads, dim] into `dst`, either
// transposed (dst[d*ld + u]) or row-major (dst[u*ld + d], rows padded with zeros to `padded_dim`).
// Positions outside the axis (window slack, vector padding) read a zero row.
template <typename T>
NATGEN_INLINE void gather(const Plan& p, const TileRef& t, const TileGeometry& g, const T* src, const T* extra,
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
                const int64_t token = (x0 * a.length[1] + x1) * a.length[2] + x2;
                rows[u] = src + (base + token * heads + t.h) * dim;
            }
        }
    }
    for (int64_t e = 0; e < p.extra_padded; ++e, ++u)
        rows[u] = e < p.n_extra ? extra + ((t.b * p.n_extra + e) * heads + t.h) * dim : zeros;
    const int64_t n = u;
    if (transposed) {
        // blocks of 8 keys: 8 reads from rows already in L1, one contiguous 8-wide store per channel
        int64_t u8 = 0;
        for (; u8 + 8 <= n; u8 += 8) {
            const T* r[8];
            for (int l = 0; l < 8; ++l) r[l] = rows[u8 + l];
            int64_t d = 0;
            if constexpr (sizeof(T) == 4)  // 8x8 blocks transposed in registers (3 shuffle stages)
                for (; d + 8 <= dim; d += 8) transpose8x8(r, d, dst + d * ld + u8, ld);
            for (; d < dim; ++d) {
                T* out = dst + d * ld + u8;
                for (int l = 0; l < 8; ++l) out[l] = r[l][d];
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
// valid[segment] counts its real keys (lanes [0, valid)); the other lanes are padding, never part of the softmax.
template <class Cfg>
NATGEN_INLINE int query_segments(const Plan& p, const TileRef& t, const TileGeometry& g, const int64_t* local,
                                 int* bases, int* valid) {
    typedef typename Cfg::T T;
    constexpr int V = VecTraits<T>::width;
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
NATGEN_INLINE VecTraits<double>::type exp_vec(VecTraits<double>::type x) {
    for (int i = 0; i < VecTraits<double>::width; ++i) x[i] = std::exp(x[i]);
    return x;
}

// probs[slot] = exp(scores[slot] * scale - shift) on valid slots, exactly 0 on padding lanes.
template <typename T>
NATGEN_INLINE void exp_slots(const T* __restrict scores, const int* __restrict valid, int nseg, T scale, T shift,
                             T* __restrict probs) {
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    for (int s = 0; s < nseg; ++s) {
        const Vec e = exp_vec(load<T>(scores + s * V) * scale - shift);
        store<T>(probs + s * V, lane_mask<T>(valid[s]) ? e : Vec{});
    }
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
    exp_slots<T>(scores, valid, nseg, scale, row_max, probs);
    Vec vsum = Vec{};
    for (int s = 0; s < nseg; ++s) vsum += load<T>(probs + s * V);
    m = row_max;
    l = hsum<T>(vsum);
}

template <class Cfg> NATGEN_INLINE void forward_tile(const Plan& p, const TileRef& t, Scratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    constexpr int V = VecTraits<T>::width;
    const Args& a = *p.a;
    const T* q = reinterpret_cast<const T*>(a.q);
    T* out = reinterpret_cast<T*>(a.out);
    T* lse = reinterpret_cast<T*>(a.lse);
    const TileGeometry g = tile_geometry<Cfg>(p, t);
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
        const int64_t nvec = p.hdv_padded / V;
        weighted_rows<T>(s.vu.data(), p.hdv_padded, s.bases.data(), nseg, s.probs.data(), nvec, s.acc.data());
        const T inv = T(1) / l;
        T* o = out + row * p.hdv;
        for (int64_t d = 0; d < p.hdv; ++d) o[d] = s.acc[d] * inv;
        if (lse) lse[row] = m + std::log(l);
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
    constexpr int V = VecTraits<T>::width;
    const Args& a = *p.a;
    const T* q = reinterpret_cast<const T*>(a.q);
    const T* dout = reinterpret_cast<const T*>(a.grad_out);
    const T* lse = reinterpret_cast<const T*>(a.lse);
    const T* out = reinterpret_cast<const T*>(a.out);
    const T* grad_lse = reinterpret_cast<const T*>(a.grad_lse);
    T* dq = reinterpret_cast<T*>(a.grad_q);
    T* dk = reinterpret_cast<T*>(a.grad_k);
    T* dv = reinterpret_cast<T*>(a.grad_v);
    const TileGeometry g = tile_geometry<Cfg>(p, t);
    gather<T>(p, t, g, reinterpret_cast<const T*>(a.k), reinterpret_cast<const T*>(a.extra_k), p.hd, p.hd, true,
              s.kt.data(), g.total, s.rows, s.zeros.data());
    gather<T>(p, t, g, reinterpret_cast<const T*>(a.v), reinterpret_cast<const T*>(a.extra_v), p.hdv, p.hdv, true,
              s.vt.data(), g.total, s.rows, s.zeros.data());
    std::fill(s.dkt.begin(), s.dkt.begin() + p.hd * g.total, T(0));
    std::fill(s.dvt.begin(), s.dvt.begin() + p.hdv * g.total, T(0));
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
        const int slots = nseg * V;
        const T* qrow = q + row * p.hd;
        const T* dorow = dout + row * p.hdv;
        dot_segments<T, Cfg::HD>(s.kt.data(), g.total, s.bases.data(), nseg, qrow, p.hd, s.scores.data());
        T* probs = s.probs.data();
        if (lse) {  // P from the saved log-sum-exp
            exp_slots<T>(s.scores.data(), s.valid.data(), nseg, scale, lse[row], probs);
        } else {  // no saved lse in the compute type (fp64): renormalize from the recomputed scores
            T m, l;
            softmax_slots<T>(s.scores.data(), s.valid.data(), nseg, scale, probs, m, l);
            const T inv = T(1) / l;
            for (int i = 0; i < slots; ++i) probs[i] *= inv;
        }
        dot_segments<T, Cfg::HD>(s.vt.data(), g.total, s.bases.data(), nseg, dorow, p.hdv, s.dprobs.data());
        // D_i = rowsum(dO * O); a cotangent on lse adds P_j * dlse_i to dS_j, i.e. subtracts dlse_i from D_i
        T di = 0;
        const T* orow = out + row * p.hdv;
        for (int64_t d = 0; d < p.hdv; ++d) di += dorow[d] * orow[d];
        if (grad_lse) di -= grad_lse[row];
        T* ds = s.dprobs.data();
        for (int i = 0; i < slots; ++i) ds[i] = probs[i] * (ds[i] - di);
        contract_segments<T, Cfg::HD>(s.kt.data(), g.total, s.bases.data(), nseg, ds, p.hd, scale, dq + row * p.hd);
        scatter_segments<T, Cfg::HD>(s.dkt.data(), g.total, s.bases.data(), nseg, ds, qrow, p.hd, scale);
        scatter_segments<T, Cfg::HD>(s.dvt.data(), g.total, s.bases.data(), nseg, probs, dorow, p.hdv, T(1));
    }
    // flush the tile's key grads (tiles of one unit overlap, so this adds)
    const int64_t heads = a.heads, base = t.b * p.tokens * heads;
    int64_t u = 0;
    for (int64_t u0 = 0; u0 < g.extent[0]; ++u0)
    for (int64_t u1 = 0; u1 < g.extent[1]; ++u1)
    for (int64_t u2 = 0; u2 < g.row_len; ++u2, ++u) {
        const int64_t l0 = g.lo[0] + u0, l1 = g.lo[1] + u1, l2 = g.lo[2] + u2;
        if (!(l0 < t.ax[0]->length && l1 < t.ax[1]->length && u2 < g.extent[2] && l2 < t.ax[2]->length)) continue;
        const int64_t token = ((l0 * a.dilation[0] + t.ax[0]->group) * a.length[1] + l1 * a.dilation[1] +
                               t.ax[1]->group) * a.length[2] + l2 * a.dilation[2] + t.ax[2]->group;
        T* dkr = dk + (base + token * heads + t.h) * p.hd;
        T* dvr = dv + (base + token * heads + t.h) * p.hdv;
        for (int64_t d = 0; d < p.hd; ++d) dkr[d] += s.dkt[d * g.total + u];
        for (int64_t d = 0; d < p.hdv; ++d) dvr[d] += s.dvt[d * g.total + u];
    }
    for (int64_t e = 0; e < p.n_extra; ++e) {
        T* ek = s.extra_grads.data() + e * (p.hd + p.hdv);
        for (int64_t d = 0; d < p.hd; ++d) ek[d] += s.dkt[d * g.total + g.window_elems + e];
        for (int64_t d = 0; d < p.hdv; ++d) ek[p.hd + d] += s.dvt[d * g.total + g.window_elems + e];
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
    forward_tile<Cfg>(p, t, s);
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
    const Plan p = make_plan<Cfg>(a);
    const int64_t units = a.batch * a.heads * items_count(p);
    const int64_t workers = std::max<int64_t>(1, std::min(a.threads, units));
    std::vector<Scratch<T>> scratch(workers);
    std::vector<char> ready(workers, 0);
    parallel_units(workers, units, [&](int64_t worker, int64_t unit) {
        if (!ready[worker]) { scratch[worker].reserve(p, false); ready[worker] = 1; }
        fn(p, unit, scratch[worker]);
    });
}

template <class Cfg> void run_backward(const Args& a, UnitFn<typename Cfg::T> fn) {
    typedef typename Cfg::T T;
    const Plan p = make_plan<Cfg>(a);
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
