"""Autograd for resolved calls: the backend's backward kernel, or the reference's gradients where it has none."""
from __future__ import annotations

import torch

from .reference import na_reference


def reference_grads(problem, tensors, grad_out, grad_lse):
    """Gradients by differentiating the O(N * window) reference (backends without backward kernels)."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) if t is not None else None for t in tensors]
        q, k, v, extra_k, extra_v = inputs
        out, lse = na_reference(q, k, v, problem, extra_k, extra_v, return_lse=True)
        outputs, cotangents = [out], [grad_out]
        if grad_lse is not None:
            outputs.append(lse)
            cotangents.append(grad_lse)
        wanted = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(outputs, wanted, cotangents, allow_unused=True))
    return tuple(next(grads) if t is not None else None for t in inputs)


class NeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, resolved, problem, q, k, v, extra_k, extra_v):
        fast = resolved.fast
        result = fast(q, k, v) if fast is not None and extra_k is None else None
        out, lse = result if result is not None else resolved.forward(q, k, v, extra_k, extra_v)
        ctx.resolved, ctx.problem = resolved, problem
        ctx.set_materialize_grads(False)  # an unused lse arrives as None, not as a tensor of zeros
        ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = ctx.resolved.backward(q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse)
        if grads is None:
            grads = reference_grads(ctx.problem, (q, k, v, extra_k, extra_v), grad_out, grad_lse)
        return (None, None, *grads)
