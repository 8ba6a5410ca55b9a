#!/usr/bin/env bash
# On a GPU machine, in one run of under 8 minutes (H200): the CUDA-graph runner tests,
# the end-to-end engine bench (synthetic SmolLM3-3B Q4_K_M: aggregate decode tokens/s at
# 1, 4, 16 and 64 concurrent sequences), the project's other GPU tests and the kernel
# benches, each phase under its own time limit.
#
# The device image has torch and triton but not gguf-py (bench/synthetic.py writes with
# gguf.GGUFWriter), so its wheel travels. Once, on a machine with PyPI, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl gguf==0.19.0
# then: run(command="bash bench/run_gpu.sh", carry=[".whl"], timeout_s=540)
#
# Results, in $OUT (else bench/results/):
#   run_gpu.log          everything printed, with each phase's start time
#   env.txt              GPU, driver, torch / triton / CUDA versions
#   bench_e2e.json       every figure (rewritten after each case: a cut-short run keeps its part)
#   bench_concurrency.md the concurrency table for bench/README.md
#   pytest_benchmark.json  pytest-benchmark's own record of the e2e cases
#   junit_*.xml          pass / fail / skip of each test phase
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BENCH_RESULTS="$OUT" BENCH_MODEL_DIR=/tmp/smollm3-synthetic
exec > >(tee -a "$OUT/run_gpu.log") 2>&1
start=$SECONDS
phase() { echo "== [$((SECONDS - start)) s] $*"; }
PYTEST="python3 -m pytest -p no:cacheprovider -q -rs"

phase "setup"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package as pip would lay it out (kernels/ is smollm3_triton.kernels, pyproject's
# package-dir), without pip: nothing can be fetched there.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r smollm3_triton /tmp/pkg/ && cp -r kernels /tmp/pkg/smollm3_triton/kernels
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} | tee "$OUT/env.txt"
python3 -c "import gguf, smollm3_triton.kernels.triton_ops" || { echo "gguf or the package does not import: see the header"; exit 1; }

# The synthetic file (1.9 GB), written on the CPUs while the graph tests run.
export BENCH_QUANTS=q4_k_m
mkdir -p "$BENCH_MODEL_DIR"
for q in q4_k_m; do
    f="$BENCH_MODEL_DIR/synthetic-smollm3-3b-$q.gguf"
    [ -f "$f" ] || python3 bench/synthetic.py "$f" --shape smollm3-3b --quant "$q" &
done

phase "CUDA-graph runner, paged attention and sampling-noise tests"
timeout 90 $PYTEST tests/test_cuda_graph.py tests/test_device_sampling.py tests/test_attention.py -m gpu \
    --junitxml "$OUT/junit_graph.xml"
phase "waiting for the synthetic files"
wait
ls -l "$BENCH_MODEL_DIR"

phase "end-to-end bench"
timeout 270 $PYTEST bench/test_bench_e2e_gpu.py --benchmark-json "$OUT/pytest_benchmark.json" \
    --junitxml "$OUT/junit_e2e.xml"
[ -f "$OUT/bench_concurrency.md" ] && cat "$OUT/bench_concurrency.md"

phase "the project's other GPU tests"
timeout 60 $PYTEST tests -m gpu --deselect tests/test_cuda_graph.py --deselect tests/test_attention.py \
    --junitxml "$OUT/junit_gpu.xml"

phase "kernel benches"
timeout 45 $PYTEST $(ls bench/test_bench_*.py | grep -v e2e) --junitxml "$OUT/junit_kernels.xml"
phase "done"
