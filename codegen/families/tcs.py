"""Tensor-core specialized forward: kernel size and dilation are compile-time constants (the NAT/DiNAT
regime, K up to 13 per dim).

It runs the tensor-core body shared with the generic family (templates/tc_fwd_body.cuh.j2): a CTA owns 64
queries of one dilation group, stages the union of their windows through shared memory with cp.async and
computes QK^T and PV with mma.sync m16n8k16. With K and D constant the window arithmetic folds away and
the box is small: for K <= 7 in 2-D (16x4 tile, box <= 22x10 keys) a warp's keys fit in a few 64-key
stages, so the online softmax rescales only a handful of times.

Default policy: odd K 3..13, D = 1, non-causal; dilated or causal problems go to the generic family (tcg),
whose runtime D/causal mask costs little next to the memory traffic. fp16/bf16 only (f32 -> simt).
"""
from __future__ import annotations

import itertools

from ..spec import KernelSpec
from . import tcg

FAMILY = "tcs"
TEMPLATE = "tcs_fwd.cu.j2"
TOOLCHAIN = "nvcc"
SOURCE_SUFFIX = ".cu"

KERNEL_SIZES = (3, 5, 7, 9, 11, 13)
TILES = tcg.TILES
# Reference problems for the wasted-work figure: the typical NAT / DiNAT shapes.
REFERENCE_SPATIAL = {1: (1024,), 2: (56, 56), 3: (16, 16, 16)}


def candidates(policy: str):
    full = policy == "full"
    for rank in (1, 2, 3):
        for dtype, head_dim in itertools.product(tcg.DTYPES, tcg.HEAD_DIMS):
            for kernel in KERNEL_SIZES:
                for dil in (1, 2, 3, 4):
                    for causal in itertools.product((False, True), repeat=rank):
                        spec = KernelSpec(FAMILY, "fwd", rank, (kernel,) * rank, (dil,) * rank, causal, dtype,
                                          head_dim, TILES[rank], "sm80")
                        reason = None
                        if dil != 1 and not full:
                            reason = "dilation != 1 is served by the generic tensor-core family (policy default)"
                        elif any(causal) and not full:
                            reason = "causal windows vary per query: served by the generic tensor-core family"
                        yield spec, reason


def launch(spec: KernelSpec) -> dict:
    return tcg.tc_launch(spec, REFERENCE_SPATIAL[spec.rank], spec.kernel_size)


def context(spec: KernelSpec) -> dict:
    return tcg.tc_context(spec)
