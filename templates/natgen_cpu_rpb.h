// natgen CPU kernels: the relative positional bias (rpb [heads, 2*K0-1, 2*K1-1, 2*K2-1], front-padded like
// every per-axis field: a padded axis has K = 1, one entry). Kept apart from the forward and backward bodies:
// they call it where their logits are formed.
// Part of the per-ISA variant body (natgen_cpu_variant.h): no include guard, no namespace of its own;
// natgen_cpu.h includes it once per variant inside namespace natgen::<isa>.

// Adds the bias of one query (group-local coordinates `local`, tile t) to its window segments' scores, in the
// order query_segments lays them out (window rows (a0, a1), then runs of up to V keys along the last axis).
// The forward scales the scores inside its softmax, so the bias goes in divided by the scale.
template <class Cfg>
NATGEN_INLINE void add_bias_segments(const Plan& p, const TileRef& t, const int64_t* local,
                                     typename Cfg::T inv_scale, typename Cfg::T* __restrict scores) {
    typedef typename Cfg::T T;
    constexpr int V = VecTraits<T>::width;
    const Args& a = *p.a;
    int64_t span[3], count[3], first[3];
    for (int d = 0; d < 3; ++d) {
        span[d] = 2 * p.K[d] - 1;
        const int64_t start = t.ax[d]->start[local[d]];
        count[d] = t.ax[d]->end[local[d]] - start;
        first[d] = p.K[d] - 1 + start - local[d];  // the entry of the window's first key: offsets in -(K-1)..K-1
    }
    const T* table = reinterpret_cast<const T*>(a.rpb) + t.h * span[0] * span[1] * span[2];
    int n = 0;
    for (int64_t a0 = 0; a0 < count[0]; ++a0) {
        for (int64_t a1 = 0; a1 < count[1]; ++a1) {
            const T* row = table + ((first[0] + a0) * span[1] + first[1] + a1) * span[2] + first[2];
            for (int64_t c = 0; c < p.chunks; ++c, ++n) {
                const int64_t lanes = std::min<int64_t>(count[2] - c * V, V);
                if (lanes <= 0) break;
                for (int64_t j = 0; j < lanes; ++j) scores[n * V + j] += row[c * V + j] * inv_scale;
            }
        }
    }
}

// Entries of one head's bias table.
inline int64_t rpb_entries(const Plan& p) { return (2 * p.K[0] - 1) * (2 * p.K[1] - 1) * (2 * p.K[2] - 1); }

// Calls fn(score index, table entry) for every window cell of a backward lane group (natgen_cpu_lanes.h's
// lane_group: rows (a0, a1) of the shared leading-axis window, columns shifted with the lanes). Every lane of a
// cell reads the same entry: lane j is the query l2 + j and its key in column c is col_lo + c + j, so the key's
// offset col_lo + c - l2 does not depend on j. Each column is in some lane's window, so its offset is in range.
template <class Cfg, class Fn>
NATGEN_INLINE void for_each_bias_cell(const Plan& p, const TileRef& t, const LaneGroup<typename Cfg::T>& lg,
                                      int64_t l0, int64_t l1, int64_t l2, Fn fn) {
    constexpr int V = VecTraits<typename Cfg::T>::width;
    const AxisGroup& ax2 = *t.ax[2];
    int64_t col_lo = INT64_MAX;
    for (int j = 0; j < lg.lanes; ++j) col_lo = std::min(col_lo, ax2.start[l2 + j] - j);
    const int64_t s0 = t.ax[0]->start[l0], n0 = t.ax[0]->end[l0] - s0;
    const int64_t s1 = t.ax[1]->start[l1], n1 = t.ax[1]->end[l1] - s1;
    const int64_t span1 = 2 * p.K[1] - 1, span2 = 2 * p.K[2] - 1;
    int64_t r = 0;
    for (int64_t a0 = 0; a0 < n0; ++a0)
        for (int64_t a1 = 0; a1 < n1; ++a1, ++r) {
            const int64_t entry = ((p.K[0] - 1 + s0 + a0 - l0) * span1 + p.K[1] - 1 + s1 + a1 - l1) * span2 +
                                  p.K[2] - 1 + col_lo - l2;
            for (int64_t c = 0; c < lg.cols; ++c) fn((r * lg.cols + c) * V, entry + c);
        }
}

// Backward: adds query head t.h's bias to a lane group's scaled scores (before P is recomputed from them).
template <class Cfg>
NATGEN_INLINE void add_bias_cells(const Plan& p, const TileRef& t, const LaneGroup<typename Cfg::T>& lg,
                                  int64_t l0, int64_t l1, int64_t l2, typename Cfg::T* __restrict sc) {
    typedef typename Cfg::T T;
    typedef typename VecTraits<T>::type Vec;
    const T* table = reinterpret_cast<const T*>(p.a->rpb) + t.h * rpb_entries(p);
    for_each_bias_cell<Cfg>(p, t, lg, l0, l1, l2, [&](int64_t i, int64_t entry) {
        store<T>(sc + i, load<T>(sc + i) + (Vec{} + table[entry]));
    });
}

// Backward: adds a lane group's logit gradients dS = P (dP - D) (unscaled: the bias is added after the scale)
// into its unit's bias grads [query heads of the unit's kv head][entries], lanes in order.
template <class Cfg>
NATGEN_INLINE void accumulate_bias_grads(const Plan& p, const TileRef& t, const LaneGroup<typename Cfg::T>& lg,
                                         int64_t l0, int64_t l1, int64_t l2, const typename Cfg::T* __restrict ds,
                                         typename Cfg::T* __restrict unit_grads) {
    typedef typename Cfg::T T;
    const Args& a = *p.a;
    T* grads = unit_grads + (t.h - t.hk * (a.heads / a.heads_kv)) * rpb_entries(p);
    for_each_bias_cell<Cfg>(p, t, lg, l0, l1, l2, [&](int64_t i, int64_t entry) {
        T sum = 0;
        for (int j = 0; j < lg.lanes; ++j) sum += ds[i + j];
        grads[entry] += sum;
    });
}

// Backward driver: grad_rpb [heads][entries] as the sum of every unit's bias grads, in unit order (the same
// result for any thread count). A unit is (batch, kv head, dilation groups, band); `groups` units per (batch, kv
// head).
template <typename T>
inline void reduce_bias_grads(const Plan& p, const std::vector<T>& per_unit, int64_t units, int64_t groups) {
    const Args& a = *p.a;
    const int64_t entries = rpb_entries(p), group = a.heads / a.heads_kv, block = group * entries;
    T* grad = reinterpret_cast<T*>(a.grad_rpb);
    std::fill(grad, grad + a.heads * entries, T(0));
    for (int64_t unit = 0; unit < units; ++unit) {
        const int64_t hk = (unit / groups) % a.heads_kv;
        const T* src = per_unit.data() + unit * block;
        T* dst = grad + hk * block;
        for (int64_t i = 0; i < block; ++i) dst[i] += src[i];
    }
}

