#!/usr/bin/env bash
# Re-runs the CPU benchmarks and rewrites the generated part of docs/benchmarks.md (between the
# "cpu-benchmarks" markers). Usage: bash docs/make_cpu_benchmarks.sh [extra natgen bench options]
# e.g. REPEATS=10 bash docs/make_cpu_benchmarks.sh --budget 20
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS="${REPEATS:-5}"
OUT="$(mktemp)"
trap 'rm -f "$OUT"' EXIT

run() {
    echo "+ natgen bench $*" >&2
    {
        echo
        echo '```'
        echo "\$ natgen bench $*"
        natgen bench -q "$@"
        echo '```'
    } >> "$OUT"
}

{
    echo "Machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores," \
         "torch $(python -c 'import torch; print(torch.__version__)')," \
         "natten $(python -c 'import natten; print(natten.__version__)' 2>/dev/null || echo 'not installed')," \
         "generated $(date -u +%Y-%m-%d) by docs/make_cpu_benchmarks.sh;" \
         "1-minute load average at the start: $(cut -d' ' -f1 /proc/loadavg) (other jobs share the machine)."
} > "$OUT"

echo -e "\n### Standard CPU sets (cpu-2d, cpu-1d), forward" >> "$OUT"
run --device cpu --set cpu-2d --set cpu-1d --repeats "$REPEATS" "$@"
echo -e "\n### Standard CPU sets, forward + backward" >> "$OUT"
run --device cpu --set cpu-2d --set cpu-1d --repeats "$REPEATS" --backward "$@"
echo -e "\n### nat-2d with batch shrunk from 128 to 4 (spatial unchanged), forward" >> "$OUT"
run --device cpu --set nat-2d --batch 4 --repeats "$REPEATS" "$@"
echo -e "\n### nat-2d with batch shrunk from 128 to 4, forward + backward" >> "$OUT"
run --device cpu --set nat-2d --batch 4 --repeats "$REPEATS" --backward "$@"

echo -e "\n### cpu-2d in bfloat16 (natgen's kernels read bf16 themselves; dense SDPA in bf16), forward" >> "$OUT"
run --device cpu --set cpu-2d --dtype bf16 --peers natgen,flex,sdpa --repeats "$REPEATS" "$@"
echo -e "\n### cpu-2d in bfloat16, forward + backward" >> "$OUT"
run --device cpu --set cpu-2d --dtype bf16 --peers natgen,flex,sdpa --repeats "$REPEATS" --backward "$@"

echo -e "\n### cpu-2d in float16 (natgen's kernels read fp16 themselves; dense SDPA in fp16), forward" >> "$OUT"
run --device cpu --set cpu-2d --dtype fp16 --peers natgen,flex,sdpa --repeats "$REPEATS" "$@"
echo -e "\n### cpu-2d in float16, forward + backward" >> "$OUT"
run --device cpu --set cpu-2d --dtype fp16 --peers natgen,flex,sdpa --repeats "$REPEATS" --backward "$@"

python docs/splice_section.py cpu-benchmarks "$OUT" docs/benchmarks.md
