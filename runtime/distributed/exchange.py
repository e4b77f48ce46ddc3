"""Halo exchange as autograd functions over point-to-point ops (batch_isend_irecv: NCCL or gloo).

The forward sends each needer the key/value rows it needs (one message per peer: keys and values flattened
into one buffer) and assembles the region tensor the local op runs on; the backward sends the gradients of
those rows back to their owners, which add them to the gradient of their own slab. Replicated inputs (the
extra tokens) go through `replicated`, whose gradient is the sum over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# payload bytes handed to isend by this process, per direction: what `sent_bytes` reports
_SENT = {"forward": 0, "backward": 0}


def sent_bytes() -> dict:
    """{"forward": n, "backward": n}: key/value (and gradient) bytes this process has sent since the last
    reset_sent_bytes(); all-reduces of extra-token gradients are not counted."""
    return dict(_SENT)


def reset_sent_bytes() -> None:
    for direction in _SENT:
        _SENT[direction] = 0


def _index(rows):
    """Index for x[:, <spatial>, ...]: slices where every axis is a contiguous range, else broadcast index
    tensors on every axis (adjacent advanced indices keep the axes in place)."""
    spans = [(int(r[0]), int(r[-1]) + 1) for r in rows]
    if all(stop - start == len(r) for (start, stop), r in zip(spans, rows)):
        return (slice(None), *[slice(start, stop) for start, stop in spans])
    n = len(rows)
    return (slice(None), *[r.reshape([-1 if a == axis else 1 for a in range(n)])
                           for axis, r in enumerate(rows)])


@dataclass(frozen=True)
class Route:
    """One message: the peer's global rank, and the index of the rows in the local tensor it reads from
    (a send) or writes to (a receive), with their extent per spatial axis."""
    peer: int
    index: tuple
    extent: tuple[int, ...]


@dataclass(frozen=True)
class Exchange:
    """What one rank sends and receives in the forward; the backward runs the same routes reversed."""
    group: object
    sends: tuple[Route, ...]        # index into this rank's slab
    receives: tuple[Route, ...]     # index into the region tensor
    region: tuple[int, ...]         # spatial extent of the region tensor
    slab_index: tuple               # where this rank's slab lies in the region tensor


def _message_size(x_tail, extent, batch):
    return batch * math.prod(extent) * x_tail


def _run(group, sends, receives):
    """sends: [(global peer, tensor)]; receives: [(global peer, buffer)]. Blocks until all are done."""
    ops = [dist.P2POp(dist.isend, tensor, peer, group) for peer, tensor in sends]
    ops += [dist.P2POp(dist.irecv, buffer, peer, group) for peer, buffer in receives]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def _pack(k, v, index):
    return torch.cat([k[index].reshape(-1), v[index].reshape(-1)])


def _unpack(buffer, k_like, v_like, extent):
    batch = k_like.shape[0]
    k_shape = (batch, *extent, *k_like.shape[-2:])
    v_shape = (batch, *extent, *v_like.shape[-2:])
    split = math.prod(k_shape)
    return buffer[:split].view(k_shape), buffer[split:].view(v_shape)


def _buffer(k, v, extent):
    batch = k.shape[0]
    size = _message_size(k.shape[-2] * k.shape[-1], extent, batch) + \
        _message_size(v.shape[-2] * v.shape[-1], extent, batch)
    return torch.empty(size, dtype=k.dtype, device=k.device)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, exchange: Exchange, k, v):
        batch, tail_k, tail_v = k.shape[0], k.shape[-2:], v.shape[-2:]
        k_region = k.new_zeros(batch, *exchange.region, *tail_k)
        v_region = v.new_zeros(batch, *exchange.region, *tail_v)
        k_region[exchange.slab_index] = k
        v_region[exchange.slab_index] = v
        sends = [(route.peer, _pack(k, v, route.index)) for route in exchange.sends]
        receives = [(route.peer, _buffer(k, v, route.extent)) for route in exchange.receives]
        _SENT["forward"] += sum(t.numel() * t.element_size() for _, t in sends)
        _run(exchange.group, sends, receives)
        for route, (_, buffer) in zip(exchange.receives, receives):
            k_rows, v_rows = _unpack(buffer, k, v, route.extent)
            k_region[route.index] = k_rows
            v_region[route.index] = v_rows
        ctx.exchange = exchange
        return k_region, v_region

    @staticmethod
    def backward(ctx, grad_k_region, grad_v_region):
        exchange = ctx.exchange
        grad_k = grad_k_region[exchange.slab_index].clone()
        grad_v = grad_v_region[exchange.slab_index].clone()
        # the rows received in the forward return as gradients to their owners, and vice versa
        sends = [(route.peer, _pack(grad_k_region, grad_v_region, route.index)) for route in exchange.receives]
        receives = [(route.peer, _buffer(grad_k, grad_v, route.extent)) for route in exchange.sends]
        _SENT["backward"] += sum(t.numel() * t.element_size() for _, t in sends)
        _run(exchange.group, sends, receives)
        for route, (_, buffer) in zip(exchange.sends, receives):
            k_rows, v_rows = _unpack(buffer, grad_k, grad_v, route.extent)
            # rows within one message are distinct; messages from several needers add up one by one
            grad_k[route.index] += k_rows
            grad_v[route.index] += v_rows
        return None, grad_k, grad_v


def halo_exchange(exchange: Exchange, k, v):
    """(k_region, v_region): the region tensors of this rank, with the rows of its peers filled in."""
    return _HaloExchange.apply(exchange, k, v)


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, tensor):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad


def replicated(group, tensor):
    """A tensor every rank holds whole: its gradient is the sum of every rank's contribution."""
    if tensor is None or not tensor.requires_grad or not torch.is_grad_enabled():
        return tensor
    return _Replicated.apply(group, tensor)


def make_exchange(plan, rank: int, group, global_rank, device) -> Exchange:
    """The routes of group rank `rank` (global_rank maps a group rank to the rank P2POp takes)."""
    slab = plan.slab(rank)
    region = plan.region(rank)

    def local(rows, origin):
        return tuple((r - o).to(device) for r, o in zip(rows, origin))

    sends = tuple(Route(global_rank(t.needer), _index(local(t.rows, [s[0] for s in slab])),
                        tuple(len(r) for r in t.rows)) for t in plan.outgoing(rank))
    receives = tuple(Route(global_rank(t.owner), _index(local(t.rows, [lo for lo, _ in region])),
                           tuple(len(r) for r in t.rows)) for t in plan.incoming(rank))
    slab_index = (slice(None), *[slice(a - lo, b - lo) for (a, b), (lo, _) in zip(slab, region)])
    return Exchange(group, sends, receives, tuple(hi - lo for lo, hi in region), slab_index)
