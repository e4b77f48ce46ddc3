// natgen CPU kernels: what every ISA variant shares. Config (an instance's compile-time facts) and the ISA
// variant codes the entry point takes.
#pragma once

#include "natgen_cpu_half.h"  // bf16, f16 (inputs only: the kernels compute in float)

namespace natgen {

// Compile-time facts of one instance; 0 means "runtime value" (the spec said "any").
template <typename T_, int K0_, int K1_, int K2_, int HD_, bool C0_, bool C1_, bool C2_, int T0_, int T1_,
          int T2_>
struct Config {
    typedef T_ T;
    static constexpr int K[3] = {K0_, K1_, K2_};
    static constexpr int HD = HD_;  // head_dim of q/k and of v (specialized instances need them equal)
    static constexpr bool C[3] = {C0_, C1_, C2_};
    static constexpr int TILE[3] = {T0_, T1_, T2_};
};

// The ISA variant a call runs: its code is its index in runtime/cpu_isa.py's VARIANTS (the same order).
// kAvx512Bf16 runs the AVX-512 body with the bf16 dot products of AVX512_BF16 where a call's inputs are bf16
// (Plan::bf16_dot); everywhere else it is kAvx512.
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kIsaCount = 4 };

}  // namespace natgen
