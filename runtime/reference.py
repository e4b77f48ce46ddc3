"""Pure-torch neighborhood attention: the slow, obviously-correct backend every other one is checked
against at sizes the dense float64 test oracle cannot reach.

It never forms an N x N matrix. Each query's neighbors come from a gather table of shape [N, prod(K)],
built per axis from the 1-D rule of docs/semantics.md and combined by broadcasting (the N-D window is the
product of the per-axis windows). Queries are processed in chunks so the gathered keys and values of
one chunk, not of the whole problem, bound the peak memory; under autograd each chunk is checkpointed
so backward regathers instead of keeping prod(K) copies of k and v alive.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.utils.checkpoint

from .problem import Problem
from .window import window_1d_tensor

# Elements of gathered keys + values per chunk (16 MB in float32): the peak memory of a forward pass is
# a few times this, while chunks stay large enough that per-chunk Python overhead does not matter.
_GATHERED_ELEMENTS_PER_CHUNK = 1 << 22


@functools.lru_cache(maxsize=64)
def _axis_table(L: int, K: int, S: int, D: int, C: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (global coordinates along the axis) [L, K] and their validity [L, K] for one axis.

    `window.window_1d_tensor` applied to every position at once.
    """
    position = torch.arange(L)
    group, start, end = window_1d_tensor(position, L, K, S, D, C)
    local_key = start[:, None] + torch.arange(K)[None, :]
    valid = local_key < end[:, None]
    # Padded slots point at the window's first key so gathers stay in bounds; `valid` masks them.
    local_key = torch.where(valid, local_key, start[:, None])
    return local_key * D + group[:, None], valid


def _neighbors(spatial, axis_tables, first_query: int, end_query: int, device):
    """Flat key indices [q, W] and validity [q, W] for the flat query range [first_query, end_query)."""
    flat_query = torch.arange(first_query, end_query, device=device)
    coords = []
    for extent in reversed(spatial):
        coords.append(flat_query % extent)
        flat_query = flat_query // extent
    coords.reverse()

    count = end_query - first_query
    key_index = torch.zeros(count, 1, dtype=torch.long, device=device)
    valid = torch.ones(count, 1, dtype=torch.bool, device=device)
    for axis, (keys, keys_valid) in enumerate(axis_tables):
        row_stride = math.prod(spatial[axis + 1:])
        axis_keys = keys.to(device)[coords[axis]] * row_stride
        axis_valid = keys_valid.to(device)[coords[axis]]
        key_index = (key_index[:, :, None] + axis_keys[:, None, :]).reshape(count, -1)
        valid = (valid[:, :, None] & axis_valid[:, None, :]).reshape(count, -1)
    return key_index, valid


@functools.lru_cache(maxsize=64)
def _axis_bias_table(L: int, K: int, S: int, D: int, C: bool) -> torch.Tensor:
    """[L, K]: the bias index K - 1 + (j - i) // D of each key slot along one axis (padded slots: that of
    the window's first key, masked anyway)."""
    keys, _ = _axis_table(L, K, S, D, C)
    return K - 1 + torch.div(keys - torch.arange(L)[:, None], D, rounding_mode="floor")


def _bias_index(spatial, kernel_size, stride, dilation, is_causal, first_query: int, end_query: int, device):
    """[q, W]: the flat index into one head's bias [2*K_0-1, ...] of each neighbor of the flat queries
    [first_query, end_query) (the per-axis indices combined row-major, like the window slots)."""
    flat_query = torch.arange(first_query, end_query, device=device)
    coords = []
    for extent in reversed(spatial):
        coords.append(flat_query % extent)
        flat_query = flat_query // extent
    coords.reverse()
    count = end_query - first_query
    index = torch.zeros(count, 1, dtype=torch.long, device=device)
    for axis, (L, K, S, D, C) in enumerate(zip(spatial, kernel_size, stride, dilation, is_causal)):
        axis_index = _axis_bias_table(int(L), int(K), int(S), int(D), bool(C)).to(device)[coords[axis]]
        index = (index[:, :, None] * (2 * K - 1) + axis_index[:, None, :]).reshape(count, -1)
    return index


