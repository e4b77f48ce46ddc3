"""Kernel arguments packed from the manifest's ABI layout (codegen/abi.py writes it; nothing here lists fields).

A layout is the ordered list of an ABI's fields with their types; per-axis fields are front-padded (a
rank-r problem fills the last r of the 3 axes). The runtime knows how to produce each field NAME (the value
vocabulary below); a layout naming a field this runtime cannot produce fails when the instance is resolved,
with the field's name, rather than at a launch.
"""
from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

from .problem import Problem

LOG2E = 1.4426950408889634
AXES = 3
POINTER = "ptr"
_STRUCT_CODES = {"ptr": "q", "i64": "q", "f64": "d", "i32": "i", "f32": "f"}
# per-axis problem attribute of each per-axis field, and the value the field has where the problem is 1-D/2-D
_AXIS_SOURCES = {"length": "spatial", "kernel": "kernel_size", "stride": "stride", "dilation": "dilation",
                 "causal": "is_causal"}


def scalar_values(problem: Problem, threads: int = 0) -> Dict[str, object]:
    """Every non-pointer field value natgen knows for a problem (the vocabulary of ABI field names)."""
    values: Dict[str, object] = {
        "batch": problem.batch, "heads": problem.heads, "heads_kv": problem.heads_kv, "head_dim": problem.head_dim,
        "head_dim_v": problem.head_dim_v, "n_extra": problem.n_extra, "threads": threads,
        "scale": float(problem.scale), "scale_log2": float(problem.scale) * LOG2E, "write_lse": 1,
        "zero_masked": 0,  # the unfused CPU qk kind: its caller sets 1 for d attn (hidden slots 0, not -inf)
        "input_dtype": 0,  # the CPU kernels' input element type: 0 the compute type (natgen.cpu sets others)
    }
    pad = AXES - problem.rank
    for field, attribute in _AXIS_SOURCES.items():
        per_axis = getattr(problem, attribute)
        for axis in range(AXES):
            values[f"{field}{axis}"] = int(per_axis[axis - pad]) if axis >= pad else None  # None: the fill
    return values


class Layout:
    """One ABI layout from the manifest: field names, types, where the pointers go."""

    def __init__(self, record: Optional[dict], owner: str):
        if not record or record.get("padding") != "front" or not record.get("fields"):
            raise RuntimeError(f"{owner}: the manifest gives no usable argument layout (re-run `python build.py`)")
        self.fields: List[dict] = record["fields"]
        self.names = [f["name"] for f in self.fields]
        self.types = [f["type"] for f in self.fields]
        self.owner = owner
        unknown_types = sorted({t for t in self.types if t not in _STRUCT_CODES})
        if unknown_types:
            raise RuntimeError(f"{owner}: argument types {unknown_types} are unknown to this natgen")
        self.pointer_names = [n for n, t in zip(self.names, self.types) if t == POINTER]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def scalars(self, problem: Problem, threads: int = 0) -> List[Tuple[int, object]]:
        """(position, value) of every non-pointer field, for this problem."""
        known = scalar_values(problem, threads)
        result = []
        for position, field in enumerate(self.fields):
            if field["type"] == POINTER:
                continue
            name = field["name"]
            if name not in known:
                raise RuntimeError(f"{self.owner}: this natgen cannot produce kernel argument {name!r}; "
                                   "upgrade natgen or rebuild the library")
            value = known[name]
            result.append((position, field.get("fill", 0) if value is None else value))
        return result

    def struct(self) -> struct.Struct:
        return struct.Struct("=" + "".join(_STRUCT_CODES[t] for t in self.types))

    def pointer_struct(self) -> Tuple[int, struct.Struct]:
        """(byte offset, struct) of the pointer fields, which must be contiguous (they are written per call)."""
        positions = [i for i, t in enumerate(self.types) if t == POINTER]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise RuntimeError(f"{self.owner}: pointer fields must be contiguous to be packed per call")
        offset = struct.calcsize("=" + "".join(_STRUCT_CODES[t] for t in self.types[:positions[0]]))
        return offset, struct.Struct("=" + "q" * len(positions))
