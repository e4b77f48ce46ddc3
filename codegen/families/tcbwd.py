"""Tensor-core backward: the gradients of the fp16 / bf16 CUDA forwards on mma.sync m16n8k16 (fp32 accumulation),
deterministic. The scheme and its entry points are the SIMT backward's (codegen/families/simtbwd.py): the same
preprocess kernel (templates/bwd_preprocess.cuh.j2), the same inverse window, the same `cuda_bwd` argument
list and launch order, launched by natgen.launch's BackwardCall. Only the dkdv and dq bodies differ
(templates/tc_bwd.cu.j2):

- dkdv: a CTA owns 64 keys of one dilation group (16 per warp, the mma rows) and walks, in shared-memory stages,
  the box of queries whose windows can reach them; it recomputes P^T and dP^T on the tensor cores from K, V (in
  shared memory, loaded once) and each stage's Q, dO, LSE and delta, and accumulates dK and dV in registers.
- dkdv_extra: the same body for 64 extra tokens over every query.
- dq: a CTA owns 64 queries of one dilation group, walks the union of their windows and the extra tokens as
  the generic forward does, and accumulates dQ = dS K.

K, stride and dilation are runtime values in the generic instances (one per rank, causal mask, dtype and
head_dim, as the SIMT backward). The specialized ones (the NAT / DiNAT regime: odd K 3-7, no dilation, no
causal mask) render the same template with K and D as compile-time constants (codegen.spec's
padded_cuda_terms), which removes index math from the window and inverse-window searches; the selector
prefers them where they fit (the `specialization` factor). fp32 inputs stay with the SIMT backward, which
meets fp32 accuracy.
"""
from __future__ import annotations

import itertools
import math

from .. import abi
from ..spec import ANY, KernelSpec, padded_cuda_terms
from . import simtbwd, tcg

FAMILY = "tcbwd"
TEMPLATE = "tc_bwd.cu.j2"
TOOLCHAIN = "nvcc"
SOURCE_SUFFIX = ".cu"
HEADERS = tcg.HEADERS
ABI = simtbwd.ABI
# Per useful (query, key) pair a backward does about 2.5x its forward's work (two passes, five products
# instead of two: simtbwd's figure against simt's), here on the tensor cores at the generic forward's rate and
# with its wasted-work model (whole 16 x 16 chunks); the tensor cores saturate with few warps, as there.
BACKWARD_WORK = 2.5
COST = {"base": BACKWARD_WORK * tcg.COST["base"], "saturating_warps": tcg.COST["saturating_warps"],
        "waste": tcg.COST["waste"]}

DTYPES = tcg.DTYPES
HEAD_DIMS = tcg.HEAD_DIMS
WARP = 32
TILES = tcg.TILES  # 64 tokens per CTA, 16 mma rows per warp: the generic forward's tiles
# dkdv: queries per shared-memory stage. The CTA's 64 keys and values stay in shared memory for the whole
# walk, beside one stage of Q and dO; fewer queries per stage at head_dim 128 keep the total under the 48 KiB
# a launch gets without opting in to more.
QUERY_STAGE = {32: 64, 64: 32, 128: 16}
# The entry points in launch order (simtbwd's roles); `grid` and `heads` as there.
ENTRIES = (
    {"role": "preprocess", "grid": "tiles", "heads": "heads"},
    {"role": "dkdv", "grid": "group_tiles", "heads": "heads_kv"},
    {"role": "dkdv_extra", "grid": "extra_tiles", "heads": "heads_kv", "needs_extra": True},
    {"role": "dq", "grid": "group_tiles", "heads": "heads"},
)
# (the SIMT backward's bias-only drpb entry aside: no positional-bias backward here, launch fact rpb false)
assert [e["role"] for e in ENTRIES] == [e["role"] for e in simtbwd.ENTRIES if not e.get("needs_rpb")]
# __launch_bounds__ minimum CTAs per SM of dkdv and dq: the generic forward's (4: 128 registers, 3: 168, 2: 255);
# head_dim 128 holds 128 fp32 dK and dV accumulators per thread
MIN_BLOCKS = tcg.MIN_BLOCKS
# the preprocess entry is bandwidth-bound and holds no state: the SIMT backward's residency
PREPROCESS_MIN_CTAS = simtbwd.MIN_CTAS_PER_SM


# the specialized instances: compile-time K (per dim, all dims equal) and dilation 1, non-causal
SPECIALIZED_KERNEL_SIZES = (3, 5, 7)
SPECIALIZATION = 0.85  # the specialized tensor-core forward's factor (tcs.COST)


