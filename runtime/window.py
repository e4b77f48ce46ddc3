"""The per-axis neighborhood rule (docs/semantics.md), once: a scalar form and a torch-vectorized form.

Everything in natgen that needs to know which keys a query sees along one axis reads it from here: the
reference backend's gather tables, the selector's wasted-work model, the flex_attention mask of the
benchmarks and the halo plans of the distributed ops. (The tests keep an oracle of their own.)

Along one axis of length L with window K, stride S, dilation D and causal flag C, query i belongs to the
dilation group g = i % D and sees the keys j with j % D == g and start <= j // D < end, where (start, end)
are group-local coordinates returned below. Non-causal windows hold exactly K keys: at the far border the
window slides inward instead of shrinking.
"""
from __future__ import annotations

import torch


def window_1d(i: int, L: int, K: int, S: int, D: int, C: bool) -> tuple[int, int, int]:
    """(group, start, end) of query i's keys along one axis, start/end in group-local coordinates."""
    group = i % D
    local = i // D
    group_length = L // D + (1 if group < L % D else 0)
    left = K // 2
    right = K // 2 + (K % 2) - 1
    if not C:
        # the whole stride group shares one centre; at the far border the window slides inward
        centre = min((local // S) * S + S // 2, group_length - 1)
        start = max(centre - left, 0)
        if centre + right >= group_length:
            start += group_length - right - centre - 1
        end = start + K
    else:
        centre = min((local // S) * S + S - 1, group_length - 1)
        start = max(centre - left - right, 0)
        end = min(local + 1, group_length)
    return group, start, end


def window_1d_tensor(i: torch.Tensor, L, K: int, S: int, D: int, C: bool):
    """window_1d for a tensor of positions (any integer dtype, any device): (group, start, end) tensors.

    L may be an int or a tensor broadcastable against i."""
    group = i % D
    local = i // D
    group_length = L // D + (group < L % D).to(i.dtype)
    left = K // 2
    right = K // 2 + (K % 2) - 1
    if not C:
        centre = torch.minimum((local // S) * S + S // 2, group_length - 1)
        start = torch.clamp(centre - left, min=0)
        start = start + torch.where(centre + right >= group_length, group_length - right - centre - 1, 0)
        end = start + K
    else:
        centre = torch.minimum((local // S) * S + S - 1, group_length - 1)
        start = torch.clamp(centre - left - right, min=0)
        end = torch.minimum(local + 1, group_length)
    return group, start, end


def sees_1d(i: torch.Tensor, j: torch.Tensor, L, K: int, S: int, D: int, C: bool) -> torch.Tensor:
    """Boolean tensor: does query i see key j along this axis (i and j broadcast against each other)."""
    group, start, end = window_1d_tensor(i, L, K, S, D, C)
    key_local = j // D
    return (j % D == group) & (key_local >= start) & (key_local < end)