def _chunk_bias(problem: Problem, rpb_flat, first: int, end: int, heads_kv: int, device):
    """The chunk's bias [q, heads_kv, group, window] from rpb_flat [heads, prod(2K-1)], or None."""
    if rpb_flat is None:
        return None
    index = _bias_index(problem.spatial, problem.kernel_size, problem.stride, problem.dilation,
                        problem.is_causal, first, end, device)
    bias = rpb_flat[:, index]  # [heads, q, window]
    return bias.view(heads_kv, -1, *index.shape).permute(2, 0, 1, 3)


def bias_index_slots(problem: Problem, device=None) -> torch.Tensor:
    """[N, W]: the flat bias index of every (query, window slot) of a problem (the unfused ops gather and
    scatter the bias with it)."""
    return _bias_index(problem.spatial, problem.kernel_size, problem.stride, problem.dilation, problem.is_causal,
                       0, problem.num_tokens, torch.device(device or "cpu"))


def _axis_tables(spatial, kernel_size, stride, dilation, is_causal):
    return [_axis_table(int(L), int(K), int(S), int(D), bool(C))
            for L, K, S, D, C in zip(spatial, kernel_size, stride, dilation, is_causal)]


@functools.lru_cache(maxsize=16)
def _cached_neighbor_table(spatial, kernel_size, stride, dilation, is_causal, device):
    tables = _axis_tables(spatial, kernel_size, stride, dilation, is_causal)
    return _neighbors(spatial, tables, 0, math.prod(spatial), device)


