// natgen CPU kernels: the work plan. The window rule in
// group-local coordinates, per-axis dilation groups with every query's window and every tile's key union,
// the specialized forward's fixed layout, the per-thread scratch buffers sized from the plan, TileRef.
// Part of the per-ISA variant body (natgen_cpu_variant.h): no include guard, no namespace of its own;
// natgen_cpu.h includes it once per variant inside namespace natgen::<isa>.

// The per-axis window rule (natgen.window.window_1d, runtime/window.py) in group-local coordinates (ii = i // D,
// group length Lg).
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

// Compile-time layout of the specialized forward (namespace fwd, fixed_tile): constant K and head_dim,
// no causal axis. The tile's key union is gathered at fixed strides (ROWS0 x ROWS1 union rows of ROWLEN
// columns), so every key a query reads sits at a compile-time offset from the query's window corner: the
// inner loops address keys and values with one pointer and immediate displacements.
template <class Cfg> struct FixedFwd {
    typedef typename Cfg::T T;
    static constexpr int V = VecTraits<T>::width;
    static constexpr bool enabled = kFixedPaths && Cfg::K[0] > 0 && Cfg::K[1] > 0 && Cfg::K[2] > 0 && Cfg::HD > 0 &&
                                    Cfg::HD % V == 0 && !Cfg::C[0] && !Cfg::C[1] && !Cfg::C[2];
    static constexpr int K0 = enabled ? Cfg::K[0] : 1, K1 = enabled ? Cfg::K[1] : 1, K2 = enabled ? Cfg::K[2] : 1;
    static constexpr int HD = enabled ? Cfg::HD : V;
    static constexpr int CH = (K2 + V - 1) / V;        // key vectors per window row
    static constexpr int LAST = K2 - (CH - 1) * V;     // real keys in a row's last vector
    // 2-D instances (one tile row on axis 0) may run tiles of up to GROW x TILE[1] rows on axis 1 (make_plan
    // picks the factor): a taller tile gathers fewer keys per query (cpu-2d: 0.317 -> 0.299 ms, 8 -> 32 rows).
    static constexpr int GROW = Cfg::TILE[0] == 1 && Cfg::TILE[1] > 1 ? 4 : 1;
    static constexpr int ROWS0 = Cfg::TILE[0] + K0 - 1, ROWS1 = Cfg::TILE[1] * GROW + K1 - 1;
    // Query pairs: where a window row fits half a vector (16-lane AVX-512, K2 <= 8), one score vector holds two
    // queries of a tile row V / 2 apart on the last axis (columns c and c + 8 of a run of 16), so the FMAs
    // and exponentials fill 2 K2 of 16 lanes instead of K2. Tiles are then whole runs of V wide (TW).
    static constexpr bool PAIRS = V == 16 && K2 <= V / 2;
    static constexpr int H = V / 2;
    static constexpr int TW = PAIRS ? (Cfg::TILE[2] + V - 1) / V * V : Cfg::TILE[2];
    static constexpr int ROWLEN = (TW + CH * V - 1 + V - 1) / V * V;
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
    bool fixed_gathers_values; // it gathers the values too: 16-bit inputs (widened), or fp32 ones whose rows in
                               // place would thrash the L1 (values_conflict); otherwise P.V reads v itself
    bool bf16_dot = false;     // its scores are AVX512_BF16 dot products of bf16 channel pairs (kAvx512Bf16, bf16
                               // inputs, query pairs): keys gathered as pairs, unwidened (fixed_gather)
    // backward bands (choose_bands): the unit's tiles along band_axis split into runs of band_tiles tiles
    int band_axis = 0;
    int64_t band_tiles = 1 << 30, bands = 1;
};