def spec_for(rank: int, causal, dtype: str, head_dim: int, kernel=None) -> KernelSpec:
    kernel_size, dilation = (ANY, ANY) if kernel is None else ((kernel,) * rank, (1,) * rank)
    return KernelSpec(FAMILY, "bwd", rank, kernel_size, dilation, tuple(causal), dtype, head_dim, TILES[rank],
                      "sm_80")


def backward_of(spec: KernelSpec):
    """The backward partners of a CUDA forward spec: the generic instance of its rank, causal mask, dtype and
    head_dim and the specialized ones of the same (the selector keeps those whose K fits the problem; the
    generator names only those the library holds)."""
    if spec.op != "fwd" or spec.dtype not in DTYPES or spec.head_dim not in HEAD_DIMS:
        return []
    generic = spec_for(spec.rank, spec.causal, spec.dtype, spec.head_dim)
    return [generic] + [spec_for(spec.rank, spec.causal, spec.dtype, spec.head_dim, kernel)
                        for kernel in SPECIALIZED_KERNEL_SIZES]


def candidates(policy: str):
    for rank in (1, 2, 3):
        for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
            for causal in itertools.product((False, True), repeat=rank):
                yield spec_for(rank, causal, dtype, head_dim), None
            for kernel in SPECIALIZED_KERNEL_SIZES:
                yield spec_for(rank, (False,) * rank, dtype, head_dim, kernel), None
        yield (KernelSpec(FAMILY, "bwd", rank, ANY, ANY, (False,) * rank, "f32", 64, TILES[rank], "sm_80"),
               "fp32 inputs are served by the simtbwd family at fp32 accuracy")


prebuild = simtbwd.prebuild  # the same rule: mixed per-dim causal masks compile on first use


def cost(spec: KernelSpec) -> dict:
    return dict(COST, specialization=SPECIALIZATION) if spec.kernel_size != ANY else dict(COST)


def key_stage(head_dim: int) -> int:
    """dq: keys per shared-memory stage (the generic forward's stage)."""
    return tcg.kv_tile(head_dim)


def dkdv_smem(head_dim: int) -> int:
    rows = math.prod(TILES[1])
    return (2 * rows + 2 * QUERY_STAGE[head_dim]) * tcg.row_stride(head_dim) * 2  # {K, V} + {Q, dO}, 2 bytes


def dq_smem(head_dim: int) -> int:
    return 2 * key_stage(head_dim) * tcg.row_stride(head_dim) * 2  # {K, V}, 2 bytes


def launch(spec: KernelSpec) -> dict:
    tcg.check_supported(spec)
    threads = WARP * math.prod(spec.tile) // tcg.QUERY_ROWS_PER_WARP
    smem = {"preprocess": 0, "dkdv": dkdv_smem(spec.head_dim), "dkdv_extra": dkdv_smem(spec.head_dim),
            "dq": dq_smem(spec.head_dim)}
    spatial, kernel_size = tcg.REFERENCE[spec.rank]
    figures = tcg.tc_launch(spec, spatial, kernel_size if spec.kernel_size == ANY else spec.kernel_size)
    figures["rpb"] = False  # no positional-bias backward here: bias problems take simtbwd
    del figures["kv_tile"]
    figures.update(
        dynamic_smem=max(smem.values()),
        query_stage=QUERY_STAGE[spec.head_dim],
        key_stage=key_stage(spec.head_dim),
        entries=[dict(entry, symbol=f"{spec.name}_{entry['role']}", threads=threads,
                      dynamic_smem=smem[entry["role"]]) for entry in ENTRIES],
        dq="query_stationary",  # dQ in its own pass, no atomics: bit-identical results on every run
    )
    return figures


def context(spec: KernelSpec) -> dict:
    values = tcg.tc_context(spec)
    del values["prologue"]
    values.update(
        rows=math.prod(spec.tile),
        query_stage=QUERY_STAGE[spec.head_dim],
        key_stage=key_stage(spec.head_dim),
        min_blocks=MIN_BLOCKS[spec.head_dim],
        min_ctas_per_sm=PREPROCESS_MIN_CTAS,
        signature=abi.cuda_signature(ABI, spec.ctype),
        prologue=abi.cuda_axis_prologue(spec.rank),
        length_prologue=abi.cuda_axis_prologue(spec.rank, abi.AXIS_LOCALS[:1]),
    )
    return values
