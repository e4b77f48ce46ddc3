"""Relative positional bias in the CUDA forward families, run through the CPU emulator against the float64
oracle (tests/rpb_cases.py), with racecheck and initcheck on every launch and a shuffled schedule that must
give bit-identical results (tests/conftest.py)."""
import pytest

from rpb_cases import core_cases, run_case

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulator_checks_global")]


def _emulator_ready():
    try:
        from natgen import emulator
        return hasattr(emulator, "launch")
    except ImportError:
        return False


requires_emulator = pytest.mark.skipif(not _emulator_ready(), reason="natgen.emulator not built")
CORE = core_cases()


@requires_emulator
@pytest.mark.parametrize("case", CORE, ids=[c.id for c in CORE])
def test_fused_rpb(case, schedules):
    schedules(lambda: run_case(case, "emulator"))
