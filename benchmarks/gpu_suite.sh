#!/usr/bin/env bash
# Issue 7's accelerator measurements in one go (REFERENCE §8): the training throughput
# against compiled AMP PyTorch, the default job's wall time and compile count (cold, then
# with the persistent compilation cache warm), and Table 3's ResNet-18 CIFAR-10 column on a
# short schedule. Needs jax, flax, optax, torch; ml_collections travels as a wheel in .whl/
# (tensorflow-datasets is not needed: synthetic CIFAR-shaped data is written as IDX files).
# Logs go to ${OUT:-/tmp}.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
if ! python3 -c "import ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$out/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"
t=$SECONDS
timeout "${T_THROUGHPUT:-230}" python3 benchmarks/throughput.py --json "$out/throughput.json" 2>&1 | tee "$out/throughput.txt"
echo "phase throughput: $((SECONDS - t)) s" | tee -a "$out/device.txt"
t=$SECONDS
# NC1 (issue 20): read floor, GEMM floor, nc1, nc1_pinv, the CPU peer, then the float32 errors
timeout "${T_NC1:-60}" python3 benchmarks/nc1.py --reps 5 --no-peer --accuracy 2>&1 | tee "$out/nc1.txt"
echo "phase nc1: $((SECONDS - t)) s" | tee -a "$out/device.txt"
export NCJAX_CACHE=/tmp/ncjax_jax_cache
for run in cold warm; do
  t=$SECONDS
  timeout 100 python3 -m ncjax.main --workdir=/tmp/default_$run --config.compile_cache_dir=$NCJAX_CACHE 2>&1 | grep -v "it/s]" | tail -25 | tee "$out/default_$run.txt"
  echo "phase default ($run cache): $((SECONDS - t)) s" | tee -a "$out/device.txt"
done
t=$SECONDS
timeout "${T_TABLE3:-130}" python3 benchmarks/table3_short.py --epochs 1 2>&1 | grep -v "it/s\]" | tail -20 | tee "$out/table3_short.txt"
echo "phase table3_short: $((SECONDS - t)) s" | tee -a "$out/device.txt"
