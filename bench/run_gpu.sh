#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run of under 8 minutes on a bare GPU
# machine of the device tool (H100 or H200: torch, triton, transformers, pytest and
# pytest-benchmark installed; no network; no gguf, fastapi, uvicorn, openai, ray).
#
# How to run it (from the repo root, on the machine that has the device tool):
#   1. once per checkout, the one wheel the GPU image lacks (gguf-py writes the synthetic model):
#        echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#            --implementation cp -d .whl gguf==0.19.0
#   2. the device tool: run(command="bash bench/run_gpu.sh", carry=[".whl"], timeout_s=540)
#   3. the files come back under files_at: put bench_summary.md's tables in bench/README.md
#      with the date and the card.
# REHEARSAL=1 bash bench/run_gpu.sh  does the setup and collects every phase without running
# it (no GPU needed); tests/test_run_gpu.py does that in CI, in a venv holding only the
# image's packages, so an import error is found before a GPU is.
#
# Each phase has its own time budget and is stopped with SIGINT, so pytest still writes
# its junit and benchmark files. At most 8 files come back, in $OUT (else bench/results):
#   run_gpu.log          everything printed, with each phase's start time
#   env.txt              GPU, driver, torch / triton / CUDA versions
#   junit_tests.xml      the kernels and the CUDA-graph runner against their references, on the GPU
#   bench_e2e.json       every end-to-end figure (rewritten after each case: a cut-short run keeps its part)
#   bench_concurrency.md the concurrency table for bench/README.md
#   bench_kernels.json   pytest-benchmark's record of the kernel benches
#   bench_summary.md     the "bench figures" lines of every bench phase
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BENCH_RESULTS="$OUT" BENCH_MODEL_DIR=/tmp/smollm3-synthetic
exec > >(tee -a "$OUT/run_gpu.log") 2>&1
start=$SECONDS
say() { echo "== [$((SECONDS - start)) s] $*"; }
PYTEST="python3 -m pytest -p no:cacheprovider -q -rs"
[ "${REHEARSAL:-0}" = 1 ] && PYTEST="$PYTEST --collect-only"

# phase BUDGET_S NAME ARGS...: one pytest run, interrupted (SIGINT, then killed 20 s later)
# when its budget is spent.
phase() {
    local budget=$1 name=$2; shift 2
    say "$name (budget ${budget} s)"
    timeout -s INT -k 20 "$budget" $PYTEST "$@"
    local rc=$?
    [ $rc -eq 124 ] && say "$name: stopped at its budget"
    return 0
}

say "setup"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The repo root is on sys.path (python3 -m): smollm3_triton/kernels is a link to kernels/.
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} | tee "$OUT/env.txt"
python3 -c "import gguf, smollm3_triton.backends, smollm3_triton.kernels.qmatmul, tests.helpers.synthetic" \
    || { echo "gguf or the package does not import: see this script's header"; exit 1; }

# The synthetic SmolLM3-3B Q4_K_M file (1.9 GB), written on the CPUs while the tests run.
export BENCH_QUANTS=q4_k_m
model="$BENCH_MODEL_DIR/synthetic-smollm3-3b-q4_k_m.gguf"
writer=""
if [ "${REHEARSAL:-0}" != 1 ] && [ ! -f "$model" ]; then
    mkdir -p "$BENCH_MODEL_DIR"
    python3 -m tests.helpers.synthetic "$model" --shape smollm3-3b --quant q4_k_m &
    writer=$!
fi

phase 120 "kernels, paged attention, sampling noise and the CUDA-graph runner on the GPU" \
    tests/test_cuda_graph.py tests/test_device_sampling.py tests/test_sampling_kernel.py tests/test_attention.py \
    tests/test_qmatmul.py \
    tests/test_swiglu.py tests/test_rope_qkv.py tests/test_rms_norm.py tests/test_dequant.py \
    --junitxml "$OUT/junit_tests.xml"
say "waiting for the synthetic file"
[ -n "$writer" ] && wait "$writer"      # (a bare wait would also wait for the log's tee)
ls -l "$BENCH_MODEL_DIR" 2>/dev/null

phase 240 "end-to-end bench (engine + CUDA graphs, 1 to 64 sequences)" bench/test_bench_e2e_gpu.py \
    --benchmark-disable-gc
[ -f "$OUT/bench_concurrency.md" ] && cat "$OUT/bench_concurrency.md"

# Kernel benches at SmolLM3-3B's shapes: decode matmuls (one row), decode attention, a 2k prefill.
phase 90 "kernel benches" bench/test_bench_qmatmul.py bench/test_bench_attention.py \
    -k "(test_qmatmul and -1-) or test_attention_decode or (test_attention_prefill and 2048)" \
    --benchmark-json "$OUT/bench_kernels.json"

grep -A200 "bench figures" "$OUT/run_gpu.log" | grep -v "^==" > "$OUT/bench_summary.md" || true
say "done"
