"""The peers natgen is measured beside: one adapter per peer turns a benchmark case into a timed call.

    natgen     natgen.naXd(backend=None): the best available backend (the row names it and the instance)
    reference  natgen.naXd(backend="reference"): the pure-torch gather implementation
    flex       torch.nn.attention.flex_attention under torch.compile, with a BlockMask built from
               `neighborhood_mask_mod` (natgen.window's rule in tensor arithmetic), inputs [B, H, N, d]
    natten     the natten package's naXd (same heads-last layout), with its own backend choice
    sdpa       dense torch scaled_dot_product_attention over all N tokens, inputs [B, H, N, d]

Layout changes a peer needs are done once outside the timed region (each peer gets inputs in its
own native layout); block masks are built once per set, outside the timed region, as a user would.
A peer that cannot run a case raises PeerUnavailable with the reason its table row shows.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..window import sees_1d
from .problems import ProblemSet


class PeerUnavailable(Exception):
    """The peer cannot run this case; the message is what the table shows."""


@dataclass
class Runner:
    call: Callable[[], object]        # one timed call: forward, or forward + backward
    implementation: str               # what ran, for the table
    compiles: bool = False            # the first call compiles (its time says nothing about the budget)


@dataclass
class Case:
    ps: ProblemSet
    device: torch.device
    dtype: torch.dtype
    backward: bool
    q: torch.Tensor                   # [B, *spatial, H, d]
    k: torch.Tensor
    v: torch.Tensor
    grad: torch.Tensor                # fixed cotangent, [B, *spatial, H, d]
    rpb: Optional[torch.Tensor] = None  # [H, 2K-1, ...] where the set has a positional bias

    def heads_first(self):
        """(q, k, v, grad) as [B, H, N, d] contiguous copies (made outside the timed region)."""
        ps = self.ps

        def convert(t):
            return t.detach().reshape(ps.batch, ps.tokens, ps.heads, -1).transpose(1, 2).contiguous()
        return tuple(convert(t) for t in (self.q, self.k, self.v, self.grad))


def make_case(ps: ProblemSet, device, dtype, backward, seed=0) -> Case:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (ps.batch, *ps.spatial, ps.heads, ps.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    rpb = (torch.randn((ps.heads, *(2 * K - 1 for K in ps.kernel_size)), generator=gen, device=device, dtype=dtype)
           if ps.rpb else None)
    return Case(ps, device, dtype, backward, q, k, v, grad, rpb)


def _no_rpb(case: Case, peer: str) -> None:
    if case.rpb is not None:
        raise PeerUnavailable(f"{peer} takes no relative positional bias")


def first_line(exc: BaseException) -> str:
    """An exception as a table cell: its type and first sentence."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    if ". " in line:        # the first sentence is enough for a table cell
        line = line[:line.index(". ") + 1]
    if "not support backward on cpu" in line.lower():
        return f"no CPU backward ({type(exc).__name__}: {line})"
    return f"{type(exc).__name__}: {line}"[:160] if line else type(exc).__name__


def _timed_call(fn, case: Case, inputs, grad):
    """fn(*inputs) -> output; a forward call, or forward + backward of the fixed cotangent `grad`."""
    if not case.backward:
        def call():
            with torch.no_grad():
                return fn(*inputs)
        return call
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def call():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad)
    return call


