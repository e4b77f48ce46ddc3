"""The unfused (natten-style) neighborhood ops on the generated CUDA kernels (families unqk, unav, uninv, unrpb).

Heads-first tensors [batch, heads, *spatial, channels]. `qk` gives the logits [batch, heads, *spatial,
prod(K) + n_extra] (no scale; slots row-major over the window counted from its start, -inf where a causal
window hides a slot, extra keys last), `av` applies weights of that layout to values. Both are
differentiable: qk's backward is d query = av(d logits, key), d key = the inverse neighborhood of
(d logits, query), d rpb = the per-offset sum of d logits; av's backward is d attn = qk(grad_out, value)
(hidden slots 0), d value = the inverse neighborhood of (attn, grad_out). The extra tokens' gradients are
one dense product each (torch). Runs on CUDA tensors (`backend="cuda"`) or through the emulator on CPU
tensors (`backend="emulator"`). Validation is make_problem's (the one place the argument rules live), on
token-major views of the tensors.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from .launch import plan as launch_plan
from .manifest import load
from .problem import Problem, make_problem
from .spec import TORCH_DTYPE_TOKENS

FAMILIES = {"qk": "unqk", "av": "unav", "inverse": "uninv", "rpb_grad": "unrpb"}


def _token_major(t):
    """[batch, heads, *spatial, c] -> [batch, *spatial, heads, c] (a view), for make_problem."""
    return None if t is None else t.movedim(1, -2)


def problem_for(rank, x, y, kernel_size, dilation, is_causal, extra=None, rpb=None, value=None) -> Problem:
    """The Problem of an unfused call: x query-like, y key-like, `value` (if given) sets the value channels."""
    problem = make_problem(rank, _token_major(x), _token_major(y), _token_major(value if value is not None else y),
                           kernel_size, 1, dilation, is_causal, None,
                           None if extra is None else extra.transpose(1, 2),
                           None if extra is None else extra.transpose(1, 2), rpb)
    if problem.heads_kv != problem.heads:
        raise ValueError(f"the unfused ops take one head count: {problem.heads} query heads, {problem.heads_kv} "
                         "key/value heads")
    return problem


@functools.lru_cache(maxsize=None)
def instance_for(operation: str, rank: int, dtype_token: str):
    family = FAMILIES[operation]
    for instance in load():
        spec = instance.spec
        if (spec.family, spec.rank, spec.dtype) == (family, rank, dtype_token):
            return instance
    raise LookupError(f"the library has no {family} instance for rank {rank}, {dtype_token} "
                      "(re-run `python build.py --render-only`)")


def _backend_for(tensor, backend):
    if backend is None:
        backend = "cuda" if tensor.device.type == "cuda" else "emulator"
    if backend not in ("cuda", "emulator"):
        raise ValueError(f"backend={backend!r} must be 'cuda' or 'emulator' for the unfused CUDA kernels")
    if (backend == "cuda") != (tensor.device.type == "cuda"):
        raise ValueError(f"backend={backend!r} does not run {tensor.device.type} tensors")
    return backend


def launch(operation: str, problem: Problem, backend: str, out: torch.Tensor, **tensors) -> torch.Tensor:
    """Run one unfused kernel: the pointers by ABI name (absent ones are null), `out` written in place."""
    instance = instance_for(operation, problem.rank, TORCH_DTYPE_TOKENS[str(problem.dtype).replace("torch.", "")])
    plan = launch_plan(instance, problem)
    tensors = dict(tensors, out=out)
    ordered = [None if tensors.get(name) is None else tensors[name].contiguous() for _, name in plan.pointers]
    if backend == "emulator":
        from .emulated import emulator_launcher
        emulator_launcher(instance, plan)(ordered)
    else:
        from . import cuda
        device = out.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        function = cuda._function(instance, cuda.device_arch(device), index)
        cupy = cuda.cupy_module()

        def stream_of():
            return cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)

        cuda.cupy_launcher(function, plan, stream_of, index)(ordered)
    return out


def qk_forward(problem, backend, query, key, extra_k=None, rpb=None):
    shape = (problem.batch, problem.heads, *problem.spatial, problem.window + problem.n_extra)
    out = torch.empty(shape, dtype=query.dtype, device=query.device)
    return launch("qk", problem, backend, out, x=query, y=key, extra=extra_k, rpb=rpb)


def av_forward(problem, backend, attn, value, extra_v=None):
    shape = (problem.batch, problem.heads, *problem.spatial, value.shape[-1])
    out = torch.empty(shape, dtype=value.dtype, device=value.device)
    return launch("av", dataclasses.replace(problem, head_dim=value.shape[-1]), backend, out, attn=attn, y=value,
                  extra=extra_v)


def inverse(problem, backend, attn, x):
    """out[key] = sum over the queries reaching the key of attn[query, slot] * x[query]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return launch("inverse", dataclasses.replace(problem, head_dim=x.shape[-1]), backend, out, attn=attn, x=x)


