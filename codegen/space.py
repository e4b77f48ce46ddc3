"""Enumerates the kernel instances of a policy. Every candidate left out carries a named reason."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from .families import REGISTRY
from .spec import KernelSpec

POLICIES = ("default", "full")
# The default policy is what `python build.py` compiles and what ships in generated/; keeping it under a
# budget keeps a full build in minutes, not hours. A test enforces it.
DEFAULT_INSTANCE_BUDGET = 1500


@dataclass(frozen=True)
class Rejected:
    name: str
    reason: str


@dataclass(frozen=True)
class Space:
    policy: str
    accepted: List[KernelSpec]
    rejected: List[Rejected]


def matches(name: str, filters: Optional[Sequence[str]]) -> bool:
    """The one filter language of every CLI verb: shell globs on instance names; a name passes if any matches."""
    if not filters:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in filters)


def split_filters(text: Optional[str]) -> List[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def enumerate_space(policy: str = "default", filters: Optional[Sequence[str]] = None,
                    families: Optional[Iterable[str]] = None) -> Space:
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} must be one of {POLICIES}")
    accepted, rejected, seen = {}, {}, set()
    for family_name in sorted(families or REGISTRY):
        for spec, reason in REGISTRY[family_name].candidates(policy):
            name = spec.name
            if name in seen:
                continue
            seen.add(name)
            if not matches(name, filters):
                continue
            if reason is None:
                accepted[name] = spec
            else:
                rejected[name] = Rejected(name, reason)
    return Space(policy, [accepted[n] for n in sorted(accepted)], [rejected[n] for n in sorted(rejected)])
