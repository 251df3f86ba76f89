#!/usr/bin/env bash
# One prepared command for a GPU machine (one H100 or H200): in at most 7 minutes (the step timeouts below add up to
# 420 s; the device's command limit is 600 s) it runs a preflight, warms Triton's cache with every kernel variant the
# check launches (compiled in parallel on the machine's cores), the `gpu`-marked tests (the Triton kernels at full
# size: attention and PowerSGD's; PowerSGD's engine and the per-resblock fp16 scaler on CUDA; the transformer with
# `triton` against `dense`), tools/bench_attention.py, tools/bench_powersgd_kernels.py (PowerSGD's kernels against
# their PyTorch twins at a 12B shard, and the Householder kernel against torch.linalg.qr) and tools/bench_train_gpu.py
# (20 updates of the 1p3b prior, tokens/s and MFU beside the planner's estimate; PEAK_TFLOPS: the GPU's peak, 989
# for an H100 / H200), then prints one summary table. It fails loudly (exit != 0) when a GPU is present but a kernel
# is wrong, and when a selected test skips instead of running (MEGADALLE_REQUIRE_GPU=1 turns "no GPU" into a
# failure). Every step writes its log (and JSON) under the results folder as it ends, and a line to summary.txt
# there, so a step that times out still leaves the others' results and a partial summary.
#
#   bash tools/gpu_check.sh            # results under $OUT (the device tool) or build/gpu_check
#
# Needs python3 with torch (CUDA) and triton, plus pytest, a C compiler and the Python headers (Triton builds its
# launcher), as the GPU image provides; nothing is downloaded.
#
# The plan (seconds). Compile counts and CPU seconds from megadalle/engine/kernel_compile.py (`tools/compile_kernels.py
# --only 'gpu_check/*' --list` lists each step's kernel variants; timed for sm_90 on a shared 2-core CPU, load ~5):
#   step               timeout  planned  what it is made of
#   environment             15        5  nvidia-smi, import torch, CUDA init
#   preflight               20        5  one trivial @triton.jit kernel: ptxas, gcc + Python.h (the launcher), a launch
#   warm cache              70       30  98 variants, 161 CPU-s (2-core figure, slowest 4.5 s) over 16 processes
#                                        ~10 s, + 16 imports of torch ~5 s, recording the launches ~8 s
#   gpu tests              115       45  80 variants (27 fp32 at 16 warps: 61 CPU-s; 44 fp16/bf16 ~1.4 s each),
#                                        cached by the warm step (a cache hit ~0.01 s); the tests ~25 s (CPU
#                                        references at 12B shard size), pytest + CUDA start ~10 s. Cold (warm step
#                                        failed): +124 s of compile, so the tests then get bench_attention's time too
#                                        (215 s) and that benchmark is skipped
#   bench_attention        100       70  36 Triton variants (18 beyond the tests', 37 CPU-s, cached); 24 rows x
#                                        (Triton, SDPA) do_bench ~0.3 s each; Flex compiled by Inductor for fp16 at
#                                        16 heads only (3 layouts x ~15-20 s, not measured here: no GPU); the other
#                                        rows report Flex "not compiled"; rows are written as they come
#   bench_powersgd          30       12  5 variants (the tests' ones); 2 x 5 ops x 21 calls at 1984 x 3968, and the
#                                        Householder kernel (one program) against torch.linalg.qr at 1984 x 112
#   bench_train_gpu         55       38  9 variants (the tests' bf16 ones); the 1p3b prior's init on the CPU ~15 s,
#                                        25 updates ~10 s, 4 more split into forward / backward / step and profiled
#                                        (torch.profiler's top CUDA operators, issue 29) ~3 s
#   summary                 15        2
#   total                  420      207
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
RESULTS=${OUT:-build/gpu_check}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MEGADALLE_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SUMMARY="$RESULTS/summary.txt"
START=$SECONDS
status=0