def rpb_grad(problem, backend, grad_logits, rpb):
    out = torch.empty(rpb.shape, dtype=rpb.dtype, device=rpb.device)
    return launch("rpb_grad", problem, backend, out, attn=grad_logits)


def _extra_grad(weights, x, window):
    """d extra[e] = sum over queries of weights[query, window + e] * x[query] (one dense product)."""
    flat_w = weights.flatten(2, -2)[..., window:]           # [b, h, n, e]
    flat_x = x.flatten(2, -2)                               # [b, h, n, c]
    return torch.einsum("bhne,bhnc->bhec", flat_w.to(torch.float32 if x.dtype != torch.float64 else x.dtype),
                        flat_x.to(torch.float32 if x.dtype != torch.float64 else x.dtype)).to(x.dtype)


class _QK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, extra_k, rpb, problem, backend):
        ctx.save_for_backward(query, key, extra_k, rpb)
        ctx.problem, ctx.backend = problem, backend
        return qk_forward(problem, backend, query, key, extra_k, rpb)

    @staticmethod
    def backward(ctx, grad_logits):
        query, key, extra_k, rpb = ctx.saved_tensors
        problem, backend = ctx.problem, ctx.backend
        grad_logits = grad_logits.contiguous()
        grad_q = av_forward(problem, backend, grad_logits, key, extra_k)
        grad_k = inverse(problem, backend, grad_logits, query)
        grad_extra = _extra_grad(grad_logits, query, problem.window) if extra_k is not None else None
        grad_rpb = rpb_grad(problem, backend, grad_logits, rpb) if rpb is not None else None
        return grad_q, grad_k, grad_extra, grad_rpb, None, None


class _AV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, value, extra_v, problem, backend):
        ctx.save_for_backward(attn, value, extra_v)
        ctx.problem, ctx.backend = problem, backend
        return av_forward(problem, backend, attn, value, extra_v)

    @staticmethod
    def backward(ctx, grad_out):
        attn, value, extra_v = ctx.saved_tensors
        problem, backend = ctx.problem, ctx.backend
        grad_out = grad_out.contiguous()
        channels = dataclasses.replace(problem, head_dim=value.shape[-1], rpb=False)
        grad_attn = qk_forward(channels, backend, grad_out, value, extra_v)
        grad_attn.masked_fill_(grad_attn == float("-inf"), 0)  # slots a causal window hides get no gradient
        grad_value = inverse(problem, backend, attn, grad_out)
        grad_extra = _extra_grad(attn, grad_out, problem.window) if extra_v is not None else None
        return grad_attn, grad_value, grad_extra, None, None


def qk(rank, query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None,
       backend: Optional[str] = None):
    """Logits [batch, heads, *spatial, prod(kernel_size) + n_extra] of heads-first query and key."""
    problem = problem_for(rank, query, key, kernel_size, dilation, is_causal, additional_keys, rpb)
    backend = _backend_for(query, backend)
    tensors = [t.contiguous() if t is not None else None for t in (query, key, additional_keys, rpb)]
    return _QK.apply(*tensors, problem, backend)


def av(rank, attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False,
       backend: Optional[str] = None):
    """[batch, heads, *spatial, head_dim] from weights of the qk layout and heads-first values."""
    if not isinstance(attn, torch.Tensor) or attn.dim() != rank + 3:
        raise ValueError(f"attn must be a [batch, heads, *spatial, slots] tensor of {rank + 3} dims, "
                         f"got {getattr(attn, 'shape', type(attn).__name__)}")
    problem = problem_for(rank, value, value, kernel_size, dilation, is_causal, additional_values)
    expected = (problem.batch, problem.heads, *problem.spatial, problem.window + problem.n_extra)
    if tuple(attn.shape) != expected:
        raise ValueError(f"attn must have shape {list(expected)} (prod(kernel_size) + n_extra slots), "
                         f"got {list(attn.shape)}")
    if attn.dtype != value.dtype or attn.device != value.device:
        raise ValueError(f"attn ({attn.dtype}, {attn.device}) must match value ({value.dtype}, {value.device})")
    backend = _backend_for(value, backend)
    tensors = [t.contiguous() if t is not None else None for t in (attn, value, additional_values)]
    return _AV.apply(*tensors, problem, backend)
