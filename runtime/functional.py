"""natgen.functional: the unfused neighborhood ops (logits, then weighting) and natten <= 0.17's names for them.

    na{1,2,3}d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None,
                  backend=None)
        -> logits [batch, heads, *spatial, prod(kernel_size) + n_extra]   (no scale applied)
    na{1,2,3}d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False, backend=None)
        -> [batch, heads, *spatial, head_dim]

Tensors are heads-first, [batch, heads, *spatial, head_dim]; docs/semantics.md gives the slot order. Both ops
are differentiable in every tensor argument (query, key, additional_keys, rpb; attn, value, additional_values).
A model written for natten's unfused ops computes softmax(qk(q * scale, k, rpb)) and passes it to av.

CUDA tensors run the generated CUDA kernels (natgen.unfused_cuda), forward and backward; backend="emulator"
runs the same kernels on CPU tensors through the emulator; other CPU tensors (backend None or "cpu") run the
generated CPU kernels (natgen.unfused_cpu), forward and backward. backend="reference" (and backend None where
no C++ compiler is found) takes the chunked torch implementation (natgen.unfused).
"""
from __future__ import annotations

import torch

from . import unfused, unfused_cpu, unfused_cuda
from .problem import make_unfused_av_problem, make_unfused_qk_problem


def _kernels(tensor, backend):
    """The backend of an unfused call: "cuda" / "emulator" / "cpu" (the generated kernels) or None (torch)."""
    if backend not in (None, "reference", "cuda", "emulator", "cpu"):
        raise ValueError(f"backend={backend!r} must be None, 'reference', 'cuda', 'cpu' or 'emulator'")
    if backend == "reference":
        return None
    if backend is None:
        if tensor.device.type == "cuda":
            return "cuda"
        # no C++ compiler: the torch implementation
        return "cpu" if tensor.device.type == "cpu" and unfused_cpu.available() else None
    if backend == "cpu":
        if tensor.device.type != "cpu":
            raise ValueError(f"backend='cpu' does not run {tensor.device.type} tensors")
        return "cpu"
    return unfused_cuda.backend_for(tensor, backend)

__all__ = ["na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
           "natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav",
           "natten3dqkrpb", "natten3dqk", "natten3dav"]


class _QK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem, query, key, additional_keys, rpb, backend):
        ctx.problem, ctx.backend = problem, backend
        ctx.save_for_backward(query, key, additional_keys)
        if backend is not None:
            return unfused_cuda.qk_forward(problem, backend, *(t.contiguous() if t is not None else None
                                                               for t in (query, key, additional_keys, rpb)))
        return unfused.qk_forward(problem, query, key, additional_keys, rpb)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        query, key, additional_keys = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:5]
        if ctx.backend is not None:
            grads = unfused_cuda.qk_backward(ctx.problem, ctx.backend, query.contiguous(), key.contiguous(),
                                             additional_keys, grad.contiguous(), needs)
        else:
            grads = unfused.qk_backward(ctx.problem, query, key, additional_keys, grad.contiguous(), needs)
        return (None, *grads, None)


class _AV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem, attn, value, additional_values, backend):
        ctx.problem, ctx.backend = problem, backend
        ctx.save_for_backward(attn, value, additional_values)
        if backend is not None:
            return unfused_cuda.av_forward(problem, backend, *(t.contiguous() if t is not None else None
                                                               for t in (attn, value, additional_values)))
        return unfused.av_forward(problem, attn, value, additional_values)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        attn, value, additional_values = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]
        if ctx.backend is not None:
            grads = unfused_cuda.av_backward(ctx.problem, ctx.backend, attn.contiguous(), value.contiguous(),
                                             additional_values, grad.contiguous(), needs)
        else:
            grads = unfused.av_backward(ctx.problem, attn, value, additional_values, grad.contiguous(), needs)
        return (None, *grads, None)


def _qk(rank):
    def qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None, backend=None):
        problem = make_unfused_qk_problem(rank, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)
        return _QK.apply(problem, query, key, additional_keys, rpb, _kernels(query, backend))
    qk.__name__ = qk.__qualname__ = f"na{rank}d_qk"
    qk.__doc__ = (f"Logits of {rank}-D neighborhood attention, heads-first [batch, heads, *spatial, head_dim] -> "
                  "[batch, heads, *spatial, prod(kernel_size) + n_extra] (no scale; rpb [heads, 2*K-1, ...] "
                  "added; -inf in slots a causal mask hides; additional_keys [batch, heads, n_extra, head_dim] "
                  "after the window slots).")
    return qk


def _av(rank):
    def av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False, backend=None):
        problem = make_unfused_av_problem(rank, attn, value, kernel_size, dilation, additional_values, is_causal)
        return _AV.apply(problem, attn, value, additional_values, _kernels(value, backend))
    av.__name__ = av.__qualname__ = f"na{rank}d_av"
    av.__doc__ = (f"Weighting of {rank}-D neighborhood attention: attn [batch, heads, *spatial, prod(kernel_size) + "
                  "n_extra] (na_qk's slots) times the window's values (and additional_values) -> "
                  "[batch, heads, *spatial, head_dim].")
    return av


na1d_qk, na2d_qk, na3d_qk = _qk(1), _qk(2), _qk(3)
na1d_av, na2d_av, na3d_av = _av(1), _av(2), _av(3)


# natten <= 0.17's names and argument orders


def natten1dqkrpb(query, key, rpb, kernel_size, dilation):
    return na1d_qk(query, key, kernel_size, dilation, rpb=rpb)


def natten1dqk(query, key, kernel_size, dilation):
    return na1d_qk(query, key, kernel_size, dilation)


def natten1dav(attn, value, kernel_size, dilation):
    return na1d_av(attn, value, kernel_size, dilation)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    return na2d_qk(query, key, kernel_size, dilation, rpb=rpb)


def natten2dqk(query, key, kernel_size, dilation):
    return na2d_qk(query, key, kernel_size, dilation)


def natten2dav(attn, value, kernel_size, dilation):
    return na2d_av(attn, value, kernel_size, dilation)


def _3d(kernel_size_d, kernel_size, dilation_d, dilation):
    return (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation)


def natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation):
    kernel, dilations = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return na3d_qk(query, key, kernel, dilations, rpb=rpb)


def natten3dqk(query, key, kernel_size_d, kernel_size, dilation_d, dilation):
    kernel, dilations = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return na3d_qk(query, key, kernel, dilations)


def natten3dav(attn, value, kernel_size_d, kernel_size, dilation_d, dilation):
    kernel, dilations = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return na3d_av(attn, value, kernel, dilations)
