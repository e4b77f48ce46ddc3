"""The backward of a resolved call, shared by the registered op (natgen.torch_ops) and the eager autograd
Function (EagerNA, which plain eager calls with gradients take: it skips the dispatcher's Python layers,
about 0.2 ms a forward and as much again a backward on the CPU).
"""
from __future__ import annotations

import warnings

import torch

from .reference import na_reference_backward


def reference_grads(problem, tensors, grad_out, grad_lse, rpb=None):
    """Gradients of the O(N * window) reference by its explicit backward (no autograd, so it also runs
    inside a registered op, below the autograd dispatch)."""
    q, k, v, extra_k, extra_v = tensors
    return na_reference_backward(q, k, v, problem, extra_k, extra_v, grad_out, grad_lse, rpb=rpb)


def _contiguous(tensor):
    return tensor.contiguous() if tensor is not None else None


def backward_grads(problem, resolved, q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb=None):
    """(grad_q, grad_k, grad_v, grad_extra_k, grad_extra_v, grad_rpb), None for an absent input: the resolved
    backward kernel, or where there is none the reference's gradients (with a warning naming why)."""
    tensors = [_contiguous(t) for t in (q, k, v, extra_k, extra_v)]
    rpb = _contiguous(rpb)
    grad_out = grad_out.contiguous()
    grads = None
    if resolved.backend != "reference":
        grads = resolved.backward(*tensors, out.contiguous(), lse.contiguous(), grad_out, _contiguous(grad_lse),
                                  rpb)
        if grads is None:
            warnings.warn(f"natgen: no {resolved.backend} backward kernel for this call ({resolved.backward_reason}); "
                          "its gradients are recomputed through the reference", stacklevel=3)
    if grads is None:
        grads = reference_grads(problem, tensors, grad_out, grad_lse, rpb)
    return grads


class EagerNA(torch.autograd.Function):
    """(q, k, v, extra_k, extra_v, rpb) -> (out, lse) through a resolved call, differentiable once (a
    second derivative raises, as the registered op's does)."""

    # forward(ctx, ...) rather than a separate setup_context: with one, every apply binds its arguments through
    # inspect.signature, which doubled the host time of a call (55 -> 119 us). torch.func transforms need the
    # separate form; they run on neither path (the registered op's autograd fails the same way).
    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, rpb, problem, resolved):
        result = None
        if resolved.fast is not None and extra_k is None and rpb is None:
            result = resolved.fast(q, k, v)
        if result is None:
            result = resolved.forward(*(_contiguous(t) for t in (q, k, v, extra_k, extra_v, rpb)))
        ctx.save_for_backward(q, k, v, extra_k, extra_v, *result, rpb)
        ctx.problem, ctx.resolved = problem, resolved
        ctx.set_materialize_grads(False)  # an unused lse stays None: the kernel then reads no lse cotangent
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, extra_k, extra_v, out, lse, rpb = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        fast = ctx.resolved.fast_backward
        if fast is not None and extra_k is None and rpb is None:
            grads = fast(q, k, v, out, lse, grad_out, grad_lse)
            if grads is not None:
                return (*grads, None, None, None, None, None)
        grads = backward_grads(ctx.problem, ctx.resolved, q, k, v, extra_k, extra_v, out, lse, grad_out,
                               grad_lse, rpb)
        return (*grads, None, None)
