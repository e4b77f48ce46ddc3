"""(op, problem, target) -> best instance, with the reason every other candidate lost.

Selection is data plus one small pure function: each manifest instance either cannot serve the problem
(and says why) or gets a cost from natgen.cost, which reads only manifest fields; the cheapest wins.
Backward kernels are chosen the same way, among the backward partners the forward's entry names.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .arch import arch_number
from .dq_scheme import DEFAULT_DQ, OPT_IN, dq_scheme, requested_dq
from .cost import ctas_per_sm, static_cost  # noqa: F401  (ctas_per_sm is shown by `natgen list`)
from .manifest import Instance, load
from .problem import Problem
from .spec import ANY, TORCH_DTYPE_TOKENS

log = logging.getLogger("natgen.selector")

OPS = {"forward": "fwd", "backward": "bwd", "fwd": "fwd", "bwd": "bwd"}


def op_token(op: str) -> str:
    try:
        return OPS[op]
    except (KeyError, TypeError):
        raise ValueError(f"op={op!r} must be 'forward' or 'backward'") from None


@dataclass(frozen=True)
class Target:
    """Where the problem will run: 'cuda' (arch like sm_80, with an SM count) or 'cpu'."""
    kind: str
    arch: str = "sm_80"
    sms: Optional[int] = None


@dataclass
class Ranked:
    instance: Instance
    cost: float = math.inf
    reasons: List[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return not self.reasons


def dtype_token(dtype) -> str:
    return TORCH_DTYPE_TOKENS.get(str(dtype).replace("torch.", ""))


def not_supported_reasons(instance: Instance, problem: Problem, target: Target, op: str = "fwd") -> List[str]:
    spec, reasons = instance.spec, []
    if (spec.arch == "cpu") != (target.kind == "cpu"):
        reasons.append(f"family {spec.family} does not run on {target.kind}")
    if instance.launch.get("operation"):
        reasons.append(f"a kernel of the unfused {instance.launch['operation']} op, not fused attention")
    if spec.op != op:
        reasons.append(f"a {spec.op} kernel, not {op}")
    if spec.rank != problem.rank:
        reasons.append(f"rank {spec.rank} != {problem.rank}")
    dtype = dtype_token(problem.dtype)
    if spec.dtype != dtype:
        reasons.append(f"dtype {spec.dtype} != {dtype}")
    if spec.head_dim != ANY and spec.head_dim != problem.head_dim:
        reasons.append(f"head_dim {spec.head_dim} != {problem.head_dim}")
    if spec.head_dim != ANY and problem.head_dim_v != problem.head_dim:
        reasons.append(f"value head_dim {problem.head_dim_v} differs from query head_dim {problem.head_dim}")
    if spec.kernel_size != ANY and tuple(spec.kernel_size) != problem.kernel_size:
        reasons.append(f"kernel_size {tuple(spec.kernel_size)} != {problem.kernel_size}")
    if spec.dilation != ANY and tuple(spec.dilation) != problem.dilation:
        reasons.append(f"dilation {tuple(spec.dilation)} != {problem.dilation}")
    if tuple(spec.causal) != problem.is_causal:
        reasons.append(f"causal mask {tuple(spec.causal)} != {problem.is_causal}")
    if target.kind == "cuda" and spec.arch.startswith("sm"):
        if arch_number(target.arch) < arch_number(spec.arch):
            reasons.append(f"needs {spec.arch}, device is {target.arch}")
    if problem.heads_kv != problem.heads and not instance.launch.get("grouped_kv_heads", False):
        reasons.append(f"{problem.heads_kv} key/value heads for {problem.heads} query heads: the instance does not "
                       "index grouped key/value heads")
    if problem.has_rpb and not instance.launch.get("rpb", False):
        reasons.append("a relative positional bias (rpb): the instance does not add one")
    if spec.op == "bwd" and instance.launch.get("dq") == "atomic" and dq_scheme() != "atomic":
        reasons.append(dq_refusal())
    limits = instance.launch.get("limits", {})
    for what, value in (("extra", problem.n_extra), ("window", problem.window), ("heads", problem.heads),
                        ("batch", problem.batch)):
        bound = limits.get(f"max_{what}")
        if bound is not None and value > bound:
            reasons.append(f"{what} {value} > {bound} (the instance's limit)")
    return reasons


def dq_refusal() -> str:
    """Why an atomic-dQ backward is refused now."""
    if requested_dq() == "atomic":
        return "dQ by fp32 atomics is not bit-reproducible: refused under torch.use_deterministic_algorithms(True)"
    return f"dQ by fp32 atomics (not bit-reproducible) is opt-in: {OPT_IN}"


def dq_of(instance: Instance) -> str:
    """A backward instance's dQ scheme (launch fact `dq`)."""
    return instance.launch.get("dq", DEFAULT_DQ)


