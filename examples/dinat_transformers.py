"""transformers' DinatModel and NatModel (4.46.3, small configs, random weights: nothing is downloaded) on natgen.

Each model runs forward and backward three ways on the CPU, from the same weights and input:
  unfused    natten's names (natten2dqkrpb, softmax, natten2dav) served by natgen.functional
  fused      natgen.na2d(..., rpb=layer.rpb) with the best available backend (printed: natgen.choose)
  reference  natgen.na2d(..., rpb=layer.rpb, backend="reference"), the check
and prints the max differences against the reference (output, and the rpb gradients) and the median time of a
forward + backward step.

    pip install -e '.[compat]' && python examples/dinat_transformers.py [--image 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import natgen
import natgen.compat


def build_models(image: int):
    from transformers import DinatConfig, DinatModel, NatConfig, NatModel
    torch.manual_seed(0)
    models = {
        "DinatModel": DinatModel(DinatConfig(embed_dim=64, depths=[2, 2], num_heads=[2, 4], kernel_size=7,
                                             dilations=[[1, 2], [1, 1]], image_size=image, drop_path_rate=0.0)),
        "NatModel": NatModel(NatConfig(embed_dim=64, depths=[2, 2], num_heads=[2, 4], kernel_size=7,
                                       image_size=image, drop_path_rate=0.0)),
    }
    for model in models.values():
        model.eval()  # no dropout: the three ways compute the same function
        for name, parameter in model.named_parameters():
            if name.endswith(".rpb"):
                torch.nn.init.normal_(parameter, std=0.5)  # trained biases are not zero
    return models


def step(model, x):
    """(output, rpb grads, seconds) of one forward + backward."""
    model.zero_grad()
    start = time.perf_counter()
    out = model(x).last_hidden_state
    out.square().mean().backward()
    seconds = time.perf_counter() - start
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(".rpb")}, seconds


def first_layer_choice(model, x):
    """The backend natgen picks for the model's first neighborhood-attention layer, fused, with its rpb."""
    layer = next(m for m in model.modules() if type(m).__name__ == "NeighborhoodAttention")
    found = {}

    def hook(module, inputs):
        hidden = inputs[0]
        shape = (*hidden.shape[:-1], module.num_attention_heads, module.attention_head_size)
        q = torch.empty(shape)
        found["choice"] = natgen.choose(2, q, q, q, module.kernel_size, dilation=getattr(module, "dilation", 1),
                                        rpb=module.rpb.detach())
    handle = layer.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(x)
    handle.remove()
    return found["choice"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import transformers
    from natgen.bench.report import cpu_model
    natgen.compat.patch_transformers()  # before the models are built: they check that a natten is available
    print(f"machine: {cpu_model()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    x = torch.randn(2, 3, args.image, args.image, generator=torch.Generator().manual_seed(1))
    ways = {"unfused": dict(fused=False), "fused": dict(fused=True), "reference": dict(fused=True,
                                                                                       backend="reference")}
    for name, model in build_models(args.image).items():
        results = {}
        for way, options in ways.items():
            natgen.compat.patch_transformers(**options)
            step(model, x)  # warm-up (module loads, caches)
            runs = [step(model, x) for _ in range(args.repeats)]
            results[way] = (runs[-1][0], runs[-1][1], statistics.median(r[2] for r in runs))
        natgen.compat.patch_transformers(fused=True)
        backend, instance = first_layer_choice(model, x)
        natgen.compat.patch_transformers(fused=False)
        out_ref, grads_ref, _ = results["reference"]
        print(f"\n{name}: input {tuple(x.shape)}, output {tuple(out_ref.shape)}; fused layers run on "
              f"backend {backend!r}" + (f" ({instance})" if instance else ""))
        print(f"  {'way':<10} {'fwd+bwd ms':>11} {'max |out - ref|':>16} {'max |drpb - ref|':>17}")
        for way, (out, grads, seconds) in results.items():
            grad_error = max((grads[k] - grads_ref[k]).abs().max().item() for k in grads_ref)
            print(f"  {way:<10} {seconds * 1e3:>11.1f} {(out - out_ref).abs().max().item():>16.2e} "
                  f"{grad_error:>17.2e}")


if __name__ == "__main__":
    main()
