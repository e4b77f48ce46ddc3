"""The kernel argument lists, declared once.

Each ABI is an ordered list of fields. From it come the CUDA kernel signatures (`cuda_signature`), the C++
argument struct of the CPU instances (`cpp_struct`) and the packing layout recorded in the manifest
(`layout`), which is all the runtime reads: it packs by field name and type, never from a list of its own.

Per-axis fields (`axes=True`) expand to name0, name1, name2. Short ranks are padded at the FRONT: a rank-r
problem fills the last r axes and the leading 3 - r axes hold the field's fill value (length 1, window 1,
...). This matches row-major flattening (a 1-D problem of length L is a 1 x 1 x L grid). Templates that
number their axes from the first real one map them with `real_axis_field`.

Adding an argument (like the positional-bias tensor `rpb`, or a key/value head count) is one line here, one name in the
runtime's value vocabulary (natgen.packing.VALUES) and its use in the templates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

AXES = 3
PADDING = "front"


@dataclass(frozen=True)
class Field:
    name: str
    type: str            # ptr | i32 | f32 | i64 | f64
    axes: bool = False   # one field per axis (name0..name2), front-padded with `fill`
    fill: int = 1
    element: str = ""    # pointers: "elem" (the instance's element type), "f32", "compute"
    const: bool = True   # pointers: read-only input
    doc: str = ""

    def names(self) -> List[str]:
        return [f"{self.name}{axis}" for axis in range(AXES)] if self.axes else [self.name]


def _ptr(name, element="elem", const=True, doc=""):
    return Field(name, "ptr", element=element, const=const, doc=doc)


ABIS: Dict[str, Tuple[Field, ...]] = {
    # CUDA forward: [batch, *spatial, heads, head_dim] row-major inputs; out like q with head_dim_v channels.
    "cuda_fwd": (
        _ptr("q"), _ptr("k"), _ptr("v"),
        _ptr("out", const=False), _ptr("lse", element="f32", const=False, doc="natural-log LSE, float32"),
        _ptr("extra_k"), _ptr("extra_v"),
        _ptr("rpb", doc="relative positional bias [heads, 2K-1 per axis] (the input type), or null: no bias"),
        Field("n_extra", "i32"), Field("heads", "i32"),
        Field("heads_kv", "i32", doc="key/value heads (divide heads): query head h reads h / (heads / heads_kv)"),
        Field("length", "i32", axes=True), Field("kernel", "i32", axes=True),
        Field("stride", "i32", axes=True), Field("dilation", "i32", axes=True),
        Field("scale_log2", "f32", doc="softmax scale times log2(e): the kernels work in base 2"),
        Field("write_lse", "i32"),
    ),
    # The unfused (natten-style) ops, heads-first [batch, heads, *spatial, channels]: one list for the four
    # kernel kinds (templates/unfused.cu.j2). x: query-like rows, y: key/value-like rows, attn: logits or
    # weights [..., prod(K) + n_extra], extra: [batch, heads, n_extra, channels]; a kind reads what it needs.
    # Stride is 1; causal is a runtime flag per axis.
    "cuda_unfused": (
        _ptr("x"), _ptr("y"), _ptr("attn"), _ptr("extra"),
        _ptr("rpb", doc="relative positional bias [heads, 2K-1 per axis], or null (the qk kind)"),
        _ptr("out", const=False),
        Field("n_extra", "i32"), Field("heads", "i32"), Field("head_dim", "i32", doc="channels of x / y / out"),
        Field("length", "i32", axes=True), Field("kernel", "i32", axes=True), Field("dilation", "i32", axes=True),
        Field("causal", "i32", axes=True, fill=0),
    ),
    # The unfused ops on the CPU (templates/cpu_unfused.cpp.j2): the pointers of "cuda_unfused" (elements of
    # the instance's type) in one block of 8-byte fields passed by address. zero_masked: the qk kind writes 0,
    # not -inf, in the slots a causal window hides (d attn of the av op).
    "cpu_unfused": (
        _ptr("x"), _ptr("y"), _ptr("attn"), _ptr("extra"),
        _ptr("rpb", doc="relative positional bias [heads, 2K-1 per axis], or null (the qk kind)"),
        _ptr("out", const=False),
        Field("batch", "i64"), Field("heads", "i64"), Field("head_dim", "i64", doc="channels of x / y / out"),
        Field("n_extra", "i64"), Field("threads", "i64"), Field("zero_masked", "i64"),
        Field("length", "i64", axes=True), Field("kernel", "i64", axes=True), Field("dilation", "i64", axes=True),
        Field("causal", "i64", axes=True, fill=0),
    ),
    # CUDA backward: every entry point of a backward instance (preprocess, dk/dv, extra-token dk/dv, dq) takes
    # this one list, so one packed argument template serves them all. `delta` (rowsum(dO * O) - dLSE, float32,
    # one per query row) is written by the preprocess entry and read by the others.
    "cuda_bwd": (
        _ptr("q"), _ptr("k"), _ptr("v"), _ptr("out"),
        _ptr("lse", element="f32", doc="the forward's natural-log LSE, float32"),
        _ptr("grad_out"), _ptr("grad_lse", element="f32", doc="the LSE cotangent (zeros when there is none)"),
        _ptr("delta", element="f32", const=False, doc="rowsum(grad_out * out) - grad_lse, float32 scratch"),
        _ptr("extra_k"), _ptr("extra_v"),
        _ptr("grad_q", const=False), _ptr("grad_k", const=False), _ptr("grad_v", const=False),
        _ptr("grad_extra_k", const=False), _ptr("grad_extra_v", const=False),
        _ptr("rpb", doc="relative positional bias [heads, 2K-1 per axis] (the input type), or null: no bias"),
        _ptr("grad_rpb", const=False, doc="[heads, 2K-1 per axis], summed over batch and queries (null: no bias)"),
        _ptr("grad_logits", element="f32", const=False,
             doc="dS per (query row, window slot) [batch, *spatial, heads, prod(K)], float32 scratch the rpb "
                 "reduction reads (null: no bias)"),
        _ptr("dq_accum", element="f32", const=False,
             doc="dQ summed by fp32 atomics (zeroed; instances with launch dq = atomic only, else null)"),
        Field("batch", "i32", doc="read only by the entries that loop over the batch (grid z = 1)"),
        Field("n_extra", "i32"), Field("heads", "i32"), Field("heads_kv", "i32"),
        Field("length", "i32", axes=True), Field("kernel", "i32", axes=True),
        Field("stride", "i32", axes=True), Field("dilation", "i32", axes=True),
        Field("scale", "f32"), Field("scale_log2", "f32"),
    ),
    # CPU forward and backward share one block of 8-byte fields (addresses as int64), passed by address.
    "cpu": (
        _ptr("q", "compute"), _ptr("k", "compute"), _ptr("v", "compute"),
        _ptr("out", "compute", False), _ptr("lse", "compute", False), _ptr("extra_k", "compute"),
        _ptr("extra_v", "compute"),
        _ptr("rpb", "compute", doc="relative positional bias [heads, 2*K_0-1, ...] or null"),
        _ptr("grad_out", "compute"), _ptr("grad_lse", "compute"), _ptr("grad_q", "compute", False),
        _ptr("grad_k", "compute", False), _ptr("grad_v", "compute", False),
        _ptr("grad_extra_k", "compute", False), _ptr("grad_extra_v", "compute", False),
        _ptr("grad_rpb", "compute", False, doc="[heads, 2*K_0-1, ...], summed over batch and queries"),
        Field("batch", "i64"), Field("heads", "i64"), Field("heads_kv", "i64"), Field("head_dim", "i64"),
        Field("head_dim_v", "i64"),
        Field("n_extra", "i64"), Field("threads", "i64"),
        Field("length", "i64", axes=True), Field("kernel", "i64", axes=True), Field("stride", "i64", axes=True),
        Field("dilation", "i64", axes=True), Field("causal", "i64", axes=True, fill=0),
        Field("scale", "f64"),
        Field("input_dtype", "i64", doc="element type of q, k, v, extra_k, extra_v, out and grad_out: 0 the "
                                        "compute type, else a code of the instance's launch fact `inputs` "
                                        "(the gradients and lse stay in the compute type)"),
    ),
}


def layout(abi: str) -> List[dict]:
    """The manifest's record of an ABI: [{name, type, fill?}] in argument order, per-axis fields expanded."""
    fields = []
    for field in ABIS[abi]:
        for name in field.names():
            record = {"name": name, "type": field.type}
            if field.axes:
                record["fill"] = field.fill
            fields.append(record)
    return fields


