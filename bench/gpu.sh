#!/usr/bin/env bash
# GPU checks and benchmark of AdamW4bit's Triton kernels. Installs nothing: it runs with the
# machine's own python3 (PyTorch with CUDA, Triton, pytest) and this checkout on PYTHONPATH.
# Writes under $OUT (default ./gpu-out): gpu.txt (the card), tests.log, bench.log,
# bench_gpu.json. Run from the repository root:  OUT=/some/dir bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PLASTICITY_CACHE=${PLASTICITY_CACHE:-/tmp/plasticity-cache} HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

status=0
timeout 300 $PY -m pytest -p no:cacheprovider -q -m gpu tests/unit/test_optim_gpu.py 2>&1 | tee "$OUT/tests.log" || status=1
timeout 300 $PY -m bench.optim --device cuda --repeats 20 --only AdamW4bit --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
