"""The backends natgen can run a call on, and how a call is resolved to one of them, once.

A backend module registers a `Backend` at import (natgen.backends imports them all, in order of
preference); `resolve_call` turns a validated Problem into a `Resolved` call: the backend, the forward
and backward instances and everything needed to run them, so that a repeated call does no selection,
no manifest lookup and no device query.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from .manifest import Instance
from .problem import Problem
from .selector import NoKernelError

log = logging.getLogger("natgen")


class Resolved:
    """One call resolved to a backend. `forward(q, k, v, extra_k, extra_v, rpb) -> (out, lse)`;
    `backward(q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb) -> (grad_q, grad_k, grad_v,
    grad_extra_k, grad_extra_v, grad_rpb)`, or None where the backend has no backward kernel for the problem
    (its gradients are then recomputed through the reference);
    `fast`, where set, is `(q, k, v, with_lse=True) -> (out, lse) or None` for calls without extra tokens or
    grads (lse None where with_lse is false); `fast_backward`, where set, is `(q, k, v, out, lse, grad_out,
    grad_lse) -> (grad_q, grad_k, grad_v) or None` for the backward of such calls (None: take backward())."""

    fast: Optional[Callable] = None
    fast_backward: Optional[Callable] = None
    backward_reason: Optional[str] = "the backend has no backward kernels"  # why backward() returns None

    def __init__(self, backend: str, instance: Optional[Instance] = None,
                 backward_instance: Optional[Instance] = None):
        self.backend, self.instance, self.backward_instance = backend, instance, backward_instance

    def forward(self, q, k, v, extra_k=None, extra_v=None, rpb=None):
        raise NotImplementedError

    def backward(self, q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb=None):
        return None

    @property
    def backward_backend(self) -> str:
        return self.backend if self.backward_instance is not None else "reference"


@dataclass
class Backend:
    name: str
    device_type: str                                 # "cuda", "cpu", or "any": the tensors it takes
    available: Callable[[], bool]
    resolve: Callable[[Problem, Optional[str]], Resolved]   # raises NoKernelError when nothing fits
    unavailable_hint: str = ""


BACKENDS: Dict[str, Backend] = {}
# preferred backend per tensor device type, when the caller names none
PREFERRED = {"cuda": "cuda", "cpu": "cpu"}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def resolve_call(problem: Problem, backend: Optional[str] = None, arch: Optional[str] = None) -> Resolved:
    device_type = problem.device.type
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {sorted(BACKENDS)} or None")
        chosen = BACKENDS[backend]
        if chosen.device_type not in ("any", device_type):
            raise ValueError(f"backend={backend!r} runs on {chosen.device_type} tensors, got {device_type} tensors")
        if not chosen.available():
            raise RuntimeError(f"backend={backend!r} is not available here" + chosen.unavailable_hint)
        return chosen.resolve(problem, arch)
    name = PREFERRED.get(device_type)
    candidate = BACKENDS.get(name) if name else None
    if candidate is not None and candidate.available():
        try:
            return candidate.resolve(problem, arch)
        except NoKernelError as exc:
            log.info("natgen: %s; using the reference backend", exc)
    return BACKENDS["reference"].resolve(problem, arch)
