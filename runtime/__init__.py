"""natgen: ahead-of-time generated neighborhood-attention kernels.

    natgen.na1d / na2d / na3d(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                              additional_keys=None, additional_values=None, return_lse=False, backend=None)
    natgen.merge_attentions(outputs, lse_tensors) -> (output, lse)
    natgen.backward_options(dq="atomic"): opt in to the CUDA backward's fp32-atomics dQ (natgen.dq_scheme)
    natgen.distributed.na1d / na2d / na3d: the same ops over spatially sharded tensors (torch.distributed)
"""
from .dq_scheme import backward_options
from .merge import merge_attentions
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .ops import choose, na1d, na2d, na3d, neighborhood_attention
from .problem import Problem, make_problem
from . import functional  # noqa: F401  (natgen.functional: the unfused ops)
from . import torch_ops  # noqa: F401,E402  (registers torch.ops.natgen.na_forward / na_backward)

__version__ = "0.1.0"
__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "choose", "merge_attentions", "backward_options",
           "make_problem", "Problem", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]
