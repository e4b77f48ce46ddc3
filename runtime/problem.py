"""One neighborhood-attention call, normalized and validated before any kernel sees it.

Every backend (generated CUDA, generated CPU, the torch reference) receives a `Problem`, so the
rules of docs/semantics.md are checked in exactly one place and an invalid call fails with a message that
names the argument, its value and the rule, instead of a crash or a silently wrong result deep inside
a kernel.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass

import torch

from .window import window_1d  # noqa: F401  (re-exported: natgen.problem.window_1d)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Names of the spatial axes, only used to make layout errors readable.
_SPATIAL_AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


@dataclass(frozen=True)
class Problem:
    rank: int
    batch: int
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    head_dim_v: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    n_extra: int
    dtype: torch.dtype
    device: torch.device
    heads_kv: int = 0  # key/value heads (grouped-query attention); 0 is filled in as `heads`
    # a relative positional bias [heads, 2*K_0 - 1, ...] is added to the logits (the tensor travels with the
    # call, like the extra tokens; the Problem only records that there is one)
    has_rpb: bool = False

    def __post_init__(self):
        if not self.heads_kv:
            object.__setattr__(self, "heads_kv", self.heads)

    def __hash__(self) -> int:
        # memoized: the runtime keys its per-call caches (instance, module, argument block) on the Problem,
        # and hashing 14 fields costs more than the lookups themselves
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self):
        # a hash is only valid in the process that computed it (str hashes are salted per process)
        return {key: value for key, value in self.__dict__.items() if key != "_hash"}

    @property
    def num_tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def window(self) -> int:
        return math.prod(self.kernel_size)


def _layout(rank: int) -> str:
    return "[batch, " + ", ".join(_SPATIAL_AXIS_NAMES[rank]) + ", heads, head_dim]"


def _check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name}.dtype={value.dtype} is not supported; expected one of {supported}")
    return value


def _per_dim_ints(name: str, value, rank: int) -> tuple[int, ...]:
    entries = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if isinstance(value, (tuple, list)) and len(entries) != rank:
        raise ValueError(
            f"{name}={tuple(value)} has {len(entries)} entries; a rank-{rank} problem needs an int "
            f"or {rank} entries")
    normalized = []
    for dim, entry in enumerate(entries):
        # bool is an int subclass, so `kernel_size=True` would otherwise pass as 1.
        if isinstance(entry, bool):
            raise TypeError(f"{name}[{dim}]={entry!r} must be an int, not a bool")
        try:
            normalized.append(operator.index(entry))
        except TypeError:
            raise TypeError(
                f"{name}[{dim}]={entry!r} must be an int, got {type(entry).__name__}") from None
    return tuple(normalized)


def _per_dim_bools(name: str, value, rank: int) -> tuple[bool, ...]:
    entries = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if isinstance(value, (tuple, list)) and len(entries) != rank:
        raise ValueError(
            f"{name}={tuple(value)} has {len(entries)} entries; a rank-{rank} problem needs a bool "
            f"or {rank} entries")
    for dim, entry in enumerate(entries):
        # Only real bools: an int like 2 is more likely a misplaced kernel size than a flag.
        if not isinstance(entry, bool):
            raise TypeError(
                f"{name}[{dim}]={entry!r} must be a bool, got {type(entry).__name__}")
    return tuple(entries)


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale={scale!r} must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale} must be a positive finite number")
    return scale


def rpb_shape(heads: int, kernel_size) -> tuple[int, ...]:
    """The shape of a relative positional bias: [heads, 2*K_0 - 1, ..., 2*K_{r-1} - 1] (every key offset of a
    window along an axis lies in -(K-1)..K-1, in dilation steps)."""
    return (heads, *(2 * K - 1 for K in kernel_size))


def check_rpb(rpb, heads: int, kernel_size, dtype: torch.dtype, device: torch.device, what: str = "q") -> None:
    """The rules of a relative positional bias, shared by the fused and the unfused ops."""
    _check_tensor("rpb", rpb)
    expected = rpb_shape(heads, kernel_size)
    if tuple(rpb.shape) != expected:
        rule = ", ".join(f"2*kernel_size[{a}]-1={n}" for a, n in enumerate(expected[1:]))
        raise ValueError(f"rpb.shape={tuple(rpb.shape)} must be [heads={heads}, {rule}] = {expected}")
    if rpb.dtype != dtype:
        raise ValueError(f"rpb.dtype={rpb.dtype} must match {what}.dtype={dtype}")
    if rpb.device != device:
        raise ValueError(f"rpb.device={rpb.device} must match {what}.device={device}")


def make_problem(rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                 additional_keys=None, additional_values=None, rpb=None) -> Problem:
    """Normalize per-dim parameters to tuples and validate the call against docs/semantics.md."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank={rank!r} must be an int")
    if rank not in (1, 2, 3):
        raise ValueError(f"rank={rank} must be 1, 2 or 3")

    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, tensor)

    expected_dims = rank + 3
    if q.dim() != expected_dims:
        raise ValueError(
            f"q has rank-{rank} layout {_layout(rank)} ({expected_dims} dims), "
            f"got shape {tuple(q.shape)}")
    if k.dim() != expected_dims or tuple(k.shape[:-2]) != tuple(q.shape[:-2]) or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} (with any number of key/value heads that "
                         f"divides q's {q.shape[-2]}), got {tuple(k.shape)}")
    heads_kv = k.shape[-2]
    if q.shape[-2] and (heads_kv < 1 or q.shape[-2] % heads_kv):  # empty q heads: reported below
        raise ValueError(f"k has {heads_kv} heads: the key/value heads must divide q's {q.shape[-2]} heads "
                         f"(q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)})")
    if v.dim() != expected_dims or tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
        owner = "q's" if heads_kv == q.shape[-2] else "k's"
        raise ValueError(
            f"v must have {owner} shape {tuple(k.shape[:-1])} followed by any head_dim_v, "
            f"got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k and v must share one dtype, got q.dtype={q.dtype}, k.dtype={k.dtype}, "
            f"v.dtype={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got q.device={q.device}, k.device={k.device}, "
            f"v.device={v.device}")

    batch = q.shape[0]
    spatial = tuple(q.shape[1:1 + rank])
    heads, head_dim = q.shape[-2], q.shape[-1]
    head_dim_v = v.shape[-1]
    for name, size in (("batch", batch), ("heads", heads), ("head_dim", head_dim),
                       ("head_dim_v", head_dim_v)):
        if size < 1:
            raise ValueError(f"{name}={size} must be >= 1 (q.shape={tuple(q.shape)}, "
                             f"v.shape={tuple(v.shape)})")

    kernel_size = _per_dim_ints("kernel_size", kernel_size, rank)
    stride = _per_dim_ints("stride", stride, rank)
    dilation = _per_dim_ints("dilation", dilation, rank)
    is_causal = _per_dim_bools("is_causal", is_causal, rank)
    for dim in range(rank):
        K, S, D, L = kernel_size[dim], stride[dim], dilation[dim], spatial[dim]
        if K < 2:
            raise ValueError(f"kernel_size[{dim}]={K} must be >= 2")
        if not 1 <= S <= K:
            raise ValueError(f"stride[{dim}]={S} must satisfy 1 <= stride <= kernel_size (={K})")
        if D < 1:
            raise ValueError(f"dilation[{dim}]={D} must be >= 1")
        if K * D > L:
            raise ValueError(
                f"kernel_size[{dim}]={K} with dilation[{dim}]={D} needs spatial extent >= {K * D}, "
                f"got {L}")

    scale = _check_scale(scale, head_dim)

    n_extra = 0
    if (additional_keys is None) != (additional_values is None):
        given, missing = (("additional_keys", "additional_values") if additional_values is None
                          else ("additional_values", "additional_keys"))
        raise ValueError(f"{given} given without {missing}; pass both or neither")
    if additional_keys is not None:
        _check_tensor("additional_keys", additional_keys)
        _check_tensor("additional_values", additional_values)
        n_extra = additional_keys.shape[1] if additional_keys.dim() == 4 else -1
        expected_keys = (batch, n_extra, heads_kv, head_dim)
        if additional_keys.dim() != 4 or tuple(additional_keys.shape) != expected_keys:
            raise ValueError(
                f"additional_keys must have shape [batch={batch}, n_extra, heads={heads_kv}, "
                f"head_dim={head_dim}] (k's heads), got {tuple(additional_keys.shape)}")
        expected_values = (batch, n_extra, heads_kv, head_dim_v)
        if tuple(additional_values.shape) != expected_values:
            raise ValueError(
                f"additional_values must have shape [batch={batch}, n_extra={n_extra}, "
                f"heads={heads_kv}, head_dim_v={head_dim_v}] (v's heads), got {tuple(additional_values.shape)}")
        for name, tensor in (("additional_keys", additional_keys),
                             ("additional_values", additional_values)):
            if tensor.dtype != q.dtype:
                raise ValueError(f"{name}.dtype={tensor.dtype} must match q.dtype={q.dtype}")
            if tensor.device != q.device:
                raise ValueError(f"{name}.device={tensor.device} must match q.device={q.device}")

    if rpb is not None:
        check_rpb(rpb, heads, kernel_size, q.dtype, q.device)

    return Problem(rank=rank, batch=batch, spatial=spatial, heads=heads, head_dim=head_dim,
                   head_dim_v=head_dim_v, kernel_size=kernel_size, stride=stride,
                   dilation=dilation, is_causal=is_causal, scale=scale, n_extra=n_extra,
                   dtype=q.dtype, device=q.device, heads_kv=heads_kv, has_rpb=rpb is not None)


