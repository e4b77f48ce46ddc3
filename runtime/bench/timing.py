"""Timing: warm-up of each peer, then interleaved rounds (every peer in turn, each keeping its minimum), a
round being the per-call mean of ~ROUND_SECONDS of back-to-back calls. Every failure becomes the status of
the peer's Measurement, never an exception out of a run."""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .peers import PEER_FACTORIES, Case, PeerUnavailable, Runner, first_line
from .problems import ProblemSet, measured_flops

# Rough sustained rates used ONLY to skip a peer on the CPU before starting a call that would take
# absurdly long (more than SKIP_FACTOR budgets and a minute); never used for any reported figure. Dense SDPA is
# charged its dense FLOPs (4 * B * H * N^2 * d), the others the neighborhood's.
ASSUMED_CPU_GFLOPS = {"natgen": 50.0, "reference": 20.0, "unfused": 10.0, "flex": 50.0, "natten": 20.0, "sdpa": 200.0}
SKIP_FACTOR = 30
# A round times this long a block of back-to-back calls (at least one) and keeps the mean: a lone sub-ms call
# measures the wake-up of an idle thread pool and cold caches as much as the op (on 2 cores: natgen's cpu-2d
# forward alone 0.68 ms a call back to back, 0.8-1.05 ms as one call after a pause or after another peer).
ROUND_SECONDS = 0.02
MAX_PER_ROUND = 50


@dataclass
class Measurement:
    peer: str
    implementation: str = ""
    seconds: Optional[float] = None   # min over the rounds of the per-call time
    calls: int = 0                    # timed rounds the minimum is over
    per_round: int = 1                # back-to-back calls in one round
    status: str = ""                  # why there is no figure, or a note about the figure


@dataclass
class SetResult:
    ps: ProblemSet
    device: str
    dtype: torch.dtype
    backward: bool
    repeats: int
    warmup: int = 2
    measurements: List[Measurement] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return measured_flops(self.ps, self.backward)

    def by_peer(self, peer) -> Optional[Measurement]:
        return next((m for m in self.measurements if m.peer == peer), None)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _estimated_cpu_seconds(peer: str, ps: ProblemSet, backward: bool) -> float:
    work = measured_flops(ps, backward)
    if peer == "sdpa":
        work *= ps.tokens / ps.window      # dense: every query against every key
    return work / (ASSUMED_CPU_GFLOPS.get(peer, 20.0) * 1e9)


def _per_round(seconds: float) -> int:
    return max(1, min(MAX_PER_ROUND, math.ceil(ROUND_SECONDS / max(seconds, 1e-9))))


def timed(runner: Runner, device: torch.device, calls: int = 1) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        runner.call()
    _sync(device)
    return (time.perf_counter() - start) / calls


def _failure(exc: BaseException) -> str:
    if isinstance(exc, PeerUnavailable):
        return str(exc)
    return "OOM" if _is_oom(exc) else first_line(exc)


_PROCESS_WARM = set()


def warm_process(device: torch.device, seconds: float = 0.5) -> None:
    """The first timed work in a process runs slow (thread pool start, allocator, clocks): burn a
    moment of matmuls once per device so that the first peer measured is not penalized."""
    if device.type in _PROCESS_WARM:
        return
    _PROCESS_WARM.add(device.type)
    a = torch.randn(256, 256, device=device)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)
        _sync(device)


def start_peer(peer: str, case: Case, budget: float, warmup: int):
    """Build the peer's runner and warm it up: (Measurement, runner or None when it is done)."""
    result = Measurement(peer)
    if case.device.type == "cpu":
        estimate = _estimated_cpu_seconds(peer, case.ps, case.backward)
        if estimate > max(SKIP_FACTOR * budget, 60.0):
            result.status = (f"skipped: would take ~{estimate:.0f} s a call on this CPU (budget {budget:g} s); "
                             "shrink with --batch")
            return result, None
    try:
        runner = PEER_FACTORIES[peer](case)
        result.implementation = runner.implementation
        cold = min(timed(runner, case.device) for _ in range(max(warmup, 1)))
    except Exception as exc:  # noqa: BLE001 - every failure is a row in the table
        result.status = _failure(exc)
        del exc
        release(case.device)
        return result, None
    if cold > budget and not runner.compiles:
        # one call already costs more than the budget: report the warm-up call itself
        result.seconds, result.calls = cold, 1
        result.status = f"1 call only (> {budget:g} s budget)"
        return result, None
    result.per_round = _per_round(cold)
    return result, runner


def interleaved_rounds(active, device: torch.device, repeats: int, budget: float) -> None:
    """`repeats` rounds over the (Measurement, runner) pairs in `active`, every peer in turn, so that a
    drifting machine affects all peers alike; each measurement keeps its minimum. A call slower than
    `budget` seconds, or one that fails, ends that peer's rounds."""
    for index in range(repeats):
        still = []
        for measurement, runner in active:
            try:
                elapsed = timed(runner, device, measurement.per_round)
            except Exception as exc:  # noqa: BLE001
                measurement.status = _failure(exc) + (f" (after {index} good calls)" if index else "")
                measurement.seconds = measurement.seconds if index else None
                del exc
                release(device)
                continue
            measurement.seconds = min(measurement.seconds or math.inf, elapsed)
            measurement.calls = index + 1
            if elapsed > budget and index + 1 < repeats:
                measurement.status = f"{index + 1} of {repeats} calls (> {budget:g} s budget)"
                continue
            still.append((measurement, runner))
        active = still
