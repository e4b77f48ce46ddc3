// natgen CPU kernels: the drivers. Work units (forward: a query tile, backward: a dilation-group
// combination), the OpenMP loop over them, and run_forward / run_backward, which the generated entry
// points call.
// Part of the per-ISA variant body (natgen_cpu_variant.h): no include guard, no namespace of its own;
// natgen_cpu.h includes it once per variant inside namespace natgen::<isa>.

// ------------------------------------------------------------------------------------- drivers
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
    t.hk = t.h / (p.a->heads / p.a->heads_kv);
    const std::pair<int, int>* items[3] = {&i0, &i1, &i2};
    for (int d = 0; d < 3; ++d) {
        t.ax[d] = &p.axes[d][items[d]->first];
        t.tile[d] = items[d]->second;
    }
    fwd::forward_tile<Cfg>(p, t, s.fwd);
}

// backward units: (batch, key/value head, group of every axis, band), tiles in order; the unit runs every query
// head of its key/value head (backward_tile), so within its phase it alone writes its band's key grads
template <class Cfg> NATGEN_INLINE void backward_unit(const Plan& p, int64_t unit, Scratch<typename Cfg::T>& s) {
    typedef typename Cfg::T T;
    TileRef t;
    const int64_t n2 = p.axes[2].size(), n1 = p.axes[1].size(), n0 = p.axes[0].size();
    const int64_t band = unit % p.bands;
    int64_t r = unit / p.bands;
    t.ax[2] = &p.axes[2][r % n2]; r /= n2;
    t.ax[1] = &p.axes[1][r % n1]; r /= n1;
    t.ax[0] = &p.axes[0][r % n0]; r /= n0;
    t.hk = r % p.a->heads_kv;
    t.b = r / p.a->heads_kv;
    t.h = t.hk * (p.a->heads / p.a->heads_kv);  // its first query head (backward_tile runs them all)
    // tiles of this band: [first, end) along the band axis (every tile along the others)
    const int bd = p.band_axis;
    const AxisGroup& bax = *t.ax[bd];
    const int64_t ntiles = bax.tile_lo.size();
    const int64_t first = std::min(band * p.band_tiles, ntiles), end = std::min(first + p.band_tiles, ntiles);
    // the key grads are torch.empty on the Python side: zeroed here, inside the parallel region instead of in
    // a separate pass. An even band zeroes the band-axis positions from its first key up to band + 2's first
    // key (band 0 from 0, the last even band to the end): odd bands run after every even one, and every key
    // lies in exactly one such range; no key of a running band lies in another's range (choose_bands).
    int64_t zlo[3] = {0, 0, 0}, zhi[3] = {t.ax[0]->length, t.ax[1]->length, t.ax[2]->length};
    if (band % 2) {
        zhi[bd] = 0;
    } else if (first < ntiles) {
        zlo[bd] = band ? bax.tile_lo[first] : 0;
        const int64_t next = first + 2 * p.band_tiles;
        if (next < ntiles) zhi[bd] = bax.tile_lo[next];
    } else {
        zhi[bd] = 0;
    }
    const Args& a = *p.a;
    T* dk = reinterpret_cast<T*>(a.grad_k);
    T* dv = reinterpret_cast<T*>(a.grad_v);
    for (int64_t l0 = zlo[0]; l0 < zhi[0]; ++l0)
    for (int64_t l1 = zlo[1]; l1 < zhi[1]; ++l1)
    for (int64_t l2 = zlo[2]; l2 < zhi[2]; ++l2) {
        const int64_t token = ((l0 * a.dilation[0] + t.ax[0]->group) * a.length[1] + l1 * a.dilation[1] +
                               t.ax[1]->group) * a.length[2] + l2 * a.dilation[2] + t.ax[2]->group;
        const int64_t row = (t.b * p.tokens + token) * a.heads_kv + t.hk;
        std::fill(dk + row * p.hd, dk + (row + 1) * p.hd, T(0));
        std::fill(dv + row * p.hdv, dv + (row + 1) * p.hdv, T(0));
    }
    int lo[3], hi[3];
    for (int d = 0; d < 3; ++d) {
        lo[d] = 0;
        hi[d] = int(t.ax[d]->tile_lo.size());
    }
    lo[bd] = int(first);
    hi[bd] = int(end);
    for (t.tile[0] = lo[0]; t.tile[0] < hi[0]; ++t.tile[0])
    for (t.tile[1] = lo[1]; t.tile[1] < hi[1]; ++t.tile[1])
    for (t.tile[2] = lo[2]; t.tile[2] < hi[2]; ++t.tile[2])
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

// bf16_dot: the CPU has AVX512_BF16 and the caller asked for its dot products (kAvx512Bf16)
template <class Cfg> void run_forward(const Args& a, bool bf16_dot = false) {
    typedef typename Cfg::T T;
    const Plan p = make_plan<Cfg>(a, true, bf16_dot);
    const int64_t units = a.batch * a.heads * items_count(p);
    const int64_t workers = std::max<int64_t>(1, std::min(a.threads, units));
    parallel_units(workers, units, [&](int64_t, int64_t unit) {
        // per pool thread, kept between calls: sizing (and zeroing) it on every call cost ~10 us a call on
        // 2 threads. A buffer's stale contents are what an earlier tile of the same call would have left.
        static thread_local Scratch<T> scratch;
        scratch.reserve(p, false);
        forward_unit<Cfg>(p, unit, scratch);
    });
}

template <class Cfg> void run_backward(const Args& a) {
    typedef typename Cfg::T T;
    const Plan p = make_plan<Cfg>(a, false);
    const int64_t groups = int64_t(p.axes[0].size()) * p.axes[1].size() * p.axes[2].size();
    const int64_t per_head = groups * p.bands;  // units per (batch, kv head)
    const int64_t units = a.batch * a.heads_kv * per_head;
    const int64_t extra_row = p.hd + p.hdv;
    std::vector<T> extra(p.n_extra ? units * p.n_extra * extra_row : 0, T(0));
    const int64_t bias_block = a.grad_rpb ? a.heads / a.heads_kv * rpb_entries(p) : 0;
    std::vector<T> bias(units * bias_block, T(0));
    const int64_t workers = std::max<int64_t>(1, std::min(a.threads, units));
    // even bands, then odd bands (one phase when there is one band); each unit's extra-token and bias grads go
    // to its own slot, summed below in unit order: the same result for any thread count
    for (int64_t phase = 0; phase < std::min<int64_t>(2, p.bands); ++phase) {
        const int64_t per_base = (p.bands - phase + 1) / 2, count = units / p.bands * per_base;
        parallel_units(workers, count, [&](int64_t, int64_t i) {
            const int64_t unit = i / per_base * p.bands + phase + 2 * (i % per_base);
            // per pool thread, kept between calls (as the forward's): allocating and zeroing the buffers cost
            // every call tens of microseconds
            static thread_local Scratch<T> s;
            s.reserve(p, true);
            s.extra_grads.assign(p.n_extra * extra_row, T(0));
            s.rpb_grads.assign(bias_block, T(0));
            backward_unit<Cfg>(p, unit, s);
            if (p.n_extra)
                std::copy(s.extra_grads.begin(), s.extra_grads.end(), extra.begin() + unit * p.n_extra * extra_row);
            if (bias_block) std::copy(s.rpb_grads.begin(), s.rpb_grads.end(), bias.begin() + unit * bias_block);
        });
    }
    if (bias_block) reduce_bias_grads<T>(p, bias, units, per_head);
    if (!p.n_extra) return;
    T* dek = reinterpret_cast<T*>(a.grad_extra_k);
    T* dev = reinterpret_cast<T*>(a.grad_extra_v);
    std::fill(dek, dek + a.batch * p.n_extra * a.heads_kv * p.hd, T(0));
    std::fill(dev, dev + a.batch * p.n_extra * a.heads_kv * p.hdv, T(0));
    // summed in unit order: the same result for any thread count
    for (int64_t unit = 0; unit < units; ++unit) {
        const int64_t bh = unit / per_head, b = bh / a.heads_kv, h = bh % a.heads_kv;
        const T* src = extra.data() + unit * p.n_extra * extra_row;
        for (int64_t e = 0; e < p.n_extra; ++e) {
            T* kr = dek + ((b * p.n_extra + e) * a.heads_kv + h) * p.hd;
            T* vr = dev + ((b * p.n_extra + e) * a.heads_kv + h) * p.hdv;
            for (int64_t d = 0; d < p.hd; ++d) kr[d] += src[e * extra_row + d];
            for (int64_t d = 0; d < p.hdv; ++d) vr[d] += src[e * extra_row + p.hd + d];
        }
    }
}

