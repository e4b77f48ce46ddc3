"""SIMT fused forward: one warp per query, lanes split head_dim, online softmax in fp32.

The first family: it exists so the whole pipeline (spec -> render -> nvcc -> manifest -> runtime) is real
before tensor-core kernels; it also serves every problem the faster families do not cover.
"""
from __future__ import annotations

import itertools

from .. import abi
from . import backward
from ..spec import ANY, KernelSpec, padded_cuda_terms

FAMILY = "simt"
TEMPLATE = "simt_fwd.cu.j2"
TOOLCHAIN = "nvcc"
SOURCE_SUFFIX = ".cu"
HEADERS = ("natgen_device.cuh",)
ABI = "cuda_fwd"
# The selector's inputs (natgen.cost): 6x the tensor-core families' time per useful key (mma throughput
# ratio); latency bound (one dependent shuffle chain per key), so it wants many resident warps.
COST = {"base": 6.0, "saturating_warps": 32, "waste": "exact"}
SPECIALIZATION = 0.85  # compile-time K and D: the neighbor loop unrolls, index math folds

SPECIALIZED_KERNEL_SIZES = (3, 5, 7, 9, 11, 13)
HEAD_DIMS = (32, 64, 128)
DTYPES = ("f32", "f16", "bf16")
WARP = 32
# One warp per query; 4 queries per CTA keeps 128 threads, enough resident warps to hide latency.
TILES = {1: (4,), 2: (2, 2), 3: (1, 2, 2)}
# Telling ptxas we want 8 resident CTAs (32 warps) caps it at 64 registers: without the hint it picks a
# tighter budget for some causal 3-D variants and spills; with it every instance fits and stays occupied.
MIN_CTAS_PER_SM = 8


def candidates(policy: str):
    full = policy == "full"
    for rank in (1, 2, 3):
        tile = TILES[rank]
        for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
            for kernel in list(range(2, 16)):
                for dil in (1, 2, 3, 4):
                    for causal in itertools.product((False, True), repeat=rank):
                        spec = KernelSpec(FAMILY, "fwd", rank, (kernel,) * rank, (dil,) * rank, causal,
                                          dtype, head_dim, tile, "sm_80")
                        reason = None
                        if kernel not in SPECIALIZED_KERNEL_SIZES:
                            reason = "kernel size outside the specialized set 3..13 (odd): served by the K=any instance"
                        elif dil != 1 and not full:
                            reason = "dilation != 1 is served by the D=any instance (policy default)"
                        elif any(causal) and not full:
                            reason = "causal windows vary per query, so a constant K buys little: served by K=any"
                        yield spec, reason
            for causal in itertools.product((False, True), repeat=rank):
                yield KernelSpec(FAMILY, "fwd", rank, ANY, ANY, causal, dtype, head_dim, tile, "sm_80"), None
    for rank in (1, 2, 3):
        yield (KernelSpec(FAMILY, "fwd", rank, ANY, ANY, (False,) * rank, "f16", 256, TILES[rank], "sm_80"),
               "head_dim 256 needs 8 fp32 accumulators per lane: left to the tensor-core families")


def launch(spec: KernelSpec) -> dict:
    return {
        "threads": WARP * spec.queries_per_tile,
        "dynamic_smem": 0,
        "queries_per_cta": spec.queries_per_tile,
        "grid": "tiles",
        # every query computes exactly its own neighbors: no masked pairs are computed
        "computed_keys_per_useful_key": 1.0,
        "limits": {"max_heads": 65535, "max_batch": 65535},  # CUDA grid y (heads) and z (batch)
        "grouped_kv_heads": True,  # key/value rows index the query head's kv head (the heads_kv argument)
        "rpb": True,  # adds the relative positional bias the rpb argument points to (null: none)
    }


def cost(spec: KernelSpec) -> dict:
    return dict(COST, specialization=SPECIALIZATION) if spec.kernel_size != ANY else dict(COST)


def context(spec: KernelSpec) -> dict:
    rank = spec.rank
    pad = 3 - rank
    kernel_size, dilation = padded_cuda_terms(spec)
    causal = [("true" if c else "false") for c in spec.causal] + ["false"] * pad
    # a constant trip count lets nvcc unroll the neighbor loop; causal windows shrink near the start
    count = [kernel_size[d] if (causal[d] == "false" and spec.kernel_size != ANY) else f"window_count{d}"
             for d in range(rank)] + ["1"] * pad
    # only the innermost real neighbor loop is unrolled: unrolling a 13x13x13 window would bloat the code
    unroll = ["" for _ in range(rank - 1)] + ["#pragma unroll"] + [""] * pad
    return {
        "threads": WARP * spec.queries_per_tile,
        "min_ctas_per_sm": MIN_CTAS_PER_SM,
        "tile": list(spec.tile) + [1] * pad,
        "kernel_size": kernel_size,
        "dilation": dilation,
        "causal": causal,
        "count": count,
        "unroll": unroll,
        "head_dim": spec.head_dim,
        "elems_per_lane": spec.head_dim // WARP,
        "signature": abi.cuda_signature(ABI, spec.ctype),
        "prologue": abi.cuda_fwd_prologue(rank, spec.ctype),
    }


def partners(spec: KernelSpec):
    """The backward instances of a forward: those of its rank, causal mask, dtype and head_dim (families.backward)."""
    return backward.backward_of(spec)
