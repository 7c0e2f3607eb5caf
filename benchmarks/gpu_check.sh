#!/usr/bin/env bash
# One prepared GPU check (issue 19): run it on a machine with an NVIDIA GPU, in the repository
# root. It prints, and writes to RESULTS (default gpu_check_results.txt):
#   1. the GPU (nvidia-smi), torch's CUDA build;
#   2. the `gpu`-marked tests;
#   3. CUDA vs CPU equality per method (benchmarks/gpu_equality.py), and a profile of ties on the
#      GPU (benchmarks/gpu_profile.py: k-th largest selection, torch.profiler tables);
#   4. the 1B merge benchmark on the GPU (and on the CPU of that machine) against the I/O floor.
# Python packages: with WHEELS=DIR, the wheels in DIR are installed into a private folder first
# (for a machine without network); otherwise the current python3 must have torch (a CUDA build)
# and mergelang's dependencies. mergekit --cuda is compared when MERGEKIT=/path/to/mergekit-yaml
# is given (install it in its own venv; it cannot be fetched on a machine without network).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${RESULTS:-gpu_check_results.txt}"
PY="${PYTHON:-python3}"
SIZE="${SIZE:-1B}"
REPEAT="${REPEAT:-2}"
exec > >(tee "$RESULTS") 2>&1
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mergelang-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/mergelang-site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
start=$(date +%s)
echo "== 1. machine"
nvidia-smi -L || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
echo "== 2. gpu tests"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15
echo "== 3. CUDA vs CPU per method"
"$PY" benchmarks/gpu_equality.py
echo "== 3b. where ties spends its time on the GPU"
"$PY" benchmarks/gpu_profile.py 2>&1 | tail -60
echo "== 3c. block-scaled FP8 merges on the GPU (codes copied, dequantized there)"
"$PY" benchmarks/bench_fp8.py --dir /tmp/mergelang-gpu-fp8 --device cuda --repeat 1
echo "== 4. merge benchmark ($SIZE), GPU"
MK=()
[ -n "${MERGEKIT:-}" ] && MK=(--mergekit "$MERGEKIT")
"$PY" benchmarks/bench_merge.py --dir /tmp/mergelang-gpu-bench --size "$SIZE" --device cuda \
    --no-compile --repeat "$REPEAT" "${MK[@]}"
if [ -z "${SKIP_CPU:-}" ]; then
    echo "== 4b. the same on this machine's CPU"
    "$PY" benchmarks/bench_merge.py --dir /tmp/mergelang-gpu-bench --size "$SIZE" --device cpu \
        --no-compile --repeat 1
fi
echo "== done in $(( $(date +%s) - start )) s; results in $RESULTS"
