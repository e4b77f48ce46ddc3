"""natgen.emulator: CUDA primitives against their documented semantics, fault detection, the cache.

Kernels live in a few shared sources so each compiles once per session (~2 s each, plus ~9 s once for the
pybind11 host module per cache directory).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from natgen import emulator as emu

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("clean_emulator_env")]

TEMPLATES = Path(emu.build.templates_dir())

PRIMITIVES_SRC = r"""
#include "natgen_device.cuh"

extern "C" __global__ void shuffles(int* out, int mode, int arg, int width) {
    const int t = threadIdx.x;
    const int v = 1000 + t;
    int r;
    if (mode == 0) r = __shfl_sync(0xffffffffu, v, arg, width);
    else if (mode == 1) r = __shfl_up_sync(0xffffffffu, v, arg, width);
    else if (mode == 2) r = __shfl_down_sync(0xffffffffu, v, arg, width);
    else r = __shfl_xor_sync(0xffffffffu, v, arg, width);
    out[t] = r;
}

extern "C" __global__ void votes(const int* pred, unsigned* ballot, int* any, int* all) {
    const int t = threadIdx.x;
    const int p = pred[t];
    ballot[t] = __ballot_sync(0xffffffffu, p);
    any[t] = __any_sync(0xffffffffu, p);
    all[t] = __all_sync(0xffffffffu, p);
}

extern "C" __global__ void warp_reduce(const float* x, float* sums, float* maxes, int width) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    sums[t] = ng::warp_sum(x[t], width);
    maxes[t] = ng::warp_max(x[t], width);
}

extern "C" __global__ void atomics(float* fsum, int* isum, int* imax, unsigned* ucount, int* cas_counter) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    int old = *cas_counter;
    __syncthreads();  // every thread now holds the same stale value: the CAS loop must retry
    int assumed;
    do {
        assumed = old;
        old = atomicCAS(cas_counter, assumed, assumed + 1);
    } while (old != assumed);
    atomicAdd(fsum, 0.5f);
    atomicAdd(isum, t);
    atomicMax(imax, (t * 7919) % 1000);
    atomicAdd(ucount, 1);
}

extern "C" __global__ void conversions(const float* x, __half* h, __nv_bfloat16* b, float* h_back, float* b_back, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    h[i] = __float2half(x[i]);
    b[i] = __float2bfloat16(x[i]);
    h_back[i] = __half2float(h[i]);
    b_back[i] = ng::to_float(b[i]);
}

extern "C" __global__ void half_math(const half* a, const half* b, half* sum, half* prod, __nv_bfloat16* bsum, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    sum[i] = a[i] + b[i];
    prod[i] = a[i] * b[i];
    bsum[i] = ng::from_float<__nv_bfloat16>(__half2float(a[i])) + ng::from_float<__nv_bfloat16>(__half2float(b[i]));
}

extern "C" __global__ void pairs(const float* x, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float2 v = make_float2(x[2 * i], x[2 * i + 1]);
    const float2 back = __half22float2(__float22half2_rn(v));
    const __nv_bfloat162 bb = __floats2bfloat162_rn(v.x, v.y);
    out[4 * i + 0] = back.x;
    out[4 * i + 1] = back.y;
    out[4 * i + 2] = __low2float(bb);
    out[4 * i + 3] = __high2float(bb);
}

// Fragments built straight from the PTX ISA tables (groupID g = lane / 4, threadID_in_group t = lane % 4).
template <class T>
__device__ __forceinline__ uint32_t pair_bits(const T* m, int lo, int hi) {
    const unsigned short* u = reinterpret_cast<const unsigned short*>(m);
    return uint32_t(u[lo]) | (uint32_t(u[hi]) << 16);
}
template <class T, int kBf16>
__device__ void mma_m16n8k16(const T* A, const T* B, const float* C, float* D) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    uint32_t a[4], b[2];
    float c[4], d[4];
    a[0] = pair_bits(A, g * 16 + 2 * t, g * 16 + 2 * t + 1);
    a[1] = pair_bits(A, (g + 8) * 16 + 2 * t, (g + 8) * 16 + 2 * t + 1);
    a[2] = pair_bits(A, g * 16 + 2 * t + 8, g * 16 + 2 * t + 9);
    a[3] = pair_bits(A, (g + 8) * 16 + 2 * t + 8, (g + 8) * 16 + 2 * t + 9);
    b[0] = pair_bits(B, (2 * t) * 8 + g, (2 * t + 1) * 8 + g);
    b[1] = pair_bits(B, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
    for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    if (kBf16) ng::mma_m16n8k16_bf16f32(d, a, b, c);
    else ng::mma_m16n8k16_f16f32(d, a, b, c);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}
