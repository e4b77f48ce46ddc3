"""Tensor-core families (tcs, tcg) run through the CPU emulator against the float64 oracle.

A fixed core set (every family x rank x dtype x causal variant, borders, several query tiles, dilation
groups, stride, even K, extra tokens, multi-tile windows) plus a seeded random sample of the generic
family whose size is NATGEN_EMULATED_SAMPLES (default 4, 16 with NATGEN_EMU_WIDE=1). Every launch runs
with racecheck and initcheck, and every case under the default schedule and a shuffled one with
bit-identical results (fixtures in tests/conftest.py). Emulated compiles are cached per source.
"""
import pytest

from tc_cases import core_cases, gqa_cases, random_cases, run_case, sample_size

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulator_checks")]


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
def test_core(case, schedules):
    schedules(lambda: run_case(case, "emulator"))


@requires_emulator
@pytest.mark.parametrize("case", SAMPLE, ids=[c.id for c in SAMPLE])
def test_random_sample(case, schedules):
    schedules(lambda: run_case(case, "emulator"))


@requires_emulator
@pytest.mark.parametrize("case", PUBLIC, ids=[c.id for c in PUBLIC])
def test_selected_through_public_api(case, schedules):
    schedules(lambda: run_case(case, "emulator", public=True))


@requires_emulator
@pytest.mark.parametrize("case", GQA, ids=[c.id for c in GQA])
def test_grouped_kv_heads(case, schedules):
    schedules(lambda: run_case(case, "emulator"))


# Bugs planted in natgen's own kernels: each edit removes one piece of synchronisation the kernel needs,
# and the checked tier must raise for it (the edited source is launched; nothing is compared).
PLANTED = {
    "tcg-no-barrier-after-wait": ("tcg", "ng::cp_async_wait<1>();\n        __syncthreads();", "ng::cp_async_wait<1>();"),
    "tcg-no-barrier-before-prefetch": ("tcg", "__syncthreads();  // the next iteration's prefetch", "//"),
    "tcg-wait-too-little": ("tcg", "ng::cp_async_wait<1>();", "ng::cp_async_wait<2>();"),
    "tcs-no-wait": ("tcs", "ng::cp_async_wait<0>();", ""),
    "tcs-no-barrier-between-slabs": ("tcs", "if (slab > 0) __syncthreads();", ""),
}
PLANTED_CASES = {
    # three key tiles per CTA: the prefetch of the third overwrites the stage of the first
    "tcg": ("tcg", (160,), 100, dict(dtype="f16")),
    # more extra tokens than the region holds: several slabs
    "tcs": ("tcs", (20,), 5, dict(dtype="bf16", n_extra=70)),
}


@requires_emulator
@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_synchronisation_bug_is_caught(name, monkeypatch):
    from natgen import emulator
    from tc_cases import case as make_case

    # racecheck alone: with initcheck on, a read that runs ahead of every copy is (also, rightly)
    # reported as uninitialized; this test is about the race
    monkeypatch.setenv("NATGEN_EMU_RACECHECK", "1")
    monkeypatch.setenv("NATGEN_EMU_INITCHECK", "0")
    family, old, new = PLANTED[name]
    fam, spatial, kernel, kw = PLANTED_CASES[family]
    with pytest.raises(emulator.RaceError):
        run_case(make_case(fam, spatial, kernel, **kw), "emulator", source_edit=lambda s: s.replace(old, new))
