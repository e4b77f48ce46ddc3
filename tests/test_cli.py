"""The natgen command line: list, show, explain, build --render-only, check."""
import json

import pytest
from click.testing import CliRunner

from natgen.cli import main
from natgen.manifest import load

pytestmark = pytest.mark.codegen


def run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_list_table_and_count():
    result = run("list", "--filter", "na2d_fwd_simt_k7x7_*")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "rank", "K"]
    names = [line.split()[0] for line in lines[2:] if line.startswith("na2d_")]
    assert names and all(name.startswith("na2d_fwd_simt_k7x7_") for name in names)
    assert f"{len(names)} instances" in result.output


def test_list_json_prints_manifest_entries():
    result = run("list", "--json", "--filter", "na1d_fwd_simt_k3_*_f32_h32_*")
    entries = json.loads(result.output)
    assert entries and {e["name"] for e in entries} == {i.name for i in load() if i.name in {e["name"] for e in entries}}
    assert all("launch" in e and "spec" in e for e in entries)


def test_list_rejected_gives_reasons():
    result = run("list", "--rejected", "--filter", "na1d_fwd_simt_k4_*")
    assert result.exit_code == 0
    assert "kernel size outside the specialized set" in result.output
    assert "candidates left out" in result.output


def test_show_prints_source_and_unknown_name_fails():
    name = next(i.name for i in load() if i.spec.family == "simt")
    result = run("show", name)
    assert result.exit_code == 0 and f"void __launch_bounds__" in result.output and name in result.output
    missing = CliRunner().invoke(main, ["show", "na9d_nothing"])
    assert missing.exit_code != 0 and "no instance named" in missing.output


def test_explain_names_choice_and_losers():
    result = run("explain", "--rank", "2", "--shape", "56x56", "--kernel-size", "7", "--dtype", "fp16",
                 "--head-dim", "32")
    assert result.exit_code == 0
    chosen = [line for line in result.output.splitlines() if line.startswith("chosen:")]
    assert chosen and "_k7x7_" in chosen[0] and "_f16_h32_" in chosen[0]
    assert "kany_dany" in result.output  # the generic fallback lost, and says so
    assert "dtype bf16 != f16" in result.output


def test_explain_reports_invalid_problem():
    result = CliRunner().invoke(main, ["explain", "--rank", "2", "--shape", "8x8", "--kernel-size", "9"])
    assert result.exit_code != 0 and "kernel_size" in result.output


def test_build_render_only_and_check(monkeypatch):
    result = run("build", "--render-only")
    assert result.exit_code == 0
    check = run("check")
    assert check.exit_code == 0 and "matches a fresh render" in check.output


def test_build_unknown_filter_is_an_error():
    result = CliRunner().invoke(main, ["build", "--filter", "no_such_instance_*"])
    assert result.exit_code != 0 and "no instance matches" in result.output


@pytest.mark.cpu
def test_demo_runs_and_reports_small_errors():
    result = CliRunner().invoke(main, ["demo", "--size", "12"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "(best available)" in line or
            line.startswith(("emulator", "reference"))]
    assert rows and "(best available)" in rows[0]
    for row in rows:
        error = float([cell for cell in row.split() if "e-" in cell or "e+" in cell][0])
        assert error < 1e-5, row


def test_explain_says_where_bf16_scores_are_avx512_bf16_dot_products():
    from natgen import cpu_isa
    for isa in cpu_isa.supported():
        with cpu_isa.use(isa):
            bf16 = run("explain", "--rank", "2", "--shape", "32x32", "--kernel-size", "7", "--dtype", "bf16",
                       "--target", "cpu")
            fp32 = run("explain", "--rank", "2", "--shape", "32x32", "--kernel-size", "7", "--dtype", "fp32",
                       "--target", "cpu")
        assert f"ISA variant: {isa}" in bf16.output
        assert ("AVX512_BF16 dot products" in bf16.output) == (isa == "avx512bf16")
        assert "AVX512_BF16 dot products" not in fp32.output
