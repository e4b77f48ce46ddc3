"""Compiles CUDA instances to cubins with nvcc and reads their resource use from `ptxas -v`.

Cubins live in a content-addressed build cache outside generated/: the key covers the source, the device
headers, the nvcc version, the flags and the arch, so a rebuild recompiles only what changed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Optional

from ..arch import arch_number  # noqa: F401  (re-exported)
from ..files import atomic_write
from ..toolkit import cubin_path, cuda_include_dir, find_nvcc  # noqa: F401  (re-exported)
from .render import DEVICE_HEADERS, TEMPLATES_DIR

DEFAULT_ARCHS = ("sm_80", "sm_90")
NVCC_FLAGS = ("-O3", "-std=c++17", "--use_fast_math", "-Xptxas", "-v")


@functools.lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def cubin_key(source: str, arch: str, nvcc: str, templates_dir: Path = TEMPLATES_DIR) -> str:
    digest = hashlib.sha256()
    digest.update(source.encode() + b"\0")
    for name in DEVICE_HEADERS:
        digest.update((Path(templates_dir) / name).read_bytes() + b"\0")
    digest.update(nvcc_version(nvcc).encode() + b"\0" + " ".join(NVCC_FLAGS).encode() + b"\0" + arch.encode())
    return digest.hexdigest()[:32]


_FUNCTION_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict:
    """Figures of the entry functions in `ptxas -v` output. One entry: its figures. Several (a backward
    instance's entry points): the largest registers, shared memory and stack of any, the spills summed, and
    each function's own figures under "entries" (by symbol)."""
    per_function, current = {}, None

    def blank():
        return {"registers": None, "smem_bytes": 0, "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0}

    for line in text.splitlines():
        function = _FUNCTION_RE.search(line)
        if function:
            current = per_function.setdefault(function.group(1), blank())
            continue
        figures = current if current is not None else per_function.setdefault("", blank())
        props = _PROPS_RE.search(line)
        if props:
            figures["stack_bytes"], figures["spill_stores"], figures["spill_loads"] = map(int, props.groups())
        used = _USED_RE.search(line)
        if used:
            figures["registers"] = int(used.group(1))
            figures["smem_bytes"] = int(used.group(2) or 0)
    measured = {name: f for name, f in per_function.items() if f["registers"] is not None}
    if not measured:
        raise ValueError("no 'Used N registers' line in ptxas output:\n" + text)
    if len(measured) == 1:
        return next(iter(measured.values()))
    values = list(measured.values())
    return {"registers": max(f["registers"] for f in values), "smem_bytes": max(f["smem_bytes"] for f in values),
            "stack_bytes": max(f["stack_bytes"] for f in values),
            "spill_stores": sum(f["spill_stores"] for f in values),
            "spill_loads": sum(f["spill_loads"] for f in values),
            "entries": {name: measured[name] for name in sorted(measured)}}


def compile_cubin(source_path: Path, source: str, arch: str, nvcc: Optional[str] = None,
                  templates_dir: Path = TEMPLATES_DIR, force: bool = False) -> dict:
    """Compile one instance for one arch (cached). Returns ptxas figures plus the cubin key."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH (nor under CUDA_HOME / CUDA_PATH / /usr/local/cuda)")
    key = cubin_key(source, arch, nvcc, templates_dir)
    cubin = cubin_path(key)
    stats_file = cubin.with_suffix(".json")
    if not force and cubin.exists() and stats_file.exists():
        try:
            return json.loads(stats_file.read_text())
        except (OSError, ValueError):
            pass  # a corrupt stats file is rebuilt, never trusted
    cubin.parent.mkdir(parents=True, exist_ok=True)
    tmp = cubin.with_name(f".{cubin.name}.{os.getpid()}.tmp")
    cmd = [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, "-I", str(templates_dir), "-o", str(tmp), str(source_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if tmp.exists():
            tmp.unlink()
        raise RuntimeError(f"nvcc failed for {source_path.name} ({arch}):\n{proc.stderr.strip()}")
    figures = parse_ptxas(proc.stderr + proc.stdout)
    figures["cubin_key"] = key
    os.replace(tmp, cubin)
    atomic_write(stats_file, (json.dumps(figures, sort_keys=True) + "\n").encode())
    return figures


def compile_ptx(source_path: Path, arch: str = "sm_80", nvcc: Optional[str] = None,
                templates_dir: Path = TEMPLATES_DIR) -> str:
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH: `natgen show --ptx` needs the CUDA toolkit")
    cmd = [nvcc, "-ptx", f"-arch={arch}", "-O3", "-std=c++17", "--use_fast_math", "-I", str(templates_dir),
           "-o", "-", str(source_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc -ptx failed for {source_path.name}:\n{proc.stderr.strip()}")
    return proc.stdout
