"""Tensor-core families (tcs, tcg) run through the CPU emulator against the float64 oracle.

A fixed core set (every family x rank x dtype x causal variant, borders, several query tiles, dilation
groups, stride, even K, extra tokens, multi-tile windows) plus a seeded random sample of the generic
family whose size is NATGEN_EMULATED_SAMPLES (default 4). Emulated compiles are cached per source.
"""
import pytest

from tc_cases import core_cases, gqa_cases, random_cases, run_case, sample_size

pytestmark = pytest.mark.emulated


def _emulator_ready():
    try:
        from natgen import emulator
        from natgen.manifest import load
        return hasattr(emulator, "launch") and any(i.spec.family in ("tcs", "tcg") for i in load())
    except Exception:
        return False


requires_emulator = pytest.mark.skipif(not _emulator_ready(), reason="natgen.emulator or tc instances missing")

CORE = core_cases()
PUBLIC = [c for c in CORE if c.selected]
SAMPLE = random_cases(sample_size())
GQA = gqa_cases()


@requires_emulator
@pytest.mark.parametrize("case", CORE, ids=[c.id for c in CORE])
def test_core(case):
    run_case(case, "emulator")


@requires_emulator
@pytest.mark.parametrize("case", SAMPLE, ids=[c.id for c in SAMPLE])
def test_random_sample(case):
    run_case(case, "emulator")


@requires_emulator
@pytest.mark.parametrize("case", PUBLIC, ids=[c.id for c in PUBLIC])
def test_selected_through_public_api(case):
    run_case(case, "emulator", public=True)


@requires_emulator
@pytest.mark.parametrize("case", GQA, ids=[c.id for c in GQA])
def test_grouped_kv_heads(case):
    run_case(case, "emulator")
