// natgen CPU kernels: the backward. Fixed-shape lane-group kernels (constant K and head_dim; in the AVX2 and
// AVX-512 variants) and backward_tile, which runs every lane group of a tile through them or the general lane kernels.
// Part of the per-ISA variant body (natgen_cpu_variant.h): no include guard, no namespace of its own;
// natgen_cpu.h includes it once per variant inside namespace natgen::<isa>.

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
// the general lane kernels (natgen_cpu_lanes.h). Measured on cpu-2d (2 AMD EPYC cores, 1 thread): 2.60 -> 1.85 ms.
template <class Cfg, int NC_ = Cfg::K[2]> struct Fixed {
    typedef typename Cfg::T T;
    static constexpr int V = VecTraits<T>::width;
    static constexpr int K0 = Cfg::K[0], K1 = Cfg::K[1], K2 = Cfg::K[2], HD = Cfg::HD;
    static constexpr bool on = kFixedPaths && K0 > 0 && K1 > 0 && K2 > 0 && K2 <= 14 && HD > 0 && HD % V == 0 && !Cfg::C[0] &&
                               !Cfg::C[1] && !Cfg::C[2];
    // columns per window row: K2, or for a masked group K2 + K2 / 2 (a border group holding all K2 / 2
    // clamped queries of its side and the shifted ones next to them), whose cells outside a lane's window
    // are masked
    static constexpr int NC = NC_;
    static constexpr bool masked = NC != K2;
    static constexpr int NC_BORDER = K2 + K2 / 2;
    static constexpr bool border_on = on && K2 / 2 > 0 && K2 / 2 < V && NC_BORDER <= 14;
    // a group holding both borders' clamped queries (an axis not much wider than the lanes: 14x14 on
    // AVX-512, 7x7 with K=7 anywhere) reads K2 + 2 (K2 / 2) columns
    static constexpr int NC_BOTH = K2 + 2 * (K2 / 2);
    static constexpr bool both_on = border_on && NC_BOTH <= 14;
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

// One lane group through the fixed-shape kernels (out of line: one copy for both call sites).

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
    const int64_t in = input_kind<T>(a);  // 16-bit q / dO / out rows: widened here (see query_rows)
    T* xw = xo + V * HD;                  // out rows, widened
    for (int j = 0; j < V; ++j) {
        query_rows<T>(in, a.q, lg.qrow[j] * HD, HD, xq + j * HD);
        query_rows<T>(in, a.grad_out, lg.qrow[j] * HD, HD, xo + j * HD);
        if (in) query_rows<T>(in, a.out, lg.qrow[j] * HD, HD, xw + j * HD);
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
        const T* o = in ? xw + j * HD : out + lg.qrow[j] * HD;
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

// (The query loop below repeats forward_tile's rather than sharing a helper that takes a lambda: under the
// former target_clones scheme the lambda ran the baseline ISA, 7x slower on cpu-2d; with the per-variant
// `#pragma GCC target` a lambda would be built for its variant, but the loops stay apart, one per job.)
//
// One backward unit = one (batch, key/value head, dilation-group combination): it owns every key its queries
// can see, for every query head reading that key/value head, so dK/dV accumulate without races and in a fixed
// order; its tiles run in order, and a tile's gathered keys serve each of the group's query heads in turn.
template <class Cfg> NATGEN_INLINE void backward_tile(const Plan& p, const TileRef& t, Scratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    constexpr int V = VecTraits<T>::width;
    const Args& a = *p.a;
    const auto [q, dout, lse, out, grad_lse, dq] = query_side<T>(a);
    T* dk = reinterpret_cast<T*>(a.grad_k);
    T* dv = reinterpret_cast<T*>(a.grad_v);
    const TileGeometry g = tile_geometry<Cfg>(p, t);
    // 16-bit inputs (Args::input_dtype): a runtime branch, so only the gathers and row copies exist per type
    const int64_t in = input_kind<T>(a);
    with_input<T>(in, [&](auto tag) {
        typedef typename decltype(tag)::type In;
        gather<T, In>(p, t, g, reinterpret_cast<const In*>(a.k), reinterpret_cast<const In*>(a.extra_k), p.hd,
                      s.kt.data(), s.ekt.data(), s.template zeros_of<In>());
        gather<T, In>(p, t, g, reinterpret_cast<const In*>(a.v), reinterpret_cast<const In*>(a.extra_v), p.hdv,
                      s.vt.data(), s.evt.data(), s.template zeros_of<In>());
    });
    // (the key-grad buffers are all zero here: zeroed once, and the flush below zeroes what it read)
    const T scale = static_cast<T>(a.scale);
    int64_t lo[3], hi[3];
    for (int d = 0; d < 3; ++d) {
        lo[d] = int64_t(t.tile[d]) * p.tile[d];
        hi[d] = std::min(lo[d] + p.tile[d], t.ax[d]->length);
    }
    const int64_t group = a.heads / a.heads_kv;  // query heads per key/value head
    TileRef tq = t;
    for (tq.h = t.hk * group; tq.h < (t.hk + 1) * group; ++tq.h)
    for (int64_t l0 = lo[0]; l0 < hi[0]; ++l0)
    for (int64_t l1 = lo[1]; l1 < hi[1]; ++l1)
    for (int64_t l2 = lo[2]; l2 < hi[2]; l2 += V) {
        const LaneGroup<T> lg = lane_group<Cfg>(p, tq, g, l0, l1, l2, hi[2], s);
        if constexpr (Fixed<Cfg>::on) {
            typedef Fixed<Cfg> F;
            typedef Fixed<Cfg, F::NC_BORDER> FB;
            if (lg.rows == F::K0 * F::K1 && p.n_extra == 0 && !a.rpb && p.hd == Cfg::HD && p.hdv == Cfg::HD) {
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
                if constexpr (F::both_on) {
                    typedef Fixed<Cfg, F::NC_BOTH> FC;
                    if (!lg.uniform && lg.cols == FC::NC && g.rs == FC::RS) {
                        fixed_group<Cfg, FC::NC>(p, lg, s);
                        continue;
                    }
                }
            }
        }
        const T* qr[V];
        const T* dor[V];
        T* dqr[V];
        T* xw = s.xr.data();  // 16-bit inputs: the lanes' q, dO and out rows widened, [3][V][dims]
        for (int j = 0; j < V; ++j) {
            const bool real = j < lg.lanes;
            qr[j] = real ? q + lg.qrow[j] * p.hd : s.zeros.data();
            dor[j] = real ? dout + lg.qrow[j] * p.hdv : s.zeros.data();
            dqr[j] = real ? dq + lg.qrow[j] * p.hd : s.sink.data();
            if (in && real) {
                T* rq = xw + j * p.dims;
                T* ro = xw + (V + j) * p.dims;
                query_rows<T>(in, a.q, lg.qrow[j] * p.hd, p.hd, rq);
                query_rows<T>(in, a.grad_out, lg.qrow[j] * p.hdv, p.hdv, ro);
                qr[j] = rq;
                dor[j] = ro;
            }
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
        if (a.rpb) add_bias_cells<Cfg>(p, tq, lg, l0, l1, l2, s.sc.data());
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
        for (int j = 0; j < V; ++j) {
            orr[j] = j < lg.lanes ? out + lg.qrow[j] * p.hdv : s.zeros.data();
            if (in && j < lg.lanes) {
                T* row = xw + (2 * V + j) * p.dims;
                query_rows<T>(in, a.out, lg.qrow[j] * p.hdv, p.hdv, row);
                orr[j] = row;
            }
        }
        rows_to_lanes<T>(orr, p.hdv, s.ot.data(), V);
        Vec di = Vec{};
        for (int64_t e = 0; e < p.hdv; ++e) di += load<T>(s.dot.data() + e * V) * load<T>(s.ot.data() + e * V);
        if (grad_lse)
            for (int j = 0; j < lg.lanes; ++j) di[j] -= grad_lse[lg.qrow[j]];
        T* ds = s.dp.data();
        for (int64_t i = 0; i < nvec; ++i) store<T>(ds + i * V, load<T>(pr + i * V) * (load<T>(ds + i * V) - di));
        if (a.grad_rpb) accumulate_bias_grads<Cfg>(p, tq, lg, l0, l1, l2, ds, s.rpb_grads.data());
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
    // wrote, for the next tile and call; a union row's keys are one run of columns
    const int64_t heads = a.heads_kv, base = t.b * p.tokens * heads;
    const int64_t hd = Cfg::HD ? Cfg::HD : p.hd, hdv = Cfg::HD ? Cfg::HD : p.hdv;
    const int64_t u_lo = g.lpad, u_hi = g.lpad + std::min(g.extent[2], t.ax[2]->length - g.lo[2]);
    const int64_t kstride = a.dilation[2] * heads;
    for (int64_t ur = 0; ur < g.nrows; ++ur) {
        int64_t token;
        T* sk = s.dkr.data() + ur * g.rs * hd;
        T* sv = s.dvr.data() + ur * g.rs * hdv;
        if (union_row_token(a, t, g, ur, token)) {
            const int64_t row0 = base + (token + g.lo[2] * a.dilation[2]) * heads + t.hk - g.lpad * kstride;
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
        // the whole stride: masked cells add 0 * q (NaN for a non-finite q) past row_len too
        std::memset(sk, 0, g.rs * hd * sizeof(T));
        std::memset(sv, 0, g.rs * hdv * sizeof(T));
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