// Backward bands. A unit (batch, kv head, dilation groups) writes the key grads of its whole group, so where
// those units are few (batch 1, one head: one unit; make_plan decides) the unit is split into bands
// of band_tiles tiles along the first axis with three tiles or more. Band i's key grads (its tiles' key
// unions) must end before band i + 2's begin, so all even bands run at once, then all odd ones, and no two
// running bands write one key: the smallest band width with that property, checked on every group's tiles
// (so borders, strides and causal windows need no rule of their own).
inline void choose_bands(Plan& p) {
    for (int d = 0; d < 3; ++d) {
        int64_t tiles = 0;
        for (const AxisGroup& ax : p.axes[d]) tiles = std::max<int64_t>(tiles, ax.tile_lo.size());
        if (tiles < 3) continue;
        for (int64_t bt = 1; 3 * bt <= tiles; ++bt) {
            bool apart = true;
            for (const AxisGroup& ax : p.axes[d]) {
                const int64_t n = ax.tile_lo.size();
                for (int64_t s = 0; apart && s + 2 * bt < n; s += bt)
                    apart = ax.tile_hi[std::min(s + bt, n) - 1] <= ax.tile_lo[s + 2 * bt];
            }
            if (apart) {
                p.band_axis = d;
                p.band_tiles = bt;
                p.bands = (tiles + bt - 1) / bt;
                return;
            }
        }
        return;  // the first axis with tiles enough decides; its windows are too wide for three bands
    }
}

// Tiles of `tile` queries over the dilation groups of axis d.
inline int64_t tiles_on_axis(const Args& a, int d, int64_t tile) {
    int64_t n = 0;
    for (int64_t g = 0; g < std::min(a.dilation[d], a.length[d]); ++g) {
        const int64_t length = a.length[d] / a.dilation[d] + (g < a.length[d] % a.dilation[d] ? 1 : 0);
        n += (length + tile - 1) / tile;
    }
    return n;
}

// The input type of a call (Args::input_dtype): kInputCompute, or for float kernels a 16-bit type they widen
// (kInputBf16, kInputF16; dispatch has checked the code).
template <typename T> NATGEN_INLINE int64_t input_kind(const Args& a) {
    return std::is_same<T, float>::value ? a.input_dtype : kInputCompute;
}

// Whether one query's window of value rows, read where they lie in v, holds more cache lines than the L1
// ways of the sets they map to (a 32 KB, 8-way L1 of 64 sets of 64-byte lines; every x86 core natgen targets
// has at least that), so that every pass over the window misses: with heads interleaved, rows lie power-of-two
// strides apart (cpu-1d: 2 KB between a dilation group's neighbours, all 32 of a window's rows in 8 sets;
// 1 head instead of 4 ran 1.5x faster a head). The specialized forward then gathers them (row_bytes: one
// value row).
inline bool values_conflict(const Args& a, const int64_t* K, int64_t row_bytes, int64_t heads) {
    constexpr int64_t kLine = 64, kSets = 64, kWays = 8;
    const int64_t token = heads * row_bytes;  // bytes between neighbouring tokens
    const int64_t stride[3] = {a.dilation[0] * a.length[1] * a.length[2] * token,
                               a.dilation[1] * a.length[2] * token, a.dilation[2] * token};
    const int64_t lines = (row_bytes + kLine - 1) / kLine;
    uint64_t sets = 0;
    int64_t total = 0;
    // the rows one query pair's P.V reads: K0 x K1 window rows of K2 + 1 values
    for (int64_t a0 = 0; a0 < K[0]; ++a0)
        for (int64_t a1 = 0; a1 < K[1]; ++a1)
            for (int64_t n = 0; n <= K[2]; ++n)
                for (int64_t l = 0; l < lines; ++l, ++total)
                    sets |= uint64_t(1) << (((a0 * stride[0] + a1 * stride[1] + n * stride[2]) / kLine + l) % kSets);
    return total > kWays * __builtin_popcountll(sets);
}

