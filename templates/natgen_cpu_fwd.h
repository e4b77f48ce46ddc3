// natgen CPU kernels: the forward (namespace fwd). Per-query kernels vectorized over keys, and the
// specialized fixed-shape tile (FixedFwd; in the AVX2 and AVX-512 variants).
// Part of the per-ISA variant body (natgen_cpu_variant.h): no include guard, no namespace of its own;
// natgen_cpu.h includes it once per variant inside namespace natgen::<isa>.

// ------------------------------------------------------------------------------------- forward, per query
// The forward vectorizes over keys (the backward over queries, natgen_cpu_lanes.h): per query, its window's
// keys along the last axis in runs of V ("segments"), scores as FMAs of one broadcast query channel against a
// segment of transposed keys, P.V as broadcast probabilities against row-major value rows. Measured against
// the lane scheme of the backward (on 2 AMD EPYC cores): equal in the interior (cpu-2d 0.62 ms both) and much
// faster where windows are clamped (nat-2d, 14x14: 1.7 vs 2.7 ms), since a query computes exactly its own
// keys; the backward keeps the lane scheme, whose per-key dK/dV accumulation is what makes it 2x faster there.
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

// Gathers the tile's key union (+ extra tokens) of its key/value head from [batch, tokens, heads_kv, dim]
// into `dst`, either transposed (dst[d*ld + u]) or row-major (dst[u*ld + d], rows padded with zeros to
// `padded_dim`), widening input elements of another type (In) to T.
// Positions outside the axis (window slack, vector padding) read a zero row.
template <typename T, typename In>
NATGEN_INLINE void gather(const Plan& p, const TileRef& t, const Geometry& g, const In* src, const In* extra,
                          int64_t dim, int64_t padded_dim, bool transposed, T* dst, int64_t ld,
                          std::vector<const In*>& rows, const In* zeros) {
    const Args& a = *p.a;
    const int64_t heads = a.heads_kv;  // key/value rows: [batch, tokens, heads_kv, dim]
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
                rows[u] = src + (base + ((x0 * a.length[1] + x1) * a.length[2] + x2) * heads + t.hk) * dim;
            }
        }
    }
    for (int64_t e = 0; e < p.extra_padded; ++e, ++u)
        rows[u] = e < p.n_extra ? extra + ((t.b * p.n_extra + e) * heads + t.hk) * dim : zeros;
    const int64_t n = u;
    if (transposed) {
        constexpr int V = VecTraits<T>::width;
        int64_t u8 = 0;
        for (; u8 + V <= n; u8 += V) rows_to_lanes<T>(rows.data() + u8, dim, dst + u8, ld);
        for (; u8 < n; ++u8)
            for (int64_t d = 0; d < dim; ++d) dst[d * ld + u8] = widen(rows[u8][d]);
    } else {
        for (int64_t i = 0; i < n; ++i) {
            T* out = dst + i * ld;
            widen_row(rows[i], dim, out);
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

// kt[d * KEYS + slot] (keys transposed) and, where Plan::fixed_gathers_values, vu[slot * HD + d] (values widened
// or copied, row-major; otherwise the P.V reads them where they are, see SourceStrides) for the union slots
// slot = (u0 * ROWS1 + u1) * ROWLEN + u2. Key columns past the union read zeros; slots no query reads keep
// whatever an earlier tile left (only masked score lanes read them; values there are never read).
template <class Cfg, typename In>
NATGEN_INLINE void fixed_gather(const Plan& p, const TileRef& t, const Geometry& g, typename Cfg::T* __restrict kt,
                                typename Cfg::T* __restrict vu, const In* zeros) {
    typedef typename Cfg::T T;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    const Args& a = *p.a;
    const In* k = reinterpret_cast<const In*>(a.k);
    const In* v = reinterpret_cast<const In*>(a.v);
    const int64_t heads = a.heads_kv, step = a.dilation[2] * heads;  // key/value rows
    const int64_t first2 = g.lo[2] * a.dilation[2] + t.ax[2]->group;
    const int64_t cols = g.extent[2];
    const In* rows[F::ROWLEN];
    for (int64_t u2 = cols; u2 < F::ROWLEN; ++u2) rows[u2] = zeros;
    for (int64_t u0 = 0; u0 < g.extent[0]; ++u0) {
        const int64_t x0 = (g.lo[0] + u0) * a.dilation[0] + t.ax[0]->group;
        for (int64_t u1 = 0; u1 < g.extent[1]; ++u1) {
            const int64_t x1 = (g.lo[1] + u1) * a.dilation[1] + t.ax[1]->group;
            const int64_t first = (t.b * p.tokens + (x0 * a.length[1] + x1) * a.length[2] + first2) * heads + t.hk;
            const int64_t slot = u0 * F::PLANE + u1 * F::ROWLEN;
            for (int64_t u2 = 0; u2 < cols; ++u2) {
                const int64_t row = (first + u2 * step) * F::HD;
                rows[u2] = k + row;
                if (p.fixed_gathers_values) widen_row(v + row, F::HD, vu + (slot + u2) * F::HD);
            }
            if constexpr (std::is_same<In, bf16>::value && std::is_same<T, float>::value) {
                if (p.bf16_dot) {
                    // the keys' bf16 channel pairs, transposed as 32-bit elements (kt[pair * KEYS + slot])
                    const T* pairs[F::ROWLEN];
                    for (int64_t u2 = 0; u2 < F::ROWLEN; ++u2) pairs[u2] = reinterpret_cast<const T*>(rows[u2]);
                    for (int64_t c = 0; c < cols; c += V) rows_to_lanes<T>(pairs + c, F::HD / 2, kt + slot + c, F::KEYS);
                    continue;
                }
            }
            for (int64_t c = 0; c < cols; c += V) rows_to_lanes<T>(rows + c, F::HD, kt + slot + c, F::KEYS);
        }
    }
}

// The lanes' max of a query's scores so far with one more vector of them (the c-th of a window row; lanes
// past a row's last key are not its keys). A NaN score leaves the max alone, as the softmax pass's compare did.
template <class Cfg>
NATGEN_INLINE typename VecTraits<typename Cfg::T>::type running_max(
    typename VecTraits<typename Cfg::T>::type mx, typename VecTraits<typename Cfg::T>::type x, int c) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    if (c == F::CH - 1 && F::LAST < F::V) x = lane_mask<T>(F::LAST) ? x : Vec{} - std::numeric_limits<T>::infinity();
    return max_ps(x, mx);
}

// Scores of window rows [R0, K1) of one window plane, in blocks of up to 12 accumulators held in registers.
// A block of at most 6 (a 1-D window: one row of CH vectors) keeps two accumulator sets, over even and odd
// channels, so the FMA units are not left waiting on their own latency (cpu-1d forward, 1 thread: 7.38 -> 6.93 ms).
// (Where a block has 12, the two sets measured slower: 0.93 vs 1.00 ms.)
template <class Cfg, int R0>
NATGEN_INLINE void fixed_dot_rows(const typename Cfg::T* __restrict kb, const typename Cfg::T* __restrict x,
                                  typename Cfg::T* __restrict sc, typename VecTraits<typename Cfg::T>::type& mx) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    constexpr int NB = std::min(std::max(1, 12 / F::CH), F::K1 - R0);
    constexpr int NA = NB * F::CH;
    constexpr int SETS = 2 * NA <= 12 && F::HD % 2 == 0 ? 2 : 1;
    Vec acc[SETS][NA];
    for (int k = 0; k < SETS; ++k)
        for (int i = 0; i < NA; ++i) acc[k][i] = Vec{};
#pragma GCC unroll 4
    for (int d = 0; d < F::HD; d += SETS) {
#pragma GCC unroll 2
        for (int k = 0; k < SETS; ++k) {
            const T xd = x[d + k];  // a scalar times a vector: one broadcast load
            const T* row = kb + (d + k) * F::KEYS + R0 * F::ROWLEN;
#pragma GCC unroll 64
            for (int r = 0; r < NB; ++r)
#pragma GCC unroll 16
                for (int c = 0; c < F::CH; ++c) acc[k][r * F::CH + c] += xd * load<T>(row + r * F::ROWLEN + c * V);
        }
    }
    for (int i = 0; i < NA; ++i) {
        const Vec total = SETS == 2 ? acc[0][i] + acc[SETS - 1][i] : acc[0][i];
        store<T>(sc + (R0 * F::CH + i) * V, total);
        mx = running_max<Cfg>(mx, total, i % F::CH);
    }
    if constexpr (R0 + NB < F::K1) fixed_dot_rows<Cfg, R0 + NB>(kb, x, sc, mx);
}

