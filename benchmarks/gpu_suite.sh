#!/usr/bin/env bash
# All benchmarks in one go, for a lent accelerator (REFERENCE §8): needs jax, flax, optax,
# torch, scipy; not ml_collections or tensorflow-datasets. Writes logs to ${OUT:-/tmp}.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$out/device.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"
timeout 240 python benchmarks/nc1.py --reps 5 2>&1 | tee "$out/nc1.txt"
timeout 150 python benchmarks/finetune.py --reps 20 2>&1 | tee "$out/finetune32.txt"
timeout 150 python benchmarks/finetune.py --size 224 --stem imagenet --batch 128 --reps 10 2>&1 | tee "$out/finetune224.txt"
timeout 150 python benchmarks/models.py --batch 32 --reps 10 2>&1 | tee "$out/models.txt"
