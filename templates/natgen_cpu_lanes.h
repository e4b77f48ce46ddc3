// natgen CPU kernels: the lane scheme the backward runs on. V neighbouring queries along the last axis side
// by side in one vector: the lane kernels (scores, weighted sums, per-key accumulation), the tile's key
// union gathered transposed per union row, lane groups with their window rows and masks, lane softmax.
// Part of the per-ISA variant body (natgen_cpu_variant.h): no include guard, no namespace of its own;
// natgen_cpu.h includes it once per variant inside namespace natgen::<isa>.

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
            // two sets, even and odd lanes: NVEC chains alone would wait on the FMA latency (cpu-1d backward)
            Vec acc[2][NVEC];
            for (int v = 0; v < NVEC; ++v) acc[0][v] = acc[1][v] = Vec{};
            const int64_t jlo = std::max<int64_t>(0, t - cols + 1), jhi = std::min<int64_t>(lanes, t + 1);
            int64_t j = jlo;
            for (; j + 1 < jhi; j += 2)
                for (int k = 0; k < 2; ++k) {
                    const T wj = wr[(t - j - k) * V + j + k];
                    const T* xj = x[j + k] + d0;
                    for (int v = 0; v < NVEC; ++v) acc[k][v] += wj * load<T>(xj + v * V);
                }
            if (j < jhi) {
                const T wj = wr[(t - j) * V + j];
                const T* xj = x[j] + d0;
                for (int v = 0; v < NVEC; ++v) acc[0][v] += wj * load<T>(xj + v * V);
            }
            T* o = dst + (row_off[r] + t) * dim + d0;
            for (int v = 0; v < NVEC; ++v)
                store<T>(o + v * V, load<T>(o + v * V) + alpha * (acc[0][v] + acc[1][v]));
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

// Gathers the tile's key union of its key/value head from [batch, tokens, heads_kv, dim] into dst (layout
// above) and the extra tokens into edst[d * n_extra + e], widening inputs of another type (bf16, f16).
template <typename T, typename In>
NATGEN_INLINE void gather(const Plan& p, const TileRef& t, const TileGeometry& g, const In* src, const In* extra,
                          int64_t dim, T* dst, T* edst, const In* zeros) {
    const Args& a = *p.a;
    const int64_t heads = a.heads_kv, base = t.b * p.tokens * heads;  // key/value rows
    for (int64_t ur = 0; ur < g.nrows; ++ur) {
        int64_t token;
        const bool row_inside = union_row_token(a, t, g, ur, token);
        T* block = dst + ur * g.bs;
        // V columns at a time (a union row's stride is whole cache lines, so never past it)
        constexpr int V = VecTraits<T>::width;
        for (int64_t c8 = 0; c8 < g.row_len; c8 += V) {
            const In* r[V];
            bool empty = true;
            for (int l = 0; l < V; ++l) {
                int64_t l2;
                const bool inside = row_inside && union_column(t, g, c8 + l, l2);
                r[l] = inside ? src + (base + (token + l2 * a.dilation[2]) * heads + t.hk) * dim : zeros;
                empty &= !inside;
            }
            if (empty) {
                for (int64_t d = 0; d < dim; ++d) std::memset(block + d * g.rs + c8, 0, V * sizeof(T));
            } else {
                rows_to_lanes<T, In>(r, dim, block + c8, g.rs);
            }
        }
        // the stride's tail: read by masked cells (0 * tail), so it must hold zeros, not an earlier tile's keys
        const int64_t tail = (g.row_len + V - 1) / V * V;
        for (int64_t d = 0; d < dim && tail < g.rs; ++d) std::memset(block + d * g.rs + tail, 0, (g.rs - tail) * sizeof(T));
    }
    for (int64_t e = 0; e < p.n_extra; ++e) {
        const In* row = extra + ((t.b * p.n_extra + e) * heads + t.hk) * dim;
        for (int64_t d = 0; d < dim; ++d) edst[d * p.n_extra + e] = widen(row[d]);
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