def dq_reason(instance: Instance) -> str:
    """The chosen backward's dQ scheme and why (for `natgen explain --backward`)."""
    scheme = dq_of(instance)
    if scheme == "atomic":
        return "atomic (summed by fp32 atomics in the dkdv pass, no dq pass; not bit-reproducible): opted in"
    why = ("the default: " + OPT_IN + " opts in to the atomic one" if requested_dq() != "atomic"
           else "the atomic one was requested but " + ("is refused under torch.use_deterministic_algorithms(True)"
                                                       if dq_scheme() != "atomic" else "no atomic instance fits"))
    return f"{scheme} (its own pass, deterministic; {why})"


def rank_instances(op: str, problem: Problem, target: Target,
                   instances: Optional[Sequence[Instance]] = None) -> List[Ranked]:
    """Every instance with its cost or its reasons, best first. A backward of the dQ scheme in force
    (natgen.backward_options) ranks before the others whatever the costs: the scheme is the caller's choice."""
    op = op_token(op)
    scheme = dq_scheme() if op == "bwd" else None
    ranked = []
    for instance in instances if instances is not None else load():
        entry = Ranked(instance, reasons=not_supported_reasons(instance, problem, target, op))
        if entry.supported:
            entry.cost, entry.details = static_cost(instance, problem, target)
            if math.isinf(entry.cost):
                entry.reasons.append("cannot be resident on this arch (0 CTAs per SM)")
            if op == "bwd":
                entry.details["dq"] = dq_of(instance)
        ranked.append(entry)
    ranked.sort(key=lambda r: (not r.supported, scheme is not None and dq_of(r.instance) != scheme, r.cost,
                               r.instance.name))
    return ranked


class NoKernelError(RuntimeError):
    pass


def select(op: str, problem: Problem, target: Target, instances: Optional[Sequence[Instance]] = None) -> Ranked:
    ranked = rank_instances(op, problem, target, instances)
    if not ranked or not ranked[0].supported:
        near = [r for r in ranked if r.instance.spec.rank == problem.rank][:6]
        lines = "; ".join(f"{r.instance.name} because {', '.join(r.reasons)}" for r in near)
        raise NoKernelError(f"no {target.kind} {op_token(op)} kernel for this problem ({describe(problem)})"
                            + (f": {lines}" if lines else ""))
    best = ranked[0]
    log.debug("selected %s (cost %.3f, %s) for %s", best.instance.name, best.cost, best.details, describe(problem))
    return best


def partner_candidates(forward: Instance) -> List[Instance]:
    """The backward instances a forward's manifest entry names (those the library holds)."""
    from .manifest import find
    found = []
    for name in forward.partners:
        try:
            found.append(find(name))
        except KeyError:
            log.warning("natgen: %s names a backward partner %s that the library lacks", forward.name, name)
    return found


def select_backward(forward: Instance, problem: Problem, target: Target) -> Ranked:
    """The backward kernel for a problem whose forward runs `forward`: the cheapest of its partners."""
    candidates = partner_candidates(forward)
    if not candidates:
        raise NoKernelError(f"{forward.name} names no backward kernel the library holds")
    return select("bwd", problem, target, candidates)


def backward_or_reason(forward: Instance, problem: Problem, target: Target):
    """(backward instance, None), or (None, why none fits): the second is what the fallback's warning says."""
    try:
        return select_backward(forward, problem, target).instance, None
    except NoKernelError as exc:
        return None, str(exc)


def describe(problem: Problem) -> str:
    dtype = str(problem.dtype).replace("torch.", "")
    return (f"rank {problem.rank}, batch {problem.batch}, spatial {'x'.join(map(str, problem.spatial))}, "
            f"heads {problem.heads}" + (f" (key/value heads {problem.heads_kv})" if problem.heads_kv != problem.heads
                                        else "") + f", head_dim {problem.head_dim}, kernel {problem.kernel_size}, "
            f"stride {problem.stride}, dilation {problem.dilation}, causal {problem.is_causal}, {dtype}, "
            f"{problem.n_extra} extra tokens" + (", with rpb" if problem.has_rpb else ""))
