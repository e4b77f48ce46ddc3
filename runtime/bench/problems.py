"""The standard benchmark problem sets and the FLOP and byte counts every figure is credited with.

    forward FLOPs  = 4 * batch * heads * N * prod(K) * head_dim      (N = prod(spatial))
    backward FLOPs = 2.5 * forward      (a --backward run times forward + backward: 3.5 * forward)
    forward bytes  = 4 * batch * heads * N * head_dim * sizeof(dtype)  (q, k, v read, out written once)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass(frozen=True)
class ProblemSet:
    name: str
    rank: int
    batch: int
    heads: int
    spatial: Tuple[int, ...]
    head_dim: int
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...] = ()
    is_causal: Tuple[bool, ...] = ()
    shrunk_from: Optional[int] = None     # the set's own batch when --batch shrank it
    rpb: bool = False                     # a relative positional bias [heads, 2K-1, ...] (DiNAT / NAT layers)

    def __post_init__(self):
        def per_dim(value, default):
            value = default if value in ((), None) else value
            return tuple(value) if isinstance(value, (tuple, list)) else (value,) * self.rank
        object.__setattr__(self, "spatial", per_dim(self.spatial, None))
        object.__setattr__(self, "kernel_size", per_dim(self.kernel_size, None))
        object.__setattr__(self, "dilation", per_dim(self.dilation, 1))
        object.__setattr__(self, "stride", per_dim(self.stride, 1))
        object.__setattr__(self, "is_causal", per_dim(self.is_causal, False))
        if not (len(self.spatial) == len(self.kernel_size) == len(self.dilation) == self.rank):
            raise ValueError(f"problem set {self.name!r}: spatial/kernel/dilation need {self.rank} entries")

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def window(self) -> int:
        return math.prod(self.kernel_size)

    def with_batch(self, batch: Optional[int]) -> "ProblemSet":
        """The same set with its batch shrunk to `batch` (never grown; spatial never changes)."""
        if batch is None or batch >= self.batch:
            return self
        if batch < 1:
            raise ValueError(f"--batch {batch} must be >= 1")
        return dataclasses.replace(self, batch=batch, shrunk_from=self.shrunk_from or self.batch)

    def describe(self) -> str:
        dims = lambda t: "x".join(str(x) for x in t)  # noqa: E731
        batch = f"batch {self.batch}" + (f" (shrunk from {self.shrunk_from})" if self.shrunk_from else "")
        extra = ""
        if any(s != 1 for s in self.stride):
            extra += f", stride {dims(self.stride)}"
        if any(self.is_causal):
            extra += f", causal {dims(int(c) for c in self.is_causal)}"
        if self.rpb:
            extra += ", with rpb"
        return (f"na{self.rank}d, {batch}, heads {self.heads}, spatial {dims(self.spatial)}, head_dim "
                f"{self.head_dim}, kernel {dims(self.kernel_size)}, dilation {dims(self.dilation)}{extra}")


def _set(name, rank, batch, heads, spatial, head_dim, kernel, dilation):
    return ProblemSet(name, rank, batch, heads, spatial, head_dim, kernel, dilation)


# The standard problem sets (docs/benchmarks.md), exactly as specified.
SETS: Dict[str, ProblemSet] = {s.name: s for s in [
    _set("nat-1d", 1, 128, 16, (144,), 32, 49, 1),
    _set("nat-2d", 2, 128, 16, (14, 14), 32, 7, 1),
    _set("dinat-2d", 2, 128, 16, (28, 28), 32, 7, 4),
    _set("nat-3d", 3, 1, 8, (14, 14, 14), 32, 7, 1),
    _set("long-1d", 1, 1, 24, (32768,), 128, 2048, 1),
    _set("image-2d", 2, 1, 24, (256, 256), 128, 80, 1),
    _set("video-3d", 3, 1, 24, (30, 48, 80), 128, (18, 24, 24), 1),
    _set("cpu-2d", 2, 1, 4, (32, 32), 32, 7, 1),
    _set("cpu-1d", 1, 4, 4, (1024,), 64, 31, 2),
    # DiNAT layers with their relative positional bias: the GPU-sized dinat-2d, and one of DiNAT-mini's
    # second-stage layers at 224 px (28 x 28 tokens, 4 heads of 32, K=7, dilation 4) for the CPU
    ProblemSet("dinat-2d-rpb", 2, 128, 16, (28, 28), 32, 7, 4, rpb=True),
    ProblemSet("cpu-dinat-rpb", 2, 2, 4, (28, 28), 32, 7, 4, rpb=True),
]}
DEFAULT_SETS = {"cpu": ("cpu-2d", "cpu-1d"),
                "cuda": ("nat-1d", "nat-2d", "dinat-2d", "nat-3d", "long-1d", "image-2d", "video-3d")}
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}


def forward_flops(ps: ProblemSet) -> float:
    """4 * batch * heads * N * prod(K) * head_dim."""
    return 4.0 * ps.batch * ps.heads * ps.tokens * ps.window * ps.head_dim


def backward_flops(ps: ProblemSet) -> float:
    """backward = 2.5 x forward."""
    return 2.5 * forward_flops(ps)


def measured_flops(ps: ProblemSet, backward: bool) -> float:
    """FLOPs credited to one timed call: forward, or forward + backward."""
    return forward_flops(ps) + (backward_flops(ps) if backward else 0.0)


def forward_bytes(ps: ProblemSet, dtype: torch.dtype) -> float:
    """Minimum forward bytes = 4 * batch * heads * N * head_dim * sizeof(dtype)."""
    return 4.0 * ps.batch * ps.heads * ps.tokens * ps.head_dim * torch.empty((), dtype=dtype).element_size()
