"""The unfused neighborhood ops in torch: logits (qk, with the bias and extra keys) and weighting (av), with
their explicit gradients, on any device.

Layout is heads-first, [batch, heads, *spatial, head_dim]. A query's window slots are those of the gather table
natgen.reference builds from natgen.window (row-major over the per-axis positions counted from each axis's
window start), so the slot order is the window rule's, not a copy of it. Work goes in chunks of queries whose
gathered keys (or values) hold at most _GATHERED_ELEMENTS: the only tensor as large as the logits is the one the
op returns, and the gradients are the size of their inputs.
"""
from __future__ import annotations

import torch

from .problem import Problem
from .reference import bias_index_slots, neighbor_table

# gathered elements per chunk (16 MB in float32), as in the reference
_GATHERED_ELEMENTS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tables(problem: Problem, device):
    index, valid = neighbor_table(problem.spatial, problem.kernel_size, problem.stride, problem.dilation,
                                  problem.is_causal, device)
    bias = bias_index_slots(problem, device) if problem.has_rpb else None
    return index, (valid if any(problem.is_causal) else None), bias


def _chunks(problem: Problem, head_dim: int):
    per_query = problem.batch * problem.heads * problem.window * head_dim
    step = max(1, _GATHERED_ELEMENTS // per_query)
    for first in range(0, problem.num_tokens, step):
        yield first, min(first + step, problem.num_tokens)


def _flat(tensor, problem: Problem, compute):
    return tensor.reshape(problem.batch, problem.heads, problem.num_tokens, tensor.shape[-1]).to(compute)


def _gather(flat, index):
    """flat [batch, heads, N, d] at the chunk's table index [c, W] -> [batch, heads, c, W, d]."""
    return flat.index_select(2, index.reshape(-1)).view(*flat.shape[:2], *index.shape, flat.shape[-1])


def qk_forward(problem: Problem, query, key, additional_keys=None, rpb=None):
    """Logits [batch, heads, *spatial, window + n_extra] in query's dtype: q . k over each window slot (plus
    the bias), -inf where a causal mask hides the slot, then q . extra key."""
    compute, window = _compute_dtype(query.dtype), problem.window
    index, valid, bias_index = _tables(problem, query.device)
    q, k = _flat(query, problem, compute), _flat(key, problem, compute)
    rpb_flat = rpb.reshape(problem.heads, -1).to(compute) if rpb is not None else None
    out = torch.empty(problem.batch, problem.heads, problem.num_tokens, window + problem.n_extra,
                      dtype=query.dtype, device=query.device)
    for first, end in _chunks(problem, problem.head_dim):
        logits = torch.einsum("bhcd,bhcwd->bhcw", q[:, :, first:end], _gather(k, index[first:end]))
        if rpb_flat is not None:
            logits += rpb_flat[:, bias_index[first:end]]
        if valid is not None:
            logits.masked_fill_(~valid[first:end], float("-inf"))
        out[:, :, first:end, :window] = logits
    if problem.n_extra:
        out[..., window:] = torch.einsum("bhnd,bhed->bhne", q, additional_keys.to(compute))
    return out.view(problem.batch, problem.heads, *problem.spatial, -1)


def qk_backward(problem: Problem, query, key, additional_keys, grad, needs=(True, True, True, True)):
    """(grad_query, grad_key, grad_additional_keys, grad_rpb) of qk_forward for the logits' cotangent `grad`;
    slots a causal mask hides are constants and pass no gradient. None where `needs` says not wanted."""
    compute, window = _compute_dtype(query.dtype), problem.window
    index, valid, bias_index = _tables(problem, query.device)
    q, k = _flat(query, problem, compute), _flat(key, problem, compute)
    g = grad.reshape(problem.batch, problem.heads, problem.num_tokens, -1)
    grad_q = torch.zeros_like(q) if needs[0] else None
    grad_k = torch.zeros_like(k) if needs[1] else None
    grad_rpb = (torch.zeros(problem.heads, *(2 * K - 1 for K in problem.kernel_size), dtype=compute,
                            device=query.device) if needs[3] and problem.has_rpb else None)
    for first, end in _chunks(problem, problem.head_dim):
        g_window = g[:, :, first:end, :window].to(compute)
        if valid is not None:
            g_window = g_window.masked_fill(~valid[first:end], 0)
        chunk_index = index[first:end]
        if grad_q is not None:
            grad_q[:, :, first:end] = torch.einsum("bhcw,bhcwd->bhcd", g_window, _gather(k, chunk_index))
        if grad_k is not None:
            contribution = torch.einsum("bhcw,bhcd->bhcwd", g_window, q[:, :, first:end])
            grad_k.index_add_(2, chunk_index.reshape(-1), contribution.flatten(2, 3))
        if grad_rpb is not None:
            grad_rpb.view(problem.heads, -1).index_add_(1, bias_index[first:end].reshape(-1),
                                                        g_window.sum(0).flatten(1, 2))
    grad_extra = None
    if problem.n_extra:
        g_extra = g[..., window:].to(compute)
        extra = additional_keys.to(compute)
        if grad_q is not None:
            grad_q += torch.einsum("bhne,bhed->bhnd", g_extra, extra)
        if needs[2]:
            grad_extra = torch.einsum("bhne,bhnd->bhed", g_extra, q).to(additional_keys.dtype)
    return (None if grad_q is None else grad_q.view(query.shape).to(query.dtype),
            None if grad_k is None else grad_k.view(key.shape).to(key.dtype), grad_extra,
            None if grad_rpb is None else grad_rpb.to(query.dtype))


def av_forward(problem: Problem, attn, value, additional_values=None):
    """[batch, heads, *spatial, head_dim]: each query's window values weighted by its attn slots (slots a
    causal mask hides are ignored), plus the extra values weighted by the trailing slots."""
    compute, window = _compute_dtype(value.dtype), problem.window
    index, valid, _ = _tables(problem, value.device)
    v = _flat(value, problem, compute)
    a = attn.reshape(problem.batch, problem.heads, problem.num_tokens, -1)
    out = torch.empty(problem.batch, problem.heads, problem.num_tokens, problem.head_dim, dtype=compute,
                      device=value.device)
    for first, end in _chunks(problem, problem.head_dim):
        weights = a[:, :, first:end, :window].to(compute)
        if valid is not None:
            weights = weights.masked_fill(~valid[first:end], 0)
        out[:, :, first:end] = torch.einsum("bhcw,bhcwd->bhcd", weights, _gather(v, index[first:end]))
    if problem.n_extra:
        out += torch.einsum("bhne,bhed->bhnd", a[..., window:].to(compute), additional_values.to(compute))
    return out.to(value.dtype).view(value.shape)


def av_backward(problem: Problem, attn, value, additional_values, grad, needs=(True, True, True)):
    """(grad_attn, grad_value, grad_additional_values) of av_forward for the output's cotangent `grad`."""
    compute, window = _compute_dtype(value.dtype), problem.window
    index, valid, _ = _tables(problem, value.device)
    v = _flat(value, problem, compute)
    a = attn.reshape(problem.batch, problem.heads, problem.num_tokens, -1)
    g = _flat(grad, problem, compute)
    grad_attn = torch.zeros(a.shape, dtype=attn.dtype, device=attn.device) if needs[0] else None
    grad_v = torch.zeros_like(v) if needs[1] else None
    for first, end in _chunks(problem, problem.head_dim):
        chunk_index = index[first:end]
        if grad_attn is not None:
            d_weights = torch.einsum("bhcd,bhcwd->bhcw", g[:, :, first:end], _gather(v, chunk_index))
            if valid is not None:
                d_weights = d_weights.masked_fill(~valid[first:end], 0)
            grad_attn[:, :, first:end, :window] = d_weights
        if grad_v is not None:
            weights = a[:, :, first:end, :window].to(compute)
            if valid is not None:
                weights = weights.masked_fill(~valid[first:end], 0)
            contribution = torch.einsum("bhcw,bhcd->bhcwd", weights, g[:, :, first:end])
            grad_v.index_add_(2, chunk_index.reshape(-1), contribution.flatten(2, 3))
    grad_extra = None
    if problem.n_extra:
        extra = additional_values.to(compute)
        if grad_attn is not None:
            grad_attn[..., window:] = torch.einsum("bhnd,bhed->bhne", g, extra)
        if needs[2]:
            grad_extra = torch.einsum("bhne,bhnd->bhed", a[..., window:].to(compute), g).to(additional_values.dtype)
    return (None if grad_attn is None else grad_attn.view(attn.shape),
            None if grad_v is None else grad_v.view(value.shape).to(value.dtype), grad_extra)
