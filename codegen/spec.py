"""The kernel-instance model, shared with the runtime (natgen.spec), plus the generator's template helpers."""
from __future__ import annotations

from ..spec import (ANY, ARCHS, DTYPE_BYTES, DTYPE_CTYPES, DTYPES, FAMILIES, OPS,  # noqa: F401
                    TORCH_DTYPE_TOKENS, IntTuple, KernelSpec)


def padded_cuda_terms(spec: KernelSpec, kernel_arg: str = "kernel_arg", dilation_arg: str = "dilation_arg"):
    """Per-dim C++ expressions for the window and dilation of a CUDA template, padded to 3 dims with 1:
    the compile-time value where the spec fixes it, else the name of the runtime kernel argument."""
    pad = 3 - spec.rank

    def terms(value, arg):
        if value == ANY:
            return [f"{arg}{d}" for d in range(spec.rank)] + ["1"] * pad
        return [str(x) for x in value] + ["1"] * pad

    return terms(spec.kernel_size, kernel_arg), terms(spec.dilation, dilation_arg)
