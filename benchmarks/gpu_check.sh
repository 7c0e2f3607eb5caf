#!/usr/bin/env bash
# One prepared GPU check (issues 19, 33): run it on a machine with an NVIDIA GPU, in the repository
# root. Every step is guarded (a failure or a step's time limit does not stop the rest) and the
# whole run stops starting new steps after TOTAL_S seconds; everything goes to a log, RESULTS
# (default $OUT/gpu_check.log when OUT is set, else gpu_check_results.txt):
#   1. the GPU (nvidia-smi), torch's CUDA build;            2. the `gpu`-marked tests;
#   3. CUDA vs CPU equality per method (gpu_equality.py);    3b. the ties profile (gpu_profile.py);
#   4. launches per tensor, batched vs unbatched, same bytes (bench_batch.py);
#   5. the k-th largest: radix select vs sort / kthvalue / topk per size (bench_select.py);
#   6. FP8 block-scaled DeepSeek-V3-shaped slice (bench_fp8.py);
#   7. 3 Llama-shaped bf16 models (SIZE, default 3B: 3 x 6.4 GB): linear, ties, dare_ties, della,
#      slerp; batched vs unbatched vs mergekit --cuda, alternating; time, peak GPU memory, ratio
#      to the I/O floor and to mergekit (bench_gpu_merge.py);
#   8. the CPU ties path on the same machine (its cores), same models, against the same floor;
#   9. tune trials on the device (bench_trials.py): trial time, share outside kernels; and on the CPU.
# Packages: WHEELS=DIR installs mergelang's missing dependencies from DIR; .whl-mergekit/ (made by
# benchmarks/gpu_wheels.sh) installs mergekit 0.1.5 into its own folder (pip --no-index
# --find-links). A check on the CPU, end to end in a minute or two: SIZE=tiny DEVICE=cpu.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${OUT:-.}"
RESULTS="${RESULTS:-$OUTDIR/gpu_check.log}"
PY="${PYTHON:-python3}"
SIZE="${SIZE:-3B}"
DEVICE="${DEVICE:-cuda}"
REPEAT="${REPEAT:-1}"
TOTAL_S="${TOTAL_S:-420}"
WORK="${WORK:-/tmp/mergelang-gpu}"
mkdir -p "$(dirname "$RESULTS")" "$WORK"
exec > >(tee "$RESULTS") 2>&1
start=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - start) )); }
# step NAME LIMIT_S CMD...: runs CMD under `timeout` (never past the total), logs its status
step() {
    local name="$1" limit="$2"; shift 2
    local rest; rest=$(left)
    if [ "$rest" -le 5 ]; then echo "== $name: SKIPPED (total time limit $TOTAL_S s reached)"; return; fi
    [ "$limit" -gt "$rest" ] && limit="$rest"
    echo "== $name (limit ${limit} s, $(( $(date +%s) - start )) s elapsed)"
    timeout -k 5 "$limit" "$@"
    local rc=$?
    [ $rc -ne 0 ] && echo "== $name: FAILED or timed out (exit $rc)"
    return 0
}
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mergelang-site "$WHEELS"/*.whl || echo "== mergelang wheels: install FAILED"
    export PYTHONPATH="/tmp/mergelang-site:${PYTHONPATH:-}"
fi
MK_EXE=""
if [ -d .whl-mergekit ] && [ -z "${NO_MERGEKIT:-}" ]; then
    # its own folder; its dependencies the device has (torch, numpy, ...) are not in the wheelhouse
    if "$PY" -m pip install -q --no-index --find-links .whl-mergekit --no-deps --no-compile \
            --target /tmp/mergekit-site .whl-mergekit/*.whl; then
        cat > "$WORK/mergekit-yaml" <<SH
#!/usr/bin/env bash
PYTHONPATH=/tmp/mergekit-site:\${PYTHONPATH:-} exec "$PY" -c 'import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = "mergekit-yaml"; sys.exit(main())' "\$@"
SH
        chmod +x "$WORK/mergekit-yaml"
        if "$WORK/mergekit-yaml" --help > /dev/null 2>&1; then MK_EXE="$WORK/mergekit-yaml"
        else echo "== mergekit installed but does not start:"; "$WORK/mergekit-yaml" --help 2>&1 | tail -5; fi
    else
        echo "== mergekit wheels: install FAILED"
    fi
fi
[ -n "${MERGEKIT:-}" ] && MK_EXE="$MERGEKIT"
MK=(); [ -n "$MK_EXE" ] && MK=(--mergekit "$MK_EXE")
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
tiny=""; [ "$SIZE" = tiny ] && tiny=1
echo "== 1. machine: $(nproc) cores, $(df -h "$WORK" | tail -1 | awk '{print $4}') free in $WORK; mergekit: ${MK_EXE:-none}"
nvidia-smi -L 2>/dev/null || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
# most wanted first (the device time is short): equality of the (batched) CUDA plans, launches,
# the select table, the models; the older checks last
[ "$DEVICE" = cuda ] && step "3. CUDA (batched) vs CPU per method" 90 env MERGELANG_BATCH=1 "$PY" benchmarks/gpu_equality.py
[ "$DEVICE" = cuda ] && step "3b. CUDA (unbatched) vs CPU per method" 90 env MERGELANG_BATCH=0 "$PY" benchmarks/gpu_equality.py
L=8; HID=512; [ -n "$tiny" ] && L=2 && HID=64
step "4. launches per tensor, batched vs unbatched ($DEVICE)" 120 "$PY" benchmarks/bench_batch.py --device "$DEVICE" --layers $L --hidden $HID
MAXLOG=26; [ "$DEVICE" = cpu ] && MAXLOG=16
step "5. k-th largest: radix select vs device sort ($DEVICE)" 60 "$PY" benchmarks/bench_select.py --device "$DEVICE" --max-log2 $MAXLOG
ALL=ties,linear,dare_ties,della,slerp; [ -n "$tiny" ] && ALL=linear,ties  # tiny: a check of the structure
METHODS="${METHODS:-$ALL}"
step "7a. write 3 $SIZE models" 240 "$PY" benchmarks/bench_gpu_merge.py --dir "$WORK/models" --size "$SIZE" --make-only
step "7. $SIZE models: batched / unbatched / mergekit ($DEVICE)" 300 \
    "$PY" benchmarks/bench_gpu_merge.py --dir "$WORK/models" --size "$SIZE" --device "$DEVICE" --repeat "$REPEAT" \
    --methods "$METHODS" "${MK[@]}"
if [ "$DEVICE" = cuda ] && [ -z "${SKIP_CPU:-}" ]; then
    step "8. the CPU ties path on this machine, same models" 120 \
        "$PY" benchmarks/bench_gpu_merge.py --dir "$WORK/models" --size "$SIZE" --device cpu --methods ties
fi
step "9. tune trials ($DEVICE)" 60 "$PY" benchmarks/bench_trials.py --device "$DEVICE"
[ "$DEVICE" = cuda ] && step "9b. tune trials (cpu, same machine)" 60 "$PY" benchmarks/bench_trials.py --device cpu
if [ -z "$tiny" ]; then
    step "6. FP8 block-scaled DeepSeek-V3-shaped slice ($DEVICE)" 120 "$PY" benchmarks/bench_fp8.py --dir "$WORK/fp8" --device "$DEVICE" --repeat 1
fi
if [ "$DEVICE" = cuda ]; then
    step "2. gpu tests" 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/
    step "3b. ties profile on the GPU" 60 "$PY" benchmarks/gpu_profile.py
fi
echo "== done in $(( $(date +%s) - start )) s (limit $TOTAL_S s); log: $RESULTS"
