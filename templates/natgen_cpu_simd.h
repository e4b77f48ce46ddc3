// natgen CPU kernels: vector math. GCC vectors of the variant's width (VecTraits: NATGEN_VEC_BYTES, 64 for
// AVX-512, 32 otherwise), unaligned loads and stores, in-register transposes between rows and lanes (in
// 8 x 8 blocks of 32-byte vectors, whatever the width), exp / exp2 / log2 (f32 at full vector width, f64 lane
// by lane through libm), horizontal max and sum.
// Part of the per-ISA variant body (natgen_cpu_variant.h): no include guard, no namespace of its own;
// natgen_cpu.h includes it once per variant inside namespace natgen::<isa>.

template <typename T> struct VecTraits;
template <> struct VecTraits<float> {
    typedef float type __attribute__((vector_size(NATGEN_VEC_BYTES)));
    typedef int32_t itype __attribute__((vector_size(NATGEN_VEC_BYTES)));
    static constexpr int width = NATGEN_VEC_BYTES / 4;
};
template <> struct VecTraits<double> {
    typedef double type __attribute__((vector_size(NATGEN_VEC_BYTES)));
    typedef int64_t itype __attribute__((vector_size(NATGEN_VEC_BYTES)));
    static constexpr int width = NATGEN_VEC_BYTES / 8;
};
// 8 floats, whatever the variant's width: the transposes' blocks and the horizontal reductions' last steps
typedef float Vec8 __attribute__((vector_size(32)));
typedef int32_t IVec8 __attribute__((vector_size(32)));
// Whether this variant builds the specialized fixed-shape kernels (natgen_cpu_variant.h).
constexpr bool kFixedPaths = NATGEN_FIXED_PATHS;

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

// ------------------------------------------------------------------------------------- input types
// A float kernel may read bf16 or f16 inputs and write its out in that type itself (Args::input_dtype),
// converting by natgen_cpu_half.h's rules (torch's), so a call has the bits of converting first.
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
NATGEN_INLINE float widen(float x) { return x; }
NATGEN_INLINE double widen(double x) { return x; }
NATGEN_INLINE float widen(bf16 x) { return bf16_to_float(x); }
NATGEN_INLINE float widen(f16 x) { return f16_to_float(x); }
NATGEN_INLINE void narrow(float x, float* out) { *out = x; }
NATGEN_INLINE void narrow(double x, double* out) { *out = x; }
NATGEN_INLINE void narrow(float x, bf16* out) { *out = float_to_bf16(x); }
NATGEN_INLINE void narrow(float x, f16* out) { *out = float_to_f16(x); }
typedef _Float16 H16x8 __attribute__((vector_size(16)));
// 8 elements as floats
NATGEN_INLINE Vec8 load8(const float* p) {
    Vec8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
NATGEN_INLINE Vec8 load8(const bf16* p) {
    U16x8 h;
    std::memcpy(&h, p, sizeof(h));
    const U32x8 w = __builtin_convertvector(h, U32x8) << 16;
    Vec8 v;
    std::memcpy(&v, &w, sizeof(v));
    return v;
}
NATGEN_INLINE Vec8 load8(const f16* p) {
#if NATGEN_F16C
    return Vec8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));  // one vcvtph2ps
#else
    H16x8 h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, Vec8);  // (element by element)
