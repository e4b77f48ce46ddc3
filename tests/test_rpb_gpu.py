"""gpu tier: relative positional bias in the CUDA forward families and the unfused ops' kernels on a real
GPU (CuPy), the cases of tests/test_rpb_emulated.py and tests/test_unfused_emulated.py."""
import pytest
import torch

from oracle import check_by_rule, unfused_av_oracle, unfused_qk_oracle
from rpb_cases import core_cases, run_case
from test_unfused_emulated import ALL_CASES as CASES, DTYPES, _close, _inputs

pytestmark = pytest.mark.gpu


def _gpu_ready():
    if not torch.cuda.is_available():
        return False
    try:
        from natgen import cuda
        return cuda.available()
    except Exception:
        return False


requires_gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA device and CuPy")
CORE = core_cases()


@requires_gpu
@pytest.mark.parametrize("case", CORE, ids=[c.id for c in CORE])
def test_fused_rpb(case):
    run_case(case, "cuda")


@requires_gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}_{c[7]}")
def test_unfused_qk_av_with_grads(case):
    from natgen import functional
    rank, spatial, kernel, dilation, causal, n_extra, _, dtype = case
    q, k, v, extra_k, extra_v, rpb = _inputs(case)
    dt = DTYPES[dtype]
    gpu = [t.cuda().requires_grad_(True) if t is not None else None for t in (q, k, extra_k, rpb)]
    logits = getattr(functional, f"na{rank}d_qk")(gpu[0], gpu[1], kernel, dilation, gpu[2], causal, gpu[3])
    ref = unfused_qk_oracle(q, k, kernel, dilation, causal, rpb, extra_k)
    _close("logits", logits.detach().cpu(), ref, unfused_qk_oracle(q, k, kernel, dilation, causal, rpb, extra_k, dt).to(dt), dt)
    attn = torch.softmax(logits.float(), -1).to(dt)
    gv = v.cuda().requires_grad_(True)
    gev = extra_v.cuda().requires_grad_(True) if extra_v is not None else None
    out = getattr(functional, f"na{rank}d_av")(attn, gv, kernel, dilation, gev, causal)
    out.float().square().sum().backward()
    torch.cuda.synchronize()

    # the same chain through the float64 / input-dtype oracle
    def chain(compute):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (q, k, extra_k, rpb, v, extra_v)]
        lg = unfused_qk_oracle(*leaves[:2], kernel, dilation, causal, leaves[3], leaves[2], compute)
        w = torch.softmax(lg, -1)
        o = unfused_av_oracle(w, leaves[4], kernel, dilation, causal, leaves[5], compute)
        o.square().sum().backward()
        return o, [t.grad if t is not None else None for t in leaves]

    ref_out, ref_grads = chain(torch.float64)
    naive_out, naive_grads = chain(dt)
    check_by_rule("out", out.detach().cpu(), ref_out, naive_out.to(dt), dt)
    for name, leaf, r, n in zip(("query", "key", "additional_keys", "rpb", "value", "additional_values"),
                                gpu + [gv, gev], ref_grads, naive_grads):
        if r is not None:
            check_by_rule(f"grad of {name}", leaf.grad.cpu(), r, n, dt)
