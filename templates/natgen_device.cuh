// natgen_device.cuh: the ONE place for hardware intrinsics. Generated kernels include only this.
//
// The same kernel text compiles two ways:
//   * nvcc (__CUDACC__): real intrinsics; tensor-core, ldmatrix and cp.async as inline PTX
//     (the only raw asm in natgen).
//   * natgen.emulator (NATGEN_EMULATOR, host g++): runtime/emulator/natgen_emu.h supplies the CUDA
//     surface (threadIdx, __shared__, __syncthreads, shuffles, half/bf16, atomics) and the warp
//     collectives below are emulated with the exact PTX fragment layouts.
//
// Kernel-facing API, namespace ng (every function is warp-collective where the PTX one is):
//   float ng::to_float(x)                     x: float, double, half, __nv_bfloat16
//   T     ng::from_float<T>(float)            round-to-nearest-even for half / __nv_bfloat16
//   float ng::warp_sum(float v, int width=32) butterfly (xor-shuffle) over `width` lanes; all lanes get it
//   float ng::warp_max(float v, int width=32)
//   uint32_t ng::pack_half2(float lo, float hi), ng::pack_bfloat162(float lo, float hi)
//   uint32_t ng::float_to_tf32(float)         cvt.rna.tf32.f32 (nearest, ties away from zero)
//   T*    ng::dynamic_smem<T>()               the launch's dynamic shared memory (16-byte aligned)
//   ng::mma_m16n8k16_f16f32 (float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4])
//   ng::mma_m16n8k16_bf16f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4])
//   ng::mma_m16n8k8_tf32f32 (float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4])
//       d = A*B + c, A row-major, B column-major ("row.col"), fragments as in the PTX ISA:
//       groupID g = lane>>2, t = lane%4; element i of a fragment; low 16 bits = lower index
//       A f16/bf16 16x16: a[i/2] half i%2 -> (row g + 8*((i>>1)&1), col 2t + (i&1) + 8*(i>=4))
//       B f16/bf16 16x8 : b[i/2] half i%2 -> (row 2t + (i&1) + 8*(i>=2), col g)
//       A tf32 16x8     : a[i]            -> (row g + 8*(i&1), col t + 4*(i>=2))
//       B tf32 8x8      : b[i]            -> (row t + 4*i, col g)
//       C/D f32 16x8    : c[i], d[i]      -> (row g + 8*(i>=2), col 2t + (i&1))
//   ng::ldmatrix_x1/x2/x4(uint32_t* regs, const void* smem_row_ptr), and _trans variants:
//       lanes 8m..8m+7 pass the 16-byte rows of 8x8 b16 matrix m; regs[m] of lane L holds
//       (row L/4, cols 2(L%4), 2(L%4)+1), or with _trans (rows 2(L%4), 2(L%4)+1; col L/4).
//   ng::cp_async_16/8/4(void* smem, const void* gmem)
//   ng::cp_async_16_zfill(void* smem, const void* gmem, int src_size)  copies src_size bytes, zero-fills the rest
//   ng::cp_async_commit(), ng::cp_async_wait<N>()   (emulated: a copy lands at the wait that covers its group)
#pragma once
#ifndef NATGEN_DEVICE_CUH
#define NATGEN_DEVICE_CUH

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(__CUDACC_RTC__)
// NVRTC (the runtime's fallback when no cubin was built) has no C library headers
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#else
#include <stdint.h>
#endif
#define NG_DEVICE __device__ __forceinline__
#elif defined(NATGEN_EMULATOR)
#include "natgen_emu.h"
#define NG_DEVICE inline
#else
#error "natgen_device.cuh: compile with nvcc, or through natgen.emulator (which defines NATGEN_EMULATOR)"
#endif

namespace ng {

NG_DEVICE float to_float(float x) { return x; }
NG_DEVICE float to_float(double x) { return float(x); }
NG_DEVICE float to_float(__half x) { return __half2float(x); }
NG_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> struct FromFloat;
template <> struct FromFloat<float> { static NG_DEVICE float apply(float x) { return x; } };
template <> struct FromFloat<double> { static NG_DEVICE double apply(float x) { return double(x); } };
template <> struct FromFloat<__half> { static NG_DEVICE __half apply(float x) { return __float2half_rn(x); } };
template <> struct FromFloat<__nv_bfloat16> {
    static NG_DEVICE __nv_bfloat16 apply(float x) { return __float2bfloat16_rn(x); }
};
template <class T> NG_DEVICE T from_float(float x) { return FromFloat<T>::apply(x); }

NG_DEVICE float warp_sum(float v, int width = 32) {
    for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
    return v;
}
NG_DEVICE float warp_max(float v, int width = 32) {
    for (int offset = width / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset, width));
    return v;
}

