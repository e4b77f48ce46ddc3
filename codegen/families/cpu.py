"""CPU family: C++ kernels built into shared libraries (one per spec, op "fwd" or "bwd"; natgen.cxx compiles them).

Forward and backward are separate specs so the selector and manifest stay one-spec-one-kernel, and a user
who only runs inference never compiles a backward. The spec dtype is the COMPUTE type: f32 serves
f32/f16/bf16 inputs (it reads the 16-bit ones itself, INPUT_TYPES), f64 serves f64. Dilation is always a runtime value: the kernels tile in dilation-group-local
coordinates, so a constant dilation would buy nothing.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

from .. import abi
from ..spec import ANY, KernelSpec

FAMILY = "cpu"
TEMPLATE = "cpu_na.cpp.j2"
TOOLCHAIN = "cxx"
SOURCE_SUFFIX = ".cpp"
HEADERS = ("natgen_cpu.h", "natgen_cpu_target.h", "natgen_cpu_config.h", "natgen_cpu_half.h", "natgen_cpu_variant.h", "natgen_cpu_simd.h", "natgen_cpu_plan.h", "natgen_cpu_lanes.h",
           "natgen_cpu_rpb.h", "natgen_cpu_fwd.h", "natgen_cpu_bwd.h", "natgen_cpu_driver.h")
ABI = "cpu"
# the selector's inputs (natgen.cost): one CPU family, so only the specialization factor ranks instances
COST = {"base": 1.0, "saturating_warps": 1, "waste": "exact"}
SPECIALIZATION = 0.85

OPS = ("fwd", "bwd")
# Query tile (group-local coordinates) per rank: 64 queries whose key union, at K=7, is ~3x the tile, so a
# gathered key is reused by ~16 queries. The last axis is a multiple of 8 in every rank: the kernels put 8
# neighbouring queries along it side by side in one vector (fewer would leave lanes empty).
TILES = {1: (64,), 2: (8, 8), 3: (2, 4, 8)}
# Specialized (constant K and head_dim, non-causal) instances in the default policy: the shapes the CPU
# benchmarks and common models use. Everything else runs on the K=any instances or compiles on demand.
DEFAULT_SPECIALIZED = {
    1: [(7, 32), (7, 64), (31, 64)],
    2: [(3, 32), (5, 32), (7, 32), (7, 64)],
    3: [(3, 32), (7, 32)],
}
FULL_KERNEL_SIZES = (3, 5, 7, 9, 11, 13)
# Input element types the f32-compute instances read themselves (forward: q, k, v, extra tokens in, out back;
# backward: q, k, v, extra tokens, out and dO in, its gradients stay float32), by the code the runtime passes in
# the ABI's input_dtype field (0: the compute type). The kernels widen while they gather (exact for both) and
# round the forward's output to nearest even, so a call gets the bits of converting first, without the
# conversion passes. Rendered into each source and the manifest.
INPUT_TYPES = {"bf16": 1, "f16": 2}
FULL_HEAD_DIMS = (32, 64, 128)


def _spec(op, rank, kernel, causal, dtype, head_dim):
    kernel_size = ANY if kernel == ANY else (kernel,) * rank
    return KernelSpec(FAMILY, op, rank, kernel_size, ANY, causal, dtype, head_dim, TILES[rank], "cpu")


def candidates(policy: str):
    full = policy == "full"
    for op, rank in itertools.product(OPS, (1, 2, 3)):
        non_causal, all_causal = (False,) * rank, (True,) * rank
        for causal in itertools.product((False, True), repeat=rank):
            for dtype in ("f32", "f64"):
                reason = None
                # every mask and dtype has a K=any instance, so every valid problem has a CPU kernel;
                # modules compile on first use, so instances nobody calls cost nothing
                yield _spec(op, rank, ANY, causal, dtype, ANY), None
        for kernel, head_dim in itertools.product(FULL_KERNEL_SIZES + (31,), FULL_HEAD_DIMS):
            accepted = (kernel, head_dim) in DEFAULT_SPECIALIZED[rank] or (full and kernel in FULL_KERNEL_SIZES)
            yield (_spec(op, rank, kernel, non_causal, "f32", head_dim),
                   None if accepted else
                   "not a default specialized shape: served by the K=any instance (`natgen build --spec` adds it)")


def launch(spec: KernelSpec) -> dict:
    return {
        "threads": 0,  # the runtime passes torch.get_num_threads()
        "queries_per_task": spec.queries_per_tile,
        # every query computes exactly its own keys (last-axis vector padding aside)
        "computed_keys_per_useful_key": 1.0,
        # key/value rows index the query head's kv head; the backward sums a kv head's grads over its query heads
        "grouped_kv_heads": True,
        # a relative positional bias: added on the forward's per-query path and the backward's lane-group path
        # (the fixed-layout paths do not take one), its grads summed per work unit, reduced in unit order
        "rpb": True,
        # input_dtype codes this instance reads directly (f32 compute); other dtypes are converted first
        "inputs": dict(INPUT_TYPES) if spec.dtype == "f32" else {},
    }


def prebuild(spec: KernelSpec) -> bool:
    """Whether `natgen build` compiles the instance by default. Mixed per-dim causal masks and causal f64 (for
    checking gradients) are rare: in the library, so every problem has a kernel, but compiled on first use."""
    rank = spec.rank
    mixed = tuple(spec.causal) not in ((False,) * rank, (True,) * rank)
    return not (mixed or (spec.dtype == "f64" and any(spec.causal)))


def cost(spec: KernelSpec) -> dict:
    return dict(COST, specialization=SPECIALIZATION) if spec.kernel_size != ANY else dict(COST)


def partners(spec: KernelSpec):
    """A forward's backward: the same spec with op bwd (the manifest records it by name)."""
    return [dataclasses.replace(spec, op="bwd")] if spec.op == "fwd" else []


def context(spec: KernelSpec) -> dict:
    pad = 3 - spec.rank
    kernel = [1] * pad + ([0] * spec.rank if spec.kernel_size == ANY else list(spec.kernel_size))
    causal = ["false"] * pad + ["true" if c else "false" for c in spec.causal]
    tile = [1] * pad + list(spec.tile)
    what = "forward (out, lse)" if spec.op == "fwd" else "backward (dq, dk, dv, extra-token grads)"
    window = "any kernel size" if spec.kernel_size == ANY else f"kernel {'x'.join(map(str, spec.kernel_size))}"
    return {
        "kernel_size": kernel,
        "head_dim": 0 if spec.head_dim == ANY else spec.head_dim,
        "causal": causal,
        "tile": tile,
        "op_function": "forward" if spec.op == "fwd" else "backward",
        "spec_json": spec.json_text(),
        "args_struct": abi.cpp_struct(ABI),
        "input_types": "".join(f"constexpr int64_t kInput{name.capitalize()} = {code};\n"
                               for name, code in INPUT_TYPES.items()),
        "description": f"rank-{spec.rank} {what}, {window}, {spec.dtype} compute, "
                       f"{math.prod(spec.tile)} queries per task",
    }
