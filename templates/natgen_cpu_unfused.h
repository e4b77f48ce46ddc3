// natgen CPU kernels of the unfused (natten-style) neighborhood ops, heads-first tensors
// [batch, heads, *spatial, channels]: the four kinds of the CUDA unfused families (templates/unfused.cu.j2),
// each generated instance (templates/cpu_unfused.cpp.j2) running one of them.
//
// - qk:       out[row, slot] = x[row] . y[key(row, slot)] (+ rpb), hidden slots -inf (or 0), then the extras
// - av:       out[row] = sum over visible slots of attn[row, slot] * y[key(row, slot)], then the extras
// - inverse:  out[key] = sum over the queries whose window holds the key of attn[query, slot] * x[query]
//             (a gather per key: every output row has one owner, so the sums are deterministic)
// - rpb_grad: out[head, entry] = sum over batch and queries of attn[query, slot at that offset], in partial
//             sums over fixed row chunks reduced in chunk order (deterministic for any thread count)
//
// The window rule (na_window) and its inverse (na_inverse_window) come from the same template text as the
// CUDA kernels, included by the instance before this header. Short ranks are front-padded with length 1,
// kernel 1 axes, so every kernel loops over three axes. Accumulation is in Acc (float, double for double);
// half and bfloat16 elements convert on load and store. Channels are the vectorized loops (omp simd); no
// buffer but one channel row per thread (and the bias partial sums) is allocated.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "natgen_cpu_half.h"

#define NATGEN_UNFUSED_INLINE inline __attribute__((always_inline))
#define NATGEN_UNFUSED_EXPORT __attribute__((visibility("default")))
// the instance's work function is built for AVX-512, AVX2+FMA and baseline x86-64, one picked at load time
// (the OpenMP region calls it: an outlined parallel region itself would not be cloned)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NATGEN_NO_CLONES)
#define NATGEN_UNFUSED_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NATGEN_UNFUSED_CLONES
#endif

namespace natgen_unfused {

using natgen::bf16;  // bfloat16 and its conversions: natgen_cpu_half.h (shared with the fused kernels)

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(_Float16 x) { return static_cast<float>(x); }
inline float load(bf16 x) { return natgen::bf16_to_float(x); }

template <class T>
struct Store;
template <>
struct Store<float> {
    static float from(float x) { return x; }
};
template <>
struct Store<double> {
    static double from(double x) { return x; }
};
template <>
struct Store<_Float16> {
    static _Float16 from(float x) { return static_cast<_Float16>(x); }  // round to nearest even, as torch
};
template <>
struct Store<bf16> {
    static bf16 from(float x) { return natgen::float_to_bf16(x); }
};

// Per-axis tables of one problem (3 padded axes): for every position, its dilation group, group-local index,
// window start (group-local) and count, and for a key position the group-local run of queries reaching it.
struct Axis {
    int len = 1, kernel = 1, dilation = 1;
    bool causal = false;
    std::vector<int> group, local, start, count, first, last;

    void build() {
        group.resize(len), local.resize(len), start.resize(len), count.resize(len), first.resize(len),
            last.resize(len);
        for (int i = 0; i < len; ++i) {
            na_window(i, len, kernel, 1, dilation, causal, group[i], start[i], count[i]);
            local[i] = i / dilation;
            int g;
            na_inverse_window(i, len, kernel, 1, dilation, causal, g, first[i], last[i]);
        }
    }
    int position(int group_local, int g) const { return group_local * dilation + g; }
};

struct Geometry {
    Axis axis[3];
    int64_t batch, heads, head_dim, n_extra, window, slots, tokens;
    int threads;

