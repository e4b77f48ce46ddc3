// natgen CPU kernels: the shared C++ body that every generated CPU instance instantiates. Generated sources
// include this header only. It includes the standard headers, natgen_cpu_target.h (compile targets,
// attributes) and natgen_cpu_config.h (Config, the ISA codes), then the kernel body (natgen_cpu_variant.h and
// its parts) once per ISA variant, each in its own namespace under its own `#pragma GCC target`:
//   natgen::avx512    AVX-512 F/BW/VL/DQ + FMA + F16C: 64-byte vectors, 16 fp32 lanes (x86-64 with GCC only);
//                     its code kAvx512Bf16 adds AVX512_BF16's dot products for bf16 inputs (Plan::bf16_dot)
//   natgen::avx2      AVX2 + FMA + F16C: 32-byte vectors, 8 fp32 lanes (x86-64 with GCC only)
//   natgen::portable  the baseline ISA: 32-byte GCC vectors, no specialized fixed-shape paths
// The vector width is the variant's one parameter (NATGEN_VEC_BYTES, read by VecTraits): the same source, not
// a copy per ISA. dispatch<Cfg, Forward>(args, isa) runs the variant the caller names. The runtime picks it
// once per process from the CPU's features (runtime/cpu_isa.py; NATGEN_CPU_ISA overrides it) and passes its
// code as the entry point's third argument; a variant the CPU lacks, or one this module was built without,
// returns an error rather than faulting.
//
// A generated instance (templates/cpu_na.cpp.j2) fixes the compile-time facts of its spec (element type,
// kernel size, head_dim, per-dim causal mask, query tile) through `Config`. Everything the kernels read
// arrives through one `Args` block of 8-byte fields, which each generated source defines before including
// this header (from codegen/abi.py's "cpu" ABI; the runtime packs it from the layout the manifest records);
// the entry point is one extern "C" function named after the spec, taking that block, its field count (a
// count that differs from this build's returns an error instead of misreading the block) and the ISA code,
// which ctypes calls with the GIL released.
//
// Work decomposition. Dilation splits every axis into interleaved groups that never see each other, so a
// query tile is a box of group-LOCAL coordinates inside one group combination; its keys are then a dense
// box too (the union of the tile's windows), gathered once per tile into contiguous buffers.
// - Forward (namespace fwd): vectorized over keys. Per query, its window's keys along the last axis come in
//   runs of V ("segments"); scores are FMAs of a broadcast query channel against a segment of transposed
//   keys, P.V broadcast probabilities against row-major value rows. A query computes exactly its own keys,
//   which matters near borders, where windows are clamped. Specialized instances (constant K and head_dim,
//   no causal axis) gather the union at fixed strides instead (FixedFwd, fixed_tile), so every key and
//   value offset from a query's window corner is a compile-time constant, take the softmax in base 2, and
//   work on 2 x 2 query blocks: the scores of the two queries stacked on axis 1 together (each key vector
//   loaded once for both), P.V of the two side by side on the last axis together (each value row loaded
//   once for both). Their score vectors have the variant's width; on AVX-512, where a window row has at most 8
//   keys, one vector holds two queries' rows (query pairs, FixedFwd::PAIRS: columns c and c + 8 of a tile 16
//   wide), so a 7-key row fills 14 of 16 lanes rather than 7. In 2-D their tiles grow up to 4x taller on
//   axis 1 where the problem has units enough for the threads.
// - Backward: vectorized over queries. One vector holds V neighbouring queries along the last axis
//   ("lanes"), whose windows are one box shifted by a key per lane, so the key of lane j at window (row,
//   column) is column + j of a union row: one contiguous vector load per (row, column, channel) from keys and
//   values gathered transposed per union row. S, dP, dS, dQ are element-wise across lanes, and dK/dV are
//   summed per key over the lanes that saw it, so each key row is read and written once per window row. Near
//   borders a group reads a few more columns and masks each lane to its own window. Specialized instances
//   (constant K and head_dim, no causal axis) run their interior lane groups, and the border groups of
//   K2 + K2 / 2 columns, through kernels whose every count and offset is a constant (Fixed, fixed_group).
//   A backward unit is a (batch, kv head, dilation group, band): bands split the outermost split axis where
//   the other factors leave threads idle, and run even bands then odd bands, so no two running bands write
//   the same key grads (natgen_cpu_driver.h).
// Extra tokens are the same keys for every query, inside the same softmax. prod(K) is small, so all scores
// of a query are computed first, then one max/exp pass (no online rescaling).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <omp.h>

