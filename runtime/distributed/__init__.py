"""natgen.distributed: neighborhood attention over spatially sharded tensors (context parallelism).

    natgen.distributed.na1d / na2d / na3d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False,
        scale=None, additional_keys=None, additional_values=None, return_lse=False, group=None,
        shard_dims=(0,), mesh=None, backend=None)

Each rank passes its slab of the global tensors and gets its slab of the global result; the key/value rows
its queries need from other slabs (the halo, from the window rule) arrive by point-to-point messages, and
their gradients return to their owners in the backward. See docs/distributed.md.
"""
from .exchange import reset_sent_bytes, sent_bytes
from .ops import na1d, na2d, na3d, neighborhood_attention
from .plan import Plan, even_sizes, make_plan

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "make_plan", "Plan", "even_sizes", "sent_bytes",
           "reset_sent_bytes"]