    template <class Args>
    explicit Geometry(const Args& a) {
        for (int d = 0; d < 3; ++d) {
            axis[d].len = int(a.length[d]);
            axis[d].kernel = int(a.kernel[d]);
            axis[d].dilation = int(a.dilation[d]);
            axis[d].causal = a.causal[d] != 0;
            axis[d].build();
        }
        batch = a.batch, heads = a.heads, head_dim = a.head_dim, n_extra = a.n_extra;
        window = int64_t(axis[0].kernel) * axis[1].kernel * axis[2].kernel;
        slots = window + n_extra;
        tokens = int64_t(axis[0].len) * axis[1].len * axis[2].len;
        threads = a.threads > 0 ? int(a.threads) : 1;
    }
    void coords(int64_t token, int* c) const {
        c[2] = int(token % axis[2].len);
        c[1] = int((token / axis[2].len) % axis[1].len);
        c[0] = int(token / (int64_t(axis[1].len) * axis[2].len));
    }
    int64_t token(int c0, int c1, int c2) const { return (int64_t(c0) * axis[1].len + c1) * axis[2].len + c2; }
};

template <class T, class Acc>
NATGEN_UNFUSED_INLINE Acc dot(const Acc* __restrict__ a, const T* __restrict__ b, int64_t n) {
    Acc total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < n; ++c) total += a[c] * load(b[c]);
    return total;
}

// four dots at once (keys at b, b + stride, ...): four independent chains, one pass over a
template <class T, class Acc>
NATGEN_UNFUSED_INLINE void dot4(const Acc* __restrict__ a, const T* __restrict__ b, int64_t stride, int64_t n,
                                Acc* out) {
    Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    const T *b0 = b, *b1 = b + stride, *b2 = b + 2 * stride, *b3 = b + 3 * stride;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t c = 0; c < n; ++c) {
        const Acc x = a[c];
        s0 += x * load(b0[c]);
        s1 += x * load(b1[c]);
        s2 += x * load(b2[c]);
        s3 += x * load(b3[c]);
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

template <class T, class Acc>
NATGEN_UNFUSED_INLINE void axpy(Acc* __restrict__ acc, Acc w, const T* __restrict__ row, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) acc[c] += w * load(row[c]);
}

template <class T, class Acc>
NATGEN_UNFUSED_INLINE void convert_row(Acc* __restrict__ dst, const T* __restrict__ src, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) dst[c] = load(src[c]);
}

template <class T, class Acc>
NATGEN_UNFUSED_INLINE void store_row(T* __restrict__ dst, const Acc* __restrict__ src, int64_t n) {
    for (int64_t c = 0; c < n; ++c) dst[c] = Store<T>::from(src[c]);
}

