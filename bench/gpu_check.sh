#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the gpu-marked tests, then the GPU kernel benchmarks.
# Usage there: bash bench/gpu_check.sh [pytest-timeout] [bench-timeout]  (results under $OUT when set, else ./out)
# The machine has torch/triton but no pip: the package is put on PYTHONPATH through symlinks.
set -u
out=${OUT:-out}; mkdir -p "$out"
test_s=${1:-200}; bench_s=${2:-150}
mkdir -p /tmp/pkg && ln -sfn "$PWD/compiler" /tmp/pkg/sparsecc
ln -sfn "$PWD/passes" compiler/passes && ln -sfn "$PWD/runtime" compiler/runtime
export PYTHONPATH=/tmp/pkg:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
timeout "$test_s" python3 -m pytest -q -n 0 -m gpu tests -p no:cacheprovider -rs 2>&1 | tail -60 > "$out/gpu_tests.log"
tail -25 "$out/gpu_tests.log"
timeout "$bench_s" python3 bench/gpu_kernels.py --json "$out/gpu_kernels.json" 2>&1 | tee "$out/gpu_kernels.log" | tail -30
timeout 150 python3 bench/attention_model.py --device cuda --window-seq 32768 --json "$out/attention_model.json" 2>&1 | tail -12 | tee "$out/attention_model.log"
timeout 120 python3 bench/launch_path.py --json "$out/launch_path.json" 2>&1 | tail -8 | tee "$out/launch_path.log"
[ -n "${NM_BENCH:-}" ] && timeout 150 python3 bench/nm_linear.py --no-cpu --json "$out/nm_linear_gpu.json" 2>&1 | tail -30 | tee "$out/nm_linear.log"
rm -f compiler/passes compiler/runtime