// The relative positional bias of the specialized forward (Args::rpb): query (l0, l1, col)'s table rows, one a
// window row (add_bias_segments' indexing), each K2 contiguous entries from rows[r].
template <class Cfg>
NATGEN_INLINE void fixed_bias_rows(const Plan& p, const TileRef& t, int64_t l0, int64_t l1, int64_t col,
                                   const typename Cfg::T** rows) {
    typedef typename Cfg::T T;
    typedef FixedFwd<Cfg> F;
    const int64_t span1 = 2 * F::K1 - 1, span2 = 2 * F::K2 - 1;
    const T* table = reinterpret_cast<const T*>(p.a->rpb) + t.h * (2 * F::K0 - 1) * span1 * span2;
    const int64_t first0 = F::K0 - 1 + t.ax[0]->start[l0] - l0, first1 = F::K1 - 1 + t.ax[1]->start[l1] - l1;
    const int64_t first2 = F::K2 - 1 + t.ax[2]->start[col] - col;
    for (int a0 = 0; a0 < F::K0; ++a0)
        for (int a1 = 0; a1 < F::K1; ++a1)
            rows[a0 * F::K1 + a1] = table + ((first0 + a0) * span1 + first1 + a1) * span2 + first2;
}

// Adds one query's bias (rows: fixed_bias_rows) divided by the scale to its scores (NSEG vectors at sc), as the
// generic forward's add_bias_segments does, and returns their running max. A vector that would read past the
// table's end (`end`) is read entry by entry.
template <class Cfg>
NATGEN_INLINE typename VecTraits<typename Cfg::T>::type fixed_bias(typename Cfg::T* __restrict sc,
                                                                   const typename Cfg::T* const* rows,
                                                                   typename Cfg::T inv_scale,
                                                                   const typename Cfg::T* end) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    Vec m = Vec{} - std::numeric_limits<T>::infinity();
    for (int r = 0; r < F::ROWS; ++r)
        for (int c = 0; c < F::CH; ++c) {
            const T* src = rows[r] + c * V;
            const int valid = c == F::CH - 1 ? F::LAST : V;
            Vec b = Vec{};
            if (src + V <= end) {
                b = lane_mask<T>(valid) ? load<T>(src) : Vec{};
            } else {
                for (int j = 0; j < valid; ++j) b[j] = src[j];
            }
            T* at = sc + (r * F::CH + c) * V;
            const Vec x = load<T>(at) + b * inv_scale;
            store<T>(at, x);
            m = running_max<Cfg>(m, x, c);
        }
    return m;
}

// Strides (elements) between a window's value rows on axes 0, 1 and between its keys on axis 2: in the tile's
// gathered union (compile-time: immediate displacements), or in v itself (fp32 inputs, whose values the P.V
// reads in place: no copy, and its loads overlap the tile's arithmetic where a gather would stall on them).
template <class Cfg> struct UnionStrides {
    typedef FixedFwd<Cfg> F;
    static constexpr int64_t s0 = F::PLANE * F::HD, s1 = F::ROWLEN * F::HD, s2 = F::HD;
};
struct SourceStrides {
    int64_t s0, s1, s2;
};