sed -n '/^# The plan/,/^#   total/s/^# \{0,1\}//p' "$0" | tee "$RESULTS/plan.txt"  # the table above
printf '%-16s %8s %8s  %s\n' step took_s limit_s result | tee "$SUMMARY"

# step NAME LIMIT_S LOG CMD...: run CMD under a timeout, its output tee'd into $RESULTS/LOG; one summary line.
step() {
    local name=$1 limit=$2 log=$3 t0=$SECONDS rc verdict
    shift 3
    echo "== $name (timeout ${limit} s; $((SECONDS - START)) s so far)"
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$RESULTS/$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) verdict=ok ;;
        124 | 137) verdict="TIMEOUT" ;;
        *) verdict="FAILED (exit $rc)" ;;
    esac
    printf '%-16s %8s %8s  %s\n' "$name" "$((SECONDS - t0))" "$limit" "$verdict" | tee -a "$SUMMARY"
    LAST_RC=$rc
    [ "$rc" = 0 ] || status=1
    return 0
}

ENV_CHECK="import torch, triton
assert torch.cuda.is_available(), 'torch sees no CUDA device'
print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
# shellcheck disable=SC2016  # $1, $2 are the inner shell's
step environment 15 environment.log bash -c 'nvidia-smi -L && "$1" -c "$2"' _ "$PY" "$ENV_CHECK"
step preflight 20 preflight.log "$PY" -c "from megadalle.engine.kernel_compile import preflight; \
print(f'preflight: a trivial Triton kernel compiled, built its launcher and ran in {preflight():.1f} s')"
if [ "$LAST_RC" != 0 ]; then
    echo "gpu_check: FAILED: no working GPU, or Triton cannot compile and launch a kernel here (see above): stopping" >&2
    exit 2
fi

# exit 1: a kernel failed to compile for sm_90 or needs too much shared memory (a failure); any other failure only
# means the cache stays cold: the tests then compile their own kernels and get bench_attention's time for it
echo "== warm cache: the check's kernel variants, compiled on $(nproc) cores into Triton's cache"
t0=$SECONDS
timeout -k 5 70 "$PY" tools/compile_kernels.py --only 'gpu_check/*' --jobs "$(nproc)" --warm-cache \
    --json "$RESULTS/compile_kernels.json" 2>&1 | tee "$RESULTS/compile_kernels.log"
rc=${PIPESTATUS[0]}
warm=0
[ "$rc" = 0 ] || [ "$rc" = 1 ] && warm=1  # exit 1: the others compiled, the cache is warm but for the failed one
case $rc in
    0) verdict=ok ;;
    1) verdict="FAILED (a kernel does not build for sm_90)"; status=1 ;;
    124 | 137) verdict="TIMEOUT (cold cache: the tests compile)" ;;
    *) verdict="not warmed (exit $rc; the tests compile)" ;;
esac
printf '%-16s %8s %8s  %s\n' "warm cache" "$((SECONDS - t0))" 70 "$verdict" | tee -a "$SUMMARY"

# the files are named: -m still imports every module it collects, and the GPU image lacks the data stack
tests_limit=115
[ "$warm" = 1 ] || tests_limit=215
CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
touch "$RESULTS/.before_tests"
step "gpu tests" "$tests_limit" gpu_tests.log "$PY" -m pytest -q -p no:cacheprovider \
    -m gpu -rs tests/kernels/test_block_sparse_attention.py tests/models/test_blocked_attention.py \
    tests/kernels/test_powersgd.py tests/engine/test_powersgd.py tests/engine/test_grad_scaler.py \
    --junitxml="$RESULTS/gpu_tests.xml"
tests=$(tail -n 1 "$RESULTS/gpu_tests.log")
# whether the warm step's cache was hit: kernels the tests had to compile themselves (0 when every key matched)
compiled=$(find "$CACHE" -name '*.cubin' -newer "$RESULTS/.before_tests" 2>/dev/null | wc -l)
printf '%-16s %8s %8s  %s
' "tests' compiles" - - "$compiled kernels not found in the warm cache" | tee -a "$SUMMARY"
if grep -q "skipped" <<<"$tests"; then
    echo "gpu_check: FAILED: gpu tests skipped on a GPU machine: $tests" >&2
    printf '%-16s %8s %8s  %s\n' "gpu tests" - - "FAILED: skipped tests" | tee -a "$SUMMARY"
    status=1
