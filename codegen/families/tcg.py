"""Tensor-core generic forward: runtime K, S, D; per-dim causal as a compile-time mask.

A CTA owns 64 queries of one dilation group (4 warps x 16 mma rows); it walks the box that is the union of
their windows, then the extra tokens, in shared-memory tiles of keys, double buffered with cp.async, with an
online (FlashAttention-2 style) softmax. QK^T and PV run on mma.sync m16n8k16 with fp32 accumulation.

fp16 and bf16 only: fp32 inputs are left to the SIMT family (which meets fp32 accuracy); head_dim 256 would
need 128 fp32 output accumulators per thread on top of Q and S and is left out (it spills).

The helpers below are shared with the specialized family (tcs), which runs the same body with K and D
as compile-time constants.
"""
from __future__ import annotations

import functools
import itertools
import math

from ...cost import QUERY_ROWS_PER_WARP as _ROWS_PER_WARP, computed_keys_per_useful_key
from .. import abi
from ..spec import ANY, KernelSpec, padded_cuda_terms

FAMILY = "tcg"
TEMPLATE = "tcg_fwd.cu.j2"
TOOLCHAIN = "nvcc"
SOURCE_SUFFIX = ".cu"
HEADERS = ("natgen_device.cuh",)
ABI = "cuda_fwd"
# The selector's inputs (natgen.cost): relative time per useful key (the tensor cores beat the SIMT family
# by the mma throughput ratio), and the resident warps beyond which occupancy stops hiding latency: tensor-core
# CTAs keep several mma and cp.async stages in flight per warp, so a few warps per scheduler saturate them.
COST = {"base": 1.3, "saturating_warps": 8, "waste": "tc_chunks"}
# CUDA grid limits on blockIdx.y (heads) and blockIdx.z (batch)
GRID_LIMITS = {"max_heads": 65535, "max_batch": 65535}

DTYPES = ("f16", "bf16")
HEAD_DIMS = (32, 64, 128)
WARP = 32
QUERY_ROWS_PER_WARP = _ROWS_PER_WARP
# 64 queries per CTA in every rank. In 2-D, 16x4 makes each warp's 16 rows a 4x4 square, whose windows
# cover a compact range of the flattened box (8x8 gives each warp 2x8 rows: 7-15% more computed keys).
TILES = {1: (64,), 2: (16, 4), 3: (4, 4, 4)}
MMA = {"f16": "mma_m16n8k16_f16f32", "bf16": "mma_m16n8k16_bf16f32"}
PACK = {"f16": "pack_half2", "bf16": "pack_bfloat162"}
# Reference problems for the wasted-work figure a runtime-K instance records in the manifest (non-causal,
# S = D = 1): a mid-size window, not the best case, shown by `natgen list`. The selector computes the figure
# for the actual problem instead (natgen.cost, waste model "tc_chunks").
REFERENCE = {1: ((1024,), (31,)), 2: ((56, 56), (7, 7)), 3: ((16, 16, 16), (5, 5, 5))}


# __launch_bounds__ minimum CTAs per SM: 4 caps registers at 128 (16 resident warps), 3 at 168; head_dim 128 holds
# 64 fp32 output accumulators and 32 Q registers per thread, so it keeps the full 255 (2 CTAs).
MIN_BLOCKS = {32: 4, 64: 3, 128: 2}


def min_blocks(spec: KernelSpec) -> int:
    """The __launch_bounds__ minimum CTAs per SM. A 3-D causal head_dim 32 instance holds three window bounds
    per row more than the non-causal one: with the positional-bias pass, ptxas for sm_90 needs a few registers
    over the 128 that 4 CTAs allow (it spilled 4-16 bytes), so it takes 3 CTAs (12 warps, above the 8 that
    saturate the tensor-core families: COST["saturating_warps"])."""
    if spec.rank == 3 and spec.head_dim == 32 and any(spec.causal):
        return 3
    return MIN_BLOCKS[spec.head_dim]


def kv_tile(head_dim: int) -> int:
    """Keys per shared-memory stage: two stages of K and V stay within the 48 KiB a launch gets without
    opting in to more dynamic shared memory."""
    return 32 if head_dim >= 128 else 64


