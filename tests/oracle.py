"""Independent dense oracle for neighborhood attention, and the tolerance rule of docs/semantics.md.

Nothing here imports natgen: the oracle is written again from docs/semantics.md so that a misreading of the
contract in the package cannot hide in its own reference. It builds the full [N, N] attention mask and
does an ordinary masked softmax, so it is only for the small problems tests use.
"""

from __future__ import annotations

import itertools

import torch

_EPS = {dtype: torch.finfo(dtype).eps
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

# Why there is a floor at all: the rule compares against "the same math done naively in the input
# dtype", and that naive error can be (close to) zero. For float64 inputs the naive computation IS the
# float64 reference, so its error is exactly 0 and a correct backend that merely sums in another order
# would fail a pure 2x rule; there the floor alone must cover reassociation, which moves a sum of n terms
# by about sqrt(n) ulps (n at worst; windows in tests have up to a few hundred terms): 32 ulps.
# For float32 the naive error already contains that reassociation noise, and the floor only guards
# against a naive error that is small by luck (a tiny tensor, windows of one key): 8 ulps.
# Both are relative to the largest reference value and far below what a wrong neighborhood, scale or
# lost extra token produces (errors of 1e-2 and more). Half-precision naive errors are never near zero,
# so they get no floor.
_FLOOR_ULPS = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 8, torch.float64: 32}


