"""Tensor-core specialized forward: kernel size and dilation are compile-time constants (the NAT/DiNAT
regime, K up to 13 per dim).

One-pass design (templates/tcs_region_body.cuh.j2): a CTA owns 64 queries of one dilation group; the union
of their windows (tile + K - 1 keys per dim with stride 1, a compile-time maximum) is loaded ONCE into
dynamic shared memory with cp.async; each warp holds S = Q K^T for its 16 rows against every 16-key chunk
its rows need in registers, masks, does an exact softmax and O = P V on mma.sync m16n8k16. Extra tokens
(and a stride > 1 union larger than the region) take further region-sized slabs with a running-max merge.

Instances whose region or warp key range does not fit (shared memory over REGION_SMEM_BUDGET, or more than
MAX_GROUP_CHUNKS chunks of scores per warp: 2-D K >= 11, 2-D K = 9 at head_dim >= 64, 2-D K = 5/7 at
head_dim 128, 3-D K >= 5, 3-D K = 3 at head_dim 128) and causal ones (full policy) keep the chunked
online-softmax body shared with the generic family (templates/tc_fwd_body.cuh.j2).

Default policy: odd K 3..13, D = 1, non-causal; dilated or causal problems go to the generic family (tcg),
whose runtime D/causal mask costs little next to the memory traffic. fp16/bf16 only (f32 -> simt).
"""
from __future__ import annotations

import itertools
import math

from ..spec import KernelSpec
from . import backward, tcg

FAMILY = "tcs"
TEMPLATE = "tcs_fwd.cu.j2"
TOOLCHAIN = "nvcc"
SOURCE_SUFFIX = ".cu"

KERNEL_SIZES = (3, 5, 7, 9, 11, 13)
TILES = tcg.TILES
# Reference problems for the wasted-work figure recorded in the manifest: the typical NAT / DiNAT shapes.
# The selector computes the figure for the actual problem instead (problem_waste).
REFERENCE_SPATIAL = {1: (1024,), 2: (56, 56), 3: (16, 16, 16)}
ABI = tcg.ABI
HEADERS = tcg.HEADERS
# Both bodies compute the same 16-key chunks per warp (see launch), so the generic family's waste model holds;
# compile-time K and D remove index math (the specialization factor).
COST = {"base": 1.0, "specialization": 0.85, "saturating_warps": 8, "waste": "tc_chunks"}


def candidates(policy: str):
    full = policy == "full"
    for rank in (1, 2, 3):
        for dtype, head_dim in itertools.product(tcg.DTYPES, tcg.HEAD_DIMS):
            for kernel in KERNEL_SIZES:
                for dil in (1, 2, 3, 4):
                    for causal in itertools.product((False, True), repeat=rank):
                        spec = KernelSpec(FAMILY, "fwd", rank, (kernel,) * rank, (dil,) * rank, causal, dtype,
                                          head_dim, TILES[rank], "sm_80")
                        reason = None
                        if dil != 1 and not full:
                            reason = "dilation != 1 is served by the generic tensor-core family (policy default)"
                        elif any(causal) and not full:
                            reason = "causal windows vary per query: served by the generic tensor-core family"
                        yield spec, reason


# The one-pass region (K and V) leaves room for 2 resident CTAs per SM on sm_80 (164 KB).
REGION_SMEM_BUDGET = 80 * 1024
# Score registers per thread are 8 per chunk next to Q (head_dim / 4) and O (head_dim / 2): beyond 10
# chunks (80 floats) the head_dim 128 instances spill, and a warp computes more masked keys than useful.
MAX_GROUP_CHUNKS = 10
SM80_SMEM_PER_SM = 164 * 1024
# __launch_bounds__ register caps per minimum CTAs per SM (128 threads), and a register estimate for the
# one-pass body: 8 per score chunk, Q + O = 3/4 head_dim, ~62 for addresses, windows and softmax state
# (fits the ptxas figures within a few registers). Going to the next cap at 95% keeps sm_90 spill-free.
REGISTER_CAP = {4: 128, 3: 168, 2: 255}


def estimated_registers(spec: KernelSpec) -> int:
    return 8 * group_chunks(spec) + 3 * spec.head_dim // 4 + 62


def region_keys(spec: KernelSpec) -> int:
    """Shared-memory rows of K (and V): the stride-1 window union of a tile, rounded up to 16-key chunks."""
    keys = math.prod(t + k - 1 for t, k in zip(spec.tile, spec.kernel_size))
    return -(-keys // 16) * 16


def group_chunks(spec: KernelSpec) -> int:
    """16-key chunks a warp's rows can need (stride 1, any alignment): the S registers it holds at once."""
    rank, rows = spec.rank, tcg.QUERY_ROWS_PER_WARP
    tile = tuple(spec.tile) + (1,) * (3 - rank)
    kernel = tuple(spec.kernel_size) + (1,) * (3 - rank)
    # a warp's 16 rows are a sub-box of the tile (row-major, last dim fastest)
    sub = [len({(r // (tile[1] * tile[2]), (r // tile[2]) % tile[1], r % tile[2])[d] for r in range(rows)})
           for d in range(3)]
    box = [t + k - 1 for t, k in zip(tile, kernel)]
    extent = [s + k - 1 for s, k in zip(sub, kernel)]
    flat_range = ((extent[0] - 1) * box[1] + (extent[1] - 1)) * box[2] + extent[2]
    return -(-(flat_range + 15) // 16)


def region_smem(spec: KernelSpec) -> int:
    return 2 * region_keys(spec) * tcg.row_stride(spec.head_dim) * 2  # {K, V}, fp16/bf16


def one_pass(spec: KernelSpec) -> bool:
    return (not any(spec.causal) and group_chunks(spec) <= MAX_GROUP_CHUNKS
            and region_smem(spec) <= REGION_SMEM_BUDGET)


def launch(spec: KernelSpec) -> dict:
    figures = tcg.tc_launch(spec, REFERENCE_SPATIAL[spec.rank], spec.kernel_size)
    if one_pass(spec):
        # the wasted-work figure is the chunked body's: chunks are 16-aligned from the region start in both
        figures.update(design="one_pass_region", dynamic_smem=region_smem(spec), region_keys=region_keys(spec),
                       group_chunks=group_chunks(spec))
        del figures["kv_tile"]
    else:
        figures["design"] = "chunked_online_softmax"
    return figures


def context(spec: KernelSpec) -> dict:
    values = tcg.tc_context(spec)
    values["one_pass"] = one_pass(spec)
    if values["one_pass"]:
        # resident CTAs are bounded by the region's shared memory: give the registers what smem leaves
        smem_ctas = max(1, SM80_SMEM_PER_SM // (region_smem(spec) + 4 * region_keys(spec) + 1024))
        register_ctas = max([b for b, cap in REGISTER_CAP.items() if estimated_registers(spec) <= 0.95 * cap],
                            default=2)
        values.update(region_keys=region_keys(spec), group_chunks=group_chunks(spec),
                      min_blocks=max(1, min(smem_ctas, register_ctas)))
    return values


def partners(spec: KernelSpec):
    """The backward instances of a forward: those of its rank, causal mask, dtype and head_dim (families.backward)."""
    return backward.backward_of(spec)
