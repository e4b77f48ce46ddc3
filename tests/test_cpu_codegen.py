"""CPU family generator checks (pure Python: no compiler needed)."""
from __future__ import annotations

import re

import pytest

from natgen.codegen import render as render_mod
from natgen.codegen.families import REGISTRY
from natgen.codegen.families import cpu as cpu_family
from natgen.codegen.space import enumerate_space
from natgen.codegen.spec import KernelSpec

pytestmark = pytest.mark.codegen

# `python build.py --filter '*_cpu'` compiles these on 2 cores; keep it a few minutes.
CPU_INSTANCE_BUDGET = 40


def _cpu_specs(policy="default"):
    return [s for s in enumerate_space(policy, families=["cpu"]).accepted]


def test_family_is_registered():
    assert REGISTRY["cpu"] is cpu_family
    assert (cpu_family.TOOLCHAIN, cpu_family.SOURCE_SUFFIX) == ("cxx", ".cpp")


def test_default_instance_count_within_budget_and_fwd_bwd_paired():
    specs = _cpu_specs()
    assert 0 < len(specs) <= CPU_INSTANCE_BUDGET
    names = {s.name for s in specs}
    for spec in specs:
        twin = KernelSpec.parse(spec.name.replace("_fwd_", "_bwd_") if spec.op == "fwd"
                                else spec.name.replace("_bwd_", "_fwd_"))
        assert twin.name in names, f"{spec.name} has no {twin.op} twin"
    for rank in (1, 2, 3):  # every rank has a K=any fallback for f32 and f64
        for dtype in ("f32", "f64"):
            assert any(s.rank == rank and s.dtype == dtype and s.kernel_size == "any" for s in specs)


def test_names_roundtrip_and_compute_dtypes():
    for spec in _cpu_specs("full"):
        assert KernelSpec.parse(spec.name) == spec
        assert spec.dtype in ("f32", "f64") and spec.arch == "cpu"


def test_rejected_candidates_have_reasons():
    rejected = enumerate_space("default", families=["cpu"]).rejected
    assert rejected and all(r.reason for r in rejected)


@pytest.mark.parametrize("name", ["na2d_fwd_cpu_k7x7_dany_c00_f32_h32_q8x8_cpu",
                                  "na3d_bwd_cpu_kany_dany_c010_f64_hany_q2x4x8_cpu",
                                  "na1d_fwd_cpu_kany_dany_c1_f32_hany_q64_cpu"])
def test_render_is_deterministic_and_complete(name):
    spec = KernelSpec.parse(name)
    text = render_mod.render(spec)
    assert text == render_mod.render(spec)
    assert f'extern "C" NATGEN_EXPORT int {name}(' in text
    assert "DO NOT EDIT" in text.splitlines()[0] and spec.json_text() in text
    assert "{{" not in text and "None" not in text and "True" not in text and "False" not in text
    run = "run_forward" if spec.op == "fwd" else "run_backward"
    assert run in text


def test_args_layout_matches_the_header():
    """runtime/cpu.py packs natgen::Args as int64 fields in ARG_FIELDS order."""
    from natgen import cpu
    header = (render_mod.TEMPLATES_DIR / "natgen_cpu_args.h").read_text()
    body = re.search(r"struct Args \{(.*?)\};", header, re.S).group(1)
    fields = []
    for decl in re.findall(r"(int64_t|double)\s+([^;]+);", body):
        for item in decl[1].split(","):
            item = item.strip()
            match = re.match(r"(\w+)\[(\d+)\]", item)
            fields += [f"{match[1]}{i}" for i in range(int(match[2]))] if match else [item]
    assert tuple(fields) == cpu.ARG_FIELDS
    assert len(fields) == cpu_family.ARG_FIELD_COUNT


def test_cache_key_hashes_every_header_an_instance_includes():
    """cpu_build's cache key hashes the headers in HEADERS: one missing there would let a module built
    against its old text be reused after it changed."""
    include = re.compile(r'#include "([^"]+)"')
    pending = include.findall((render_mod.TEMPLATES_DIR / cpu_family.TEMPLATE).read_text())
    seen = set()
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending += include.findall((render_mod.TEMPLATES_DIR / name).read_text())
    assert seen == set(cpu_family.HEADERS)
    assert len(cpu_family.HEADERS) == len(seen)  # each once
