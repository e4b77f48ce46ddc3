"""SIMT backward with dQ summed by float32 atomics: opt-in, not bit-reproducible.

The simtbwd template (templates/simt_bwd.cu.j2) rendered with `atomic_dq`: the key-stationary dkdv entries
(window keys and extra tokens) also add dS k to a zeroed float32 dQ buffer with atomicAdd, so there is no
query-stationary dq pass (each (query, key) pair's two dot products are computed once instead of twice);
a small dq_convert entry scales that buffer into grad_q. The order of the atomics varies between runs, so
dQ may differ in its last bits from run to run; dK, dV and grad_rpb stay deterministic (the dkdv walk stores
dS per window slot for the same drpb reduction as simtbwd). The selector takes it only when the caller opts
in (natgen.backward_options(dq="atomic") or NATGEN_BACKWARD_DQ=atomic, and never under
torch.use_deterministic_algorithms(True)), so its cost never competes with the deterministic family's.
"""
from __future__ import annotations

from ..spec import KernelSpec
from . import simtbwd

FAMILY = "simtbwda"
TEMPLATE = simtbwd.TEMPLATE
TOOLCHAIN = simtbwd.TOOLCHAIN
SOURCE_SUFFIX = simtbwd.SOURCE_SUFFIX
HEADERS = simtbwd.HEADERS
ABI = simtbwd.ABI
# Unmeasured (no GPU figures yet): one pair walk instead of two, plus head_dim atomics per pair. It is ranked
# only against other atomic-dQ instances, so the figure only matters against future ones.
COST = dict(simtbwd.COST)
DQ = "atomic"
ENTRIES = (
    {"role": "preprocess", "grid": "tiles", "heads": "heads"},
    {"role": "dkdv", "grid": "tiles", "heads": "heads_kv"},
    {"role": "dkdv_extra", "grid": "extra", "heads": "heads_kv", "needs_extra": True},
    {"role": "dq_convert", "grid": "tiles", "heads": "heads"},
    simtbwd.DRPB,
)


def candidates(policy: str):
    return simtbwd.family_candidates(FAMILY)


def prebuild(spec: KernelSpec) -> bool:
    return simtbwd.prebuild(spec)


def launch(spec: KernelSpec) -> dict:
    return simtbwd.launch(spec, ENTRIES, DQ)


def context(spec: KernelSpec) -> dict:
    return simtbwd.context(spec, atomic_dq=True)