extern "C" __global__ void mma_f16(const half* A, const half* B, const float* C, float* D) {
    mma_m16n8k16<half, 0>(A, B, C, D);
}
extern "C" __global__ void mma_bf16(const __nv_bfloat16* A, const __nv_bfloat16* B, const float* C, float* D) {
    mma_m16n8k16<__nv_bfloat16, 1>(A, B, C, D);
}
extern "C" __global__ void mma_tf32(const float* A, const float* B, const float* C, float* D) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    uint32_t a[4], b[2];
    float c[4];
    a[0] = ng::float_to_tf32(A[g * 8 + t]);
    a[1] = ng::float_to_tf32(A[(g + 8) * 8 + t]);
    a[2] = ng::float_to_tf32(A[g * 8 + t + 4]);
    a[3] = ng::float_to_tf32(A[(g + 8) * 8 + t + 4]);
    b[0] = ng::float_to_tf32(B[t * 8 + g]);
    b[1] = ng::float_to_tf32(B[(t + 4) * 8 + g]);
    for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    ng::mma_m16n8k8_tf32f32(c, a, b, c);  // d aliases c, as accumulating kernels do
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = c[i];
}

// 4 matrices of 8x8 b16 in shared memory; lane L passes the row stored at tile row (5L + 3) % 32.
extern "C" __global__ void ldmatrix_test(const unsigned short* src, unsigned* out, int num, int trans) {
    __shared__ __align__(16) unsigned short tile[32 * 8];
    const int lane = threadIdx.x;
    for (int i = lane; i < 32 * 8; i += 32) tile[i] = src[i];
    __syncwarp();
    const unsigned short* row = &tile[((5 * lane + 3) % 32) * 8];
    uint32_t r[4] = {0u, 0u, 0u, 0u};
    if (num == 1) { if (trans) ng::ldmatrix_x1_trans(r, row); else ng::ldmatrix_x1(r, row); }
    if (num == 2) { if (trans) ng::ldmatrix_x2_trans(r, row); else ng::ldmatrix_x2(r, row); }
    if (num == 4) { if (trans) ng::ldmatrix_x4_trans(r, row); else ng::ldmatrix_x4(r, row); }
    for (int m = 0; m < 4; ++m) out[lane * 4 + m] = r[m];
}

extern "C" __global__ void cp_async_test(const float* x, float* y, int first_bytes) {
    __shared__ __align__(16) float buf[4 * 32];
    const int t = threadIdx.x;
    ng::cp_async_16_zfill(&buf[4 * t], &x[4 * t], t == 0 ? first_bytes : 16);
    ng::cp_async_commit();
    ng::cp_async_wait<0>();
    __syncthreads();
    for (int k = 0; k < 4; ++k) y[4 * t + k] = buf[4 * ((t + 1) % 32) + k];
}

extern "C" __global__ void reverse_extern_shared(const float* x, float* y) {
    extern __shared__ float buf[];
    const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    buf[t] = x[base + t];
    __syncthreads();
    y[base + t] = buf[blockDim.x - 1 - t];
}
extern "C" __global__ void reverse_ng_dynamic(const float* x, float* y) {
    float* buf = ng::dynamic_smem<float>();
    const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    buf[t] = x[base + t];
    __syncthreads();
    y[base + t] = buf[blockDim.x - 1 - t];
}

extern "C" __global__ void neighbor_racy(const float* x, float* y) {
    __shared__ float buf[128];
    const int t = threadIdx.x;
    buf[t] = x[t];
    y[t] = buf[(t + 1) % blockDim.x];  // BUG: no __syncthreads between the write and the neighbour's read
}
extern "C" __global__ void neighbor_fixed(const float* x, float* y) {
    __shared__ float buf[128];
    const int t = threadIdx.x;
    buf[t] = x[t];
    __syncthreads();
    y[t] = buf[(t + 1) % blockDim.x];
}