// P.V of one query for output vectors [J0, HD / V), in blocks of up to 4 accumulators; padding lanes are
// skipped at compile time. (Accumulator sets taking turns over the keys measured slower.)
template <class Cfg, int J0, class S>
NATGEN_INLINE void fixed_pv(const typename Cfg::T* __restrict vb, const S& st, const typename Cfg::T* __restrict pr,
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
            const T* vr = vb + a0 * st.s0 + a1 * st.s1 + J0 * V;
            const T* w = pr + (a0 * F::K1 + a1) * F::CH * V;
#pragma GCC unroll 64
            for (int n = 0; n < F::K2; ++n) {
                const T wl = w[n];
#pragma GCC unroll 8
                for (int j = 0; j < NVB; ++j) acc[j] += wl * load<T>(vr + n * st.s2 + j * V);
            }
        }
    for (int j = 0; j < NVB; ++j) store<T>(o + (J0 + j) * V, acc[j] * inv);
    if constexpr (J0 + NVB < F::HD / V) fixed_pv<Cfg, J0 + NVB>(vb, st, pr, o, inv);
}

// P.V of two queries side by side on the last axis (B = A's neighbour), whose windows are the same rows
// shifted by DELTA (1 in the interior, 0 where B's window is clamped onto A's): each value row is loaded once
// for both. Within a window row, key n of A is value slot n and key n - DELTA of B.
template <class Cfg, int NVB, int DELTA, class S>
NATGEN_INLINE void fixed_pv2_row(const typename Cfg::T* __restrict vr, const S& st,
                                 const typename Cfg::T* __restrict wa,
                                 const typename Cfg::T* __restrict wb, typename VecTraits<typename Cfg::T>::type* acc_a,
                                 typename VecTraits<typename Cfg::T>::type* acc_b) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
#pragma GCC unroll 64
    for (int n = 0; n < F::K2 + DELTA; ++n) {
        const T* vp = vr + n * st.s2;
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

template <class Cfg, int J0, int DELTA, class S>
NATGEN_FIXED_TARGET void fixed_pv2(const typename Cfg::T* __restrict vb, const S& st,
                                   const typename Cfg::T* __restrict pa,
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
            fixed_pv2_row<Cfg, NVB, DELTA>(vb + a0 * st.s0 + a1 * st.s1 + J0 * V, st, pa + w, pb + w,
                                           acc_a, acc_b);
        }
    for (int j = 0; j < NVB; ++j) {
        store<T>(oa + (J0 + j) * V, acc_a[j] * inv_a);
        store<T>(ob + (J0 + j) * V, acc_b[j] * inv_b);
    }
    if constexpr (J0 + NVB < F::HD / V) fixed_pv2<Cfg, J0 + NVB, DELTA>(vb, st, pa, pb, oa, ob, inv_a, inv_b);
}

// Scores of two queries stacked on axis 1 (B below A), rows [U0, K1 + DV) of their window union in one plane:
// B's window is A's shifted down by DV rows (1 in the interior, 0 where B's window is clamped onto A's), so
// each key vector is loaded once for both: 2 FMAs a load where one query alone does 1 (and twice the
// independent accumulator chains against FMA latency).
template <class Cfg, int DV, int U0>
NATGEN_INLINE void fixed_dot_rows2(const typename Cfg::T* __restrict kb, const typename Cfg::T* __restrict xa,
                                   const typename Cfg::T* __restrict xb, typename Cfg::T* __restrict sca,
                                   typename Cfg::T* __restrict scb, typename VecTraits<typename Cfg::T>::type& mxa,
                                   typename VecTraits<typename Cfg::T>::type& mxb) {
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
            if (U0 + u < F::K1) {
                store<T>(sca + ((U0 + u) * F::CH + c) * V, acc_a[u * F::CH + c]);
                mxa = running_max<Cfg>(mxa, acc_a[u * F::CH + c], c);
            }
            if (U0 + u >= DV) {
                store<T>(scb + ((U0 + u - DV) * F::CH + c) * V, acc_b[u * F::CH + c]);
                mxb = running_max<Cfg>(mxb, acc_b[u * F::CH + c], c);
            }
        }
    if constexpr (U0 + NB < NU) fixed_dot_rows2<Cfg, DV, U0 + NB>(kb, xa, xb, sca, scb, mxa, mxb);
}

// Scores of one query (sc: NSEG vectors) and the lanes of its running max (mx).
template <class Cfg>
NATGEN_INLINE void fixed_scores(const typename Cfg::T* __restrict kb, const typename Cfg::T* __restrict x,
                                typename Cfg::T* __restrict sc, typename VecTraits<typename Cfg::T>::type* mx) {
    typedef FixedFwd<Cfg> F;
    typedef typename VecTraits<typename Cfg::T>::type Vec;
    Vec m = Vec{} - std::numeric_limits<typename Cfg::T>::infinity();
    for (int a0 = 0; a0 < F::K0; ++a0) fixed_dot_rows<Cfg, 0>(kb + a0 * F::PLANE, x, sc + a0 * F::K1 * F::CH * F::V, m);
    *mx = m;
}

// The same for two queries stacked on axis 1 (see fixed_dot_rows2): A's into sca and mxa, B's into scb and mxb.
template <class Cfg, int DV>
NATGEN_FIXED_TARGET void fixed_scores2(const typename Cfg::T* __restrict kb, const typename Cfg::T* __restrict xa,
                                       const typename Cfg::T* __restrict xb, typename Cfg::T* __restrict sca,
                                       typename Cfg::T* __restrict scb, typename VecTraits<typename Cfg::T>::type* mxa,
                                       typename VecTraits<typename Cfg::T>::type* mxb) {
    typedef FixedFwd<Cfg> F;
    typedef typename VecTraits<typename Cfg::T>::type Vec;
    Vec ma = Vec{} - std::numeric_limits<typename Cfg::T>::infinity(), mb = ma;
    for (int a0 = 0; a0 < F::K0; ++a0)
        fixed_dot_rows2<Cfg, DV, 0>(kb + a0 * F::PLANE, xa, xb, sca + a0 * F::K1 * F::CH * F::V,
                                    scb + a0 * F::K1 * F::CH * F::V, ma, mb);
    *mxa = ma;
    *mxb = mb;
}

