"""`natgen bench`: the flex mask_mod against the reference neighborhood, the FLOP/byte formulas, and a
tiny end-to-end run whose table reports every requested peer (missing ones included)."""
import math
import sys
import warnings

import pytest
import torch

from natgen import bench
from natgen.problem import make_problem
from natgen.reference import na_reference, neighbor_table

pytestmark = pytest.mark.cpu

# (spatial, kernel_size, stride, dilation, is_causal): borders, even K, dilation groups of unequal
# length (L % D != 0), stride groups, causal, mixed per-dim parameters.
MASK_CASES = [
    ((8,), 3, 1, 1, False),
    ((13,), 4, 1, 1, False),
    ((17,), 5, 2, 3, False),
    ((19,), 4, 3, 2, True),
    ((16,), 5, 5, 1, False),
    ((11,), 11, 1, 1, False),
    ((9, 10), (3, 4), (1, 2), (2, 1), (False, True)),
    ((12, 7), 3, (3, 1), (3, 2), (True, False)),
    ((10, 11), (5, 2), (2, 2), 1, False),
    ((5, 6, 7), (3, 2, 3), (1, 2, 3), (1, 2, 1), (False, True, False)),
]


def _dense_reference_mask(spatial, kernel_size, stride, dilation, is_causal):
    index, valid = neighbor_table(spatial, kernel_size, stride, dilation, is_causal)
    tokens = math.prod(spatial)
    mask = torch.zeros(tokens, tokens, dtype=torch.bool)
    rows = torch.arange(tokens)[:, None].expand_as(index)
    mask[rows[valid], index[valid]] = True
    return mask


@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: str(c))
def test_mask_mod_is_the_reference_neighborhood(case):
    from torch.nn.attention.flex_attention import create_mask
    spatial = case[0]
    tokens = math.prod(spatial)
    mask_mod = bench.neighborhood_mask_mod(*case)
    got = create_mask(mask_mod, None, None, tokens, tokens, device="cpu")[0, 0]
    assert torch.equal(got, _dense_reference_mask(*case))


@pytest.mark.parametrize("rank, spatial, params", [
    (1, (23,), dict(kernel_size=5, stride=2, dilation=3, is_causal=False)),
    (1, (20,), dict(kernel_size=6, stride=4, dilation=2, is_causal=True)),
    (2, (9, 10), dict(kernel_size=(3, 4), stride=(2, 1), dilation=(2, 2), is_causal=(True, False))),
    (2, (8, 8), dict(kernel_size=3, stride=1, dilation=1, is_causal=False)),
])
def test_flex_attention_with_mask_mod_matches_reference(rank, spatial, params):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    gen = torch.Generator().manual_seed(rank * 100 + len(spatial))
    batch, heads, head_dim = 2, 3, 16
    q, k, v = (torch.randn(batch, *spatial, heads, head_dim, generator=gen, dtype=torch.float64)
               for _ in range(3))
    expected = na_reference(q, k, v, make_problem(rank, q, k, v, **params))
    tokens = math.prod(spatial)
    mask_mod = bench.neighborhood_mask_mod(spatial, params["kernel_size"], params["stride"], params["dilation"],
                                           params["is_causal"])
    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device="cpu", BLOCK_SIZE=16)

    def heads_first(t):
        return t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # eager flex_attention warns that it is unfused
        out = flex_attention(heads_first(q), heads_first(k), heads_first(v), block_mask=block_mask)
    out = out.transpose(1, 2).reshape(expected.shape)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_flop_and_byte_formulas():
    ps = bench.SETS["nat-2d"]
    assert ps.tokens == 196 and ps.window == 49
    assert bench.forward_flops(ps) == 4 * 128 * 16 * 196 * 49 * 32
    assert bench.backward_flops(ps) == 2.5 * bench.forward_flops(ps)
    assert bench.measured_flops(ps, backward=True) == 3.5 * bench.forward_flops(ps)
    assert bench.forward_bytes(ps, torch.float16) == 4 * 128 * 16 * 196 * 32 * 2
    video = bench.SETS["video-3d"]
    assert bench.forward_flops(video) == 4 * 1 * 24 * (30 * 48 * 80) * (18 * 24 * 24) * 128
    shrunk = ps.with_batch(4)
    assert shrunk.batch == 4 and shrunk.shrunk_from == 128 and shrunk.spatial == ps.spatial
    assert bench.forward_flops(shrunk) == bench.forward_flops(ps) / 32
    assert ps.with_batch(1000) is ps            # --batch only shrinks


