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

# the same on one ISA variant (NATGEN_CPU_ISA)
run_isa() {
    local isa="$1"
    shift
    echo "+ NATGEN_CPU_ISA=$isa natgen bench $*" >&2
    {
        echo
        echo '```'
        echo "\$ NATGEN_CPU_ISA=$isa natgen bench $*"
        NATGEN_CPU_ISA="$isa" natgen bench -q "$@"
        echo '```'
    } >> "$OUT"
}

{
    echo "Machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1)" \
         "($(python -c 'from natgen import cpu_isa; print(cpu_isa.cpu_class())')), $(nproc) cores," \
         "natgen's default ISA variant here: $(python -c 'from natgen import cpu_isa; print(cpu_isa.describe())')," \
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

# every ISA variant this CPU runs but the default, natgen alone (the default's rows are above)
DEFAULT_ISA="$(python -c 'from natgen import cpu_isa; print(cpu_isa.current())')"
for isa in $(python -c 'from natgen import cpu_isa; print(" ".join(cpu_isa.supported()))'); do
    [ "$isa" = "$DEFAULT_ISA" ] && continue
    echo -e "\n### ISA variant $isa (natgen alone): standard CPU sets and nat-2d batch 4, forward, then forward + backward" >> "$OUT"
    run_isa "$isa" --device cpu --set cpu-2d --set cpu-1d --set nat-2d --batch 4 --peers natgen --repeats "$REPEATS" "$@"
    run_isa "$isa" --device cpu --set cpu-2d --set cpu-1d --set nat-2d --batch 4 --peers natgen --repeats "$REPEATS" \
        --backward "$@"
    case "$isa" in avx512*)
        echo -e "\n### ISA variant $isa, cpu-2d in bfloat16 (natgen alone), forward" >> "$OUT"
        run_isa "$isa" --device cpu --set cpu-2d --dtype bf16 --peers natgen --repeats "$REPEATS" "$@" ;;
    esac
done

python docs/splice_section.py cpu-benchmarks "$OUT" docs/benchmarks.md
