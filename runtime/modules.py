"""nn.Module wrappers: multi-head neighborhood attention layers for 1-D, 2-D and 3-D token grids."""
from __future__ import annotations

import torch
from torch import nn

from .ops import neighborhood_attention


class _NeighborhoodAttentionND(nn.Module):
    rank = 0

    def __init__(self, dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, backend=None, num_kv_heads=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 \
                or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive int dividing num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.num_kv_heads = num_kv_heads
        self.kernel_size, self.stride, self.dilation, self.is_causal = kernel_size, stride, dilation, is_causal
        self.scale = qk_scale or self.head_dim ** -0.5
        self.backend = backend
        # one projection for q (num_heads heads) and k, v (num_kv_heads heads each)
        self.qkv = nn.Linear(dim, dim + 2 * num_kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, *spatial, dim] -> [batch, *spatial, dim]."""
        if x.dim() != self.rank + 2:
            raise ValueError(f"x must be [batch, {self.rank} spatial dims, dim] ({self.rank + 2} dims), "
                             f"got shape {tuple(x.shape)}")
        kv_dim = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.num_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        out = neighborhood_attention(self.rank, q, k, v, self.kernel_size, self.stride, self.dilation,
                                     self.is_causal, self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}")


class NeighborhoodAttention1D(_NeighborhoodAttentionND):
    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttentionND):
    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttentionND):
    rank = 3