// logits of query rows [begin, end) of the (batch, head, token) rows (qk), hidden slots 0 when zero_masked
// (d attn of av) and -inf otherwise
template <class T, class Acc, class Args>
NATGEN_UNFUSED_INLINE void qk_rows(const Geometry& g, const Args& a, int64_t begin, int64_t end, void*) {
    const T *x = reinterpret_cast<const T*>(a.x), *y = reinterpret_cast<const T*>(a.y);
    const T *extra = reinterpret_cast<const T*>(a.extra), *rpb = reinterpret_cast<const T*>(a.rpb);
    T* out = reinterpret_cast<T*>(a.out);
    const Acc masked = a.zero_masked ? Acc(0) : -std::numeric_limits<Acc>::infinity();
    const int64_t D = g.head_dim, N = g.tokens;
    const Axis &a0 = g.axis[0], &a1 = g.axis[1], &a2 = g.axis[2];
    const int e1 = 2 * a1.kernel - 1, e2 = 2 * a2.kernel - 1;
    const int64_t entries = int64_t(2 * a0.kernel - 1) * e1 * e2;
    std::vector<Acc> buffer(size_t(D > 0 ? D : 1));
    Acc* __restrict__ qrow = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / N, token = r % N, head = plane % g.heads;
        int c[3];
        g.coords(token, c);
        const T* rpb_head = rpb ? rpb + head * entries : nullptr;
        convert_row(qrow, x + r * D, D);  // the query row once in Acc: it meets every slot
        T* o = out + r * g.slots;
        const T* keys = y + plane * N * D;
        const int n2 = a2.count[c[2]];
        const int64_t key_step = int64_t(a2.dilation) * D;  // the visible keys along the last axis
        for (int t0 = 0; t0 < a0.kernel; ++t0) {
            const bool in0 = t0 < a0.count[c[0]];
            const int k0 = a0.position(a0.start[c[0]] + t0, a0.group[c[0]]);
            const int r0 = a0.kernel - 1 + a0.start[c[0]] + t0 - a0.local[c[0]];
            for (int t1 = 0; t1 < a1.kernel; ++t1) {
                T* o_row = o + (int64_t(t0) * a1.kernel + t1) * a2.kernel;
                const bool in1 = in0 && t1 < a1.count[c[1]];
                const int visible = in1 ? n2 : 0;  // slots t2 < n2 are visible, the rest hidden
                for (int t2 = visible; t2 < a2.kernel; ++t2) o_row[t2] = Store<T>::from(masked);
                if (!visible) continue;
                const int k1 = a1.position(a1.start[c[1]] + t1, a1.group[c[1]]);
                const int r1 = a1.kernel - 1 + a1.start[c[1]] + t1 - a1.local[c[1]];
                const T* first = keys + g.token(k0, k1, a2.position(a2.start[c[2]], a2.group[c[2]])) * D;
                const T* bias = rpb_head ? rpb_head + (int64_t(r0) * e1 + r1) * e2 + a2.kernel - 1 +
                                               a2.start[c[2]] - a2.local[c[2]] : nullptr;
                Acc dots[4];
                int t2 = 0;
                for (; t2 + 4 <= visible; t2 += 4) {
                    dot4<T, Acc>(qrow, first + t2 * key_step, key_step, D, dots);
                    for (int j = 0; j < 4; ++j)
                        o_row[t2 + j] = Store<T>::from(bias ? dots[j] + load(bias[t2 + j]) : dots[j]);
                }
                for (; t2 < visible; ++t2) {
                    const Acc value = dot<T, Acc>(qrow, first + t2 * key_step, D);
                    o_row[t2] = Store<T>::from(bias ? value + load(bias[t2]) : value);
                }
            }
        }
        for (int64_t e = 0; e < g.n_extra; ++e)
            o[g.window + e] = Store<T>::from(dot<T, Acc>(qrow, extra + (plane * g.n_extra + e) * D, D));
    }
}

// output rows [begin, end) of av: the visible slots' values weighted, then the extras
template <class T, class Acc, class Args>
NATGEN_UNFUSED_INLINE void av_rows(const Geometry& g, const Args& a, int64_t begin, int64_t end, void*) {
    const T *attn = reinterpret_cast<const T*>(a.attn), *y = reinterpret_cast<const T*>(a.y);
    const T* extra = reinterpret_cast<const T*>(a.extra);
    T* out = reinterpret_cast<T*>(a.out);
    const int64_t D = g.head_dim, N = g.tokens;
    const Axis &a0 = g.axis[0], &a1 = g.axis[1], &a2 = g.axis[2];
    std::vector<Acc> buffer(size_t(D > 0 ? D : 1));
    Acc* __restrict__ acc = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / N, token = r % N;
        int c[3];
        g.coords(token, c);
        for (int64_t i = 0; i < D; ++i) acc[i] = 0;
        const T* w = attn + r * g.slots;
        const T* values = y + plane * N * D;
        const int n0 = a0.count[c[0]], n1 = a1.count[c[1]], n2 = a2.count[c[2]];
        for (int t0 = 0; t0 < n0; ++t0) {
            const int k0 = a0.position(a0.start[c[0]] + t0, a0.group[c[0]]);
            for (int t1 = 0; t1 < n1; ++t1) {
                const int k1 = a1.position(a1.start[c[1]] + t1, a1.group[c[1]]);
                const int64_t slot_base = (int64_t(t0) * a1.kernel + t1) * a2.kernel;
                for (int t2 = 0; t2 < n2; ++t2) {
                    const int k2 = a2.position(a2.start[c[2]] + t2, a2.group[c[2]]);
                    axpy<T, Acc>(acc, load(w[slot_base + t2]), values + g.token(k0, k1, k2) * D, D);
                }
            }
        }
        for (int64_t e = 0; e < g.n_extra; ++e)
            axpy<T, Acc>(acc, load(w[g.window + e]), extra + (plane * g.n_extra + e) * D, D);
        store_row(out + r * D, acc, D);
    }
}

