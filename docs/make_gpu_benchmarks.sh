#!/usr/bin/env bash
# Runs the gpu test tier and the GPU benchmarks on a CUDA machine and rewrites the generated part of
# docs/benchmarks.md (between the "gpu-benchmarks" markers). Usage, from the repository root:
#   bash docs/make_gpu_benchmarks.sh [extra natgen bench options]     e.g. REPEATS=20 bash docs/make_gpu_benchmarks.sh
# On a machine without network access, install natgen against the torch/CuPy already there:
#   pip install --no-deps --no-build-isolation -e .
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS="${REPEATS:-10}"
OUT="$(mktemp)"
trap 'rm -f "$OUT"' EXIT

python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script needs a GPU")'

run() {
    echo "+ natgen bench $*" >&2
    {
        echo
        echo '```'
        echo "\$ natgen bench $*"
        natgen bench -q "$@" || echo "(natgen bench exited with $?)"
        echo '```'
    } >> "$OUT"
}

{
    echo "GPU: $(python -c 'import torch; print(torch.cuda.get_device_name())')," \
         "torch $(python -c 'import torch; print(torch.__version__)')," \
         "CuPy $(python -c 'import cupy; print(cupy.__version__)' 2>/dev/null || echo 'not installed')," \
         "natten $(python -c 'import natten; print(natten.__version__)' 2>/dev/null || echo 'not installed')," \
         "generated $(date -u +%Y-%m-%d) by docs/make_gpu_benchmarks.sh."
    echo
    echo "### gpu test tier"
    echo
    echo '```'
    echo '$ python -m pytest -m gpu -q'
    python -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -n 15 || true
    echo '```'
} > "$OUT"

echo -e "\n### GPU sets, fp16, forward" >> "$OUT"
run --device cuda --dtype fp16 --repeats "$REPEATS" "$@"
echo -e "\n### GPU sets, bf16, forward" >> "$OUT"
run --device cuda --dtype bf16 --repeats "$REPEATS" "$@"
echo -e "\n### GPU sets, fp16, forward + backward" >> "$OUT"
run --device cuda --dtype fp16 --repeats "$REPEATS" --backward "$@"

python docs/splice_section.py gpu-benchmarks "$OUT" docs/benchmarks.md