def layouts() -> Dict[str, dict]:
    return {name: {"padding": PADDING, "fields": layout(name)} for name in ABIS}


_CUDA_SCALARS = {"i32": "int", "f32": "float", "i64": "long long", "f64": "double"}


def cuda_signature(abi: str, ctype: str, indent: str = "    ") -> str:
    """The parameter list of a CUDA kernel, one field group per line."""
    lines = []
    for field in ABIS[abi]:
        if field.type == "ptr":
            element = ctype if field.element == "elem" else "float"
            lines.append(f"{'const ' if field.const else ''}{element}* __restrict__ {field.name}")
        else:
            lines.append(", ".join(f"{_CUDA_SCALARS[field.type]} {name}" for name in field.names()))
    return (",\n" + indent).join(lines)


def real_axis_field(name: str, rank: int, axis: int, fill: str = "1") -> str:
    """The ABI field holding a template's axis `axis` (counted from the first real axis), or `fill` for the
    template's own trailing padding (axis >= rank)."""
    return f"{name}{AXES - rank + axis}" if axis < rank else fill


def cpp_struct(abi: str) -> str:
    """The C++ struct of an 8-byte-field ABI (per-axis fields as arrays of 3)."""
    kinds = {"ptr": "int64_t", "i64": "int64_t", "f64": "double"}
    lines = []
    for field in ABIS[abi]:
        if field.type not in kinds:
            raise ValueError(f"field {field.name}: type {field.type} is not an 8-byte field")
        decl = f"{field.name}[{AXES}]" if field.axes else field.name
        lines.append(f"    {kinds[field.type]} {decl};")
    count = len(layout(abi))
    return ("struct Args {  // generated from codegen/abi.py (ABI \"" + abi + "\"); the manifest records the same layout\n"
            + "\n".join(lines) + "\n};\n"
            + f"constexpr int kArgFields = {count};  // every field is 8 bytes\n")


