#!/usr/bin/env bash
# One prepared command for a GPU machine: in under 10 minutes on one H200 it runs the `gpu`-marked tests (the
# Triton kernels at full size: attention and PowerSGD's; PowerSGD's engine and the per-resblock fp16 scaler on CUDA;
# the transformer with `triton`
# against `dense`), tools/bench_attention.py, tools/bench_powersgd_kernels.py (PowerSGD's kernels against their
# PyTorch twins at a 12B shard) and tools/bench_train_gpu.py (20 updates of the 1p3b prior, tokens/s
# and MFU beside the planner's estimate; PEAK_TFLOPS: the GPU's peak, 989 for an H200), then
# prints one summary table. It fails loudly (exit != 0) when a GPU is present but a kernel is wrong, and when a
# selected test skips instead of running (MEGADALLE_REQUIRE_GPU=1 turns "no GPU" into a failure).
# Later issues add their benchmarks to the summary.
#
#   bash tools/gpu_check.sh            # results also under $OUT (the device tool) or build/gpu_check
#
# Needs python3 with torch (CUDA) and triton, plus pytest, as the GPU image provides; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-build/gpu_check}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MEGADALLE_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi -L || { echo "gpu_check: FAILED: no NVIDIA GPU visible (nvidia-smi)" >&2; exit 2; }
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

status=0
echo "== gpu-marked tests"
# the files are named: -m still imports every module it collects, and the GPU image lacks the data stack
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/kernels/test_block_sparse_attention.py \
    tests/models/test_blocked_attention.py tests/kernels/test_powersgd.py tests/engine/test_powersgd.py \
    tests/engine/test_grad_scaler.py \
    --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log" || status=1
summary=$(tail -n 1 "$RESULTS/gpu_tests.log")
if grep -q "skipped" <<<"$summary"; then
    echo "gpu_check: FAILED: gpu tests skipped on a GPU machine: $summary" >&2
    status=1
fi

echo "== tools/bench_attention.py"
timeout 180 "$PY" tools/bench_attention.py --json "$RESULTS/bench_attention.json" 2>&1 \
    | tee "$RESULTS/bench_attention.log" || status=1

echo "== tools/bench_powersgd_kernels.py: PowerSGD's kernels against their PyTorch twins, one 12B shard"
timeout 60 "$PY" tools/bench_powersgd_kernels.py --json "$RESULTS/bench_powersgd_kernels.json" 2>&1 \
    | tee "$RESULTS/bench_powersgd_kernels.log" || status=1

echo "== tools/bench_train_gpu.py: 20 updates of the 1p3b prior on one GPU, beside the planner's estimate"
timeout 150 "$PY" tools/bench_train_gpu.py --flavor 1p3b --steps 20 --warmup 5 --micro-batch 4 --precision bf16 \
    --peak-tflops "${PEAK_TFLOPS:-989}" --json "$RESULTS/bench_train_gpu.json" 2>&1 \
    | tee "$RESULTS/bench_train_gpu.log" || status=1

echo "== summary"
echo "tests: $summary"
"$PY" - "$RESULTS/bench_attention.json" <<'PYEOF' || status=1
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print(f"{'layout':>7} {'heads':>5} {'dtype':>5} {'pass':>8} {'ms':>8} {'TFLOP/s':>8} {'x sdpa-causal':>13} {'x flex':>7}")
for r in rows:
    print(f"{r['layout']:>7} {r['heads']:>5} {r['dtype']:>5} {r['pass']:>8} {r['ms']['triton']:>8.3f} {r['tflops']:>8.1f} "
          f"{r['x_sdpa_causal']:>12.2f}x {r['x_flex']:>6.2f}x")
PYEOF
"$PY" - "$RESULTS/bench_powersgd_kernels.json" "$RESULTS/bench_train_gpu.json" <<'PYEOF' || status=1
import json, sys
k = json.load(open(sys.argv[1]))
print("PowerSGD kernels, torch twin / Triton:", ", ".join(f"{op} {x:.2f}x" for op, x in k["torch_over_triton"].items()))
t = json.load(open(sys.argv[2]))
p = t["planner"]
print(f"1p3b on {t['device']}: {t['tokens_per_s']:,.0f} tokens/s, MFU {t['mfu']:.1%}, {t['memory_gib']:.1f} GiB; "
      f"planner: {p['tokens_per_s']:,.0f} tokens/s, MFU {p['mfu']:.1%}, {p['total_bytes'] / 2**30:.1f} GiB")
PYEOF
[ "$status" = 0 ] && echo "gpu_check: OK" || echo "gpu_check: FAILED" >&2
exit "$status"