def _heads_first_layout(rank: int, last: str = "head_dim") -> str:
    return "[batch, heads, " + ", ".join(_SPATIAL_AXIS_NAMES[rank]) + f", {last}]"


def _unfused_geometry(rank, name, tensor, kernel_size, dilation, is_causal):
    """(batch, heads, spatial, kernel_size, dilation, is_causal) of a heads-first tensor, the per-axis rules
    checked as for the fused op (stride 1)."""
    if isinstance(rank, bool) or rank not in (1, 2, 3):
        raise ValueError(f"rank={rank!r} must be 1, 2 or 3")
    _check_tensor(name, tensor)
    if tensor.dim() != rank + 3:
        raise ValueError(f"{name} has rank-{rank} heads-first layout {_heads_first_layout(rank)} "
                         f"({rank + 3} dims), got shape {tuple(tensor.shape)}")
    batch, heads, spatial = tensor.shape[0], tensor.shape[1], tuple(tensor.shape[2:2 + rank])
    for what, size in (("batch", batch), ("heads", heads), ("head_dim", tensor.shape[-1])):
        if size < 1:
            raise ValueError(f"{what}={size} must be >= 1 ({name}.shape={tuple(tensor.shape)})")
    kernel_size = _per_dim_ints("kernel_size", kernel_size, rank)
    dilation = _per_dim_ints("dilation", dilation, rank)
    is_causal = _per_dim_bools("is_causal", is_causal, rank)
    for dim in range(rank):
        K, D, L = kernel_size[dim], dilation[dim], spatial[dim]
        if K < 2:
            raise ValueError(f"kernel_size[{dim}]={K} must be >= 2")
        if D < 1:
            raise ValueError(f"dilation[{dim}]={D} must be >= 1")
        if K * D > L:
            raise ValueError(f"kernel_size[{dim}]={K} with dilation[{dim}]={D} needs spatial extent >= {K * D}, "
                             f"got {L}")
    return batch, heads, spatial, kernel_size, dilation, is_causal