// Softmax of NQ (2 or 4) queries' scores (query q's NSEG vectors at sc[q], its probabilities to pr[q]):
// pr = 2^(y - m2) over its window (padding lanes 0), y = score * scale2, with m2 = scale2 * (the query's max
// score: its running max's lanes, mx[q]; scale2 > 0, as the problem's checks require of the scale); m2[q] and
// the sum l[q] returned. The exponent's argument is one FMA. Several at a time, interleaved: one query's chain
// (lanes' max -> exponentials -> sum -> lanes' sum) is mostly latency, which independent ones hide, and the
// horizontal reductions share their shuffles (hmax4, hsum4, whose four slots reduce one vector each by the
// same steps: NQ = 2 fills slots 2, 3 with queries 0, 1 again), so a query's numbers are the same bits in
// whichever block and slot it comes.
template <class Cfg, int NQ>
NATGEN_FIXED_TARGET void fixed_probs(const typename Cfg::T* const* sc, const typename VecTraits<typename Cfg::T>::type* mx,
                                     typename Cfg::T scale2, typename Cfg::T* const* pr, typename Cfg::T* m2,
                                     typename Cfg::T* l) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    const auto last = lane_mask<T>(F::LAST);
    static_assert(NQ == 2 || NQ == 4, "fixed_probs: 2 or 4 queries");
    Vec slots[4];
    for (int j = 0; j < 4; ++j) slots[j] = mx[j % NQ];
    T mq[4];
    hmax4(slots, mq);
    Vec bias[NQ], vsum[NQ];
    for (int q = 0; q < NQ; ++q) {
        m2[q] = mq[q] * scale2;
        bias[q] = Vec{} - m2[q];
        vsum[q] = Vec{};
    }
    const T* src[NQ];
    T* dst[NQ];
    for (int q = 0; q < NQ; ++q) {
        src[q] = sc[q];
        dst[q] = pr[q];
    }
#pragma GCC unroll 16
    for (int r = 0; r < F::ROWS; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < F::CH; ++c)
#pragma GCC unroll 4
            for (int q = 0; q < NQ; ++q) {
                const int64_t at = (r * F::CH + c) * V;
                Vec e = exp2_vec(load<T>(src[q] + at) * scale2 + bias[q]);
                if (c == F::CH - 1 && F::LAST < V) e = last ? e : Vec{};
                store<T>(dst[q] + at, e);
                vsum[q] += e;
            }
    for (int j = 0; j < 4; ++j) slots[j] = vsum[j % NQ];
    T lq[4];
    hsum4(slots, lq);
    for (int q = 0; q < NQ; ++q) l[q] = lq[q];
}

#if NATGEN_AVX && NATGEN_VEC_BYTES == 64
// ---- Query pairs (FixedFwd::PAIRS, AVX-512 only): scores, softmax and lanes as above, with two queries of a
// tile row in each vector, the first's window row in lanes [0, H), the second's (the query H columns on) in
// [H, V). Their windows start S8 keys apart on the last axis: H in the interior (CONTIG: one load covers
// both), fewer where a window is clamped at the border (the halves loaded apart).

// The lanes of a pair vector that hold keys: the first K2 of each half
template <class Cfg> NATGEN_INLINE auto pair_key_lanes() {
    typedef VecTraits<float>::itype IVec;
    IVec lane;
    for (int l = 0; l < 16; ++l) lane[l] = l & (FixedFwd<Cfg>::H - 1);
    return lane < (IVec{} + FixedFwd<Cfg>::K2);
}

// Scores of NR (1 or 2) pairs stacked on axis 1 (the second pair's window DV rows below the first's, as in
// fixed_dot_rows2), union rows [U0, U0 + NB) of one window plane, all in registers; pair i's queries are
// lo[i], hi[i], its scores go to sc[i] and its running max to mx[i] (lanes past a window row's end masked).
// BF16 (Plan::bf16_dot): queries and keys are bf16 channel pairs, one 32-bit element each (HD / 2 of them, the
// keys transposed as pairs), multiplied by dot_bf16_pairs.
template <class Cfg, int NR, int DV, bool CONTIG, bool BF16, int U0>
NATGEN_INLINE void pair_dot_rows(const float* __restrict kb, int64_t s8, const float* const* lo,
                                 const float* const* hi, float* const* sc, VecTraits<float>::type* mx) {
    typedef VecTraits<float>::type Vec;
    typedef FixedFwd<Cfg> F;
    constexpr int NU = NR == 2 ? F::K1 + DV : F::K1;  // union rows the pairs' windows cover in the plane
    constexpr int NB = std::min(8, NU - U0);
    Vec acc[2][NB];
    for (int i = 0; i < 2; ++i)
        for (int u = 0; u < NB; ++u) acc[i][u] = Vec{};
    constexpr int CHANNELS = BF16 ? F::HD / 2 : F::HD;  // 32-bit elements of a query row
    static_assert(CHANNELS % 4 == 0, "pair_dot_rows: channels in fours");
    for (int d = 0; d < CHANNELS; d += 4) {
        Vec quads[NR];
        for (int i = 0; i < NR; ++i) quads[i] = pair_quads(lo[i] + d, hi[i] + d);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            Vec x[NR];
            if (j == 0) for (int i = 0; i < NR; ++i) x[i] = pair_splat_lane<0>(quads[i]);
            if (j == 1) for (int i = 0; i < NR; ++i) x[i] = pair_splat_lane<1>(quads[i]);
            if (j == 2) for (int i = 0; i < NR; ++i) x[i] = pair_splat_lane<2>(quads[i]);
            if (j == 3) for (int i = 0; i < NR; ++i) x[i] = pair_splat_lane<3>(quads[i]);
            const float* row = kb + (d + j) * F::KEYS + U0 * F::ROWLEN;
#pragma GCC unroll 16
            for (int u = 0; u < NB; ++u) {
                const float* at = row + u * F::ROWLEN;
                const Vec kv = CONTIG ? load<float>(at) : load_halves(at, at + s8);
                if constexpr (BF16) {
                    if (U0 + u < F::K1) acc[0][u] = dot_bf16_pairs(acc[0][u], x[0], kv);
                    if (NR == 2 && U0 + u >= DV) acc[NR - 1][u] = dot_bf16_pairs(acc[NR - 1][u], x[NR - 1], kv);
                } else {
                    if (U0 + u < F::K1) acc[0][u] += x[0] * kv;
                    if (NR == 2 && U0 + u >= DV) acc[NR - 1][u] += x[NR - 1] * kv;
                }
            }
        }
    }
    const auto valid = pair_key_lanes<Cfg>();
    const Vec lowest = Vec{} - std::numeric_limits<float>::infinity();
