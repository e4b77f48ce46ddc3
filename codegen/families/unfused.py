"""The unfused (natten-style) neighborhood ops as CUDA kernels: four small SIMT families on heads-first
tensors, one template (templates/unfused.cu.j2), one ABI (`cuda_unfused`).

- unqk:  logits = query . key per window slot (+ rpb), -inf where a causal window hides a slot, then the
         extra keys (natgen.unfused na*d_qk; also d attn of the av op, from grad_out and value);
- unav:  out = sum over slots of attn * value, then the extra values (na*d_av; also d query of the qk op,
         from d logits and key);
- uninv: the inverse neighborhood, per KEY: sum over the queries whose window holds it of
         attn[query, its slot] * x[query] (d key of qk from d logits and query, d value of av from attn and
         grad_out); the queries reaching a key lie within K - 1 group-local steps of it on every axis;
- unrpb: d rpb, per bias entry: the sum of d logits over batch and queries at that relative offset
         (deterministic: no atomics).

Kernel size, dilation, causal and head_dim are runtime values (a legacy op: one instance per family, rank
and dtype keeps the library small); the spec's causal field is all False and means nothing here. One thread
per output row; nothing but the logits tensor and the inputs is held in memory.
"""
from __future__ import annotations

from types import SimpleNamespace

from .. import abi
from ..spec import ANY, KernelSpec

TEMPLATE = "unfused.cu.j2"
ABI = "cuda_unfused"
DTYPES = ("f32", "f16", "bf16", "f64")
TILES = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
THREADS = 64
OPERATIONS = {
    "unqk": ("qk", "fwd", "logits[b, h, i, slot] = x[b, h, i] . y[b, h, key(i, slot)] (+ rpb), then extras"),
    "unav": ("av", "fwd", "out[b, h, i] = sum over slots of attn[b, h, i, slot] * y[b, h, key(i, slot)], then extras"),
    "uninv": ("inverse", "bwd", "out[b, h, j] = sum over queries i reaching key j of attn[b, h, i, slot(i, j)] * x[b, h, i]"),
    "unrpb": ("rpb_grad", "bwd", "out[h, offset] = sum over b, i of attn[b, h, i, slot at that offset]"),
}
COST = {"base": 6.0, "saturating_warps": 32, "waste": "exact"}


def _acc(dtype):
    return "double" if dtype == "f64" else "float"


def _family(name: str):
    operation, op, doc = OPERATIONS[name]

    def candidates(policy: str):
        for rank in (1, 2, 3):
            for dtype in DTYPES:
                yield KernelSpec(name, op, rank, ANY, ANY, (False,) * rank, dtype, ANY, TILES[rank], "sm_80"), None

    def launch(spec: KernelSpec) -> dict:
        return {
            "threads": THREADS,
            "dynamic_smem": 0,
            "queries_per_cta": THREADS,
            "grid": "tiles",
            "computed_keys_per_useful_key": 1.0,
            "limits": {"max_heads": 65535, "max_batch": 65535},
            "operation": operation,  # an unfused op kernel: the fused-attention selector passes it by
        }

    def context(spec: KernelSpec) -> dict:
        double = spec.dtype == "f64"
        return {
            "operation": operation,
            "operation_doc": doc,
            "threads": THREADS,
            "tile": list(spec.tile) + [1] * (3 - spec.rank),
            "acc_type": _acc(spec.dtype),
            "load_expr": "*p" if double else "ng::to_float(*p)",
            "store_expr": "x" if double else "ng::from_float<T>(x)",
            "signature": abi.cuda_signature(ABI, spec.ctype),
            "prologue": abi.cuda_axis_prologue(spec.rank, abi.UNFUSED_AXIS_LOCALS),
        }

    return SimpleNamespace(FAMILY=name, TEMPLATE=TEMPLATE, TOOLCHAIN="nvcc", SOURCE_SUFFIX=".cu",
                           HEADERS=("natgen_device.cuh",), ABI=ABI, COST=COST, candidates=candidates,
                           launch=launch, context=context, __doc__=doc)


FAMILIES = tuple(_family(name) for name in OPERATIONS)