def test_standard_sets_match_benchmarks_md():
    assert list(bench.SETS) == ["nat-1d", "nat-2d", "dinat-2d", "nat-3d", "long-1d", "image-2d", "video-3d",
                                "cpu-2d", "cpu-1d", "dinat-2d-rpb", "cpu-dinat-rpb"]
    assert bench.SETS["cpu-dinat-rpb"].rpb and not bench.SETS["dinat-2d"].rpb
    cpu_1d = bench.SETS["cpu-1d"]
    assert (cpu_1d.batch, cpu_1d.heads, cpu_1d.spatial, cpu_1d.head_dim, cpu_1d.kernel_size, cpu_1d.dilation) == \
        (4, 4, (1024,), 64, (31,), (2,))
    assert bench.SETS["video-3d"].kernel_size == (18, 24, 24)
    assert bench.SETS["dinat-2d"].dilation == (4, 4)


TINY = bench.ProblemSet("tiny-2d", 2, 1, 2, (12, 12), 16, 3, (1, 2))


@pytest.fixture
def no_natten(monkeypatch):
    monkeypatch.setitem(sys.modules, "natten", None)     # `import natten` raises ImportError


def test_bench_reports_every_requested_peer(no_natten):
    result = bench.run_set(TINY, ["natgen", "reference", "natten", "sdpa"], "cpu", repeats=2, budget=30)
    assert [m.peer for m in result.measurements] == ["natgen", "reference", "natten", "sdpa"]
    by_peer = {m.peer: m for m in result.measurements}
    assert by_peer["natten"].seconds is None and "not installed" in by_peer["natten"].status
    for peer in ("natgen", "reference", "sdpa"):
        assert by_peer[peer].seconds > 0 and by_peer[peer].calls == 2, by_peer[peer]
    assert by_peer["reference"].implementation == "reference"
    assert by_peer["natgen"].implementation      # names the backend (and instance) natgen.choose picked

    text = bench.format_result(result)
    lines = text.splitlines()
    assert "tiny-2d" in lines[0] and "GFLOP/s" in lines[2] and "GB/s" in lines[2]
    body = lines[4:]
    assert [line.split()[0] for line in body] == ["natgen", "reference", "natten", "sdpa"]
    assert "not installed" in body[2]
    assert body[0].split()[-2:] == ["1.00x", "-"]


def test_bench_backward_reports_unsupported_peers(no_natten):
    result = bench.run_set(TINY, ["natgen", "flex", "natten", "sdpa"], "cpu", backward=True, repeats=1, budget=30)
    by_peer = {m.peer: m for m in result.measurements}
    assert "no CPU backward" in by_peer["flex"].status and by_peer["flex"].seconds is None
    assert "not installed" in by_peer["natten"].status
    assert by_peer["natgen"].seconds > 0 and by_peer["sdpa"].seconds > 0
    assert result.flops == 3.5 * bench.forward_flops(TINY)
    text = bench.format_result(result)
    assert "forward + backward" in text and "GB/s" not in text   # bytes are defined for the forward only
    assert "no CPU backward" in text


def test_budget_stops_repeats():
    result = bench.run_set(TINY, ["reference"], "cpu", repeats=3, budget=0.0)
    measurement = result.measurements[0]
    assert measurement.calls == 1 and measurement.seconds > 0 and "budget" in measurement.status


def test_cli_bench(tmp_path, no_natten):
    import json

    from click.testing import CliRunner

    from natgen.cli import main
    json_path = tmp_path / "bench.json"
    args = ["bench", "--device", "cpu", "--set", "cpu-1d", "--batch", "1", "--peers", "natgen,natten,sdpa",
            "--repeats", "1", "--json", str(json_path), "-q"]
    plot_path = tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(plot_path)]
    except ImportError:
        plot_path = None
    outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code == 0, outcome.output
    assert "cpu-1d batch shrunk from 4 to 1" in outcome.output
    assert "batch 1 (shrunk from 4)" in outcome.output
    assert "not installed" in outcome.output
    data = json.loads(json_path.read_text())
    assert data[0]["set"] == "cpu-1d" and [p["peer"] for p in data[0]["peers"]] == ["natgen", "natten", "sdpa"]
    assert data[0]["flops_per_call"] == 4 * 1 * 4 * 1024 * 31 * 64
    if plot_path is not None:
        assert plot_path.stat().st_size > 1000

    bad = CliRunner().invoke(main, ["bench", "--device", "cpu", "--peers", "natgen,nope"])
    assert bad.exit_code != 0 and "choose from" in bad.output