#include "natgen_cpu_target.h"
#include "natgen_cpu_config.h"

#if NATGEN_X86_VARIANTS
#include <immintrin.h>  // F16C's 8-wide half conversions (GCC does not vectorize _Float16 vector conversions)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace natgen {
namespace avx512 {
#define NATGEN_VEC_BYTES 64
#define NATGEN_FIXED_PATHS 1
#define NATGEN_F16C 1
#define NATGEN_AVX 1
#include "natgen_cpu_variant.h"
#undef NATGEN_AVX
#undef NATGEN_F16C
#undef NATGEN_FIXED_PATHS
#undef NATGEN_VEC_BYTES
}  // namespace avx512
}  // namespace natgen
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace natgen {
namespace avx2 {
#define NATGEN_VEC_BYTES 32
#define NATGEN_FIXED_PATHS 1
#define NATGEN_F16C 1
#define NATGEN_AVX 1
#include "natgen_cpu_variant.h"
#undef NATGEN_AVX
#undef NATGEN_F16C
#undef NATGEN_FIXED_PATHS
#undef NATGEN_VEC_BYTES
}  // namespace avx2
}  // namespace natgen
#pragma GCC pop_options
#endif

namespace natgen {
namespace portable {
#define NATGEN_VEC_BYTES 32
#define NATGEN_FIXED_PATHS 0
#define NATGEN_F16C 0
#define NATGEN_AVX 0
#include "natgen_cpu_variant.h"
#undef NATGEN_AVX
#undef NATGEN_F16C
#undef NATGEN_FIXED_PATHS
#undef NATGEN_VEC_BYTES
}  // namespace portable

// The variants this module holds, best first (the `<name>_variants` export; runtime/cpu_isa.py's names).
constexpr const char* kVariants = NATGEN_X86_VARIANTS ? "avx512bf16,avx512,avx2,portable" : "portable";

// Runs the forward or backward of `Cfg` on ISA variant `isa`. Returns 0, or 3 for a code this module has no
// variant for, 4 for a variant whose instructions this CPU lacks.
template <class Cfg, bool Forward> int dispatch(const Args& a, int isa) {
    // other input types: float instances read bf16 and f16 (everything else gets the compute type)
    if (a.input_dtype != kInputCompute &&
        !(std::is_same<typename Cfg::T, float>::value && (a.input_dtype == kInputBf16 || a.input_dtype == kInputF16)))
        return 5;
#if NATGEN_X86_VARIANTS
    if (isa == kAvx512 || isa == kAvx512Bf16) {
        if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
            return 4;
        if (isa == kAvx512Bf16 && !__builtin_cpu_supports("avx512bf16")) return 4;
        if constexpr (Forward) avx512::run_forward<Cfg>(a, isa == kAvx512Bf16); else avx512::run_backward<Cfg>(a);
        return 0;
    }
    if (isa == kAvx2) {
        if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) return 4;
        if constexpr (Forward) avx2::run_forward<Cfg>(a); else avx2::run_backward<Cfg>(a);
        return 0;
    }
#endif
    if (isa == kPortable) {
        if constexpr (Forward) portable::run_forward<Cfg>(a); else portable::run_backward<Cfg>(a);
        return 0;
    }
    return 3;
}

}  // namespace natgen
