"""How the CUDA backward may sum dQ: the caller's opt-in to the fp32-atomics scheme.

    natgen.backward_options(dq="atomic")          # from here on (returns the previous setting's restorer)
    with natgen.backward_options(dq="atomic"):    # or for a block
        loss.backward()

`dq` is "query_stationary" (the default: dQ in its own pass, bit-identical results run to run) or "atomic"
(backward instances whose manifest says `launch.dq = "atomic"`: one pass fewer, dQ summed by float32
atomics, so its last bits may change between runs). NATGEN_BACKWARD_DQ=atomic sets the process's default.
torch.use_deterministic_algorithms(True) overrides an opt-in: the atomic scheme is then refused.

The setting is read when a call is resolved (it is part of the resolved-call cache's key), and the torch
op's backward resolves its call when it runs, so the setting in force when the backward runs decides.
"""
from __future__ import annotations

import os

import torch

DQ_SCHEMES = ("query_stationary", "atomic")
DEFAULT_DQ = "query_stationary"
ENVIRONMENT = "NATGEN_BACKWARD_DQ"
OPT_IN = f"natgen.backward_options(dq='atomic') or {ENVIRONMENT}=atomic"


def _checked(dq, source: str) -> str:
    if dq not in DQ_SCHEMES:
        raise ValueError(f"{source}={dq!r} must be one of {DQ_SCHEMES}")
    return dq


_state = {"dq": _checked(os.environ.get(ENVIRONMENT) or DEFAULT_DQ, ENVIRONMENT)}


def requested_dq() -> str:
    """The dQ scheme the caller asked for."""
    return _state["dq"]


def dq_scheme() -> str:
    """The dQ scheme the selector honours now: the request, unless torch's deterministic mode forbids atomics."""
    dq = _state["dq"]
    if dq == "atomic" and torch.are_deterministic_algorithms_enabled():
        return DEFAULT_DQ
    return dq


class backward_options:
    """Set the backward's options (today: `dq`, see the module's doc); as a context manager, the previous
    ones come back at exit."""

    def __init__(self, dq=None):
        self.previous = dict(_state)
        if dq is not None:
            _state["dq"] = _checked(dq, "dq")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        _state.update(self.previous)
        return False
