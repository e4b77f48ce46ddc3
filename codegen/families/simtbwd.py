"""SIMT backward: the gradients of every CUDA forward family, fp32 accumulation, deterministic.

One instance holds five entry points (preprocess, dkdv, dkdv_extra, dq, drpb; templates/simt_bwd.cu.j2) that
the runtime launches in the order the manifest's `launch.entries` lists them, all with the `cuda_bwd`
argument list. It adds the relative positional bias and returns its gradient (`"rpb": true`): the dq pass
stores dS per (query row, window slot) in a float32 scratch and the drpb entry sums it per bias entry in a
fixed order. `simtbwda` (codegen/families/simtbwda.py) is the same template with dQ summed by atomics. K, stride and dilation are runtime values (the key-stationary walk's trip counts vary per key anyway);
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
MIN_CTAS_PER_SM = 8  # __launch_bounds__: caps registers at 64 (32 resident warps, COST["saturating_warps"])
# With the positional bias some dkdv walks need a few registers over 64 (ptxas, sm_80 and sm_90): simtbwd's
# rank 3 head_dim 128 (8 bytes spilled), and the atomic-dQ walk of simtbwda (its dQ row address and the slot
# store on top) at rank 2 head_dim 128 and rank 3 head_dim 64 and 32 (its causal masks; 8-72 bytes). Those take
# 6 CTAs (80 registers, 24 warps), and simtbwda's rank 3 head_dim 128 5 (96 registers: a mixed causal mask
# still spilled 4 bytes at 80); every default instance is then spill-free.
WIDE_WALKS = {("simtbwd", 3, 128): 6, ("simtbwda", 2, 128): 6, ("simtbwda", 3, 32): 6, ("simtbwda", 3, 64): 6,
              ("simtbwda", 3, 128): 5}


def min_ctas_per_sm(spec: KernelSpec) -> int:
    return WIDE_WALKS.get((spec.family, spec.rank, spec.head_dim), MIN_CTAS_PER_SM)

# The entry points in launch order. `grid`: natgen.launch's grid kind along blockIdx.x; `heads`: what
# blockIdx.y counts; `needs_extra`: launched only when the problem has extra tokens.
# `batch`: "loop" for an entry that sums over the batch itself (grid z = 1); `needs_rpb`: launched only with a
# bias.
DRPB = {"role": "drpb", "grid": "rpb", "heads": "heads", "batch": "loop", "needs_rpb": True}
ENTRIES = (
    {"role": "preprocess", "grid": "tiles", "heads": "heads"},
    {"role": "dkdv", "grid": "tiles", "heads": "heads_kv"},
    {"role": "dkdv_extra", "grid": "extra", "heads": "heads_kv", "needs_extra": True},
    {"role": "dq", "grid": "tiles", "heads": "heads"},
    DRPB,
)
# how dQ is summed (launch fact `dq`): its own query-stationary pass, so results are bit-identical run to run
DQ = "query_stationary"


def spec_for(rank: int, causal, dtype: str, head_dim: int, family: str = FAMILY) -> KernelSpec:
    return KernelSpec(family, "bwd", rank, ANY, ANY, tuple(causal), dtype, head_dim, TILES[rank], "sm_80")


# the backward families every CUDA forward names, in this order (the selector ranks them; the atomic one is
# opt-in)
PARTNER_FAMILIES = (FAMILY, "simtbwda")


def backward_of(spec: KernelSpec):
    """The backward partners of a CUDA forward spec (the generator keeps those the library holds)."""
    if spec.op != "fwd" or spec.dtype not in DTYPES or spec.head_dim not in HEAD_DIMS:
        return []
    return [spec_for(spec.rank, spec.causal, spec.dtype, spec.head_dim, family) for family in PARTNER_FAMILIES]


def family_candidates(family: str):
    for rank in (1, 2, 3):
        for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
            for causal in itertools.product((False, True), repeat=rank):
                yield spec_for(rank, causal, dtype, head_dim, family), None


def candidates(policy: str):
    return family_candidates(FAMILY)


def prebuild(spec: KernelSpec) -> bool:
    """Mixed per-dim causal masks are rare: in the library (every problem has a backward), compiled on first use."""
    return tuple(spec.causal) in ((False,) * spec.rank, (True,) * spec.rank)


def launch(spec: KernelSpec, entries=ENTRIES, dq: str = DQ) -> dict:
    threads = WARP * spec.queries_per_tile
    return {
        "threads": threads,
        "dynamic_smem": 0,
        "queries_per_cta": spec.queries_per_tile,
        "grid": "tiles",
        "entries": [dict(entry, symbol=f"{spec.name}_{entry['role']}", threads=threads) for entry in entries],
        "dq": dq,
        "rpb": True,  # adds the bias and returns its gradient (the drpb entry)
        "computed_keys_per_useful_key": 1.0,
        "limits": {"max_heads": 65535, "max_batch": 65535},  # CUDA grid y (heads) and z (batch)
        "grouped_kv_heads": True,  # a kv head's dK/dV sum over its query heads, in head order
    }


def context(spec: KernelSpec, atomic_dq: bool = False) -> dict:
    rank = spec.rank
    pad = 3 - rank
    kernel_size, dilation = padded_cuda_terms(spec)
    return {
        "threads": WARP * spec.queries_per_tile,
        "warps": spec.queries_per_tile,
        "min_ctas_per_sm": min_ctas_per_sm(spec),
        "tile": list(spec.tile) + [1] * pad,
        "kernel_size": kernel_size,
        "dilation": dilation,
        "causal": [("true" if c else "false") for c in spec.causal] + ["false"] * pad,
        "head_dim": spec.head_dim,
        "atomic_dq": atomic_dq,
        "elems_per_lane": spec.head_dim // WARP,
        "signature": abi.cuda_signature(ABI, spec.ctype),
        "prologue": abi.cuda_axis_prologue(rank),
        "length_prologue": abi.cuda_axis_prologue(rank, abi.AXIS_LOCALS[:1]),  # entries without a window walk
    }
