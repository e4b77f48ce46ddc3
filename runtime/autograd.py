"""Gradients by the reference, for backends without a backward kernel (natgen.torch_ops' backward op uses it)."""
from __future__ import annotations

from .reference import na_reference_backward


def reference_grads(problem, tensors, grad_out, grad_lse, rpb=None):
    """Gradients of the O(N * window) reference by its explicit backward (no autograd, so it also runs
    inside a registered op, below the autograd dispatch)."""
    q, k, v, extra_k, extra_v = tensors
    return na_reference_backward(q, k, v, problem, extra_k, extra_v, grad_out, grad_lse, rpb=rpb)
