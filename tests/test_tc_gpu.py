"""The tensor-core families on a real GPU (CuPy): the same cases as tests/test_tc_emulated.py."""
import pytest
import torch

from tc_cases import core_cases, gqa_cases, random_cases, run_case, sample_size

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
PUBLIC = [c for c in CORE if c.selected]
SAMPLE = random_cases(max(sample_size(), 16))
GQA = gqa_cases()


@requires_gpu
@pytest.mark.parametrize("case", CORE, ids=[c.id for c in CORE])
def test_core(case):
    run_case(case, "cuda")


@requires_gpu
@pytest.mark.parametrize("case", SAMPLE, ids=[c.id for c in SAMPLE])
def test_random_sample(case):
    run_case(case, "cuda")


@requires_gpu
@pytest.mark.parametrize("case", PUBLIC, ids=[c.id for c in PUBLIC])
def test_selected_through_public_api(case):
    run_case(case, "cuda", public=True)


@requires_gpu
@pytest.mark.parametrize("case", GQA, ids=[c.id for c in GQA])
def test_grouped_kv_heads(case):
    run_case(case, "cuda")
