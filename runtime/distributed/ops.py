"""natgen.distributed.na1d / na2d / na3d: the public op on spatially sharded tensors."""
from __future__ import annotations

import torch.nn.functional as F

from ..ops import na1d as _na1d, na2d as _na2d, na3d as _na3d
from .exchange import halo_exchange, replicated
from .layout import resolve

_LOCAL_OPS = {1: _na1d, 2: _na2d, 3: _na3d}


def neighborhood_attention(rank, q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                           additional_keys=None, additional_values=None, return_lse=False, group=None,
                           shard_dims=(0,), mesh=None, backend=None):
    layout = resolve(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                     additional_values, group, shard_dims, mesh)
    problem, exchange = layout.problem, layout.exchange
    k_region, v_region = halo_exchange(exchange, k, v)
    # queries outside the slab are zeros: their outputs are dropped and their (zero) output gradients add
    # nothing to the key/value gradients
    padding = []
    for (a, b), (lo, hi) in zip(reversed(layout.plan.slab(layout.rank)), reversed(layout.plan.region(layout.rank))):
        padding += [a - lo, hi - b]
    q_region = F.pad(q, [0, 0, 0, 0, *padding])
    out, lse = _LOCAL_OPS[rank](q_region, k_region, v_region, problem.kernel_size, problem.stride,
                                problem.dilation, problem.is_causal, problem.scale,
                                replicated(layout.group, additional_keys), replicated(layout.group, additional_values),
                                return_lse=True, backend=backend)
    out = out[exchange.slab_index].contiguous()
    if not return_lse:
        return out
    return out, lse[exchange.slab_index].contiguous()


def _op(rank):
    def op(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, return_lse=False, group=None, shard_dims=(0,), mesh=None, backend=None):
        return neighborhood_attention(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                                      additional_keys, additional_values, return_lse, group, shard_dims, mesh,
                                      backend)
    op.__name__ = op.__qualname__ = f"na{rank}d"
    op.__doc__ = (f"{rank}-D neighborhood attention over tensors sharded along spatial axes across a process "
                  f"group: q, k, v are this rank's slab [batch, *slab, heads, head_dim] of the global tensors "
                  "(slabs in rank order along shard_dims; with two or three shard_dims, mesh gives the ranks "
                  "per axis, row-major). Returns this rank's slab of the global result (and of the lse). "
                  "Parameters as natgen.na{1,2,3}d; additional_keys/values are replicated on every rank. "
                  "group: a torch.distributed process group (default: the world). backend: the local op's.")
    return op


na1d, na2d, na3d = _op(1), _op(2), _op(3)
