// natgen CPU kernels: the relative positional bias (rpb [heads, 2*K0-1, 2*K1-1, 2*K2-1], front-padded like
// every per-axis field: a padded axis has K = 1, one entry). Kept apart from the forward and backward bodies:
// they call it where their logits are formed.
#pragma once

namespace natgen {

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

}  // namespace natgen