#pragma GCC unroll 16
    for (int u = 0; u < NB; ++u) {
        if (U0 + u < F::K1) {
            store<float>(sc[0] + (U0 + u) * F::V, acc[0][u]);
            mx[0] = max_ps(valid ? acc[0][u] : lowest, mx[0]);
        }
        if (NR == 2 && U0 + u >= DV) {
            store<float>(sc[NR - 1] + (U0 + u - DV) * F::V, acc[NR - 1][u]);
            mx[NR - 1] = max_ps(valid ? acc[NR - 1][u] : lowest, mx[NR - 1]);
        }
    }
    if constexpr (U0 + NB < NU) pair_dot_rows<Cfg, NR, DV, CONTIG, BF16, U0 + NB>(kb, s8, lo, hi, sc, mx);
}

template <class Cfg, int NR, int DV, bool CONTIG, bool BF16>
NATGEN_FIXED_TARGET void pair_scores(const float* __restrict kb, int64_t s8, const float* const* lo,
                                     const float* const* hi, float* const* sc, VecTraits<float>::type* mx) {
    typedef FixedFwd<Cfg> F;
    typedef VecTraits<float>::type Vec;
    Vec m[NR];
    for (int i = 0; i < NR; ++i) m[i] = Vec{} - std::numeric_limits<float>::infinity();
    for (int a0 = 0; a0 < F::K0; ++a0) {
        float* scp[NR];
        for (int i = 0; i < NR; ++i) scp[i] = sc[i] + a0 * F::K1 * F::V;
        pair_dot_rows<Cfg, NR, DV, CONTIG, BF16, 0>(kb + a0 * F::PLANE, s8, lo, hi, scp, m);
    }
    for (int i = 0; i < NR; ++i) mx[i] = m[i];
}

// Adds a relative positional bias to one pair's scores (ROWS vectors at sc; the queries' bias rows for window
// row r at lo[r], hi[r]: K2 entries each, Args::rpb's layout) divided by the scale, as the generic forward's
// add_bias_segments does, and returns the scores' running max (lanes past a window row's end masked).
template <class Cfg>
NATGEN_INLINE VecTraits<float>::type pair_bias(float* __restrict sc, const float* const* lo, const float* const* hi,
                                              float inv_scale) {
    typedef VecTraits<float>::type Vec;
    typedef FixedFwd<Cfg> F;
    const auto valid = pair_key_lanes<Cfg>();
    const Vec lowest = Vec{} - std::numeric_limits<float>::infinity();
    Vec mx = lowest;
    for (int r = 0; r < F::ROWS; ++r) {
        const Vec x = load<float>(sc + r * F::V) + load_halves_first(lo[r], hi[r], F::K2) * inv_scale;
        store<float>(sc + r * F::V, x);
        mx = max_ps(valid ? x : lowest, mx);
    }
    return mx;
}

// Softmax of four pairs' scores (pair q's ROWS vectors at sc[q], probabilities to pr[q]), as fixed_probs
// does for four queries: m2[2 q + h], l[2 q + h] are the numbers of half h of pair q.
template <class Cfg>
NATGEN_FIXED_TARGET void pair_probs(const float* const* sc, const VecTraits<float>::type* mx, float scale2,
                                    float* const* pr, float* m2, float* l) {
    typedef VecTraits<float>::type Vec;
    typedef FixedFwd<Cfg> F;
    float mq[8];
    reduce_pairs4<true>(mx, mq);
    Vec bias[4], vsum[4];
    for (int q = 0; q < 4; ++q) {
        m2[2 * q] = mq[2 * q] * scale2;
        m2[2 * q + 1] = mq[2 * q + 1] * scale2;
        bias[q] = pair_splat(-m2[2 * q], -m2[2 * q + 1]);
        vsum[q] = Vec{};
    }
    const auto valid = pair_key_lanes<Cfg>();
#pragma GCC unroll 16
    for (int r = 0; r < F::ROWS; ++r)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
            Vec e = exp2_vec(load<float>(sc[q] + r * F::V) * scale2 + bias[q]);
            if (F::K2 < F::H) e = valid ? e : Vec{};
            store<float>(pr[q] + r * F::V, e);
            vsum[q] += e;
        }
    reduce_pairs4<false>(vsum, l);
}
#endif