template <class Cfg> Plan make_plan(const Args& a, bool forward, bool bf16_dot = false) {
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
        p.tile[2] = std::min<int64_t>(FixedFwd<Cfg>::TW, a.length[2]);  // whole runs of query pairs
        // the tallest tile (FixedFwd::GROW) that still leaves the threads 4 units each
        const int64_t others = a.batch * a.heads * tiles_on_axis(a, 0, p.tile[0]) * tiles_on_axis(a, 2, p.tile[2]);
        for (int64_t grow = FixedFwd<Cfg>::GROW; grow > 1; grow /= 2)
            if (others * tiles_on_axis(a, 1, Cfg::TILE[1] * grow) >= 4 * a.threads) {
                p.tile[1] = std::min<int64_t>(Cfg::TILE[1] * grow, a.length[1]);
                break;
            }
    }
    // backward: a tile is at least one lane group wide on the last axis (the fixed-shape kernels need
    // exactly that width; 8-query tiles would leave half of AVX-512's 16 lanes empty)
    if (!forward) p.tile[2] = std::min<int64_t>(std::max<int64_t>(Cfg::TILE[2], V), a.length[2]);
    // whether the backward's units (batch x kv heads x dilation groups) are too few to keep a machine's
    // threads busy: then it splits them into bands (choose_bands) instead of growing its tiles. Decided from
    // the problem alone, not the thread count, so the gradients have the same bits for any thread count.
    int64_t groups = 1;
    for (int d = 0; d < 3; ++d) groups *= std::min(a.dilation[d], a.length[d]);
    constexpr int64_t kBandBelow = 4;
    const bool banded = !forward && a.batch * a.heads_kv * groups < kBandBelow;
    // 2-D backward: tiles 4x taller on axis 1 (where its units alone keep the threads busy, a taller tile costs
    // no parallelism): fewer gathers and key-grad flushes a query (cpu-2d 0.99 -> 0.94 ms, 14x14 x 16 heads
    // x batch 4 4.98 -> 4.50 ms)
    if (!forward && !banded && Cfg::TILE[0] == 1 && Cfg::TILE[1] > 1)
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
    p.fixed_gathers_values = p.fixed && (input_kind<T>(a) != kInputCompute ||
                                         values_conflict(a, p.K, p.hdv * int64_t(sizeof(T)), a.heads_kv));
    p.bf16_dot = bf16_dot && p.fixed && F::PAIRS && input_kind<T>(a) == kInputBf16;
    if (banded) choose_bands(p);
    return p;
}

// Zero rows of the 16-bit input types (the gathers' padding), sized whatever a call's inputs (the next call on
// the thread may read another type), and the zero row of input type In.
struct HalfZeros {
    std::vector<bf16> bf16_row;
    std::vector<f16> f16_row;
    void assign(size_t n) {
        bf16_row.assign(n, bf16{0});
        f16_row.assign(n, f16{0});
    }
};
template <typename In, typename T> const In* zero_row(const std::vector<T>& zeros, const HalfZeros& halves) {
    if constexpr (std::is_same<In, bf16>::value) return halves.bf16_row.data();
    else if constexpr (std::is_same<In, f16>::value) return halves.f16_row.data();
    else return zeros.data();
}

// Buffers of the per-query forward (namespace fwd, natgen_cpu_fwd.h).
template <typename T> struct FwdScratch {
    std::vector<T> kt, vu, scores, probs, acc;
    std::vector<int> bases, valid;  // per segment: its first key, its real keys (lanes [0, valid))
    std::vector<T> zeros, qrow;  // qrow: a widened query row (inputs of another type)
    std::vector<const T*> rows;
    HalfZeros zeros16;  // the same for 16-bit inputs
    std::vector<const bf16*> rows_bf16;
    std::vector<const f16*> rows_f16;
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
        scores.assign(4 * p.max_segments * V, T(0));  // the fixed forward's 2 x 2 query blocks
        probs.assign(4 * p.max_segments * V, T(0));
        valid.assign(p.max_segments, 0);
        bases.assign(p.max_segments, 0);
        zeros.assign(std::max(p.hd, p.hdv_padded), T(0));
        qrow.assign(p.hd, T(0));
        rows.assign(n, nullptr);
        zeros16.assign(zeros.size());
        rows_bf16.assign(n, nullptr);
        rows_f16.assign(n, nullptr);
    }
    // the gathers' row pointers and zero row for input type In
    template <typename In> std::vector<const In*>& rows_of() {
        if constexpr (std::is_same<In, bf16>::value) return rows_bf16;
        else if constexpr (std::is_same<In, f16>::value) return rows_f16;
        else return rows;
    }
    template <typename In> const In* zeros_of() const { return zero_row<In>(zeros, zeros16); }
};