def row_stride(head_dim: int) -> int:
    return head_dim + 8  # one 16-byte pad per row: the 8 rows an ldmatrix reads fall in distinct banks


def dynamic_smem(head_dim: int, dtype: str) -> int:
    element = 2  # fp16 / bf16
    return 2 * 2 * kv_tile(head_dim) * row_stride(head_dim) * element  # {K, V} x 2 stages


def check_supported(spec: KernelSpec) -> None:
    if spec.dtype not in MMA:
        raise ValueError(f"dtype={spec.dtype}: the tensor-core families take f16/bf16 (f32 goes to simt)")
    if spec.head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={spec.head_dim} must be one of {HEAD_DIMS}")
    if math.prod(spec.tile) != 64:
        raise ValueError(f"tile={spec.tile} must hold 64 queries (4 warps x 16 mma rows)")


def tc_launch(spec: KernelSpec, spatial, kernel_size, limits=None) -> dict:
    figures = {
        "threads": WARP * math.prod(spec.tile) // QUERY_ROWS_PER_WARP,
        "dynamic_smem": dynamic_smem(spec.head_dim, spec.dtype),
        "queries_per_cta": math.prod(spec.tile),
        "kv_tile": kv_tile(spec.head_dim),
        "grid": "group_tiles",
        "computed_keys_per_useful_key": round(computed_keys_per_useful_key(
            tuple(spec.tile), tuple(spatial), tuple(kernel_size), tuple(spec.causal), kv_tile(spec.head_dim)), 4),
        "waste_reference": {"spatial": list(spatial), "kernel_size": list(kernel_size)},
        "grouped_kv_heads": True,  # key/value rows index the query head's kv head (the heads_kv argument)
        "rpb": True,  # adds the relative positional bias the rpb argument points to (null: none)
    }
    figures["limits"] = dict(GRID_LIMITS, **(limits or {}))
    return figures


def tc_context(spec: KernelSpec) -> dict:
    check_supported(spec)
    rank, pad = spec.rank, 3 - spec.rank
    kernel_size, dilation = padded_cuda_terms(spec)
    return {
        "rank": rank,
        "threads": WARP * math.prod(spec.tile) // QUERY_ROWS_PER_WARP,
        "queries": math.prod(spec.tile),
        "tile": list(spec.tile) + [1] * pad,
        "kernel_size": kernel_size,
        "dilation": dilation,
        "causal": [("true" if c else "false") for c in spec.causal] + ["false"] * pad,
        "head_dim": spec.head_dim,
        "kv_tile": kv_tile(spec.head_dim),
        "min_blocks": min_blocks(spec),
        "length": [f"len{d}" for d in range(rank)] + ["1"] * pad,
        "mma": MMA[spec.dtype],
        "pack": PACK[spec.dtype],
        "signature": abi.cuda_signature(ABI, spec.ctype),
        "prologue": abi.cuda_fwd_prologue(rank, spec.ctype),
    }


def candidates(policy: str):
    for rank in (1, 2, 3):
        for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
            for causal in itertools.product((False, True), repeat=rank):
                yield KernelSpec(FAMILY, "fwd", rank, ANY, ANY, causal, dtype, head_dim, TILES[rank], "sm_80"), None
        yield (KernelSpec(FAMILY, "fwd", rank, ANY, ANY, (False,) * rank, "f32", 64, TILES[rank], "sm_80"),
               "fp32 inputs are served by the simt family at fp32 accuracy (no 3xTF32 path yet)")
        yield (KernelSpec(FAMILY, "fwd", rank, ANY, ANY, (False,) * rank, "f16", 256, TILES[rank], "sm_80"),
               "head_dim 256 needs 128 fp32 output accumulators per thread besides Q and S: it spills")


def launch(spec: KernelSpec) -> dict:
    spatial, kernel_size = REFERENCE[spec.rank]
    return tc_launch(spec, spatial, kernel_size)


def context(spec: KernelSpec) -> dict:
    return tc_context(spec)


def partners(spec: KernelSpec):
    """The backward instances of a forward: those of its rank, causal mask, dtype and head_dim (natgen.codegen's
    families.backward)."""
    from .backward import backward_of  # imported here: the tensor-core backward builds on this module
    return backward_of(spec)