def _check_same(name, tensor, reference_name, reference):
    if tensor.dtype != reference.dtype:
        raise ValueError(f"{name}.dtype={tensor.dtype} must match {reference_name}.dtype={reference.dtype}")
    if tensor.device != reference.device:
        raise ValueError(f"{name}.device={tensor.device} must match {reference_name}.device={reference.device}")


def make_unfused_qk_problem(rank, query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False,
                            rpb=None) -> Problem:
    """The rules of the unfused logits op na{rank}d_qk (heads-first [batch, heads, *spatial, head_dim])."""
    batch, heads, spatial, kernel_size, dilation, is_causal = _unfused_geometry(
        rank, "query", query, kernel_size, dilation, is_causal)
    _check_tensor("key", key)
    if tuple(key.shape) != tuple(query.shape):
        raise ValueError(f"key.shape={tuple(key.shape)} must equal query.shape={tuple(query.shape)}")
    _check_same("key", key, "query", query)
    head_dim = query.shape[-1]
    n_extra = 0
    if additional_keys is not None:
        _check_tensor("additional_keys", additional_keys)
        if additional_keys.dim() != 4 or tuple(additional_keys.shape[:2]) != (batch, heads) \
                or additional_keys.shape[-1] != head_dim:
            raise ValueError(f"additional_keys must have shape [batch={batch}, heads={heads}, n_extra, "
                             f"head_dim={head_dim}], got {tuple(additional_keys.shape)}")
        _check_same("additional_keys", additional_keys, "query", query)
        n_extra = additional_keys.shape[2]
    if rpb is not None:
        check_rpb(rpb, heads, kernel_size, query.dtype, query.device, what="query")
    return Problem(rank=rank, batch=batch, spatial=spatial, heads=heads, head_dim=head_dim, head_dim_v=head_dim,
                   kernel_size=kernel_size, stride=(1,) * rank, dilation=dilation, is_causal=is_causal, scale=1.0,
                   n_extra=n_extra, dtype=query.dtype, device=query.device, heads_kv=heads,
                   has_rpb=rpb is not None)


