"""Registers every backend, in one place: the reference here, the others from their modules."""
from __future__ import annotations

from typing import Optional

from .problem import Problem
from .reference import na_reference
from .registry import Backend, Resolved, register_backend


class ReferenceCall(Resolved):
    def __init__(self, problem: Problem):
        super().__init__("reference")
        self.problem = problem

    def forward(self, q, k, v, extra_k=None, extra_v=None, rpb=None):
        return na_reference(q, k, v, self.problem, extra_k, extra_v, return_lse=True, rpb=rpb)


def _resolve_reference(problem: Problem, arch: Optional[str] = None) -> ReferenceCall:
    return ReferenceCall(problem)


register_backend(Backend("reference", "any", lambda: True, _resolve_reference))

from . import cpu, cuda, emulated  # noqa: E402,F401  (each registers its backend; none imports this module)
