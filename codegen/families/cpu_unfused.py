"""The unfused (natten-style) neighborhood ops as CPU kernels: four small C++ families on heads-first tensors,
mirroring the CUDA unfused families (codegen/families/unfused.py), one template
(templates/cpu_unfused.cpp.j2), one header (templates/natgen_cpu_unfused.h), one ABI (`cpu_unfused`).

- cpuqk:  logits = query . key per window slot (+ rpb), -inf (or 0: zero_masked) where a causal window hides
          a slot, then the extra keys (na*d_qk; also d attn of the av op, from grad_out and value);
- cpuav:  out = sum over slots of attn * value, then the extra values (na*d_av; also d query of the qk op);
- cpuinv: the inverse neighborhood, a gather per KEY over the queries whose window holds it (d key of qk,
          d value of av): every output row has one owner, so the sums are deterministic;
- cpurpb: d rpb, partial sums per (head, fixed chunk of rows) reduced in chunk order (deterministic for any
          thread count).

The spec dtype is the ELEMENT type (halves convert on load and store, accumulation is float, double for
double): no converted copy of the logits is ever made, so an op's memory is the tensors it returns. Kernel
size, dilation, causal and head_dim are runtime values: one instance per family, rank and dtype; the spec's
causal field is all False and means nothing here. OpenMP splits the (batch, head, row) rows (d rpb: the
(head, chunk) tasks) into one contiguous range per thread; channels are the vectorized loops.
"""
from __future__ import annotations

from types import SimpleNamespace

from .. import abi
from ..spec import ANY, KernelSpec

TEMPLATE = "cpu_unfused.cpp.j2"
ABI = "cpu_unfused"
HEADERS = ("natgen_cpu_unfused.h", "natgen_cpu_half.h")
DTYPES = ("f32", "f16", "bf16", "f64")
# C++ element and accumulator types (torch's float16 is IEEE binary16: _Float16; bfloat16 is a bit pattern)
ELEMENT_TYPES = {"f32": "float", "f16": "_Float16", "bf16": "natgen_unfused::bf16", "f64": "double"}
OPERATIONS = {
    "cpuqk": ("qk", "fwd", "logits[b, h, i, slot] = x[b, h, i] . y[b, h, key(i, slot)] (+ rpb), then extras"),
    "cpuav": ("av", "fwd", "out[b, h, i] = sum over slots of attn[b, h, i, slot] * y[b, h, key(i, slot)], then extras"),
    "cpuinv": ("inverse", "bwd", "out[b, h, j] = sum over queries i reaching key j of attn[b, h, i, slot(i, j)] * x[b, h, i]"),
    "cpurpb": ("rpb_grad", "bwd", "out[h, offset] = sum over b, i of attn[b, h, i, slot at that offset]"),
}
COST = {"base": 1.0, "saturating_warps": 1, "waste": "exact"}


def _family(name: str):
    operation, op, doc = OPERATIONS[name]

    def candidates(policy: str):
        for rank in (1, 2, 3):
            for dtype in DTYPES:
                yield KernelSpec(name, op, rank, ANY, ANY, (False,) * rank, dtype, ANY, (1,) * rank, "cpu"), None

    def prebuild(spec: KernelSpec) -> bool:
        """`natgen build` compiles the float32 ones (the common case); the rest compile on first use."""
        return spec.dtype == "f32"

    def launch(spec: KernelSpec) -> dict:
        return {
            "threads": 0,  # the runtime passes torch.get_num_threads()
            "queries_per_task": 1,
            "computed_keys_per_useful_key": 1.0,
            "operation": operation,  # an unfused op kernel: the fused-attention selector passes it by
        }

    def context(spec: KernelSpec) -> dict:
        return {
            "operation": operation,
            "operation_doc": doc,
            "elem_type": ELEMENT_TYPES[spec.dtype],
            "acc_type": "double" if spec.dtype == "f64" else "float",
            "args_struct": abi.cpp_struct(ABI),
            "description": f"rank-{spec.rank} unfused {operation} ({op}), any kernel size, dilation, causal mask "
                           f"and head_dim, {spec.dtype} elements",
        }

    return SimpleNamespace(FAMILY=name, TEMPLATE=TEMPLATE, TOOLCHAIN="cxx", SOURCE_SUFFIX=".cpp", HEADERS=HEADERS,
                           ABI=ABI, COST=COST, candidates=candidates, prebuild=prebuild, launch=launch,
                           context=context, __doc__=doc)


FAMILIES = tuple(_family(name) for name in OPERATIONS)
