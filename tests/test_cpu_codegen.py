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

# `python build.py` compiles the prebuilt ones on 2 cores; keep it a few minutes (the rest compile on first use).
CPU_INSTANCE_BUDGET = 40


def _cpu_specs(policy="default", prebuilt_only=True):
    return [s for s in enumerate_space(policy, families=["cpu"]).accepted
            if cpu_family.prebuild(s) or not prebuilt_only]


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
    run = "dispatch<Cfg, true>" if spec.op == "fwd" else "dispatch<Cfg, false>"  # the forward / backward body
    assert run in text


def test_args_layout_matches_the_generated_struct():
    """The runtime packs the Args block from the manifest's "cpu" layout; every generated CPU source declares
    the struct it reads, and both must list the same 8-byte fields in the same order."""
    from natgen.manifest import load
    instances = [i for i in load() if i.spec.family == "cpu"]
    assert instances
    for instance in instances:
        body = re.search(r"struct Args \{(.*?)\};", instance.source_path.read_text(), re.S).group(1)
        fields, kinds = [], []
        for kind, decl in re.findall(r"(int64_t|double)\s+([^;]+);", body):
            for item in decl.split(","):
                item = item.strip()
                match = re.match(r"(\w+)\[(\d+)\]", item)
                names = [f"{match[1]}{i}" for i in range(int(match[2]))] if match else [item]
                fields += names
                kinds += [kind] * len(names)
        layout = instance.layout["fields"]
        assert fields == [f["name"] for f in layout], instance.name
        assert kinds == ["double" if f["type"] == "f64" else "int64_t" for f in layout], instance.name
    # 16 pointers (rpb, grad_rpb among them), 8 counts (heads_kv among them), 5 x 3 per-axis, scale, input_dtype
    assert len(fields) == 40


def test_cache_key_hashes_every_header_an_instance_includes():
    """The CPU compile cache key hashes the headers the manifest entry lists (HEADERS): one missing there would let a module built
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