#endif
}
// dst[0, n) = src[0, n) widened (a plain copy where the types agree)
template <typename T, typename In> NATGEN_INLINE void widen_row(const In* __restrict src, int64_t n, T* __restrict dst) {
    if constexpr (std::is_same<T, In>::value) {
        std::memcpy(dst, src, n * sizeof(T));
    } else {
        int64_t d = 0;
        if constexpr (sizeof(T) == 4)
            for (; d + 8 <= n; d += 8) {
                const Vec8 v = load8(src + d);
                std::memcpy(dst + d, &v, sizeof(v));
            }
        for (; d < n; ++d) dst[d] = widen(src[d]);
    }
}
// dst[0, n) = src[0, n) narrowed to Out
template <typename T, typename Out> NATGEN_INLINE void narrow_row(const T* __restrict src, int64_t n, Out* __restrict dst) {
    if constexpr (std::is_same<T, Out>::value) {
        std::memcpy(dst, src, n * sizeof(T));
    } else {
        int64_t d = 0;
        if constexpr (sizeof(T) == 4)
            for (; d + 8 <= n; d += 8) {
                const Vec8 x = load8(src + d);
                if constexpr (std::is_same<Out, f16>::value) {
#if NATGEN_F16C
                    const __m128i h = _mm256_cvtps_ph(__m256(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), h);  // one vcvtps2ph
#else
                    const H16x8 h = __builtin_convertvector(x, H16x8);  // to nearest even
                    std::memcpy(dst + d, &h, sizeof(h));
#endif
                } else {
                    U32x8 b;
                    std::memcpy(&b, &x, sizeof(b));
                    const U32x8 r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
                    const U32x8 nan = (U32x8)(x != x);
                    const U16x8 h = __builtin_convertvector((r & ~nan) | (nan & 0x7FC0u), U16x8);
                    std::memcpy(dst + d, &h, sizeof(h));
                }
            }
        for (; d < n; ++d) narrow(src[d], dst + d);
    }
}

// ------------------------------------------------------------------------------------- transposes
// In-register transpose of an 8x8 float block: x[l] (row l) -> x[j] (column j).
NATGEN_INLINE void transpose8(Vec8* x) {
    typedef Vec8 Vec;
    typedef IVec8 IVec;
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
    // x[0] = rows 0-3 channels {0, 4}, x[2] = {1, 5}, x[1] = {2, 6}, x[3] = {3, 7}; x[4..8) rows 4-7 likewise.
    // (spelled out: an index table here is one more way to keep x out of registers)
    const IVec lo{0, 1, 2, 3, 8, 9, 10, 11}, hi{4, 5, 6, 7, 12, 13, 14, 15};
    const Vec x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3], x4 = x[4], x5 = x[5], x6 = x[6], x7 = x[7];
    x[0] = __builtin_shuffle(x0, x4, lo);
    x[4] = __builtin_shuffle(x0, x4, hi);
    x[1] = __builtin_shuffle(x2, x6, lo);
    x[5] = __builtin_shuffle(x2, x6, hi);
    x[2] = __builtin_shuffle(x1, x5, lo);
    x[6] = __builtin_shuffle(x1, x5, hi);
    x[3] = __builtin_shuffle(x3, x7, lo);
    x[7] = __builtin_shuffle(x3, x7, hi);
}

// dst[d * ld + j] = r[j][d] for d < n, j < V: V rows side by side (a lane buffer when ld = V); f32 in 8 x 8
// blocks transposed in registers.
// Rows of another input type (bf16, f16) are widened as they load.
template <typename T, typename In = T>
NATGEN_INLINE void rows_to_lanes(const In* const* r, int64_t n, T* __restrict dst, int64_t ld) {
    constexpr int V = VecTraits<T>::width;
    int64_t d = 0;
    if constexpr (sizeof(T) == 4) {
        for (; d + 8 <= n; d += 8)
            for (int j0 = 0; j0 < V; j0 += 8) {
                Vec8 x[8];
                for (int l = 0; l < 8; ++l) x[l] = load8(r[j0 + l] + d);
                transpose8(x);
                // unrolled, so x stays in registers (a loop here kept it on the stack and copied it out 16 bytes
                // at a time: the forward gather's hottest lines)
#pragma GCC unroll 8
                for (int j = 0; j < 8; ++j) std::memcpy(dst + (d + j) * ld + j0, &x[j], sizeof(Vec8));
            }
    }
    for (; d < n; ++d)
        for (int j = 0; j < V; ++j) dst[d * ld + j] = widen(r[j][d]);
}