template <typename U> struct TypeTag {
    typedef U type;
};
// f(TypeTag<In>{}) for input kind `kind`: what reads the inputs is instantiated per input type, nothing else
template <typename T, typename F> NATGEN_INLINE void with_input(int64_t kind, F&& f) {
    if constexpr (std::is_same<T, float>::value) {
        if (kind == kInputBf16) return f(TypeTag<bf16>{});
        if (kind == kInputF16) return f(TypeTag<f16>{});
    }
    f(TypeTag<T>{});
}
// n elements from element `offset` of a per-query input (q, dO, out) at `base` into dst as T: a copy, or
// widened from input kind `kind` (branches written out: through with_input's lambda GCC lost the row
// length and warned of unbounded loops)
template <typename T>
NATGEN_INLINE void query_rows(int64_t kind, int64_t base, int64_t offset, int64_t n, T* __restrict dst) {
    if constexpr (std::is_same<T, float>::value) {
        if (kind == kInputBf16) return widen_row(reinterpret_cast<const bf16*>(base) + offset, n, dst);
        if (kind == kInputF16) return widen_row(reinterpret_cast<const f16*>(base) + offset, n, dst);
    }
    widen_row(reinterpret_cast<const T*>(base) + offset, n, dst);
}
// n outputs from src into element `offset` of `base`, narrowed to input kind `kind` (the forward's out)
template <typename T>
NATGEN_INLINE void output_rows(int64_t kind, const T* __restrict src, int64_t n, int64_t base, int64_t offset) {
    if constexpr (std::is_same<T, float>::value) {
        if (kind == kInputBf16) return narrow_row(src, n, reinterpret_cast<bf16*>(base) + offset);
        if (kind == kInputF16) return narrow_row(src, n, reinterpret_cast<f16*>(base) + offset);
    }
    narrow_row(src, n, reinterpret_cast<T*>(base) + offset);
}

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
    LineVec<T> xr;                           // backward: q, dO (and 16-bit out) rows of a lane group [3][V][dims]
    LineVec<T> sc, pr, dp;                   // per (window row, column) and extra token: one vector of lanes
    std::vector<char> colmask;               // per column: an itype vector of the lanes whose window contains it
    std::vector<int64_t> row_off, key_off;   // per window row: its column 0 in kt/vt and in dkr/dvr
    std::vector<T> zeros, sink;
    HalfZeros zeros16;  // the same for 16-bit inputs
    template <typename In> const In* zeros_of() const { return zero_row<In>(zeros, zeros16); }
    std::vector<T> extra_grads;  // backward: this unit's extra-token grads [n_extra][hd + hdv]
    std::vector<T> rpb_grads;    // backward: this unit's bias grads [query heads of its kv head][entries]
    FwdScratch<T> fwd;
    std::array<int64_t, 8> backward_sizes{};  // the plan sizes the backward buffers were last made for
    void reserve(const Plan& p, bool backward) {
        constexpr int V = VecTraits<T>::width;
        if (!backward) {
            fwd.reserve(p);
            return;
        }
        // kept between calls of one shape (a per-thread scratch), zeroed only when made: every tile writes all of
        // its gather rows' stride (padding too) before reading them, and leaves the key-grad rows zero over their
        // whole stride, so nothing an earlier tile or call left (non-finite values included) reaches a result;
        // zeroing ~3 MB per thread on every call cost cpu-2d's backward ~0.1 ms
        const std::array<int64_t, 8> sizes = {p.gather_capacity, p.key_capacity, p.hd, p.hdv, p.dims, p.n_extra,
                                              p.max_rows, p.max_cols};
        if (sizes == backward_sizes) return;
        backward_sizes = sizes;
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
        xr.assign(3 * V * dims, T(0));  // (the fixed path: q, dO, out rows; the generic: 16-bit rows widened)
        zeros16.assign(dims + V);
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

// ------------------------------------------------------------------------------------- tiles
// One tile of work: batch, query head h and the key/value head hk it reads (h / (heads / heads_kv)), and per
// axis its dilation group and the tile's index in that group.
struct TileRef {
    int64_t b, h, hk;
    const AxisGroup* ax[3];
    int tile[3];
};