fi

if [ "$warm" = 1 ]; then
    step bench_attention 100 bench_attention.log "$PY" tools/bench_attention.py --flex-heads 16 --flex-dtypes fp16 \
        --json "$RESULTS/bench_attention.json"
else
    printf '%-16s %8s %8s  %s\n' bench_attention - - "skipped: its time went to the cold-cache tests" \
        | tee -a "$SUMMARY"
fi
step bench_powersgd 30 bench_powersgd_kernels.log "$PY" tools/bench_powersgd_kernels.py \
    --json "$RESULTS/bench_powersgd_kernels.json"
step bench_train_gpu 55 bench_train_gpu.log "$PY" tools/bench_train_gpu.py --flavor 1p3b --steps 20 --warmup 5 \
    --micro-batch 4 --precision bf16 --peak-tflops "${PEAK_TFLOPS:-989}" --profile 3 --json "$RESULTS/bench_train_gpu.json"

echo "== summary"
{
    echo
    echo "tests: $tests"
    timeout 15 "$PY" - "$RESULTS" <<'PYEOF' || echo "summary: FAILED to read the results"
import json, os, sys
d = sys.argv[1]

def part(name, show):
    """One result file's lines; a missing or unreadable one says so without hiding the others."""
    path = os.path.join(d, name)
    if not os.path.exists(path):
        print(f"{name}: no results")
        return
    try:
        show(json.load(open(path)))
    except Exception as e:
        print(f"{name}: unreadable ({type(e).__name__}: {e})")

def kernels(k):
    s = k["summary"]
    print(f"kernels for sm_90: {s['variants']} variants, {s['failed']} failed, max shared {s['max_shared']:,} B, "
          f"max registers {s['max_registers']}, {len(s['spilling'])} spilling, {k['wall_s']} s to warm the cache")

def attention(a):
    print(a["table"] or "bench_attention: no rows")
    if not a["complete"]:
        print("(bench_attention: partial, the step ended early)")

def powersgd(p):
    print("PowerSGD kernels, torch twin / Triton:", ", ".join(f"{op} {x:.2f}x" for op, x in p["torch_over_triton"].items()))
    o = p["orthogonalize"]
    print(f"orthogonalize {p['rows']} x {p['rank']}: Triton Householder {o['triton_ms']:.3f} ms, torch.linalg.qr "
          f"{o['torch_qr_ms']:.3f} ms: orthogonalize_faster = {p['orthogonalize_faster']}")

def train(t):
    q = t["planner"]
    print(f"1p3b on {t['device']}: {t['tokens_per_s']:,.0f} tokens/s, MFU {t['mfu']:.1%}, {t['memory_gib'] or 0:.1f} GiB; "
          f"planner: {q['tokens_per_s']:,.0f} tokens/s, MFU {q['mfu']:.1%}, {q['total_bytes'] / 2**30:.1f} GiB")
    if t.get("phases_ms"):
        print("1p3b update: " + ", ".join(f"{k} {v:.1f} ms" for k, v in t["phases_ms"].items()))

part("compile_kernels.json", kernels)
part("bench_attention.json", attention)
part("bench_powersgd_kernels.json", powersgd)
part("bench_train_gpu.json", train)
PYEOF
    echo "total: $((SECONDS - START)) s"
} 2>&1 | tee -a "$SUMMARY"
if [ "$status" = 0 ]; then
    echo "gpu_check: OK$([ "$warm" = 1 ] || echo " (cache not warmed: bench_attention skipped)")" | tee -a "$SUMMARY"
else
    echo "gpu_check: FAILED" | tee -a "$SUMMARY" >&2
fi
exit "$status"