def make_unfused_av_problem(rank, attn, value, kernel_size, dilation=1, additional_values=None,
                            is_causal=False) -> Problem:
    """The rules of the unfused weighting op na{rank}d_av: attn [batch, heads, *spatial, prod(K) + n_extra]
    (the qk op's slots) and value [batch, heads, *spatial, head_dim]."""
    batch, heads, spatial, kernel_size, dilation, is_causal = _unfused_geometry(
        rank, "value", value, kernel_size, dilation, is_causal)
    _check_tensor("attn", attn)
    window = math.prod(kernel_size)
    head_dim = value.shape[-1]
    n_extra = 0 if additional_values is None else (additional_values.shape[2] if additional_values.dim() == 4
                                                   else -1)
    expected = (batch, heads, *spatial, window + max(n_extra, 0))
    if tuple(attn.shape) != expected:
        extra = f" + n_extra={n_extra}" if additional_values is not None else ""
        raise ValueError(f"attn.shape={tuple(attn.shape)} must be [batch, heads, *spatial, prod(kernel_size)="
                         f"{window}{extra}] = {expected} for value.shape={tuple(value.shape)}")
    _check_same("attn", attn, "value", value)
    if additional_values is not None:
        _check_tensor("additional_values", additional_values)
        if additional_values.dim() != 4 or tuple(additional_values.shape[:2]) != (batch, heads) \
                or additional_values.shape[-1] != head_dim:
            raise ValueError(f"additional_values must have shape [batch={batch}, heads={heads}, n_extra, "
                             f"head_dim={head_dim}], got {tuple(additional_values.shape)}")
        _check_same("additional_values", additional_values, "value", value)
    return Problem(rank=rank, batch=batch, spatial=spatial, heads=heads, head_dim=head_dim, head_dim_v=head_dim,
                   kernel_size=kernel_size, stride=(1,) * rank, dilation=dilation, is_causal=is_causal, scale=1.0,
                   n_extra=n_extra, dtype=value.dtype, device=value.device, heads_kv=heads)