def _per_dim(value, rank):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def _axis_mask(L, K, S, D, causal):
    """[L, L] bool: mask[i][j] is True iff query i sees key j along this axis (the 1-D rule of docs/semantics.md)."""
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        g, ii = i % D, i // D
        members = list(range(g, L, D))  # the group's positions, in order
        Lg = len(members)
        left = K // 2
        right = K // 2 + (K % 2) - 1
        if causal:
            c = min((ii // S) * S + S - 1, Lg - 1)
            start = max(c - (K - 1), 0)
            end = min(ii + 1, Lg)
        else:
            c = min((ii // S) * S + S // 2, Lg - 1)
            start = max(c - left, 0)
            if c + right >= Lg:
                start += Lg - right - c - 1
            end = start + K
        for j in members[start:end]:
            mask[i, j] = True
    return mask


def dense_mask(spatial, kernel_size, stride, dilation, is_causal):
    """[N, N] bool over row-major flattened tokens: the product of the per-axis masks."""
    rank = len(spatial)
    kernel_size, stride, dilation, is_causal = (
        _per_dim(x, rank) for x in (kernel_size, stride, dilation, is_causal))
    mask = torch.ones(1, 1, dtype=torch.bool)
    for L, K, S, D, C in zip(spatial, kernel_size, stride, dilation, is_causal):
        axis = _axis_mask(L, K, S, D, C)
        n = mask.shape[0]
        mask = (mask[:, None, :, None] & axis[None, :, None, :]).reshape(n * L, n * L)
    return mask


def axis_windows(L, K, S, D, causal):
    """Per query i along one axis: the keys it sees, in order (the same 1-D rule as _axis_mask)."""
    mask = _axis_mask(L, K, S, D, causal)
    return [[j for j in range(L) if mask[i, j]] for i in range(L)]


def dense_bias(rpb, spatial, kernel_size, stride=1, dilation=1, is_causal=False):
    """[heads, N, N]: the relative positional bias of every (query, key) pair, 0 where the key is not seen.

    Along each axis the pair (i, j) reads entry K - 1 + (j - i) / D (j - i is a multiple of D in a window);
    the N-D entry is the per-axis entries together (rpb[h, e_0, e_1, ...])."""
    rank = len(spatial)
    kernel_size, stride, dilation, is_causal = (
        _per_dim(x, rank) for x in (kernel_size, stride, dilation, is_causal))
    per_axis = []
    for L, K, S, D, C in zip(spatial, kernel_size, stride, dilation, is_causal):
        entry = torch.zeros(L, L, dtype=torch.long)
        for i, keys in enumerate(axis_windows(L, K, S, D, C)):
            for j in keys:
                assert (j - i) % D == 0 and abs(j - i) // D <= K - 1
                entry[i, j] = K - 1 + (j - i) // D
        per_axis.append(entry)
    coords = list(itertools.product(*[range(L) for L in spatial]))  # row-major token order
    n = len(coords)
    index = torch.zeros(n, n, rank, dtype=torch.long)
    for a in range(rank):
        axis_i = torch.tensor([c[a] for c in coords])
        index[:, :, a] = per_axis[a][axis_i[:, None], axis_i[None, :]]
    return rpb[(slice(None), *[index[:, :, a] for a in range(rank)])]


def dense_oracle(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                 additional_keys=None, additional_values=None, compute_dtype=torch.float64, rpb=None):
    """(out [batch, *spatial, heads, head_dim_v], lse [batch, *spatial, heads]), both in compute_dtype.

    k and v (and the extra tokens) may have fewer heads than q (grouped-query attention): they are repeated
    so that query head h meets kv head h // (heads // heads_kv), and autograd sums their gradients back."""
    group = q.shape[-2] // k.shape[-2]
    if group != 1:
        k, v = k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)
        if additional_keys is not None:
            additional_keys = additional_keys.repeat_interleave(group, dim=-2)
            additional_values = additional_values.repeat_interleave(group, dim=-2)
    rank = q.dim() - 3
    batch, spatial, heads, head_dim = q.shape[0], tuple(q.shape[1:1 + rank]), q.shape[-2], q.shape[-1]
    num_tokens = 1
    for extent in spatial:
        num_tokens *= extent
    if scale is None:
        scale = head_dim ** -0.5
    mask = dense_mask(spatial, kernel_size, stride, dilation, is_causal).to(q.device)

    queries = q.reshape(batch, num_tokens, heads, head_dim).to(compute_dtype)
    keys = k.reshape(batch, num_tokens, heads, head_dim).to(compute_dtype)
    values = v.reshape(batch, num_tokens, heads, v.shape[-1]).to(compute_dtype)
    logits = torch.einsum("bihd,bjhd->bhij", queries, keys) * scale
    if rpb is not None:
        logits = logits + dense_bias(rpb.to(compute_dtype), spatial, kernel_size, stride, dilation, is_causal)
    logits = logits.masked_fill(~mask, float("-inf"))
    if additional_keys is not None:
        extra_logits = torch.einsum("bihd,behd->bhie", queries,
                                    additional_keys.to(compute_dtype)) * scale
        logits = torch.cat([logits, extra_logits], dim=-1)
        values = torch.cat([values, additional_values.to(compute_dtype)], dim=1)

    row_max = logits.amax(dim=-1, keepdim=True).detach()
    exp_logits = torch.exp(logits - row_max)
    denominator = exp_logits.sum(dim=-1, keepdim=True)
    probabilities = exp_logits / denominator
    out = torch.einsum("bhij,bjhd->bihd", probabilities, values)
    lse = (row_max + torch.log(denominator)).squeeze(-1).transpose(1, 2)
    return (out.reshape(batch, *spatial, heads, values.shape[-1]),
            lse.reshape(batch, *spatial, heads))


def _max_abs_error(value, reference):
    if reference.numel() == 0:
        return 0.0
    return (value.detach().double() - reference.detach().double()).abs().max().item()


def _floor(dtype, reference):
    magnitude = reference.detach().abs().max().item() if reference.numel() else 0.0
    return _FLOOR_ULPS[dtype] * _EPS[dtype] * max(magnitude, 1.0)


def check_by_rule(name, value, reference, naive, dtype, extra_tolerance=0.0):
    """Raise AssertionError unless max|value-ref| <= 2 max|naive-ref| + floor (+ extra_tolerance)."""
    error = _max_abs_error(value, reference)
    naive_error = _max_abs_error(naive, reference)
    floor = _floor(dtype, reference)
    bound = 2.0 * naive_error + floor + extra_tolerance
    assert error <= bound, (
        f"{name}: max error {error:.3e} vs float64 oracle exceeds 2 x naive {str(dtype)[6:]} "
        f"error {naive_error:.3e} + floor {floor:.1e}" +
        (f" + {extra_tolerance:.1e}" if extra_tolerance else "") + f" = {bound:.3e}")


def assert_close_by_rule(out, q, k, v, lse=None, **params):
    """Check `out` (and `lse` if given) from a backend against the float64 oracle by the 2x-naive rule.

    params: kernel_size, stride, dilation, is_causal, scale, additional_keys, additional_values.
    """
    dtype = q.dtype
    ref_out, ref_lse = dense_oracle(q, k, v, compute_dtype=torch.float64, **params)
    naive_out, naive_lse = dense_oracle(q, k, v, compute_dtype=dtype, **params)
    assert out.shape == ref_out.shape, f"out shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    assert out.dtype == dtype, f"out dtype {out.dtype} != input dtype {dtype}"
    check_by_rule("out", out, ref_out, naive_out.to(dtype), dtype)
    if lse is not None:
        assert lse.shape == ref_lse.shape, f"lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
        assert lse.dtype == torch.float32, f"lse dtype {lse.dtype} != float32"
        # The contract stores lse in float32 whatever the input dtype, so one float32 rounding of the
        # reference is part of a correct answer even for float64 inputs.
        storage_rounding = _EPS[torch.float32] * ref_lse.abs().max().item()
        check_by_rule("lse", lse, ref_lse, naive_lse.to(dtype), dtype, storage_rounding)


def _random_cotangent(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _grads(forward, tensors, cotangent, lse_cotangent=None):
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    result = forward(**leaves)
    out = result[0] if isinstance(result, tuple) else result
    outputs, cotangents = [out], [cotangent.to(out.dtype)]
    if lse_cotangent is not None:
        lse = result[1]
        outputs.append(lse)
        cotangents.append(lse_cotangent.to(lse.dtype))
    names = list(leaves)
    grads = torch.autograd.grad(outputs, [leaves[n] for n in names], cotangents, allow_unused=True)
    return dict(zip(names, grads))


def _grad_inputs(q, k, v, seed, lse_cotangent, params):
    extra_keys = params.pop("additional_keys", None)
    extra_values = params.pop("additional_values", None)
    rpb = params.pop("rpb", None)
    tensors = {"q": q, "k": k, "v": v}
    if extra_keys is not None:
        tensors.update(additional_keys=extra_keys, additional_values=extra_values)
    if rpb is not None:
        tensors.update(rpb=rpb)
    cotangent = _random_cotangent((*q.shape[:-1], v.shape[-1]), q.dtype, seed)
    lse_grad = _random_cotangent(q.shape[:-1], torch.float32, seed + 1) if lse_cotangent else None
    return tensors, cotangent, lse_grad


def grads_of(forward, q, k, v, seed=0, lse_cotangent=False, **params):
    """The gradients of `forward` that assert_grads_close_by_rule checks (same cotangents), as a tuple in the
    order q, k, v[, additional_keys, additional_values]: to run the tested backend once (or under several
    schedules) and hand the result over as `tested`."""
    tensors, cotangent, lse_grad = _grad_inputs(q, k, v, seed, lse_cotangent, params)
    return tuple(_grads(forward, tensors, cotangent, lse_grad).values())


def assert_grads_close_by_rule(forward, q, k, v, seed=0, lse_cotangent=False, tested=None, **params):
    """Compare gradients of `forward` with the oracle's for one fixed random cotangent of the output.

    forward(q=, k=, v=, additional_keys=, additional_values=, rpb=) must return out (or (out, lse)); it is
    the backend under test with every other parameter already bound. The naive gradients are autograd
    through the dense oracle run in the input dtype, the reference ones through it in float64, both
    from the same (input-dtype) tensors and cotangent so only arithmetic differs. With lse_cotangent=True
    forward must return (out, lse), and a second fixed random cotangent (float32, as the lse is) flows
    into the lse as well. `tested`: the backend's gradients already computed by grads_of (forward is then
    not called).
    """
    dtype = q.dtype
    tensors, cotangent, lse_grad = _grad_inputs(q, k, v, seed, lse_cotangent, params)

    def oracle_in(compute_dtype):
        return lambda **t: dense_oracle(**t, compute_dtype=compute_dtype, **params)

    tested = (_grads(forward, tensors, cotangent, lse_grad) if tested is None
              else dict(zip(tensors, tested)))
    reference = _grads(oracle_in(torch.float64), tensors, cotangent, lse_grad)
    naive = _grads(oracle_in(dtype), tensors, cotangent, lse_grad)
    for name in tensors:
        assert tested[name] is not None, f"d out / d {name} is missing (not differentiable?)"
        assert tested[name].shape == tensors[name].shape, (
            f"grad of {name}: shape {tuple(tested[name].shape)} != {tuple(tensors[name].shape)}")
        assert tested[name].dtype == tensors[name].dtype, (
            f"grad of {name}: dtype {tested[name].dtype} != {tensors[name].dtype}")
        check_by_rule(f"grad of {name}", tested[name], reference[name], naive[name], dtype)


def _window_slots(spatial, kernel_size, dilation, is_causal):
    """Per row-major query: a list over the prod(K) slots (row-major over per-axis positions counted from each
    axis's window start) of (flat key index or None where a causal window has no key, per-axis bias entry)."""
    rank = len(spatial)
    kernel_size, dilation, is_causal = (_per_dim(x, rank) for x in (kernel_size, dilation, is_causal))
    windows = [axis_windows(L, K, 1, D, C) for L, K, D, C in zip(spatial, kernel_size, dilation, is_causal)]
    slots = []
    for coords in itertools.product(*[range(L) for L in spatial]):
        row = []
        for positions in itertools.product(*[range(K) for K in kernel_size]):
            key, entry = 0, []
            for a, t in enumerate(positions):
                keys = windows[a][coords[a]]
                if t >= len(keys):
                    key = None
                    break
                key = key * spatial[a] + keys[t]
                entry.append(kernel_size[a] - 1 + (keys[t] - coords[a]) // dilation[a])
            row.append((key, tuple(entry)))
        slots.append(row)
    return slots


def unfused_qk_oracle(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, additional_keys=None,
                      compute_dtype=torch.float64):
    """Logits [batch, heads, *spatial, prod(K) + n_extra] of heads-first query/key, slot by slot."""
    batch, heads = query.shape[:2]
    spatial = tuple(query.shape[2:-1])
    q = query.reshape(batch, heads, -1, query.shape[-1]).to(compute_dtype)
    k = key.reshape(batch, heads, -1, key.shape[-1]).to(compute_dtype)
    columns = []
    for n, row in enumerate(_window_slots(spatial, kernel_size, dilation, is_causal)):
        values = []
        for key_index, entry in row:
            if key_index is None:
                values.append(torch.full((batch, heads), float("-inf"), dtype=compute_dtype))
                continue
            logit = (q[:, :, n] * k[:, :, key_index]).sum(-1)
            if rpb is not None:
                logit = logit + rpb.to(compute_dtype)[(slice(None), *entry)]
            values.append(logit)
        if additional_keys is not None:
            values += list((q[:, :, n, None] * additional_keys.to(compute_dtype)).sum(-1).unbind(-1))
        columns.append(torch.stack(values, dim=-1))
    return torch.stack(columns, dim=2).reshape(batch, heads, *spatial, -1)


def unfused_av_oracle(attn, value, kernel_size, dilation=1, is_causal=False, additional_values=None,
                      compute_dtype=torch.float64):
    """[batch, heads, *spatial, head_dim]: the attn slots weighting their keys' values."""
    batch, heads = value.shape[:2]
    spatial = tuple(value.shape[2:-1])
    v = value.reshape(batch, heads, -1, value.shape[-1]).to(compute_dtype)
    a = attn.reshape(batch, heads, v.shape[2], -1).to(compute_dtype)
    rows = []
    for n, row in enumerate(_window_slots(spatial, kernel_size, dilation, is_causal)):
        total = torch.zeros(batch, heads, v.shape[-1], dtype=compute_dtype)
        for slot, (key_index, _) in enumerate(row):
            if key_index is not None:
                total = total + a[:, :, n, slot, None] * v[:, :, key_index]
        if additional_values is not None:
            total = total + (a[:, :, n, len(row):, None] * additional_values.to(compute_dtype)).sum(2)
        rows.append(total)
    return torch.stack(rows, dim=2).reshape(value.shape)