def neighbor_table(spatial, kernel_size, stride, dilation, is_causal, device=None):
    """(idx LongTensor [N, W], valid BoolTensor [N, W]): row-major flat key index of each neighbor.

    Entries with valid=False are padding (a causal window with fewer than prod(K) keys); their idx is a
    real key of the same window, so gathers never go out of bounds. The tensors are cached and shared:
    do not modify them in place.
    """
    rank = len(spatial)

    def per_dim(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank

    return _cached_neighbor_table(
        tuple(int(x) for x in spatial), tuple(int(x) for x in per_dim(kernel_size)),
        tuple(int(x) for x in per_dim(stride)), tuple(int(x) for x in per_dim(dilation)),
        tuple(bool(x) for x in per_dim(is_causal)), torch.device(device or "cpu"))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(queries, k_flat, v_flat, key_index, valid, scale, extra_keys, bias=None):
    """The chunk's gathered keys and values and its scaled logits (plus the bias [q, heads_kv, group, window]
    where given), heads grouped by key/value head.

    queries [batch, q, heads, head_dim] -> (queries [batch, q, heads_kv, group, head_dim], keys and values
    [batch, q, window, heads_kv, d], flat key index, logits [batch, q, heads_kv, group, window + n_extra]).
    Query head h reads kv head h // group: indexed, never repeated. valid is None when no window is padded
    (non-causal), which skips the mask."""
    batch, count, heads, head_dim = queries.shape
    heads_kv = k_flat.shape[2]
    queries = queries.view(batch, count, heads_kv, heads // heads_kv, head_dim)
    window = key_index.shape[1]
    flat_index = key_index.reshape(-1)
    keys = k_flat.index_select(1, flat_index).view(batch, count, window, heads_kv, -1)
    values = v_flat.index_select(1, flat_index).view(batch, count, window, heads_kv, -1)
    logits = torch.einsum("bqhgd,bqwhd->bqhgw", queries, keys) * scale
    if bias is not None:
        logits = logits + bias
    if valid is not None:
        logits = logits.masked_fill(~valid[None, :, None, None, :], float("-inf"))
    if extra_keys is not None:
        logits = torch.cat([logits, torch.einsum("bqhgd,behd->bqhge", queries, extra_keys) * scale], dim=-1)
    return queries, keys, values, flat_index, logits


def _attend_chunk(queries, k_flat, v_flat, key_index, valid, scale, extra_keys, extra_values, bias=None):
    """(out [batch, q, heads, head_dim_v], lse [batch, q, heads]) for one chunk of q queries."""
    _, _, values, _, logits = _chunk_logits(queries, k_flat, v_flat, key_index, valid, scale, extra_keys, bias)
    window = key_index.shape[1]
    # Every query sees at least itself, so the row max is finite and no row is all -inf. Detaching it
    # is exact: out and lse do not depend on the shift, and amax's gradient would only add noise.
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(logits - row_max)
    denominator = weights.sum(dim=-1, keepdim=True)
    out = torch.einsum("bqhgw,bqwhd->bqhgd", weights[..., :window], values)
    if extra_keys is not None:
        out = out + torch.einsum("bqhge,behd->bqhgd", weights[..., window:], extra_values)
    return (out / denominator).flatten(2, 3), (row_max + torch.log(denominator)).squeeze(-1).flatten(2, 3)


def _rpb_flat(rpb, problem: Problem, compute_dtype):
    if (rpb is not None) != problem.has_rpb:
        raise ValueError(f"problem has_rpb={problem.has_rpb} but rpb is {'given' if rpb is not None else 'None'}")
    return None if rpb is None else rpb.reshape(problem.heads, -1).to(compute_dtype)


def na_reference(q, k, v, problem: Problem, additional_keys=None, additional_values=None,
                 return_lse=False, rpb=None):
    """Neighborhood attention per docs/semantics.md with plain torch ops (differentiable in every input).

    Returns out [batch, *spatial, heads, head_dim_v] in q's dtype, and with return_lse also
    lse [batch, *spatial, heads] in float32.
    """
    expected_q = (problem.batch, *problem.spatial, problem.heads, problem.head_dim)
    if tuple(q.shape) != expected_q:
        raise ValueError(f"q.shape={tuple(q.shape)} does not match the problem's {expected_q}")
    given_extra = 0 if additional_keys is None else additional_keys.shape[1]
    if given_extra != problem.n_extra or (additional_keys is None) != (additional_values is None):
        raise ValueError(
            f"problem has n_extra={problem.n_extra} but additional_keys gives {given_extra} "
            f"(additional_values {'missing' if additional_values is None else 'given'})")

    batch, heads = problem.batch, problem.heads
    num_tokens, window = problem.num_tokens, problem.window
    compute_dtype = _compute_dtype(q.dtype)

    # reshape copies non-contiguous inputs (and is a view otherwise), so strides never matter below.
    heads_kv = problem.heads_kv
    q_flat = q.reshape(batch, num_tokens, heads, problem.head_dim).to(compute_dtype)
    k_flat = k.reshape(batch, num_tokens, heads_kv, problem.head_dim).to(compute_dtype)
    v_flat = v.reshape(batch, num_tokens, heads_kv, problem.head_dim_v).to(compute_dtype)
    has_extra = additional_keys is not None and additional_keys.shape[1] > 0
    if has_extra:
        extra_keys = additional_keys.to(compute_dtype)
        extra_values = additional_values.to(compute_dtype)

    rpb_flat = _rpb_flat(rpb, problem, compute_dtype)

    axis_tables = _axis_tables(problem.spatial, problem.kernel_size, problem.stride,
                               problem.dilation, problem.is_causal)
    any_padding = any(problem.is_causal)
    per_query = batch * window * (heads * 2 + heads_kv * (problem.head_dim + problem.head_dim_v))
    chunk = max(1, _GATHERED_ELEMENTS_PER_CHUNK // per_query)

    # With autograd, each chunk's gathered keys and values would be saved for backward, i.e. prod(K)
    # copies of k and v in total; checkpointing keeps only the chunk's inputs and regathers in backward.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, additional_keys, additional_values, rpb))

    outputs, lses = [], []
    for first in range(0, num_tokens, chunk):
        end = min(first + chunk, num_tokens)
        key_index, valid = _neighbors(problem.spatial, axis_tables, first, end, q.device)
        arguments = (q_flat[:, first:end], k_flat, v_flat, key_index,
                     valid if any_padding else None, problem.scale,
                     extra_keys if has_extra else None, extra_values if has_extra else None,
                     _chunk_bias(problem, rpb_flat, first, end, heads_kv, q.device))
        if needs_grad:
            out, lse = torch.utils.checkpoint.checkpoint(_attend_chunk, *arguments,
                                                         use_reentrant=False)
        else:
            out, lse = _attend_chunk(*arguments)
        outputs.append(out)
        lses.append(lse)

    out = torch.cat(outputs, dim=1).reshape(batch, *problem.spatial, heads, problem.head_dim_v)
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1).reshape(batch, *problem.spatial, heads).to(torch.float32)
    return out, lse


def _backward_chunk(queries, k_flat, v_flat, key_index, valid, scale, extra_keys, extra_values, grad_out,
                    grad_lse, grads, bias=None):
    """Accumulate one chunk's gradients into grads = [dq chunk out, dk, dv, d extra_k, d extra_v] (explicit
    formulas, no autograd: dS = P * (dP - rowsum(dO * O) + d lse)). With a bias, also returns the bias's
    gradient per (query, slot): dS before the softmax scale, summed over the batch, [q, heads_kv, group, window]."""
    batch, count, heads, head_dim = queries.shape
    queries, keys, values, flat_index, logits = _chunk_logits(queries, k_flat, v_flat, key_index, valid, scale,
                                                              extra_keys, bias)
    heads_kv, group, window = queries.shape[2], queries.shape[3], key_index.shape[1]
    grad_out = grad_out.reshape(batch, count, heads_kv, group, -1)
    probabilities = torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))
    p_window, p_extra = probabilities[..., :window], probabilities[..., window:]
    out = torch.einsum("bqhgw,bqwhd->bqhgd", p_window, values)
    d_probabilities = torch.einsum("bqhgd,bqwhd->bqhgw", grad_out, values)
    if extra_keys is not None:
        out = out + torch.einsum("bqhge,behd->bqhgd", p_extra, extra_values)
        d_probabilities = torch.cat([d_probabilities, torch.einsum("bqhgd,behd->bqhge", grad_out, extra_values)],
                                    dim=-1)
    shift = (grad_out * out).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        shift = shift - grad_lse.reshape(batch, count, heads_kv, group, 1)
    d_biased = probabilities * (d_probabilities - shift)  # the gradient of the logits the bias is added to
    d_logits = d_biased * scale
    ds_window, ds_extra = d_logits[..., :window], d_logits[..., window:]
    grad_q = torch.einsum("bqhgw,bqwhd->bqhgd", ds_window, keys)
    grad_keys = torch.einsum("bqhgw,bqhgd->bqwhd", ds_window, queries).reshape(batch, count * window, heads_kv, -1)
    grad_values = torch.einsum("bqhgw,bqhgd->bqwhd", p_window, grad_out).reshape(batch, count * window,
                                                                                 heads_kv, -1)
    grads[1].index_add_(1, flat_index, grad_keys)
    grads[2].index_add_(1, flat_index, grad_values)
    if extra_keys is not None:
        grad_q = grad_q + torch.einsum("bqhge,behd->bqhgd", ds_extra, extra_keys)
        grads[3] += torch.einsum("bqhge,bqhgd->behd", ds_extra, queries)
        grads[4] += torch.einsum("bqhge,bqhgd->behd", p_extra, grad_out)
    d_bias = d_biased[..., :window].sum(dim=0) if bias is not None else None
    return grad_q.reshape(batch, count, heads, head_dim), d_bias


