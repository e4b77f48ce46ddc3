"""The backward partners of a CUDA forward: one instance of each CUDA backward family that serves its rank,
causal mask, dtype and head_dim (the SIMT one for every dtype, the tensor-core one for fp16 / bf16). The
selector picks among them by cost (natgen.selector.select_backward)."""
from __future__ import annotations

from ..spec import KernelSpec
from . import simtbwd, tcbwd

FAMILIES = (simtbwd, tcbwd)


def backward_of(spec: KernelSpec):
    return [partner for family in FAMILIES for partner in family.backward_of(spec)]
