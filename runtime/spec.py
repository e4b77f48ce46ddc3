"""The kernel-instance model: one frozen `KernelSpec` per generated kernel.

`KernelSpec.name` is a pure function of the fields and `KernelSpec.parse` is its inverse, so a name seen
in a profiler, a log or the CLI always identifies exactly one instance.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Tuple, Union

from . import arch as arch_names

ANY = "any"

FAMILIES = ("simt", "tcs", "tcg", "cpu", "simtbwd", "simtbwda", "tcbwd", "unqk", "unav", "uninv", "unrpb", "cpuqk",
            "cpuav", "cpuinv", "cpurpb")
# the families whose kernels run on the CPU (arch "cpu"): the fused one and the unfused ops'
CPU_FAMILIES = ("cpu", "cpuqk", "cpuav", "cpuinv", "cpurpb")
OPS = ("fwd", "bwd")
DTYPES = ("f32", "f16", "bf16", "f64")
ARCHS = ("sm_80", "sm_90", "cpu")

# torch dtype name -> spec dtype token (the runtime maps problems onto specs with this table)
TORCH_DTYPE_TOKENS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8}
DTYPE_CTYPES = {"f32": "float", "f16": "half", "bf16": "__nv_bfloat16", "f64": "double"}

IntTuple = Tuple[int, ...]


@dataclass(frozen=True)
class KernelSpec:
    family: str                                  # simt | tcs | tcg | cpu | simtbwd | simtbwda | tcbwd | ...
    op: str                                      # fwd | bwd
    rank: int                                    # 1, 2 or 3 spatial dims
    kernel_size: Union[IntTuple, str]            # per-dim window, or "any" (runtime value)
    dilation: Union[IntTuple, str]               # per-dim dilation, or "any"
    causal: Tuple[bool, ...]                     # compile-time causal mask per dim
    dtype: str                                   # element type of q/k/v/o
    head_dim: Union[int, str]                    # compile-time head_dim, or "any"
    tile: IntTuple                               # query tile owned by one CTA (or CPU task)
    arch: str                                    # minimum target: sm_80, sm_90, or cpu (sm80 is accepted)

    def __post_init__(self):
        if isinstance(self.arch, str) and self.arch.startswith("sm") and self.arch not in ARCHS:
            try:  # one spelling: the name's compact token (sm80) is accepted and stored as sm_80
                object.__setattr__(self, "arch", arch_names.normalize(self.arch))
            except ValueError:
                pass  # reported below with the other problems
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r} must be one of {FAMILIES}")
        if self.op not in OPS:
            problems.append(f"op={self.op!r} must be one of {OPS}")
        if self.rank not in (1, 2, 3):
            problems.append(f"rank={self.rank} must be 1, 2 or 3")
        for label, value in (("kernel_size", self.kernel_size), ("dilation", self.dilation)):
            if value != ANY and (not isinstance(value, tuple) or len(value) != self.rank
                                 or not all(isinstance(x, int) and x >= 1 for x in value)):
                problems.append(f"{label}={value!r} must be 'any' or a tuple of {self.rank} positive ints")
        if self.kernel_size != ANY and isinstance(self.kernel_size, tuple) and any(x < 2 for x in self.kernel_size):
            problems.append(f"kernel_size={self.kernel_size} must be >= 2 per dim")
        if not isinstance(self.causal, tuple) or len(self.causal) != self.rank or \
                not all(isinstance(c, bool) for c in self.causal):
            problems.append(f"causal={self.causal!r} must be a tuple of {self.rank} bools")
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} must be one of {DTYPES}")
        if self.head_dim != ANY and not (isinstance(self.head_dim, int) and self.head_dim > 0):
            problems.append(f"head_dim={self.head_dim!r} must be 'any' or a positive int")
        if not isinstance(self.tile, tuple) or len(self.tile) != self.rank or \
                not all(isinstance(t, int) and t >= 1 for t in self.tile):
            problems.append(f"tile={self.tile!r} must be a tuple of {self.rank} positive ints")
        if self.arch not in ARCHS:
            problems.append(f"arch={self.arch!r} must be one of {ARCHS}")
        if (self.family in CPU_FAMILIES) != (self.arch == "cpu"):
            problems.append(f"family={self.family!r} and arch={self.arch!r}: arch 'cpu' goes with family 'cpu' "
                            f"and the unfused ops' CPU families {CPU_FAMILIES[1:]} only")
        if problems:
            raise ValueError("invalid KernelSpec: " + "; ".join(problems))

    # ----------------------------------------------------------------- naming
    @property
    def name(self) -> str:
        def dims(value):
            return ANY if value == ANY else "x".join(str(x) for x in value)

        causal = "".join("1" if c else "0" for c in self.causal)
        return (f"na{self.rank}d_{self.op}_{self.family}_k{dims(self.kernel_size)}_d{dims(self.dilation)}"
                f"_c{causal}_{self.dtype}_h{self.head_dim}_q{dims(self.tile)}_{arch_names.name_token(self.arch)}")

    _NAME_RE = re.compile(
        r"^na(?P<rank>[123])d_(?P<op>[a-z]+)_(?P<family>[a-z]+)_k(?P<k>any|\d+(?:x\d+)*)"
        r"_d(?P<d>any|\d+(?:x\d+)*)_c(?P<c>[01]+)_(?P<dtype>[a-z0-9]+)_h(?P<h>any|\d+)"
        r"_q(?P<q>\d+(?:x\d+)*)_(?P<arch>[a-z0-9]+)$")

    @classmethod
    def parse(cls, name: str) -> "KernelSpec":
        match = cls._NAME_RE.match(name)
        if not match:
            raise ValueError(f"{name!r} is not a natgen kernel name "
                             "(expected na<rank>d_<op>_<family>_k<K>_d<D>_c<causal>_<dtype>_h<head_dim>_q<tile>_<arch>)")

        def dims(text):
            return ANY if text == ANY else tuple(int(x) for x in text.split("x"))

        head_dim = match["h"]
        return cls(family=match["family"], op=match["op"], rank=int(match["rank"]),
                   kernel_size=dims(match["k"]), dilation=dims(match["d"]),
                   causal=tuple(c == "1" for c in match["c"]), dtype=match["dtype"],
                   head_dim=ANY if head_dim == ANY else int(head_dim), tile=dims(match["q"]), arch=match["arch"])

    # ------------------------------------------------------------ derived values
    @property
    def ctype(self) -> str:
        return DTYPE_CTYPES[self.dtype]

    @property
    def queries_per_tile(self) -> int:
        return math.prod(self.tile)

    def to_json(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "KernelSpec":
        values = {}
        for field in fields(cls):
            value = data[field.name]
            values[field.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def json_text(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)
