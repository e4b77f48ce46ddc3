"""CPU family: C++ kernels built into shared libraries (one per spec, op "fwd" or "bwd"; codegen/cpu_build.py).

Forward and backward are separate specs so the selector and manifest stay one-spec-one-kernel, and a user
who only runs inference never compiles a backward. The spec dtype is the COMPUTE type: f32 serves
f32/f16/bf16 inputs (the runtime converts half inputs, whose conversion is O(N*D) against the kernel's
O(N*K*D)), f64 serves f64. Dilation is always a runtime value: the kernels tile in dilation-group-local
coordinates, so a constant dilation would buy nothing.
"""
from __future__ import annotations

import itertools
import math

from ..spec import ANY, KernelSpec

FAMILY = "cpu"
TEMPLATE = "cpu_na.cpp.j2"
TOOLCHAIN = "cxx"
SOURCE_SUFFIX = ".cpp"
HEADERS = ("natgen_cpu.h", "natgen_cpu_target.h", "natgen_cpu_args.h", "natgen_cpu_simd.h", "natgen_cpu_plan.h",
           "natgen_cpu_lanes.h", "natgen_cpu_fwd.h", "natgen_cpu_bwd.h", "natgen_cpu_driver.h")

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
FULL_HEAD_DIMS = (32, 64, 128)
# mirrors natgen::Args in templates/natgen_cpu.h (runtime/cpu.py packs it)
ARG_FIELD_COUNT = 7 + 7 + 6 + 5 * 3 + 1


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
                if dtype == "f64" and any(causal) and not full:
                    reason = "f64 is for checking gradients: causal f64 compiles on demand"
                elif causal not in (non_causal, all_causal) and not full:
                    reason = "mixed per-dim causal masks are rare: compiled on demand"
                yield _spec(op, rank, ANY, causal, dtype, ANY), reason
        for kernel, head_dim in itertools.product(FULL_KERNEL_SIZES + (31,), FULL_HEAD_DIMS):
            accepted = (kernel, head_dim) in DEFAULT_SPECIALIZED[rank] or (full and kernel in FULL_KERNEL_SIZES)
            yield (_spec(op, rank, kernel, non_causal, "f32", head_dim),
                   None if accepted else
                   "not a default specialized shape: served by the K=any instance or compiled on demand")


def launch(spec: KernelSpec) -> dict:
    return {
        "threads": 0,  # the runtime passes torch.get_num_threads()
        "queries_per_task": spec.queries_per_tile,
        # every query computes exactly its own keys (last-axis vector padding aside)
        "computed_keys_per_useful_key": 1.0,
    }


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
        "arg_field_count": ARG_FIELD_COUNT,
        "description": f"rank-{spec.rank} {what}, {window}, {spec.dtype} compute, "
                       f"{math.prod(spec.tile)} queries per task",
    }