// r[j][d] = src[d * V + j] for d < n, j < V (the inverse of rows_to_lanes).
template <typename T>
NATGEN_INLINE void lanes_to_rows(const T* __restrict src, int64_t n, T* const* r) {
    constexpr int V = VecTraits<T>::width;
    int64_t d = 0;
    if constexpr (sizeof(T) == 4) {
        for (; d + 8 <= n; d += 8)
            for (int j0 = 0; j0 < V; j0 += 8) {
                Vec8 x[8];
                for (int l = 0; l < 8; ++l) std::memcpy(&x[l], src + (d + l) * V + j0, sizeof(Vec8));
                transpose8(x);
#pragma GCC unroll 8  // (as in rows_to_lanes)
                for (int j = 0; j < 8; ++j) std::memcpy(r[j0 + j] + d, &x[j], sizeof(Vec8));
            }
    }
    for (; d < n; ++d)
        for (int j = 0; j < V; ++j) r[j][d] = src[d * V + j];
}

// exp for the softmax: Cephes' expf (range reduction by ln2 in two parts, degree-5 polynomial, ~1 ulp for
// x <= 0) in vector arithmetic, so every variant gets it at its full width; f64 goes lane by lane through std::exp.
NATGEN_INLINE VecTraits<float>::type exp_vec(VecTraits<float>::type x) {
    typedef VecTraits<float>::type Vec;
    typedef VecTraits<float>::itype IVec;
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

// a > b ? a : b lane by lane, so b where either is NaN: one maxps where GCC emits a compare and a blend
NATGEN_INLINE VecTraits<float>::type max_ps(VecTraits<float>::type a, VecTraits<float>::type b) {
#if NATGEN_AVX && NATGEN_VEC_BYTES == 64
    return VecTraits<float>::type(_mm512_max_ps(__m512(a), __m512(b)));
#elif NATGEN_AVX
    return VecTraits<float>::type(_mm256_max_ps(__m256(a), __m256(b)));
#else
    return a > b ? a : b;
#endif
}
NATGEN_INLINE VecTraits<double>::type max_ps(VecTraits<double>::type a, VecTraits<double>::type b) {
    return a > b ? a : b;
}

// 2^y for y <= 0 (the specialized forward's softmax, whose scores are pre-scaled by log2(e)): y = n + f with n
// = round(y) by the 1.5 * 2^23 trick (whose low mantissa bits are then n), 2^f on |f| <= 1/2 by a degree-5
// polynomial with constant term 1, fitted here for the least relative error (9.2e-8; 1.7e-7 evaluated in f32,
// where the degree-6 Taylor polynomial it replaces measured 2.2e-7), and n added into the exponent: the bits of
// t = 1.5 * 2^23 + n are 0x4B400000 + n, and 0x4B400000 << 23 is 0 in 32 bits, so t's bits << 23 are n << 23.
// Below -126 the result is 2^-126 times the polynomial, i.e. a value the softmax rounds away against its max
// term (whose 2^y is 1). The clamp is one max, written so that a NaN y stays NaN.
NATGEN_INLINE VecTraits<float>::type exp2_vec(VecTraits<float>::type y) {
    typedef VecTraits<float>::type Vec;
    typedef VecTraits<float>::itype IVec;
    y = max_ps(Vec{} - 126.0f, y);
    const Vec t = y + 12582912.0f;
    const Vec f = y - (t - 12582912.0f);
    Vec e = Vec{} + 1.326469877075298e-3f;
    e = e * f + 9.671508817438643e-3f;
    e = e * f + 5.550733776482303e-2f;
    e = e * f + 2.4022242145351555e-1f;
    e = e * f + 6.931469776119841e-1f;
    e = e * f + 1.0f;
    IVec tb, eb;
    std::memcpy(&tb, &t, sizeof(tb));
    std::memcpy(&eb, &e, sizeof(eb));
    eb += tb << 23;
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
// f32: the upper half of a 16-lane vector folded onto the lower, then three in-register steps on 8 lanes
NATGEN_INLINE Vec8 fold8(VecTraits<float>::type x, bool max) {
    Vec8 lo;
    std::memcpy(&lo, &x, sizeof(lo));
    if constexpr (VecTraits<float>::width == 16) {
        Vec8 hi;
        std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(hi), sizeof(hi));
        lo = max ? (lo > hi ? lo : hi) : lo + hi;
    }
    return lo;
}
NATGEN_INLINE float hmax(VecTraits<float>::type v) {
    typedef IVec8 IVec;
    Vec8 x = fold8(v, true);
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
NATGEN_INLINE float hsum(VecTraits<float>::type v) {
    typedef IVec8 IVec;
    Vec8 x = fold8(v, false);
    x += __builtin_shuffle(x, IVec{4, 5, 6, 7, 0, 1, 2, 3});
    x += __builtin_shuffle(x, IVec{2, 3, 0, 1, 6, 7, 4, 5});
    x += __builtin_shuffle(x, IVec{1, 0, 3, 2, 5, 4, 7, 6});
    return x[0];
}


// Horizontal max / sum of four vectors at once (out[q] reduces x[q]): f32 shares the shuffles between the
// four (a 16-lane vector's upper half folded onto its lower first), 11 instructions where one vector at a time
// takes 24, and fewer steps on the critical path; the sum adds lanes in the order {0, 2}, {1, 3}, then the
// pairs, then the two halves (a fixed order: the same bits for a vector whichever of the four it is).
template <typename Vec, typename S> NATGEN_INLINE void hmax4(const Vec* x, S* out) {
    for (int q = 0; q < 4; ++q) out[q] = hmax(x[q]);
}
template <typename Vec, typename S> NATGEN_INLINE void hsum4(const Vec* x, S* out) {
    for (int q = 0; q < 4; ++q) out[q] = hsum(x[q]);
}
// the shared steps on four 8-lane vectors (r[q] reduces the q-th), after any fold
template <bool MAX> NATGEN_INLINE Vec8 reduce4_8(Vec8 a, Vec8 b, Vec8 c, Vec8 d) {
    typedef IVec8 IVec;
    auto op = [](Vec8 a, Vec8 b) { return MAX ? (a > b ? a : b) : a + b; };
    // lanes {a0.2, b0.2, a1.3, b1.3, a4.6, b4.6, a5.7, b5.7} (x0.2: lanes 0 and 2 of x reduced); y likewise
    const Vec8 x = op(__builtin_shuffle(a, b, IVec{0, 8, 1, 9, 4, 12, 5, 13}), __builtin_shuffle(a, b, IVec{2, 10, 3, 11, 6, 14, 7, 15}));
    const Vec8 y = op(__builtin_shuffle(c, d, IVec{0, 8, 1, 9, 4, 12, 5, 13}), __builtin_shuffle(c, d, IVec{2, 10, 3, 11, 6, 14, 7, 15}));
    // lanes {a0-3, b0-3, c0-3, d0-3, a4-7, b4-7, c4-7, d4-7}
    const Vec8 z = op(__builtin_shuffle(x, y, IVec{0, 1, 8, 9, 4, 5, 12, 13}), __builtin_shuffle(x, y, IVec{2, 3, 10, 11, 6, 7, 14, 15}));
    return op(z, __builtin_shuffle(z, IVec{4, 5, 6, 7, 0, 1, 2, 3}));
}
template <bool MAX> NATGEN_INLINE Vec8 reduce4(const VecTraits<float>::type* v) {
    return reduce4_8<MAX>(fold8(v[0], MAX), fold8(v[1], MAX), fold8(v[2], MAX), fold8(v[3], MAX));
}
NATGEN_INLINE void hmax4(const VecTraits<float>::type* x, float* out) {
    const Vec8 r = reduce4<true>(x);
    for (int q = 0; q < 4; ++q) out[q] = r[q];
}
NATGEN_INLINE void hsum4(const VecTraits<float>::type* x, float* out) {
    const Vec8 r = reduce4<false>(x);
    for (int q = 0; q < 4; ++q) out[q] = r[q];
}

// ---- query pairs (the AVX-512 forward's FixedFwd::PAIRS): one 16-lane vector holds two queries' numbers, the
// first's in lanes [0, 8), the second's in [8, 16). Each half reduces by reduce4_8's steps, which are the steps
// hmax4 / hsum4 take on a 16-lane vector after folding a zero (or -inf) upper half onto it, so a query has the
// same bits whether it came in a pair or alone.
#if NATGEN_AVX && NATGEN_VEC_BYTES == 64
// lanes [0, 8) from lo, [8, 16) from hi
NATGEN_INLINE VecTraits<float>::type load_halves(const float* lo, const float* hi) {
    return VecTraits<float>::type(_mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(lo)), _mm256_loadu_ps(hi), 1));
}
// [a[0..4), a[0..4), b[0..4), b[0..4)]: pair_splat_lane<j> of it is a[j] in the lower half, b[j] in the upper
NATGEN_INLINE VecTraits<float>::type pair_quads(const float* a, const float* b) {
    return VecTraits<float>::type(_mm512_insertf32x8(
        _mm512_castps256_ps512(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(a))),
        _mm256_broadcast_ps(reinterpret_cast<const __m128*>(b)), 1));
}
template <int J> NATGEN_INLINE VecTraits<float>::type pair_splat_lane(VecTraits<float>::type quads) {
    return VecTraits<float>::type(_mm512_permute_ps(__m512(quads), J * 0x55));
}
// acc + the dot products of x's and k's bf16 channel pairs, lane by lane (AVX512_BF16's vdpbf16ps: each lane
// adds the product of its odd channels, then of its even ones, each exact, each sum rounded to float, with
// subnormals flushed). Written in assembly, so this variant's code needs no AVX512_BF16 target (which would let
// the compiler use it elsewhere); only Plan::bf16_dot calls reach it, on CPUs that have it (dispatch).
NATGEN_INLINE VecTraits<float>::type dot_bf16_pairs(VecTraits<float>::type acc, VecTraits<float>::type x,
                                                   VecTraits<float>::type k) {
    __m512 r = __m512(acc);
    asm("vdpbf16ps %2, %1, %0" : "+v"(r) : "v"(__m512(x)), "vm"(__m512(k)));
    return VecTraits<float>::type(r);
}
// lanes [0, n) from lo and [8, 8 + n) from hi, the others 0 (n <= 8; nothing past n is read)
NATGEN_INLINE VecTraits<float>::type load_halves_first(const float* lo, const float* hi, int n) {
    const __mmask8 m = static_cast<__mmask8>((1u << n) - 1);
    return VecTraits<float>::type(
        _mm512_insertf32x8(_mm512_zextps256_ps512(_mm256_maskz_loadu_ps(m, lo)), _mm256_maskz_loadu_ps(m, hi), 1));
}
// a in the lower half, b in the upper
NATGEN_INLINE VecTraits<float>::type pair_splat(float a, float b) {
    return VecTraits<float>::type(_mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1));
}
// each half of four pair vectors reduced: out[2 q + h] is half h of x[q] (max, or sum)
template <bool MAX> NATGEN_INLINE void reduce_pairs4(const VecTraits<float>::type* x, float* out) {
    Vec8 lo[4], hi[4];
    for (int q = 0; q < 4; ++q) {
        std::memcpy(&lo[q], &x[q], sizeof(Vec8));
        std::memcpy(&hi[q], reinterpret_cast<const char*>(&x[q]) + sizeof(Vec8), sizeof(Vec8));
    }
    const Vec8 rl = reduce4_8<MAX>(lo[0], lo[1], lo[2], lo[3]), rh = reduce4_8<MAX>(hi[0], hi[1], hi[2], hi[3]);
    for (int q = 0; q < 4; ++q) {
        out[2 * q] = rl[q];
        out[2 * q + 1] = rh[q];
    }
}
#endif
