"""The CUDA toolkit on this machine (nvcc, its headers) and where compiled cubins are cached."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from . import paths


def find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def cuda_include_dir() -> Optional[str]:
    """The CUDA toolkit's include directory (cuda_fp16.h etc.), for NVRTC, which has no default one."""
    candidates = []
    compiler = find_nvcc()
    if compiler:
        candidates.append(Path(compiler).resolve().parent.parent / "include")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "include")
    for include in candidates:
        if (include / "cuda_fp16.h").exists():
            return str(include)
    return None


def cubin_path(key: str) -> Path:
    return paths.cache_dir() / "cubin" / f"{key}.cubin"
