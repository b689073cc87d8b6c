#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the gpu-marked tests, then the N:M benchmark.
# Usage there: bash bench/gpu_check.sh   (results under $OUT when set, else ./out)
set -u
out=${OUT:-out}; mkdir -p "$out"
mkdir -p /tmp/pkg && ln -sfn "$PWD/compiler" /tmp/pkg/sparsecc
ln -sfn "$PWD/passes" compiler/passes && ln -sfn "$PWD/runtime" compiler/runtime
export PYTHONPATH=/tmp/pkg:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -40 | tee "$out/gpu_tests.log"
timeout 200 python3 bench/nm_linear.py --no-cpu --json "$out/nm_linear_gpu.json" 2>&1 | tail -40 | tee "$out/bench.log"
rm -f compiler/passes compiler/runtime