# ------------------------------------------------------------------------------------ flex mask_mod
def neighborhood_mask_mod(spatial, kernel_size, stride=1, dilation=1, is_causal=False):
    """A flex_attention mask_mod(b, h, q_idx, kv_idx) for flat row-major token indices implementing
    the per-axis window rule (natgen.window.sees_1d: dilation groups, stride groups, inward border
    shift, causal) with tensor arithmetic."""
    rank = len(spatial)

    def per_dim(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank

    spatial = tuple(int(x) for x in spatial)
    dims = list(zip(spatial, per_dim(kernel_size), per_dim(stride), per_dim(dilation), per_dim(is_causal)))
    row_strides = [math.prod(spatial[a + 1:]) for a in range(rank)]

    def mask_mod(b, h, q_idx, kv_idx):
        sees = None
        for axis, (L, K, S, D, C) in enumerate(dims):
            i = (q_idx // row_strides[axis]) % L
            j = (kv_idx // row_strides[axis]) % L
            axis_mask = sees_1d(i, j, L, K, S, D, bool(C))
            sees = axis_mask if sees is None else sees & axis_mask
        return sees

    return mask_mod


def flex_block_mask(ps: ProblemSet, device):
    from torch.nn.attention.flex_attention import create_block_mask
    mask_mod = neighborhood_mask_mod(ps.spatial, ps.kernel_size, ps.stride, ps.dilation, ps.is_causal)
    # _compile=True builds the mask block by block instead of materializing N x N booleans at once.
    return create_block_mask(mask_mod, None, None, ps.tokens, ps.tokens, device=device,
                             _compile=ps.tokens > 4096)


_COMPILED_FLEX = None


def compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo.config as dynamo_config
        # one compiled graph per (set, dtype, forward/backward): more than dynamo's default cache
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


# -------------------------------------------------------------------------------------------- peers
def _natgen_op(rank):
    import natgen
    return {1: natgen.na1d, 2: natgen.na2d, 3: natgen.na3d}[rank]


def _peer_natgen(case: Case, backend=None) -> Runner:
    import natgen
    ps = case.ps
    params = dict(kernel_size=ps.kernel_size, stride=ps.stride, dilation=ps.dilation, is_causal=ps.is_causal)
    if case.rpb is not None:
        params["rpb"] = case.rpb
    try:
        name, instance = natgen.choose(ps.rank, case.q, case.k, case.v, backend=backend, **params)
    except (RuntimeError, ValueError) as exc:
        raise PeerUnavailable(first_line(exc)) from None
    implementation = f"{name}: {instance}" if instance else (
        name if backend == "reference" else f"{name} (no generated kernel fits)")
    if case.backward and name != "reference" and natgen.choose(ps.rank, case.q, case.k, case.v, backend=backend,
                                                               op="backward", **params)[0] == "reference":
        implementation += " + reference backward"
    op = _natgen_op(ps.rank)
    params.pop("rpb", None)
    inputs = (case.q, case.k, case.v) + ((case.rpb,) if case.rpb is not None else ())

    def fn(q, k, v, rpb=None):
        return op(q, k, v, backend=backend, rpb=rpb, **params)
    return Runner(_timed_call(fn, case, inputs, case.grad), implementation, compiles=instance is not None)


def _peer_unfused(case: Case) -> Runner:
    """natgen.functional's composition, as natten <= 0.17 models call it: softmax(qk(q * scale, k, rpb)) then
    av, heads-first (logits materialized)."""
    import natgen.functional as functional
    ps = case.ps
    if any(s != 1 for s in ps.stride):
        raise PeerUnavailable("the unfused ops take no stride")
    qk, av = getattr(functional, f"na{ps.rank}d_qk"), getattr(functional, f"na{ps.rank}d_av")
    q, k, v, grad = (t.movedim(-2, 1).contiguous() for t in (case.q, case.k, case.v, case.grad))
    scale = ps.head_dim ** -0.5
    inputs = (q, k, v) + ((case.rpb,) if case.rpb is not None else ())

    def fn(q, k, v, rpb=None):
        logits = qk(q * scale, k, ps.kernel_size, ps.dilation, is_causal=ps.is_causal, rpb=rpb)
        return av(torch.softmax(logits, dim=-1), v, ps.kernel_size, ps.dilation, is_causal=ps.is_causal)
    from natgen import unfused_cpu
    where = ("CUDA kernels" if q.device.type == "cuda" else
             "CPU kernels" if unfused_cpu.available() else "torch")
    return Runner(_timed_call(fn, case, inputs, grad), f"natgen.functional qk + softmax + av ({where})")


def _peer_reference(case: Case) -> Runner:
    return _peer_natgen(case, backend="reference")


def _peer_flex(case: Case) -> Runner:
    _no_rpb(case, "flex")
    try:
        from torch.nn.attention import flex_attention as _  # noqa: F401
    except ImportError:
        raise PeerUnavailable(f"not available in torch {torch.__version__}") from None
    if case.backward and case.device.type == "cpu":
        raise PeerUnavailable("no CPU backward (flex_attention supports backward only on GPU)")
    ps = case.ps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block_mask = flex_block_mask(ps, case.device)
    q, k, v, grad = case.heads_first()
    flex = compiled_flex()
    scale = ps.head_dim ** -0.5

    def fn(q, k, v):
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    try:
        rows_, columns = (math.ceil(ps.tokens / size) for size in block_mask.BLOCK_SIZE)
        used = int(block_mask.kv_num_blocks[0, 0].sum())
        if block_mask.full_kv_num_blocks is not None:
            used += int(block_mask.full_kv_num_blocks[0, 0].sum())
        sparsity = f", {used}/{rows_ * columns} blocks"
    except Exception:  # noqa: BLE001 - cosmetic only
        sparsity = ""
    return Runner(_timed_call(fn, case, (q, k, v), grad),
                  f"flex_attention (torch.compile) + BlockMask{sparsity}", compiles=True)


def _peer_natten(case: Case) -> Runner:
    _no_rpb(case, "natten")
    try:
        import natten
    except ImportError:
        raise PeerUnavailable("not installed (pip install --no-build-isolation natten)") from None
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        raise PeerUnavailable(f"import failed: {first_line(exc)}") from None
    ps = case.ps
    op = getattr(natten, f"na{ps.rank}d")
    try:
        from natten.backends import choose_backend
        backend = choose_backend(case.q, case.k, case.v, torch_compile=False)
    except Exception as exc:  # noqa: BLE001
        raise PeerUnavailable(first_line(exc)) from None
    version = getattr(natten, "__version__", "?")
    if backend.startswith("flex"):
        backend += " (compiled)" if natten.is_flex_compile_allowed() else " (eager)"

    def fn(q, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # natten's flex path warns on every eager call
            return op(q, k, v, kernel_size=ps.kernel_size, stride=ps.stride, dilation=ps.dilation,
                      is_causal=ps.is_causal)
    return Runner(_timed_call(fn, case, (case.q, case.k, case.v), case.grad),
                  f"natten {version}: {backend}", compiles=True)


def _peer_sdpa(case: Case) -> Runner:
    _no_rpb(case, "sdpa")
    q, k, v, grad = case.heads_first()
    scale = case.ps.head_dim ** -0.5

    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return Runner(_timed_call(fn, case, (q, k, v), grad), f"dense SDPA over all {case.ps.tokens} tokens")


PEER_FACTORIES: Dict[str, Callable[[Case], Runner]] = {
    "natgen": _peer_natgen, "reference": _peer_reference, "unfused": _peer_unfused, "flex": _peer_flex,
    "natten": _peer_natten, "sdpa": _peer_sdpa,
}
PEERS = tuple(PEER_FACTORIES)
