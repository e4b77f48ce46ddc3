"""natgen.merge_attentions: combine partial attention results over disjoint key sets by their log-sum-exps."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def merge_attentions(outputs: Sequence[torch.Tensor], lse_tensors: Sequence[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output, lse) of attention over the union of the key sets that produced each (output, lse) pair.

    outputs: tensors of one shape [..., heads, head_dim] and dtype; lse_tensors: their natural-log LSEs
    [..., heads] (the shape of an output without its last dim). The merge is exact and differentiable, and is
    computed in float32 (float64 for float64 outputs): weight_i = exp(lse_i - lse), lse = log sum exp(lse_i).
    The output has the outputs' dtype, the lse is float32 (as every natgen op returns it)."""
    outputs, lse_tensors = list(outputs), list(lse_tensors)
    if not outputs:
        raise ValueError("outputs is empty: merge_attentions needs at least one partial result")
    if len(outputs) != len(lse_tensors):
        raise ValueError(f"{len(outputs)} outputs but {len(lse_tensors)} lse tensors: pass one lse per output")
    first = outputs[0]
    for index, (out, lse) in enumerate(zip(outputs, lse_tensors)):
        for name, value in (("outputs", out), ("lse_tensors", lse)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}[{index}] must be a torch.Tensor, got {type(value).__name__}")
        if out.shape != first.shape or out.dtype != first.dtype or out.device != first.device:
            raise ValueError(f"outputs[{index}] has shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}; "
                             f"outputs[0] has {tuple(first.shape)}, {first.dtype} on {first.device}: they must agree")
        if out.dim() < 2 or lse.shape != out.shape[:-1]:
            raise ValueError(f"lse_tensors[{index}] has shape {tuple(lse.shape)}; it must be outputs[{index}]'s "
                             f"shape without the last dim, {tuple(out.shape[:-1])}")
        if lse.device != first.device:
            raise ValueError(f"lse_tensors[{index}] is on {lse.device}, the outputs on {first.device}")
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    lses = torch.stack([lse.to(compute) for lse in lse_tensors])
    # the max is a shift only (it cancels), so its gradient is left out
    shift = lses.amax(dim=0).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # all -inf rows: no keys at all
    weights = torch.exp(lses - shift)
    total = weights.sum(dim=0)
    merged = sum(w.unsqueeze(-1) * out.to(compute) for w, out in zip(weights, outputs)) / total.unsqueeze(-1)
    return merged.to(first.dtype), (shift + torch.log(total)).to(torch.float32)