extern "C" __global__ void __launch_bounds__(256) barrier_bench(float* __restrict__ out, int iters) {
    __shared__ float buf[2][256];  // double-buffered: one barrier per iteration orders every reuse
    float acc = 0.f;
    for (int i = 0; i < iters; ++i) {
        buf[i & 1][threadIdx.x] = acc + float(i);
        __syncthreads();
        acc += buf[i & 1][(threadIdx.x + 1) % blockDim.x];
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

extern "C" __global__ void scalars(double* out, long long a, unsigned b, float c, double d, __half e, bool f) {
    out[0] = double(a);
    out[1] = double(b);
    out[2] = double(c);
    out[3] = d;
    out[4] = double(ng::to_float(e));
    out[5] = f ? 1.0 : 0.0;
}
"""

FAULTS_SRC = r"""
#include "natgen_device.cuh"

extern "C" __global__ void early_exit_then_barrier(float* y) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    y[threadIdx.x] = 1.0f;
}
extern "C" __global__ void divergent_barriers(float* y) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[threadIdx.x] = 1.0f;
}
extern "C" __global__ void shuffle_vs_barrier(float* y) {
    float v = float(threadIdx.x);
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncthreads();
    y[threadIdx.x] = v;
}
extern "C" __global__ void store_past_end(float* y, int n) {
    y[int(threadIdx.x) + n - 16] = 1.0f;
}
extern "C" __global__ void dynamic_smem_overflow(float* y) {
    extern __shared__ float dyn[];
    dyn[threadIdx.x] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = dyn[threadIdx.x];
}
extern "C" __global__ void shuffle_outside_mask(float* y) {
    y[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 0);
}
extern "C" __global__ void divide(int* y, int d) {
    y[threadIdx.x] = 100 / d;
}
__device__ int deep(int n) {
    volatile char pad[4096];
    pad[0] = (char)n;
    return n == 0 ? 0 : 1 + deep(n - 1) + pad[0];
}
extern "C" __global__ void recurse(int* y, int n) {
    y[threadIdx.x] = deep(n);
}
extern "C" __global__ void spin_forever(int* flag) {
    while (*(volatile int*)flag == 0) {
    }
}
"""


@pytest.fixture(scope="module")
def prims():
    """Compile PRIMITIVES_SRC once; return a launcher for its kernels."""
    emu.load_source(PRIMITIVES_SRC)
    return lambda name, grid, block, args, **kw: emu.launch(PRIMITIVES_SRC, name, grid, block, args, timeout=60, **kw)


@pytest.fixture(scope="module")
def faults():
    emu.load_source(FAULTS_SRC)
    return lambda name, grid, block, args, **kw: emu.launch(FAULTS_SRC, name, grid, block, args, timeout=60, **kw)


# ------------------------------------------------------------------------------------- warp shuffles
def expected_shuffle(mode: int, lane: int, arg: int, width: int) -> int:
    """CUDA Programming Guide semantics of __shfl*_sync, written independently of the emulator."""
    segment = (lane // width) * width
    if mode == 0:
        src = segment + arg % width
    elif mode == 1:
        src = lane - arg if lane - segment >= arg else lane
    elif mode == 2:
        src = lane + arg if lane - segment + arg < width else lane
    else:
        src = lane ^ arg
        if src // width > lane // width:  # later groups are out of reach: own value
            src = lane
    return src


@pytest.mark.parametrize("mode", [0, 1, 2, 3], ids=["idx", "up", "down", "xor"])
@pytest.mark.parametrize("arg,width", [(1, 32), (5, 32), (3, 8), (17, 16), (2, 4)])
def test_shuffles_match_cuda_semantics(prims, mode, arg, width):
    out = torch.zeros(64, dtype=torch.int32)
    prims("shuffles", 1, 64, [out, mode, arg, width])
    expected = [1000 + 32 * (t // 32) + expected_shuffle(mode, t % 32, arg, width) for t in range(64)]
    assert out.tolist() == expected


def test_ballot_any_all(prims):
    gen = torch.Generator().manual_seed(0)
    pred = (torch.rand(96, generator=gen) < 0.3).to(torch.int32)
    pred[64:] = 1  # third warp: all set
    pred[32:64] = 0  # second warp: none set
    ballot = torch.zeros(96, dtype=torch.int32)
    any_ = torch.zeros(96, dtype=torch.int32)
    all_ = torch.zeros(96, dtype=torch.int32)
    prims("votes", 1, 96, [pred, ballot, any_, all_])
    for w in range(3):
        bits = sum(int(pred[32 * w + i]) << i for i in range(32))
        assert {b & 0xFFFFFFFF for b in ballot[32 * w : 32 * w + 32].tolist()} == {bits}
        assert set(any_[32 * w : 32 * w + 32].tolist()) == {int(bits != 0)}
        assert set(all_[32 * w : 32 * w + 32].tolist()) == {int(bits == 0xFFFFFFFF)}


@pytest.mark.parametrize("width", [32, 16, 4])
def test_warp_sum_and_max(prims, width):
    x = torch.randn(128, generator=torch.Generator().manual_seed(width))
    sums, maxes = torch.zeros(128), torch.zeros(128)
    prims("warp_reduce", 2, 64, [x, sums, maxes, width])
    groups = x.view(-1, width).double()
    torch.testing.assert_close(sums.double(), groups.sum(1, keepdim=True).expand_as(groups).reshape(-1), rtol=1e-6, atol=1e-5)
    assert torch.equal(maxes, x.view(-1, width).amax(1, keepdim=True).expand(-1, width).reshape(-1))


def test_atomics_under_contention(prims):
    fsum, isum, imax = torch.zeros(1), torch.zeros(1, dtype=torch.int32), torch.full((1,), -1, dtype=torch.int32)
    ucount, cas = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    prims("atomics", 4, 256, [fsum, isum, imax, ucount, cas], seed=3)
    n = 4 * 256
    assert fsum.item() == 0.5 * n
    assert isum.item() == n * (n - 1) // 2
    assert imax.item() == max((t * 7919) % 1000 for t in range(n))
    assert ucount.item() == n and cas.item() == n


# ------------------------------------------------------------------------------------- half / bf16
def _conversion_inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6.1e-5, 5.96e-8, 2.98e-8,
                            2.99e-8, 1e-10, float("inf"), float("-inf"), 3.0e38, 1.00048828125, 1.0009765625,
                            1.00146484375, 2.0 ** -24 * 1.5, 2.0 ** -25])
    wide = torch.randn(4000, generator=gen) * torch.logspace(-9, 6, 4000)
    ties_f16 = (torch.randint(0, 2048, (500,), generator=gen) * 2 + 1).float() * 2.0 ** -11 + 1  # halfway cases
    ties_bf16 = (torch.randint(0, 256, (500,), generator=gen) * 2 + 1).float() * 2.0 ** -8 + 1
    return torch.cat([special, wide, ties_f16, ties_bf16, torch.tensor([float("nan")])]).float()


def test_half_bfloat16_conversions_round_to_nearest_even(prims):
    x = _conversion_inputs()
    n = x.numel()
    h, b = torch.zeros(n, dtype=torch.float16), torch.zeros(n, dtype=torch.bfloat16)
    h_back, b_back = torch.zeros(n), torch.zeros(n)
    prims("conversions", (n + 255) // 256, 256, [x, h, b, h_back, b_back, n])
    finite = ~torch.isnan(x)
    assert torch.equal(h.view(torch.int16)[finite], x.half().view(torch.int16)[finite])
    assert torch.equal(b.view(torch.int16)[finite], x.bfloat16().view(torch.int16)[finite])
    assert torch.isnan(h[-1]) and torch.isnan(b[-1])
    assert torch.equal(h_back[finite], x.half().float()[finite])
    assert torch.equal(b_back[finite], x.bfloat16().float()[finite])


def test_half_arithmetic_and_pairs(prims):
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(1000, generator=gen) * 30).half(), (torch.randn(1000, generator=gen) * 30).half()
    s, p, bs = torch.zeros_like(a), torch.zeros_like(a), torch.zeros(1000, dtype=torch.bfloat16)
    prims("half_math", 4, 256, [a, b, s, p, bs, 1000])
    assert torch.equal(s.view(torch.int16), (a + b).view(torch.int16))
    assert torch.equal(p.view(torch.int16), (a * b).view(torch.int16))
    assert torch.equal(bs.view(torch.int16), (a.bfloat16() + b.bfloat16()).view(torch.int16))
    x = torch.randn(512, generator=gen) * 1000
    out = torch.zeros(1024)
    prims("pairs", 1, 256, [x, out, 256])
    out = out.view(256, 4)
    assert torch.equal(out[:, 0:2].reshape(-1), x.half().float())
    assert torch.equal(out[:, 2:4].reshape(-1), x.bfloat16().float())


# ------------------------------------------------------------------------------------- tensor cores
@pytest.mark.parametrize("kernel,dtype", [("mma_f16", torch.float16), ("mma_bf16", torch.bfloat16)])
def test_mma_m16n8k16_against_matmul(prims, kernel, dtype):
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(16, 16, generator=gen).to(dtype)
    B = torch.randn(16, 8, generator=gen).to(dtype)
    C = torch.randn(16, 8, generator=gen)
    D = torch.zeros(16, 8)
    prims(kernel, 1, 32, [A, B, C, D])
    expected = A.double() @ B.double() + C.double()
    torch.testing.assert_close(D.double(), expected, rtol=1e-6, atol=1e-6)


def test_mma_m16n8k8_tf32_against_matmul(prims):
    gen = torch.Generator().manual_seed(5)
    # values with <= 10 mantissa bits are exact in tf32, so the rounding mode does not matter here
    A = torch.randint(-512, 512, (16, 8), generator=gen).float() / 64
    B = torch.randint(-512, 512, (8, 8), generator=gen).float() / 64
    C = torch.randn(16, 8, generator=gen)
    D = torch.zeros(16, 8)
    prims("mma_tf32", 1, 32, [A, B, C, D])
    torch.testing.assert_close(D.double(), A.double() @ B.double() + C.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_matches_plain_copy(prims, num, trans):
    src = torch.arange(32 * 8, dtype=torch.int16) * 7 + 11
    out = torch.zeros(32 * 4, dtype=torch.int32)
    prims("ldmatrix_test", 1, 32, [src, out, num, trans])
    tile = src.view(32, 8).tolist()
    # matrix m row r is the row that lane 8m + r pointed at
    mats = [[tile[(5 * (8 * m + r) + 3) % 32] for r in range(8)] for m in range(4)]
    got = out.view(32, 4).tolist()
    for lane in range(32):
        for m in range(4):
            if m >= num:
                assert got[lane][m] == 0
                continue
            r, c = lane // 4, 2 * (lane % 4)
            lo, hi = (mats[m][c][r], mats[m][c + 1][r]) if trans else (mats[m][r][c], mats[m][r][c + 1])
            assert got[lane][m] & 0xFFFFFFFF == (lo & 0xFFFF) | ((hi & 0xFFFF) << 16), (lane, m)


def test_cp_async_zero_fill(prims):
    x = torch.arange(128, dtype=torch.float32) + 1
    y = torch.zeros(128)
    prims("cp_async_test", 1, 32, [x, y, 8])
    expected = x.clone()
    expected[2:4] = 0  # thread 0 copied 8 of its 16 bytes; the rest is zero-filled
    assert torch.equal(y, torch.roll(expected, -4))


@pytest.mark.parametrize("kernel", ["reverse_extern_shared", "reverse_ng_dynamic"])
def test_dynamic_shared_memory(prims, kernel):
    x = torch.randn(3 * 96)
    y = torch.zeros_like(x)
    prims(kernel, 3, 96, [x, y], shared_mem=96 * 4)
    assert torch.equal(y, x.view(3, 96).flip(1).reshape(-1))


# ------------------------------------------------------------------------------------- scheduling
def test_missing_barrier_race_shows_under_seeds_fixed_version_does_not(prims):
    x = torch.arange(128, dtype=torch.float32)
    results = {}
    for kernel in ("neighbor_racy", "neighbor_fixed"):
        outs = []
        for seed in range(4):
            y = torch.zeros(128)
            prims(kernel, 1, 128, [x, y], seed=seed)
            outs.append(tuple(y.view(torch.int32).tolist()))  # bitwise: unwritten smem reads as NaN poison
        results[kernel] = outs
    assert len(set(results["neighbor_racy"])) > 1
    assert len(set(results["neighbor_fixed"])) == 1
    assert torch.equal(torch.tensor(results["neighbor_fixed"][0], dtype=torch.int32).view(torch.float32),
                       torch.roll(x, -1))


def test_8192_threads_20_barriers_is_fast(prims):
    out = torch.zeros(32 * 256)
    prims("barrier_bench", 32, 256, [out, 20])  # warm (stack pool, page faults)
    start = time.perf_counter()
    prims("barrier_bench", 32, 256, [out, 20])
    elapsed = time.perf_counter() - start
    print(f"8192 threads x 20 __syncthreads: {elapsed * 1e3:.1f} ms")
    assert elapsed < 0.5


def test_scalar_parameters_convert_to_their_types(prims):
    out = torch.zeros(6, dtype=torch.float64)
    prims("scalars", 1, 1, [out, -(2**40), 2**32 - 1, 0.1, 0.1, 1.0009765625 + 2**-12, True])
    assert out.tolist() == [-(2**40), 2**32 - 1, float(torch.tensor(0.1, dtype=torch.float32)), 0.1,
                            float(torch.tensor(1.0009765625 + 2**-12).half()), 1.0]


def test_argument_checking(prims):
    with pytest.raises(emu.ArgumentError, match="float32"):
        prims("reverse_ng_dynamic", 1, 32, [torch.zeros(32, dtype=torch.float64), torch.zeros(32)], shared_mem=128)
    with pytest.raises(emu.ArgumentError, match="takes 2 arguments"):
        prims("reverse_ng_dynamic", 1, 32, [torch.zeros(32)])
    with pytest.raises(emu.ArgumentError, match="does not fit"):
        prims("scalars", 1, 1, [torch.zeros(6, dtype=torch.float64), 0, -1, 0.0, 0.0, 0.0, False])
    with pytest.raises(emu.LaunchConfigError, match="no __global__ function 'nope'"):
        prims("nope", 1, 1, [])
    with pytest.raises(emu.LaunchConfigError, match="at most 1024"):
        prims("neighbor_fixed", 1, 2048, [torch.zeros(1), torch.zeros(1)])


def test_find_kernels_reads_parameter_names():
    found = {k.name: k.param_names for k in emu.find_kernels(PRIMITIVES_SRC)}
    assert found["shuffles"] == ("out", "mode", "arg", "width")
    assert found["barrier_bench"] == ("out", "iters")
    assert "mma_m16n8k16" not in found  # a template, not launchable


# ------------------------------------------------------------------------------------- faults
def test_barrier_after_a_thread_exited_raises(faults):
    with pytest.raises(emu.BarrierError, match="exited") as info:
        faults("early_exit_then_barrier", 2, 32, [torch.zeros(32)])
    assert info.value.kernel == "early_exit_then_barrier" and info.value.block == (0, 0, 0)
    assert info.value.thread is not None


def test_barriers_at_different_sites_raise(faults):
    with pytest.raises(emu.BarrierError, match="different __syncthreads.*kernel.cu:"):
        faults("divergent_barriers", 1, 32, [torch.zeros(32)])


def test_deadlock_raises(faults):
    with pytest.raises(emu.DeadlockError, match="deadlock"):
        faults("shuffle_vs_barrier", 1, 32, [torch.zeros(32)])


def test_out_of_bounds_global_store_raises_in_checked_mode(faults):
    y = torch.zeros(100)
    with pytest.raises(emu.MemoryAccessError, match=r"store at byte offset 400 of argument 'y'") as info:
        faults("store_past_end", 1, 32, [y, 100])
    assert info.value.thread == (16, 0, 0)
    assert torch.equal(y, torch.zeros(100))  # a faulting launch writes nothing back


def test_dynamic_shared_memory_overflow_raises(faults):
    with pytest.raises(emu.SharedMemoryError, match="shared_mem=64"):
        faults("dynamic_smem_overflow", 1, 32, [torch.zeros(32)], shared_mem=64)
    faults("dynamic_smem_overflow", 1, 32, [torch.zeros(32)], shared_mem=128)


def test_shared_memory_request_above_227kb_raises(faults):
    with pytest.raises(emu.SharedMemoryError, match="227 KB"):
        faults("dynamic_smem_overflow", 1, 32, [torch.zeros(32)], shared_mem=228 * 1024)


def test_warp_collective_misuse_and_arithmetic_fault_raise(faults):
    with pytest.raises(emu.WarpCollectiveError, match="does not include the calling lane"):
        faults("shuffle_outside_mask", 1, 32, [torch.zeros(32)])
    with pytest.raises(emu.ArithmeticFault):
        faults("divide", 1, 4, [torch.zeros(4, dtype=torch.int32), 0])


def test_stack_overflow_raises(faults):
    with pytest.raises(emu.StackOverflowError, match="stack overflow"):
        faults("recurse", 1, 2, [torch.zeros(2, dtype=torch.int32), 1000])


def test_unchecked_mode_runs_on_the_tensors_directly(faults):
    y = torch.zeros(4, dtype=torch.int32)
    faults("divide", 1, 4, [y, 7], checked=False)
    assert y.tolist() == [14] * 4


def test_second_launch_uses_cache_without_recompiling(faults):
    before = dict(emu.stats)
    emu.clear_memory_cache()
    faults("divide", 1, 4, [torch.zeros(4, dtype=torch.int32), 1])
    faults("divide", 1, 4, [torch.zeros(4, dtype=torch.int32), 1])
    assert emu.stats["compiles"] == before["compiles"]
    assert emu.stats["disk_hits"] == before["disk_hits"] + 1
    assert emu.stats["memory_hits"] > before["memory_hits"]


def _run_python(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)


def test_infinite_loop_times_out(faults):
    # In a subprocess with its own deadline, so a broken timer fails this test instead of hanging the suite.
    code = f"""
        import torch
        from natgen import emulator as emu
        src = {FAULTS_SRC!r}
        try:
            emu.launch(src, "spin_forever", 1, 4, [torch.zeros(1, dtype=torch.int32)], timeout=0.5)
        except emu.EmulatorTimeout as exc:
            print("TIMEOUT", exc)
    """
    proc = _run_python(code, timeout=90)
    assert "TIMEOUT kernel 'spin_forever'" in proc.stdout, proc.stderr


def test_compile_error_names_the_source_line():
    src = '#include "natgen_device.cuh"\nextern "C" __global__ void broken(float* y) {\n    y[0] = undefined_name;\n}\n'
    with pytest.raises(emu.CompileError, match=r"kernel\.cu:3:.*undefined_name") as info:
        emu.launch(src, "broken", 1, 1, [torch.zeros(1)])
    assert "y[0] = undefined_name;" in str(info.value)


def test_corrupt_cache_entry_is_ignored():
    src = f'#include "natgen_device.cuh"\n// {uuid.uuid4()}\nextern "C" __global__ void fill(float* y) {{ y[threadIdx.x] = 7.0f; }}\n'
    path = emu.compile_to_cache(src)
    compiles = emu.stats["compiles"]
    garbage = path.with_suffix(".garbage")
    garbage.write_bytes(b"\x7fELF this is not a shared object")
    os.replace(garbage, path)
    y = torch.zeros(8)
    emu.launch(src, "fill", 1, 8, [y])
    assert torch.equal(y, torch.full((8,), 7.0))
    assert emu.stats["compiles"] == compiles + 1 and emu.stats["corrupt_entries"] >= 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_sources_are_valid_cuda(tmp_path):
    for name, src in (("primitives.cu", PRIMITIVES_SRC), ("faults.cu", FAULTS_SRC)):
        path = tmp_path / name
        path.write_text(src)
        proc = subprocess.run(["nvcc", "-arch=sm_80", "-std=c++17", "-c", f"-I{TEMPLATES}", str(path), "-o",
                               str(tmp_path / (name + ".o"))], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
