"""Generator tier: spec names, the space, deterministic rendering, StrictUndefined, the committed library."""
import json
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from natgen.codegen import library, render, space
from natgen.codegen.families import REGISTRY
from natgen.codegen.spec import ANY, KernelSpec

pytestmark = pytest.mark.codegen
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default_space():
    return space.enumerate_space("default")


def test_name_round_trip_for_every_instance(default_space):
    assert default_space.accepted, "the default policy produced no instances"
    for spec in default_space.accepted:
        assert KernelSpec.parse(spec.name) == spec, spec.name


def test_name_round_trip_for_rejected_candidates(default_space):
    for rejected in default_space.rejected[:: max(1, len(default_space.rejected) // 500)]:
        assert KernelSpec.parse(rejected.name).name == rejected.name


def test_names_are_unique_and_sorted(default_space):
    names = [spec.name for spec in default_space.accepted]
    assert len(names) == len(set(names))
    assert names == sorted(names)


def test_name_example_and_fields():
    spec = KernelSpec("simt", "fwd", 2, (7, 7), ANY, (False, True), "f16", 32, (8, 8), "sm80")
    assert spec.name == "na2d_fwd_simt_k7x7_dany_c01_f16_h32_q8x8_sm80"
    assert KernelSpec.parse(spec.name) == spec
    assert KernelSpec.from_json(json.loads(spec.json_text())) == spec


@pytest.mark.parametrize("bad", ["na2d_fwd_simt_k7x7", "na4d_fwd_simt_k7_d1_c0_f16_h32_q8_sm80",
                                 "na2d_fwd_simt_k7x7_d1x1_c00_f16_h32_q8x8_sm80_extra"])
def test_parse_rejects_foreign_names(bad):
    with pytest.raises(ValueError, match="not a natgen kernel name|invalid KernelSpec"):
        KernelSpec.parse(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=2, kernel_size=(7,)), "kernel_size"),
    (dict(rank=1, kernel_size=(1,)), ">= 2"),
    (dict(rank=1, dtype="f8"), "dtype"),
    (dict(rank=1, family="tcs", arch="cpu"), "arch 'cpu' goes with family 'cpu'"),
])
def test_spec_validation(kwargs, message):
    base = dict(family="simt", op="fwd", rank=1, kernel_size=(3,), dilation=(1,), causal=(False,),
                dtype="f32", head_dim=32, tile=(4,), arch="sm80")
    base.update(kwargs)
    rank = base["rank"]
    # only the field under test is wrong: the per-dim fields follow the rank
    base.update(dilation=(1,) * rank, causal=(False,) * rank, tile=(1,) * rank)
    with pytest.raises(ValueError, match=message):
        KernelSpec(**base)


def test_default_policy_within_budget(default_space):
    count = len(default_space.accepted)
    assert 0 < count <= space.DEFAULT_INSTANCE_BUDGET, f"{count} instances, budget {space.DEFAULT_INSTANCE_BUDGET}"


def test_full_policy_is_a_superset(default_space):
    full = {s.name for s in space.enumerate_space("full").accepted}
    assert {s.name for s in default_space.accepted} <= full
    assert len(full) > len(default_space.accepted)


def test_every_rejection_has_a_reason(default_space):
    assert default_space.rejected
    assert all(r.reason and len(r.reason) > 10 for r in default_space.rejected)
    accepted = {s.name for s in default_space.accepted}
    assert not accepted & {r.name for r in default_space.rejected}


def test_glob_filters():
    picked = space.enumerate_space("default", ["na2d_*_f16_h32_*"]).accepted
    assert picked and all(s.rank == 2 and s.dtype == "f16" and s.head_dim == 32 for s in picked)
    assert space.enumerate_space("default", ["no_such_*"]).accepted == []


def test_rendering_is_deterministic(default_space):
    sample = default_space.accepted[:: max(1, len(default_space.accepted) // 40)]
    for spec in sample:
        first = render.render(spec)
        render.environment.cache_clear()
        render.template_hash.cache_clear()
        assert render.render(spec).encode() == first.encode(), spec.name


def test_generated_header_names_spec_and_template(default_space):
    for spec in default_space.accepted[:: max(1, len(default_space.accepted) // 20)]:
        text = render.render(spec)
        assert "DO NOT EDIT" in text.splitlines()[0]
        assert render.spec_from_source(text) == spec
        family = REGISTRY[spec.family]
        assert f"template-sha256: {render.template_hash(family.TEMPLATE)}" in text
        assert "{{" not in text and "{%" not in text
        if family.TOOLCHAIN == "nvcc":
            assert f'extern "C" __global__' in text and spec.name in text


def test_strict_undefined_fails_loudly(tmp_path):
    (tmp_path / "bad.j2").write_text("int x = {{ not_provided }};\n")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(tmp_path)), undefined=jinja2.StrictUndefined)
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("bad.j2").render()
    # the project's own environment is strict too: a family context missing a value must not render
    assert render.environment().undefined is jinja2.StrictUndefined
    spec = next(s for s in space.enumerate_space("default").accepted if s.family == "simt")
    family = REGISTRY["simt"]
    original = family.context
    try:
        family.context = lambda s: {k: v for k, v in original(s).items() if k != "head_dim"}
        with pytest.raises(jinja2.UndefinedError, match="head_dim"):
            render.render(spec)
    finally:
        family.context = original


def test_committed_library_matches_fresh_render():
    problems = library.check_library()
    assert problems == [], "\n".join(problems[:20])


def test_manifest_describes_every_file():
    manifest = library.load_manifest()
    assert manifest["schema"] == library.SCHEMA_VERSION
    for entry in manifest["instances"]:
        assert (library.GENERATED_DIR / entry["file"]).exists(), entry["file"]
        assert entry["symbol"] == entry["name"]
        assert KernelSpec.from_json(entry["spec"]).name == entry["name"]
        assert entry["launch"]["threads"] > 0 or entry["toolchain"] != "nvcc"


def test_write_library_is_incremental_and_check_detects_drift(tmp_path):
    filtered = space.enumerate_space("default", ["na1d_fwd_simt_k3_*"])
    counts = library.write_library(tmp_path, filtered)
    assert counts["written"] == counts["total"] > 0
    again = library.write_library(tmp_path, filtered)
    assert again["written"] == 0 and again["unchanged"] == counts["total"]
    victim = tmp_path / library.relative_file(filtered.accepted[0])
    victim.write_text(victim.read_text() + "// edited by hand\n")
    repaired = library.write_library(tmp_path, filtered)
    assert repaired["written"] == 1
    stale = tmp_path / "cuda" / "na1d_fwd_simt_k99_d1_c0_f32_h32_q4_sm80.cu"
    stale.write_text("// stale\n")
    assert library.write_library(tmp_path, filtered)["removed"] == 1


def test_build_check_command_passes_on_the_committed_tree():
    proc = subprocess.run([sys.executable, str(REPO / "build.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "matches a fresh render" in proc.stdout