NG_DEVICE uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}
NG_DEVICE uint32_t pack_bfloat162(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

#if defined(__CUDACC__)
// ---------------------------------------------------------------------------------------- GPU
template <class T> NG_DEVICE T* dynamic_smem() {
    extern __shared__ __align__(16) unsigned char ng_dynamic_smem_[];
    return reinterpret_cast<T*>(ng_dynamic_smem_);
}
NG_DEVICE uint32_t float_to_tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
NG_DEVICE void mma_m16n8k16_f16f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
NG_DEVICE void mma_m16n8k16_bf16f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
NG_DEVICE void mma_m16n8k8_tf32f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
NG_DEVICE uint32_t smem_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
NG_DEVICE void ldmatrix_x1(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_address(p)));
}
NG_DEVICE void ldmatrix_x2(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_address(p)));
}
NG_DEVICE void ldmatrix_x4(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(p)));
}
NG_DEVICE void ldmatrix_x1_trans(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_address(p)));
}
NG_DEVICE void ldmatrix_x2_trans(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_address(p)));
}
NG_DEVICE void ldmatrix_x4_trans(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(p)));
}
NG_DEVICE void cp_async_16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(smem_address(smem)), "l"(gmem));
}
NG_DEVICE void cp_async_8(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" :: "r"(smem_address(smem)), "l"(gmem));
}
NG_DEVICE void cp_async_4(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" :: "r"(smem_address(smem)), "l"(gmem));
}
NG_DEVICE void cp_async_16_zfill(void* smem, const void* gmem, int src_size) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smem_address(smem)), "l"(gmem), "r"(src_size));
}
NG_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> NG_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

#else
// ---------------------------------------------------------------------------------- emulator
template <class T> inline T* dynamic_smem() { return ::natgen_emu::dynamic_shared_as<T>(); }
inline uint32_t float_to_tf32(float x) {
    uint32_t u = ::natgen_emu::float_bits(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? 0x7fffffffu : u;  // NaN, inf
    return (u + 0x1000u) & 0xffffe000u;  // nearest, ties away from zero; a carry may reach inf (correct)
}
inline void mma_m16n8k16_f16f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    ::natgen_emu::mma_sync(::natgen_emu::OP_MMA_F16, d, a, b, c, __LINE__);
}
inline void mma_m16n8k16_bf16f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    ::natgen_emu::mma_sync(::natgen_emu::OP_MMA_BF16, d, a, b, c, __LINE__);
}
inline void mma_m16n8k8_tf32f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    ::natgen_emu::mma_sync(::natgen_emu::OP_MMA_TF32, d, a, b, c, __LINE__);
}
inline void ldmatrix_x1(uint32_t* r, const void* p) { ::natgen_emu::ldmatrix_sync(r, p, 1, false, __LINE__); }
inline void ldmatrix_x2(uint32_t* r, const void* p) { ::natgen_emu::ldmatrix_sync(r, p, 2, false, __LINE__); }
inline void ldmatrix_x4(uint32_t* r, const void* p) { ::natgen_emu::ldmatrix_sync(r, p, 4, false, __LINE__); }
inline void ldmatrix_x1_trans(uint32_t* r, const void* p) { ::natgen_emu::ldmatrix_sync(r, p, 1, true, __LINE__); }
inline void ldmatrix_x2_trans(uint32_t* r, const void* p) { ::natgen_emu::ldmatrix_sync(r, p, 2, true, __LINE__); }
inline void ldmatrix_x4_trans(uint32_t* r, const void* p) { ::natgen_emu::ldmatrix_sync(r, p, 4, true, __LINE__); }
inline void cp_async_16(void* smem, const void* gmem) { ::natgen_emu::cp_async(smem, gmem, 16, 16); }
inline void cp_async_8(void* smem, const void* gmem) { ::natgen_emu::cp_async(smem, gmem, 8, 8); }
inline void cp_async_4(void* smem, const void* gmem) { ::natgen_emu::cp_async(smem, gmem, 4, 4); }
inline void cp_async_16_zfill(void* smem, const void* gmem, int src_size) {
    ::natgen_emu::cp_async(smem, gmem, 16, src_size);
}
inline void cp_async_commit() { ::natgen_emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { ::natgen_emu::cp_async_wait(N); }
#endif

}  // namespace ng

#undef NG_DEVICE
#endif  // NATGEN_DEVICE_CUH
