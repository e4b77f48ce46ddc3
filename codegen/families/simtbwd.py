"""SIMT backward: the gradients of every CUDA forward family, fp32 accumulation, deterministic.

One instance holds four entry points (preprocess, dkdv, dkdv_extra, dq; templates/simt_bwd.cu.j2) that the
runtime launches in the order the manifest's `launch.entries` lists them, all with the `cuda_bwd` argument
list. K, stride and dilation are runtime values (the key-stationary walk's trip counts vary per key anyway);
the causal mask, dtype and head_dim are compile-time, as in the forward, so each CUDA forward names the
instance of its (rank, causal, dtype, head_dim) as its backward partner.
"""
from __future__ import annotations

import itertools

from .. import abi
from ..spec import ANY, KernelSpec, padded_cuda_terms

FAMILY = "simtbwd"
TEMPLATE = "simt_bwd.cu.j2"
TOOLCHAIN = "nvcc"
SOURCE_SUFFIX = ".cu"
HEADERS = ("natgen_device.cuh",)
ABI = "cuda_bwd"
# Per useful (query, key) pair the backward does about 2.5x the forward's work (two passes, four dot
# products); there is one backward family so far, so the figure only matters against future ones.
COST = {"base": 15.0, "saturating_warps": 32, "waste": "exact"}

HEAD_DIMS = (32, 64, 128)
DTYPES = ("f32", "f16", "bf16")
WARP = 32
# One warp per key (dkdv) or query (preprocess, dq); 4 per CTA as in the SIMT forward.
TILES = {1: (4,), 2: (2, 2), 3: (1, 2, 2)}
MIN_CTAS_PER_SM = 8
# The entry points in launch order. `grid`: natgen.launch's grid kind along blockIdx.x; `heads`: what
# blockIdx.y counts; `needs_extra`: launched only when the problem has extra tokens.
ENTRIES = (
    {"role": "preprocess", "grid": "tiles", "heads": "heads"},
    {"role": "dkdv", "grid": "tiles", "heads": "heads_kv"},
    {"role": "dkdv_extra", "grid": "extra", "heads": "heads_kv", "needs_extra": True},
    {"role": "dq", "grid": "tiles", "heads": "heads"},
)


def spec_for(rank: int, causal, dtype: str, head_dim: int) -> KernelSpec:
    return KernelSpec(FAMILY, "bwd", rank, ANY, ANY, tuple(causal), dtype, head_dim, TILES[rank], "sm_80")


def backward_of(spec: KernelSpec):
    """The backward partner of a CUDA forward spec (the generator keeps it only if the library holds it)."""
    if spec.op != "fwd" or spec.dtype not in DTYPES or spec.head_dim not in HEAD_DIMS:
        return []
    return [spec_for(spec.rank, spec.causal, spec.dtype, spec.head_dim)]


def candidates(policy: str):
    for rank in (1, 2, 3):
        for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
            for causal in itertools.product((False, True), repeat=rank):
                yield spec_for(rank, causal, dtype, head_dim), None


def prebuild(spec: KernelSpec) -> bool:
    """Mixed per-dim causal masks are rare: in the library (every problem has a backward), compiled on first use."""
    return tuple(spec.causal) in ((False,) * spec.rank, (True,) * spec.rank)


def launch(spec: KernelSpec) -> dict:
    threads = WARP * spec.queries_per_tile
    return {
        "threads": threads,
        "dynamic_smem": 0,
        "queries_per_cta": spec.queries_per_tile,
        "grid": "tiles",
        "entries": [dict(entry, symbol=f"{spec.name}_{entry['role']}", threads=threads) for entry in ENTRIES],
        # dQ in its own query-stationary pass (no atomics): bit-identical results on every run
        "dq": "query_stationary",
        "computed_keys_per_useful_key": 1.0,
        "limits": {"max_heads": 65535, "max_batch": 65535},  # CUDA grid y (heads) and z (batch)
        "grouped_kv_heads": True,  # a kv head's dK/dV sum over its query heads, in head order
    }


def context(spec: KernelSpec) -> dict:
    rank = spec.rank
    pad = 3 - rank
    kernel_size, dilation = padded_cuda_terms(spec)
    return {
        "threads": WARP * spec.queries_per_tile,
        "warps": spec.queries_per_tile,
        "min_ctas_per_sm": MIN_CTAS_PER_SM,
        "tile": list(spec.tile) + [1] * pad,
        "kernel_size": kernel_size,
        "dilation": dilation,
        "causal": [("true" if c else "false") for c in spec.causal] + ["false"] * pad,
        "head_dim": spec.head_dim,
        "elems_per_lane": spec.head_dim // WARP,
        "signature": abi.cuda_signature(ABI, spec.ctype),
        "prologue": abi.cuda_axis_prologue(rank),
        "length_prologue": abi.cuda_axis_prologue(rank, abi.AXIS_LOCALS[:1]),  # entries without a window walk
    }