// KEY rows [begin, end) of the inverse neighborhood: the queries reaching a key are one run per axis
// (na_inverse_window); each output row has one owner, so the sums are deterministic
template <class T, class Acc, class Args>
NATGEN_UNFUSED_INLINE void inverse_rows(const Geometry& g, const Args& a, int64_t begin, int64_t end, void*) {
    const T *attn = reinterpret_cast<const T*>(a.attn), *x = reinterpret_cast<const T*>(a.x);
    T* out = reinterpret_cast<T*>(a.out);
    const int64_t D = g.head_dim, N = g.tokens;
    const Axis &a0 = g.axis[0], &a1 = g.axis[1], &a2 = g.axis[2];
    std::vector<Acc> buffer(size_t(D > 0 ? D : 1));
    Acc* __restrict__ acc = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / N, token = r % N;
        int c[3];
        g.coords(token, c);
        for (int64_t i = 0; i < D; ++i) acc[i] = 0;
        const T* weights = attn + plane * N * g.slots;
        const T* rows = x + plane * N * D;
        for (int l0 = a0.first[c[0]]; l0 <= a0.last[c[0]]; ++l0) {
            const int q0 = a0.position(l0, a0.group[c[0]]);
            const int t0 = a0.local[c[0]] - a0.start[q0];
            for (int l1 = a1.first[c[1]]; l1 <= a1.last[c[1]]; ++l1) {
                const int q1 = a1.position(l1, a1.group[c[1]]);
                const int64_t slot_base = (int64_t(t0) * a1.kernel + a1.local[c[1]] - a1.start[q1]) * a2.kernel;
                for (int l2 = a2.first[c[2]]; l2 <= a2.last[c[2]]; ++l2) {
                    const int q2 = a2.position(l2, a2.group[c[2]]);
                    const int64_t query = g.token(q0, q1, q2);
                    const int64_t slot = slot_base + a2.local[c[2]] - a2.start[q2];
                    axpy<T, Acc>(acc, load(weights[query * g.slots + slot]), rows + query * D, D);
                }
            }
        }
        store_row(out + r * D, acc, D);
    }
}

// rows per partial sum of the bias gradient: fixed by the problem, not the thread count, so the order of
// every addition (batches and rows within a chunk, then the chunks in order) is fixed too
constexpr int64_t kRpbChunk = 256;

inline int64_t rpb_entries(const Geometry& g) {
    return int64_t(2 * g.axis[0].kernel - 1) * (2 * g.axis[1].kernel - 1) * (2 * g.axis[2].kernel - 1);
}
inline int64_t rpb_chunks(const Geometry& g) { return (g.tokens + kRpbChunk - 1) / kRpbChunk; }

