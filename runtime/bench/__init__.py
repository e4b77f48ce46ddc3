"""`natgen bench`: natgen beside its peers on the standard problem sets.

Every peer of a set is measured in the same run on the same inputs (warm-up, then the minimum of N
interleaved rounds, a round being the per-call mean of ~20 ms of back-to-back calls), and credited with the
neighborhood's FLOPs and bytes. The figures are *effective*: the dense `sdpa` peer does N / prod(K) times
more arithmetic than the neighborhood needs, and is still credited with the neighborhood's FLOPs, so every
row of a table is comparable. A peer that is not installed, does not support the case, runs out of memory
or fails is a row with the reason, never dropped.

This module runs a set; each job has its own module:
    problems   the standard problem sets, FLOP and byte counts
    peers      one adapter per peer (natgen, reference, flex, natten, sdpa), the flex mask
    timing     warm-up and interleaved rounds, Measurement / SetResult
    report     text tables, JSON, the machine description
    chart      the bar chart (--plot)
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .peers import PEER_FACTORIES, PEERS, Case, PeerUnavailable, Runner, make_case, neighborhood_mask_mod
from .chart import plot
from .problems import (DEFAULT_DTYPE, DEFAULT_SETS, DTYPES, SETS, ProblemSet, backward_flops, forward_bytes,
                       forward_flops, measured_flops)
from .report import format_result, machine_description, to_json, write_json
from .timing import Measurement, SetResult, interleaved_rounds, release, start_peer, warm_process

__all__ = ["PEERS", "PEER_FACTORIES", "Case", "PeerUnavailable", "Runner", "neighborhood_mask_mod", "plot",
           "DEFAULT_DTYPE", "DEFAULT_SETS", "DTYPES", "SETS", "ProblemSet", "backward_flops", "forward_bytes",
           "forward_flops", "measured_flops", "format_result", "machine_description", "to_json", "write_json",
           "Measurement", "SetResult", "run_set", "run_bench"]


def run_set(ps: ProblemSet, peers: Sequence[str], device="cpu", dtype=None, backward=False, repeats=5,
            budget=10.0, echo: Optional[Callable[[str], None]] = None, warmup: int = 2) -> SetResult:
    """Every peer warmed up, then `repeats` rounds per peer (interleaved, so that a drifting machine affects
    all peers alike), a round being the mean of ROUND_SECONDS of back-to-back calls (at least one); each peer
    keeps its minimum. A call slower than `budget` seconds ends that peer's repeats."""
    device = torch.device(device)
    dtype = dtype or DEFAULT_DTYPE[device.type]
    unknown = [p for p in peers if p not in PEER_FACTORIES]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {list(PEER_FACTORIES)}")
    if len(set(peers)) != len(peers):
        raise ValueError(f"peers {list(peers)} name a peer twice")
    warm_process(device)
    case = make_case(ps, device, dtype, backward)
    result = SetResult(ps, device.type, dtype, backward, repeats, warmup)
    active = []
    for peer in peers:
        if echo:
            echo(f"  {ps.name}: warming up {peer} ...")
        measurement, runner = start_peer(peer, case, budget, warmup)
        result.measurements.append(measurement)
        if runner is not None:
            active.append((measurement, runner))
    if echo and active:
        echo(f"  {ps.name}: {repeats} rounds of {', '.join(m.peer for m, _ in active)}")
    interleaved_rounds(active, device, repeats, budget)
    del active
    release(device)
    return result


def run_bench(sets: Sequence[ProblemSet], peers: Sequence[str] = PEERS, device="cpu", dtype=None,
              backward=False, repeats=5, budget=10.0, echo=None, warmup: int = 2) -> List[SetResult]:
    return [run_set(ps, peers, device, dtype, backward, repeats, budget, echo, warmup) for ps in sets]
