import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Under pytest-xdist (the README's `-n auto`) every worker would otherwise run torch (and the CPU kernels, which
# take torch's thread count) on every core: share the cores out instead, at least 2 per worker so the
# two-thread paths still run. Tests that compare thread counts set theirs explicitly.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    torch.set_num_threads(max(2, (os.cpu_count() or 2) // _WORKERS))

# The emulator reads these when a launch leaves seed / racecheck / initcheck at None (natgen.emulator).
EMULATOR_ENV = ("NATGEN_EMU_SEED", "NATGEN_EMU_RACECHECK", "NATGEN_EMU_INITCHECK")


def emulator_wide() -> bool:
    """NATGEN_EMU_WIDE=1: more sampled cases and more shuffled schedules in the emulated tiers."""
    return os.environ.get("NATGEN_EMU_WIDE", "") not in ("", "0")


def cpu_wide() -> bool:
    """NATGEN_CPU_WIDE=1: the CPU tier's extra specialized shapes (each one more pair of modules to compile)."""
    return os.environ.get("NATGEN_CPU_WIDE", "") not in ("", "0")


def emulator_tier_racecheck() -> str:
    """The op-level emulated tiers' racecheck: NATGEN_EMU_CHECKS=0 turns the checks off (to measure
    their cost), =global adds the tensors to racecheck; anything else: shared memory."""
    value = os.environ.get("NATGEN_EMU_CHECKS", "1").strip().lower()
    return {"0": "0", "": "0", "global": "global"}.get(value, "1")


@pytest.fixture
def clean_emulator_env(monkeypatch):
    """Tests of the emulator itself pass every option explicitly: no inherited seed or checks."""
    for name in EMULATOR_ENV:
        monkeypatch.delenv(name, raising=False)


def _set_checks(monkeypatch, racecheck: str) -> None:
    if racecheck != "0":
        monkeypatch.setenv("NATGEN_EMU_RACECHECK", racecheck)
        monkeypatch.setenv("NATGEN_EMU_INITCHECK", "1")


@pytest.fixture
def emulator_checks(monkeypatch, clean_emulator_env):
    """Every launch of the test runs with racecheck and initcheck (through the environment, so the op
    layer's calls are covered without passing anything)."""
    _set_checks(monkeypatch, emulator_tier_racecheck())


@pytest.fixture
def emulator_checks_global(monkeypatch, clean_emulator_env):
    """emulator_checks with racecheck over the tensors as well: for kernels without shared memory (the
    SIMT family), where that is the only race there can be."""
    racecheck = emulator_tier_racecheck()
    _set_checks(monkeypatch, "global" if racecheck == "1" else racecheck)


def _bits(value):
    """A comparable, NaN-exact form of a result: tensors as their raw bytes, containers element-wise."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).clone())
    if isinstance(value, (tuple, list)):
        return tuple(_bits(v) for v in value)
    return value


def _same_bits(a, b) -> bool:
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return isinstance(b, tuple) and b[:3] == a[:3] and torch.equal(a[3], b[3])
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same_bits(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def schedules(request, monkeypatch):
    """run(fn): fn() under the default schedule, then under shuffled ones (NATGEN_EMU_SEED); the results
    must be bit-identical (the forward kernels are deterministic). Returns the default run's result.

    The seeds differ per test (derived from its id) so the tier covers many schedules; one per test, three
    with NATGEN_EMU_WIDE=1."""
    base = zlib.crc32(request.node.nodeid.encode())
    seeds = [base + i * 7919 for i in range(3 if emulator_wide() else 1)]

    def run(fn):
        monkeypatch.delenv("NATGEN_EMU_SEED", raising=False)
        expected = fn()
        for seed in seeds:
            monkeypatch.setenv("NATGEN_EMU_SEED", str(seed))
            got = fn()
            assert _same_bits(_bits(expected), _bits(got)), \
                f"results differ between the default schedule and NATGEN_EMU_SEED={seed}"
        monkeypatch.delenv("NATGEN_EMU_SEED", raising=False)
        return expected

    return run