def na_reference_backward(q, k, v, problem: Problem, additional_keys, additional_values, grad_out,
                          grad_lse=None, rpb=None):
    """(grad_q, grad_k, grad_v, grad_extra_k, grad_extra_v, grad_rpb) of na_reference for the cotangents of
    its out (and lse), by explicit formulas chunk by chunk (O(N * window) memory like the forward,
    deterministic). Extra-token grads are None when there are none, grad_rpb when there is no bias; grad_rpb
    sums over batch and queries, into the bias slot each (query, key) pair reads."""
    batch, heads, heads_kv = problem.batch, problem.heads, problem.heads_kv
    num_tokens = problem.num_tokens
    compute_dtype = _compute_dtype(q.dtype)
    q_flat = q.reshape(batch, num_tokens, heads, problem.head_dim).to(compute_dtype)
    k_flat = k.reshape(batch, num_tokens, heads_kv, problem.head_dim).to(compute_dtype)
    v_flat = v.reshape(batch, num_tokens, heads_kv, problem.head_dim_v).to(compute_dtype)
    do_flat = grad_out.reshape(batch, num_tokens, heads, problem.head_dim_v).to(compute_dtype)
    dlse_flat = None if grad_lse is None else grad_lse.reshape(batch, num_tokens, heads).to(compute_dtype)
    has_extra = additional_keys is not None and additional_keys.shape[1] > 0
    extra_keys = additional_keys.to(compute_dtype) if has_extra else None
    extra_values = additional_values.to(compute_dtype) if has_extra else None
    grads = [None, torch.zeros_like(k_flat), torch.zeros_like(v_flat),
             torch.zeros_like(extra_keys) if has_extra else None,
             torch.zeros_like(extra_values) if has_extra else None]
    rpb_flat = _rpb_flat(rpb, problem, compute_dtype)
    grad_rpb = torch.zeros_like(rpb_flat) if rpb_flat is not None else None
    axis_tables = _axis_tables(problem.spatial, problem.kernel_size, problem.stride, problem.dilation,
                               problem.is_causal)
    any_padding = any(problem.is_causal)
    window = problem.window
    per_query = batch * window * (heads * 4 + heads_kv * 2 * (problem.head_dim + problem.head_dim_v))
    chunk = max(1, _GATHERED_ELEMENTS_PER_CHUNK // per_query)
    grad_q = []
    for first in range(0, num_tokens, chunk):
        end = min(first + chunk, num_tokens)
        key_index, valid = _neighbors(problem.spatial, axis_tables, first, end, q.device)
        bias = _chunk_bias(problem, rpb_flat, first, end, heads_kv, q.device)
        chunk_grad_q, d_bias = _backward_chunk(q_flat[:, first:end], k_flat, v_flat, key_index,
                                               valid if any_padding else None, problem.scale, extra_keys,
                                               extra_values, do_flat[:, first:end],
                                               None if dlse_flat is None else dlse_flat[:, first:end], grads, bias)
        grad_q.append(chunk_grad_q)
        if d_bias is not None:
            # masked slots have P = 0, so their (in-window, valid-index) bias slot receives exactly 0
            index = _bias_index(problem.spatial, problem.kernel_size, problem.stride, problem.dilation,
                                problem.is_causal, first, end, q.device)
            d_bias = d_bias.permute(1, 2, 0, 3).reshape(heads, -1)
            grad_rpb.index_add_(1, index.reshape(-1), d_bias)
    result = [torch.cat(grad_q, dim=1).reshape(q.shape).to(q.dtype), grads[1].reshape(k.shape).to(k.dtype),
              grads[2].reshape(v.shape).to(v.dtype)]
    if has_extra:
        result += [grads[3].to(additional_keys.dtype), grads[4].to(additional_values.dtype)]
    elif additional_keys is not None:  # zero extra tokens
        result += [torch.zeros_like(additional_keys), torch.zeros_like(additional_values)]
    else:
        result += [None, None]
    result.append(None if grad_rpb is None else grad_rpb.reshape(rpb.shape).to(rpb.dtype))
    return tuple(result)