def cuda_fwd_prologue(rank: int, ctype: str) -> str:
    """Locals that give the forward templates their own axis numbering (real axes first, then the trailing
    padding as constants 1) on top of the ABI's front-padded parameters."""
    return "\n    ".join([f"{ctype}* __restrict__ const o = out;", cuda_axis_prologue(rank)])


# (local name, ABI field, fill of the trailing padding axes)
AXIS_LOCALS = (("len", "length", "1"), ("kernel_arg", "kernel", "1"), ("stride_arg", "stride", "1"),
               ("dilation_arg", "dilation", "1"))
# the unfused families: stride is 1, the causal mask a runtime flag per axis
UNFUSED_AXIS_LOCALS = (("len", "length", "1"), ("kernel_arg", "kernel", "1"), ("dilation_arg", "dilation", "1"),
                       ("causal_arg", "causal", "0"))


def cuda_axis_prologue(rank: int, locals_=AXIS_LOCALS) -> str:
    """Per-axis locals in a template's own axis numbering (real axes first, then the padding as constants),
    numbered as in cuda_fwd_prologue."""
    lines = []
    for local, field, fill in locals_:
        terms = [f"{local}{axis} = {real_axis_field(field, rank, axis, fill)}" for axis in range(AXES)]
        lines.append(f"const int {', '.join(terms)};")
    return "\n    ".join(lines)


def field_count(abi: str) -> int:
    return len(layout(abi))
