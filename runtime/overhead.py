"""`natgen bench --overhead`: host-side microseconds per na2d call on each path, cold and cached.

Every path runs with its kernel replaced by a no-op (the CPU module's entry, the emulator's launch, and
CuPy's launch on the cuda path, which therefore runs on CPU tensors where no GPU exists), so what is timed is
natgen's own work per call: the call-cache lookup, allocation of the outputs, argument packing and
conversion, up to the launch. "cold" is the first call after natgen's per-call caches are cleared (modules
already compiled and loaded; for the torch.compile row it includes compiling the graph); "cached" is the
mean of back-to-back calls with the same arguments. The forward + backward row times a forward with gradients
and torch.autograd.grad through it (natgen's autograd Function, and torch's autograd engine). The torch.compile row is a compiled function holding
one na2d call, which the graph runs through the registered op (torch.ops.natgen.na_forward).
"""
from __future__ import annotations

import contextlib
import time
from typing import List

import torch

from . import cpu, cxx, ops, registry
from .registry import Backend

PATHS = ("cpu", "cpu (forward + backward)", "cpu (torch.compile)", "emulator", "cuda")
DRY_CUDA = "cuda (dry run)"


@contextlib.contextmanager
def dry_run():
    """Kernels replaced by no-ops, and a dry-run cuda backend for CPU tensors, for the duration."""
    from . import cuda, emulator
    saved_run, saved_launch = cxx.Kernel.run, emulator.launch
    cxx.Kernel.run = lambda self, address, fields: None
    emulator.launch = lambda *args, **kwargs: None
    registry.register_backend(Backend(DRY_CUDA, "cpu", lambda: True,
                                      lambda problem, arch=None: cuda.resolve_dry_run(problem, arch or "sm_80")))
    try:
        _clear()
        yield
    finally:
        cxx.Kernel.run, emulator.launch = saved_run, saved_launch
        registry.BACKENDS.pop(DRY_CUDA, None)
        _clear()


def _clear():
    ops._CALLS.clear()
    cpu.choose.cache_clear()


def measure(path: str, calls: int = 2000, size: int = 56, kernel_size: int = 7, heads: int = 4,
            head_dim: int = 32, rounds: int = 7) -> dict:
    """{path, cold_us, cached_us, calls} for na2d on a [1, size, size, heads, head_dim] problem; cached is the
    best of `rounds` rounds of `calls` back-to-back calls (the least disturbed by the rest of the machine)."""
    backend = {"cuda": DRY_CUDA, "cpu (torch.compile)": "cpu", "cpu (forward + backward)": "cpu"}.get(path, path)
    dtype = torch.float16 if path == "cuda" else torch.float32  # the cuda path: a tensor-core instance
    q, k, v = (torch.randn(1, size, size, heads, head_dim).to(dtype) for _ in range(3))
    if backend == "cpu":
        cxx.load(cpu.choose(ops.resolve(2, q, k, v, kernel_size)[0], "fwd"))  # compiled before timing

    def call(q, k, v):
        return ops.na2d(q, k, v, kernel_size, backend=backend)

    if path == "cpu (forward + backward)":
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        grad = torch.randn(1, size, size, heads, head_dim)
        if backend == "cpu":
            cxx.load(cpu.choose(ops.resolve(2, q, k, v, kernel_size)[0], "bwd"))

        def call(q, k, v):
            return torch.autograd.grad(ops.na2d(q, k, v, kernel_size, backend=backend), leaves, grad)

    if path == "cpu (torch.compile)":
        torch._dynamo.reset()
        call = torch.compile(call, fullgraph=True)  # the graph holds the registered op (natgen.torch_ops)
    with dry_run():
        start = time.perf_counter()
        call(q, k, v)
        cold = time.perf_counter() - start
        for _ in range(100):
            call(q, k, v)
        cached = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                call(q, k, v)
            cached = min(cached, (time.perf_counter() - start) / calls)
    return {"path": path, "cold_us": cold * 1e6, "cached_us": cached * 1e6, "calls": calls}


def run(paths=PATHS, calls: int = 2000) -> List[dict]:
    rows = []
    for path in paths:
        if path == "emulator" and not ops.BACKENDS["emulator"].available():
            continue
        if path.startswith("cpu") and not cpu.available():
            continue
        rows.append(measure(path, calls))
    return rows
