// natgen CPU kernels: one ISA variant's body. No include guard: natgen_cpu.h includes this file once per
// variant, inside namespace natgen::<isa>, under that variant's `#pragma GCC target`, with
// NATGEN_VEC_BYTES (the vector width in bytes: 64 for AVX-512, 32 otherwise) and NATGEN_FIXED_PATHS (whether
// the specialized fixed-shape kernels are built: the portable variant leaves them out, as they only pay off
// with FMA, and they are most of a specialized instance's compile time), NATGEN_F16C (whether the half
// conversions may use F16C's 8-wide instructions) and NATGEN_AVX (whether AVX intrinsics of the variant's width
// may be used) defined. The parts, one job each, in
// the order they build on each other:
//   natgen_cpu_simd.h    vector types (VecTraits: the variant's lanes), loads / stores, transposes, exp / log2
//   natgen_cpu_plan.h    the window rule, the work plan (dilation groups, tiles, key unions, backward bands),
//                        the specialized forward's layout (FixedFwd), per-thread scratch buffers, TileRef
//   natgen_cpu_lanes.h   the lane scheme: lane kernels, a tile's transposed key-union gather, lane groups
//   natgen_cpu_rpb.h     the relative positional bias hooks (they use the variant's VecTraits)
//   natgen_cpu_fwd.h     the forward (namespace fwd): per-query kernels and the specialized fixed_tile
//   natgen_cpu_bwd.h     the backward: fixed-shape lane-group kernels (Fixed, fixed_group), backward_tile
//   natgen_cpu_driver.h  work units, the OpenMP loop over them, run_forward / run_backward
#include "natgen_cpu_simd.h"
#include "natgen_cpu_plan.h"
#include "natgen_cpu_lanes.h"
#include "natgen_cpu_rpb.h"
#include "natgen_cpu_fwd.h"
#include "natgen_cpu_bwd.h"
#include "natgen_cpu_driver.h"
