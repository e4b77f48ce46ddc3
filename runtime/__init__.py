"""natgen: ahead-of-time generated neighborhood-attention kernels.

    natgen.na1d / na2d / na3d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                              additional_keys=None, additional_values=None, return_lse=False, backend=None)
"""
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .ops import choose, na1d, na2d, na3d, neighborhood_attention
from .problem import Problem, make_problem

__version__ = "0.1.0"
__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "choose", "make_problem", "Problem",
           "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]
