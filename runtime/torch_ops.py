"""natgen's ops registered with torch.library (namespace `natgen`), for torch.compile, export and meta tensors.

    torch.ops.natgen.na_forward(q, k, v, additional_keys, additional_values, kernel_size, stride, dilation,
                                is_causal, scale, backend, arch, rpb=None) -> (out, lse)
    torch.ops.natgen.na_backward(q, k, v, additional_keys, additional_values, out, lse, grad_out, grad_lse,
                                 kernel_size, ..., arch, rpb=None)
        -> (grad_q, grad_k, grad_v, grad_extra_k, grad_extra_v, grad_rpb)

Per-axis arguments are lists of the rank's length; the rank is their length. Inside, a call is validated
and resolved like any other (natgen.ops.resolve: cached) and runs on its backend; the fake (meta) functions
validate the same way and give the outputs' shapes and dtypes. The forward's autograd formula calls the
backward op, which runs the backend's backward kernel or, where it has none, the reference's gradients.
Missing extra-token and bias gradients come back as empty tensors (an op cannot return None). The bias comes
last, with a default, so calls written before it existed keep their meaning.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .autograd import backward_grads
from .problem import make_problem

NAMESPACE = "natgen"


def _problem(q, k, v, extra_k, extra_v, kernel_size, stride, dilation, is_causal, scale, rpb=None):
    return make_problem(len(kernel_size), q, k, v, tuple(kernel_size), tuple(stride), tuple(dilation),
                        tuple(is_causal), scale, extra_k, extra_v, rpb)


@torch.library.custom_op(f"{NAMESPACE}::na_forward", mutates_args=())
def na_forward(q: Tensor, k: Tensor, v: Tensor, additional_keys: Optional[Tensor],
               additional_values: Optional[Tensor], kernel_size: List[int], stride: List[int],
               dilation: List[int], is_causal: List[bool], scale: Optional[float], backend: Optional[str],
               arch: Optional[str], rpb: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    _, resolved = ops.resolve(len(kernel_size), q, k, v, tuple(kernel_size), tuple(stride), tuple(dilation),
                              tuple(is_causal), scale, additional_keys, additional_values, backend, arch, rpb)
    tensors = [t.contiguous() if t is not None else None
               for t in (q, k, v, additional_keys, additional_values, rpb)]
    return resolved.forward(*tensors)


@na_forward.register_fake
def _na_forward_fake(q, k, v, additional_keys, additional_values, kernel_size, stride, dilation, is_causal, scale,
                     backend, arch, rpb=None):
    problem = _problem(q, k, v, additional_keys, additional_values, kernel_size, stride, dilation, is_causal,
                       scale, rpb)
    out = q.new_empty((problem.batch, *problem.spatial, problem.heads, problem.head_dim_v))
    lse = q.new_empty((problem.batch, *problem.spatial, problem.heads), dtype=torch.float32)
    return out, lse


def _empty_like_missing(reference: Tensor) -> Tensor:
    return reference.new_empty((0,))


@torch.library.custom_op(f"{NAMESPACE}::na_backward", mutates_args=())
def na_backward(q: Tensor, k: Tensor, v: Tensor, additional_keys: Optional[Tensor],
                additional_values: Optional[Tensor], out: Tensor, lse: Tensor, grad_out: Tensor,
                grad_lse: Optional[Tensor], kernel_size: List[int], stride: List[int], dilation: List[int],
                is_causal: List[bool], scale: Optional[float], backend: Optional[str],
                arch: Optional[str], rpb: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                            Tensor]:
    problem, resolved = ops.resolve(len(kernel_size), q, k, v, tuple(kernel_size), tuple(stride), tuple(dilation),
                                    tuple(is_causal), scale, additional_keys, additional_values, backend, arch, rpb)
    grads = backward_grads(problem, resolved, q, k, v, additional_keys, additional_values, out, lse, grad_out,
                           grad_lse, rpb)
    return tuple(_empty_like_missing(q) if g is None else g for g in grads)  # every grad is a fresh tensor


@na_backward.register_fake
def _na_backward_fake(q, k, v, additional_keys, additional_values, out, lse, grad_out, grad_lse, kernel_size,
                      stride, dilation, is_causal, scale, backend, arch, rpb=None):
    extras = [t.new_empty(t.shape) if t is not None else _empty_like_missing(q)
              for t in (additional_keys, additional_values, rpb)]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *extras


def _setup_context(ctx, inputs, output):
    q, k, v, extra_k, extra_v, *params, rpb = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse, rpb)
    ctx.params = params
    ctx.has_extra = extra_k is not None
    ctx.has_rpb = rpb is not None


def _backward(ctx, grad_out, grad_lse):
    q, k, v, extra_k, extra_v, out, lse, rpb = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = torch.ops.natgen.na_backward(q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, *ctx.params,
                                         rpb)
    grad_q, grad_k, grad_v, grad_ek, grad_ev, grad_rpb = grads
    if not ctx.has_extra:
        grad_ek = grad_ev = None
    return (grad_q, grad_k, grad_v, grad_ek, grad_ev) + (None,) * len(ctx.params) + (
        grad_rpb if ctx.has_rpb else None,)


na_forward.register_autograd(_backward, setup_context=_setup_context)
