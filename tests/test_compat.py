"""natgen.compat: natten's import names served by natgen without natten, and transformers' DiNAT / NAT models on
natgen (unfused and fused), checked end to end against the models with the independent oracle's ops in their
place."""

import importlib.util
import sys

import pytest
import torch

import natgen.compat as compat
import natgen.functional as F
from oracle import unfused_av_oracle, unfused_qk_oracle

pytestmark = [pytest.mark.reference,
              pytest.mark.skipif(importlib.util.find_spec("natten") is not None and not compat.natten_is_shimmed(),
                                 reason="a real natten is installed; the shim leaves it alone")]


@pytest.fixture
def natten_shim():
    assert compat.patch_natten()
    yield
    compat.unpatch_natten()


def test_natten_names_resolve_to_natgen(natten_shim):
    from natten.functional import natten2dav, natten2dqkrpb, natten3dqk, na2d_qk  # noqa: F401
    import natten
    assert natten2dqkrpb is F.natten2dqkrpb and natten2dav is F.natten2dav and natten3dqk is F.natten3dqk
    assert natten.functional is sys.modules["natten.functional"] and natten.__version__.endswith("+natgen")
    compat.unpatch_natten()
    assert "natten" not in sys.modules and importlib.util.find_spec("natten") is None
    assert compat.patch_natten()  # idempotent, and re-installable


transformers = pytest.importorskip("transformers", reason="transformers (the compat extra) is not installed")


def _oracle_natten(module):
    """natten's two ops as the float64 oracle computes them (differentiable), for the transformers module."""
    def qkrpb(query, key, rpb, kernel_size, dilation):
        return unfused_qk_oracle(query, key, kernel_size, dilation, rpb=rpb).to(query.dtype)

    def av(attn, value, kernel_size, dilation):
        return unfused_av_oracle(attn, value, kernel_size, dilation).to(value.dtype)
    return {"natten2dqkrpb": qkrpb, "natten2dav": av}


def _models():
    from transformers import DinatConfig, DinatModel, NatConfig, NatModel
    torch.manual_seed(0)
    dinat = DinatModel(DinatConfig(embed_dim=16, depths=[1, 2], num_heads=[2, 4], kernel_size=3,
                                   dilations=[[2], [1, 2]], image_size=32, drop_path_rate=0.0))
    nat = NatModel(NatConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4], kernel_size=3, image_size=28,
                             drop_path_rate=0.0))
    for model in (dinat, nat):
        for name, parameter in model.named_parameters():
            if name.endswith(".rpb"):  # trained biases are not zero; zeros would hide a misplaced entry
                torch.nn.init.normal_(parameter, std=0.5)
    return {"dinat": (dinat, (1, 3, 32, 32)), "nat": (nat, (1, 3, 28, 28))}


def _run(model, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    out = model(x).last_hidden_state
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if name.endswith(".rpb")}
    return out.detach(), grads


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_transformers_models_run_on_natgen(natten_shim, monkeypatch, fused):
    patched = compat.patch_transformers(fused=fused)  # the best available backend (cpu forward with rpb)
    try:
        assert "transformers.models.dinat.modeling_dinat" in patched
        for name, (model, shape) in _models().items():
            module = sys.modules[type(model).__module__]
            out, grads = _run(model, shape)
            with monkeypatch.context() as patch:
                for function, implementation in _oracle_natten(module).items():
                    patch.setattr(module, function, implementation)
                patch.setattr(module.NeighborhoodAttention, "forward", module.NeighborhoodAttention.forward.__wrapped__
                              if fused else module.NeighborhoodAttention.forward)
                expected, expected_grads = _run(model, shape)
            assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (name, (out - expected).abs().max())
            assert grads and all(g.abs().sum() > 0 for g in grads.values()), name
            for key in grads:
                assert torch.allclose(grads[key], expected_grads[key], atol=1e-3, rtol=1e-3), (name, key)
    finally:
        compat.patch_transformers(fused=False)