// (head, row chunk) tasks [begin, end) of d rpb: each sums its rows' d logits per bias entry into its own
// partial (scratch: [heads * chunks, entries] of Acc)
template <class T, class Acc, class Args>
NATGEN_UNFUSED_INLINE void rpb_grad_rows(const Geometry& g, const Args& a, int64_t begin, int64_t end,
                                         void* scratch) {
    const Axis &a0 = g.axis[0], &a1 = g.axis[1], &a2 = g.axis[2];
    const int e1 = 2 * a1.kernel - 1, e2 = 2 * a2.kernel - 1;
    const int64_t entries = rpb_entries(g), chunks = rpb_chunks(g);
    const T* grad = reinterpret_cast<const T*>(a.attn);
    for (int64_t task = begin; task < end; ++task) {
        const int64_t head = task / chunks, chunk = task % chunks;
        Acc* __restrict__ sums = static_cast<Acc*>(scratch) + task * entries;
        for (int64_t e = 0; e < entries; ++e) sums[e] = 0;
        const int64_t last = std::min(g.tokens, (chunk + 1) * kRpbChunk);
        for (int64_t b = 0; b < g.batch; ++b) {
            const T* plane = grad + ((b * g.heads + head) * g.tokens) * g.slots;
            for (int64_t token = chunk * kRpbChunk; token < last; ++token) {
                int c[3];
                g.coords(token, c);
                const T* row = plane + token * g.slots;
                const int n0 = a0.count[c[0]], n1 = a1.count[c[1]], n2 = a2.count[c[2]];
                // the entry of slot t on an axis: K - 1 + start + t - local
                const int r0 = a0.kernel - 1 + a0.start[c[0]] - a0.local[c[0]];
                const int r1 = a1.kernel - 1 + a1.start[c[1]] - a1.local[c[1]];
                const int r2 = a2.kernel - 1 + a2.start[c[2]] - a2.local[c[2]];
                for (int t0 = 0; t0 < n0; ++t0)
                    for (int t1 = 0; t1 < n1; ++t1) {
                        const T* slots = row + (int64_t(t0) * a1.kernel + t1) * a2.kernel;
                        Acc* target = sums + (int64_t(r0 + t0) * e1 + r1 + t1) * e2 + r2;
#pragma omp simd
                        for (int t2 = 0; t2 < n2; ++t2) target[t2] += load(slots[t2]);
                    }
            }
        }
    }
}

using Unit = void (*)(const Geometry&, const void* args, int64_t begin, int64_t end, void* scratch);

// multiply-adds below which a call runs on the calling thread: waking the pool costs more than it saves
// (on a loaded 2-core machine a tiny call waited ~15 ms for its second thread)
constexpr int64_t kSerialWork = int64_t(1) << 16;

// tasks [0, count) split into one contiguous range per thread; OpenMP on purpose: torch's CPU build loads its
// libgomp first, so this region reuses torch's worker pool (as the fused CPU kernels do)
inline void parallel(const Geometry& g, const void* args, int64_t count, Unit unit, void* scratch) {
    const int64_t work = g.batch * g.heads * g.tokens * g.slots * std::max<int64_t>(g.head_dim, 1);
    const int threads = int(std::min<int64_t>({int64_t(g.threads), count, std::max<int64_t>(1, work / kSerialWork)}));
    if (threads <= 1) {
        if (count > 0) unit(g, args, 0, count, scratch);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t begin = count * t / n, end = count * (t + 1) / n;
        if (begin < end) unit(g, args, begin, end, scratch);
    }
}

// run one instance's operation: rows for qk / av / inverse, (head, chunk) tasks then the ordered reduction
// for rpb_grad
template <class T, class Acc, class Args>
void run(const Args& a, const char* operation, Unit unit) {
    const Geometry g(a);
    if (std::strcmp(operation, "rpb_grad") != 0) {
        parallel(g, &a, g.batch * g.heads * g.tokens, unit, nullptr);
        return;
    }
    const int64_t entries = rpb_entries(g), chunks = rpb_chunks(g);
    std::vector<Acc> partial(size_t(g.heads * chunks * entries));
    parallel(g, &a, g.heads * chunks, unit, partial.data());
    T* out = reinterpret_cast<T*>(a.out);
    for (int64_t head = 0; head < g.heads; ++head)
        for (int64_t entry = 0; entry < entries; ++entry) {
            Acc total = 0;
            for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[(head * chunks + chunk) * entries + entry];
            out[head * entries + entry] = Store<T>::from(total);
        }
}

}  // namespace natgen_unfused