// 16-bit inputs (Args::input_dtype: bf16, f16) are widened as gathered, queries a row at a time into qw,
// outputs written through ow; the input type is a runtime branch here (only the gathers and row conversions
// are instantiated per type), so the module's compile time barely grows.
template <class Cfg>
NATGEN_FIXED_TARGET void fixed_tile(const Plan& p, const TileRef& t, FwdScratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    typedef typename VecTraits<T>::itype IVec;
    typedef FixedFwd<Cfg> F;
    constexpr int V = F::V;
    const Args& a = *p.a;
    const int64_t in = input_kind<T>(a);  // 0: q / k / v / out are T
    const T* q = reinterpret_cast<const T*>(a.q);
    T* out = reinterpret_cast<T*>(a.out);
    T* lse = reinterpret_cast<T*>(a.lse);
    const Geometry g = geometry<Cfg>(p, t);
    T* kt = line_aligned(s.kt.data());
    T* vu = line_aligned(s.vu.data());
    with_input<T>(in, [&](auto tag) {
        typedef typename decltype(tag)::type In;
        fixed_gather<Cfg, In>(p, t, g, kt, vu, s.template zeros_of<In>());
    });
    alignas(64) T qw[2][4][F::HD], ow[2][4][F::HD];  // [row i][query k of the row]: widened queries, float outputs
    // a query's row as T: the input itself, or widened into qw; an output's destination: out itself, or ow
    auto query = [&](int i, int k, int64_t row) -> const T* {
        if (!in) return q + row * F::HD;
        query_rows<T>(in, a.q, row * F::HD, F::HD, qw[i][k]);
        return qw[i][k];
    };
    auto output = [&](int i, int k, int64_t row) -> T* { return in ? ow[i][k] : out + row * F::HD; };
    T* sc = s.scores.data();
    T* pr = s.probs.data();
    const T scale2 = static_cast<T>(a.scale * 1.4426950408889634);  // log2(e)
    constexpr int ROW_SLOTS = (F::TW + V - 1) / V * V;
    constexpr int NS = F::NSEG * V;
    alignas(64) T row_m2[2][ROW_SLOTS], row_l[2][ROW_SLOTS];
    for (int i = 0; i < ROW_SLOTS; ++i) row_m2[0][i] = row_l[0][i] = row_m2[1][i] = row_l[1][i] = T(1);
    int64_t lo[3], hi[3];
    for (int d = 0; d < 3; ++d) {
        lo[d] = int64_t(t.tile[d]) * p.tile[d];
        hi[d] = std::min(lo[d] + p.tile[d], t.ax[d]->length);
    }
    const int64_t step2 = a.dilation[2] * a.heads;
    const UnionStrides<Cfg> ust;
    const T* vsrc = reinterpret_cast<const T*>(a.v);
    const int64_t vrow = a.heads_kv * F::HD;  // one token of v
    const SourceStrides sst{a.dilation[0] * a.length[1] * a.length[2] * vrow, a.dilation[1] * a.length[2] * vrow,
                            a.dilation[2] * vrow};
    // queries in 2 x 2 blocks (two rows of axis 1, two neighbours on the last axis): scores of the two queries
    // stacked on axis 1 together (fixed_scores2), the softmax of the block's four together (fixed_probs), P.V
    // of the two side by side on the last axis together (fixed_pv2)
    // P.V of tile row i's query qa and, where `both`, its right neighbour qb (probabilities at pa, pb; window
    // corners, rows, inverse sums and columns in corner[q], row[q], inv[q], col[q]; vcorner: the row's value
    // corner in v): fixed_pv2 where qb's window is qa's shifted by 1 or 0 columns (each value row loaded once
    // for both), else each alone; 16-bit outputs narrowed as written
    auto pv_pair = [&](int i, int qa, int qb, bool both, const T* pa, const T* pb, const int64_t* corner,
                       const int64_t* row, const T* inv, const int64_t* col, int64_t vcorner) {
        const int64_t delta = both ? corner[qb] - corner[qa] : -1;
        auto pv = [&](const auto& st, const auto& corner_of) {
            if (delta == 1)
                fixed_pv2<Cfg, 0, 1>(corner_of(qa), st, pa, pb, output(i, qa, row[qa]), output(i, qb, row[qb]),
                                     inv[qa], inv[qb]);
            else if (delta == 0)
                fixed_pv2<Cfg, 0, 0>(corner_of(qa), st, pa, pb, output(i, qa, row[qa]), output(i, qb, row[qb]),
                                     inv[qa], inv[qb]);
            else {
                fixed_pv<Cfg, 0>(corner_of(qa), st, pa, output(i, qa, row[qa]), inv[qa]);
                if (both) fixed_pv<Cfg, 0>(corner_of(qb), st, pb, output(i, qb, row[qb]), inv[qb]);
            }
        };
        if (p.fixed_gathers_values)
            pv(ust, [&](int q) { return vu + corner[q] * F::HD; });
        else
            pv(sst, [&](int q) { return vsrc + vcorner + t.ax[2]->start[col[q]] * sst.s2; });
        if (in)
            for (int q = qa; q <= (both ? qb : qa); ++q) output_rows<T>(in, ow[i][q], F::HD, a.out, row[q] * F::HD);
    };
#if NATGEN_AVX && NATGEN_VEC_BYTES == 64
    // columns l2, l2 + 1 of the rows l1, l1 + 1 (nr of them) with their partners H columns on, as query pairs:
    // query (i, k, h) is row i's column l2 + k + H h, numbered k + 2 h in its row; pair (i, k) holds (i, k, 0)
    // and (i, k, 1), its scores at sc + (2 i + k) NS. Softmax of the block's pairs together (pair_probs), P.V
    // of two side-by-side queries together (fixed_pv2), as in the 2 x 2 block. Columns past the tile's end are
    // left out: a missing column l2 + 1 leaves its pairs out, a missing partner makes its pair the query with
    // itself (its window loaded into both halves, the upper one's numbers dropped), so every query, whichever
    // of its neighbours exist, is computed by the same steps and has the same bits.
    auto pair_block = [&](int64_t l0, int64_t l1, int64_t l2, int nr, int64_t dv, const int64_t* corner01,
                          const int64_t* row01, const int64_t* vcorner01) {
        if constexpr (F::PAIRS) {
            const int n = l2 + 1 < hi[2] ? 2 : 1;  // columns l2, l2 + 1 present
            bool up[2] = {false, false};           // whether column l2 + k + H is
            int64_t row[2][4], corner[2][4];
            const T* qlo[2][2];  // [k][i]
            const T* qhi[2][2];
            for (int k = 0; k < n; ++k) {
                up[k] = l2 + k + F::H < hi[2];
                for (int h = 0; h < 2; ++h)
                    for (int i = 0; i < nr; ++i) {
                        const int q = k + 2 * h;
                        if (h && !up[k]) {  // the query with itself
                            row[i][q] = row[i][k];
                            corner[i][q] = corner[i][k];
                            qhi[k][i] = qlo[k][i];
                            continue;
                        }
                        const int64_t col = l2 + k + F::H * h;
                        row[i][q] = row01[i] + col * step2;
                        corner[i][q] = corner01[i] + t.ax[2]->start[col];
                        // bf16 dot products read the query's bf16 channel pairs where they are
                        (h ? qhi : qlo)[k][i] =
                            p.bf16_dot ? reinterpret_cast<const T*>(reinterpret_cast<const bf16*>(a.q) + row[i][q] * F::HD)
                                       : query(i, q, row[i][q]);
                    }
            }
            alignas(64) Vec mx[4];
            for (int k = 0; k < n; ++k) {
                const int64_t s8 = corner[0][k + 2] - corner[0][k];  // the same on every row
                T* scp[2] = {sc + k * NS, sc + (2 + k) * NS};
                Vec m[2];
                auto scores = [&](auto bf16_dot) {
                    constexpr bool B = decltype(bf16_dot)::value;
                    if (nr == 2 && dv == 1 && s8 == F::H)
                        pair_scores<Cfg, 2, 1, true, B>(kt + corner[0][k], s8, qlo[k], qhi[k], scp, m);
                    else if (nr == 2 && dv == 1)
                        pair_scores<Cfg, 2, 1, false, B>(kt + corner[0][k], s8, qlo[k], qhi[k], scp, m);
                    else if (nr == 2 && dv == 0 && s8 == F::H)
                        pair_scores<Cfg, 2, 0, true, B>(kt + corner[0][k], s8, qlo[k], qhi[k], scp, m);
                    else if (nr == 2 && dv == 0)
                        pair_scores<Cfg, 2, 0, false, B>(kt + corner[0][k], s8, qlo[k], qhi[k], scp, m);
                    else
                        for (int i = 0; i < nr; ++i) {
                            if (s8 == F::H)
                                pair_scores<Cfg, 1, 0, true, B>(kt + corner[i][k], s8, &qlo[k][i], &qhi[k][i], &scp[i],
                                                                &m[i]);
                            else
                                pair_scores<Cfg, 1, 0, false, B>(kt + corner[i][k], s8, &qlo[k][i], &qhi[k][i], &scp[i],
                                                                 &m[i]);
                        }
                };
                if (p.bf16_dot)
                    scores(std::true_type{});
                else
                    scores(std::false_type{});
                for (int i = 0; i < nr; ++i) mx[2 * i + k] = m[i];
            }
            if (a.rpb) {
                // each query's bias, added before the softmax (masked loads: no entry past a row is read)
                for (int i = 0; i < nr; ++i)
                    for (int k = 0; k < n; ++k) {
                        const T* rlo[F::ROWS];
                        const T* rhi[F::ROWS];
                        fixed_bias_rows<Cfg>(p, t, l0, l1 + i, l2 + k, rlo);
                        fixed_bias_rows<Cfg>(p, t, l0, l1 + i, l2 + k + (up[k] ? F::H : 0), rhi);
                        mx[2 * i + k] = pair_bias<Cfg>(sc + (2 * i + k) * NS, rlo, rhi, T(1) / T(a.scale));
                    }
            }
            T inv[2][4];
            {
                // the block's pairs (2 i + k); the four slots repeat them where they are fewer
                int present[4], count = 0;
                for (int i = 0; i < nr; ++i)
                    for (int k = 0; k < n; ++k) present[count++] = 2 * i + k;
                const T* scq[4];
                T* prq[4];
                Vec mxq[4];
                for (int j = 0; j < 4; ++j) {
                    const int q = present[j % count];
                    scq[j] = sc + q * NS;
                    prq[j] = pr + q * NS;
                    mxq[j] = mx[q];
                }
                T m2q[8], lq[8];
                pair_probs<Cfg>(scq, mxq, scale2, prq, m2q, lq);
                for (int j = 0; j < count; ++j) {
                    const int i = present[j] / 2, k = present[j] % 2;
                    for (int h = 0; h < (up[k] ? 2 : 1); ++h) {
                        const int64_t slot = l2 + k + F::H * h - lo[2];
                        inv[i][k + 2 * h] = T(1) / lq[2 * j + h];
                        row_m2[i][slot] = m2q[2 * j + h];
                        row_l[i][slot] = lq[2 * j + h];
                    }
                }
            }
            const int64_t col[4] = {l2, l2 + 1, l2 + F::H, l2 + F::H + 1};  // query q's column
            for (int i = 0; i < nr; ++i)
                for (int h = 0; h < (up[0] ? 2 : 1); ++h)  // queries (i, 0, h), (i, 1, h)
                    pv_pair(i, 2 * h, 2 * h + 1, n == 2 && (h == 0 || up[1]), pr + 2 * i * NS + F::H * h,
                            pr + (2 * i + 1) * NS + F::H * h, corner[i], row[i], inv[i], col, vcorner01[i]);
        }
    };
#endif
    for (int64_t l0 = lo[0]; l0 < hi[0]; ++l0)
    for (int64_t l1 = lo[1]; l1 < hi[1]; l1 += 2) {
        const int nr = l1 + 1 < hi[1] ? 2 : 1;
        const int64_t x0 = l0 * a.dilation[0] + t.ax[0]->group;
        int64_t corner01[2], row01[2], vcorner01[2];
        for (int i = 0; i < nr; ++i) {
            const int64_t x1 = (l1 + i) * a.dilation[1] + t.ax[1]->group;
            corner01[i] = ((t.ax[0]->start[l0] - g.lo[0]) * F::ROWS1 + t.ax[1]->start[l1 + i] - g.lo[1]) * F::ROWLEN -
                          g.lo[2];
            row01[i] = (t.b * p.tokens + (x0 * a.length[1] + x1) * a.length[2] + t.ax[2]->group) * a.heads + t.h;
            const int64_t w0 = t.ax[0]->start[l0] * a.dilation[0] + t.ax[0]->group;
            const int64_t w1 = t.ax[1]->start[l1 + i] * a.dilation[1] + t.ax[1]->group;
            vcorner01[i] = ((t.b * p.tokens + (w0 * a.length[1] + w1) * a.length[2] + t.ax[2]->group) * a.heads_kv +
                            t.hk) * F::HD;
        }
        const int64_t dv = nr == 2 ? (corner01[1] - corner01[0]) / F::ROWLEN : -1;
        // the block of columns l2, l2 + 1 (n of them)
        auto block = [&](int64_t l2) {
            const int n = l2 + 1 < hi[2] ? 2 : 1;
            int64_t row[2][2], corner[2][2];
            T inv[2][2];
            // query (i, k) is number 2 i + k: its scores at sc + (2 i + k) NS, its probabilities at pr + (2 i + k) NS
            alignas(64) Vec mx[4];
            for (int k = 0; k < n; ++k) {
                const T* qk[2];
                for (int i = 0; i < nr; ++i) {
                    row[i][k] = row01[i] + (l2 + k) * step2;
                    corner[i][k] = corner01[i] + t.ax[2]->start[l2 + k];
                    qk[i] = query(i, k, row[i][k]);
                }
                if (dv == 1)
                    fixed_scores2<Cfg, 1>(kt + corner[0][k], qk[0], qk[1], sc + k * NS, sc + (2 + k) * NS, mx + k,
                                          mx + 2 + k);
                else if (dv == 0)
                    fixed_scores2<Cfg, 0>(kt + corner[0][k], qk[0], qk[1], sc + k * NS, sc + (2 + k) * NS, mx + k,
                                          mx + 2 + k);
                else
                    for (int i = 0; i < nr; ++i)
                        fixed_scores<Cfg>(kt + corner[i][k], qk[i], sc + (2 * i + k) * NS, mx + 2 * i + k);
            }
            if (a.rpb) {
                // each query's bias, added before the softmax
                const T* end = reinterpret_cast<const T*>(a.rpb) +
                               a.heads * (2 * F::K0 - 1) * (2 * F::K1 - 1) * (2 * F::K2 - 1);
                for (int i = 0; i < nr; ++i)
                    for (int k = 0; k < n; ++k) {
                        const T* rows[F::ROWS];
                        fixed_bias_rows<Cfg>(p, t, l0, l1 + i, l2 + k, rows);
                        mx[2 * i + k] = fixed_bias<Cfg>(sc + (2 * i + k) * NS, rows, T(1) / T(a.scale), end);
                    }
            }
            {
                // the block's queries (2 i + k), softmaxed together; a lone query fills its pair's second slot too
                int present[4], count = 0;
                for (int i = 0; i < nr; ++i)
                    for (int k = 0; k < n; ++k) present[count++] = 2 * i + k;
                const T* scq[4];
                T* prq[4];
                Vec mxq[4];
                for (int j = 0; j < 4; ++j) {
                    const int q = present[j < count ? j : 0];
                    scq[j] = sc + q * NS;
                    prq[j] = pr + q * NS;
                    mxq[j] = mx[q];
                }
                T m2q[4], lq[4];
                if (count > 2)
                    fixed_probs<Cfg, 4>(scq, mxq, scale2, prq, m2q, lq);
                else
                    fixed_probs<Cfg, 2>(scq, mxq, scale2, prq, m2q, lq);
                for (int j = 0; j < count; ++j) {
                    const int i = present[j] / 2, k = present[j] % 2;
                    const int64_t slot = l2 + k - lo[2];
                    inv[i][k] = T(1) / lq[j];
                    row_m2[i][slot] = m2q[j];
                    row_l[i][slot] = lq[j];
                }
            }
            const int64_t col[2] = {l2, l2 + 1};
            for (int i = 0; i < nr; ++i)
                pv_pair(i, 0, 1, n == 2, pr + 2 * i * NS, pr + (2 * i + 1) * NS, corner[i], row[i], inv[i], col,
                        vcorner01[i]);
        };
#if NATGEN_AVX && NATGEN_VEC_BYTES == 64
        if constexpr (F::PAIRS) {
            // runs of V columns: blocks l2, l2 + 1 of the first half paired with l2 + H, l2 + H + 1
            for (int64_t c0 = lo[2]; c0 < hi[2]; c0 += V)
                for (int64_t l2 = c0; l2 < std::min(c0 + F::H, hi[2]); l2 += 2)
                    pair_block(l0, l1, l2, nr, dv, corner01, row01, vcorner01);
        } else
#endif
        {
            for (int64_t l2 = lo[2]; l2 < hi[2]; l2 += 2) block(l2);
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

// 16-bit inputs (Args::input_dtype: q, k, v, extra tokens) are widened as read, out rounded as written.
template <class Cfg> NATGEN_INLINE void forward_tile(const Plan& p, const TileRef& t, FwdScratch<typename Cfg::T>& s) {
    if constexpr (FixedFwd<Cfg>::enabled) {
        if (p.fixed) {
            fixed_tile<Cfg>(p, t, s);
            return;
        }
    }
    typedef typename Cfg::T T;
    constexpr int V = VecTraits<T>::width;
    const Args& a = *p.a;
    const int64_t in = input_kind<T>(a);  // 0: q / k / v / out are T
    T* lse = reinterpret_cast<T*>(a.lse);
    const Geometry g = geometry<Cfg>(p, t);
    with_input<T>(in, [&](auto tag) {
        typedef typename decltype(tag)::type In;
        gather<T, In>(p, t, g, reinterpret_cast<const In*>(a.k), reinterpret_cast<const In*>(a.extra_k), p.hd, p.hd,
                      true, s.kt.data(), g.total, s.template rows_of<In>(), s.template zeros_of<In>());
        gather<T, In>(p, t, g, reinterpret_cast<const In*>(a.v), reinterpret_cast<const In*>(a.extra_v), p.hdv,
                      p.hdv_padded, false, s.vu.data(), p.hdv_padded, s.template rows_of<In>(),
                      s.template zeros_of<In>());
    });
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
        const T* qr = reinterpret_cast<const T*>(a.q) + row * p.hd;
        if (in) {
            query_rows<T>(in, a.q, row * p.hd, p.hd, s.qrow.data());
            qr = s.qrow.data();
        }
        dot_segments<T, Cfg::HD>(s.kt.data(), g.total, s.bases.data(), nseg, qr, p.hd, s.scores.data());
        if (a.rpb) add_bias_segments<Cfg>(p, t, local, T(1) / scale, s.scores.data());
        T m, l;
        softmax_slots<T>(s.scores.data(), s.valid.data(), nseg, scale, s.probs.data(), m, l);
        weighted_rows<T>(s.vu.data(), p.hdv_padded, s.bases.data(), nseg, s.probs.data(), p.hdv_padded / V,
                         s.acc.data());
        const T inv = T(1) / l;
        if (in) {
            for (int64_t d = 0; d < p.hdv; ++d) s.acc[d] *= inv;
            output_rows<T>(in, s.acc.data(), p.hdv, a.out, row * p.hdv);
        } else {
            T* o = reinterpret_cast<T*>(a.out) + row * p.hdv;
            for (int64_t d = 0; d < p.hdv; ++d) o[d] = s.acc[d] * inv;
        }
        if (lse) lse[row] = m + std::log(l);
    }
}

}  // namespace fwd

