"""Stage ``finetune``: one cell of the grid.

A cell is (model, dataset, train size, method, unit); its method decides which parameters
train (`ncjax.methods`) and every method runs `ncjax.train`'s one train step. After training,
the cell is evaluated on the test split and its collapse measured on the training split.
"""
from __future__ import annotations

import time

import numpy as np
from absl import logging

from ncjax import data, lora, measure, methods, models, train
from ncjax.experiment import assemble, records
from ncjax.experiment.spec import Run, Spec
from ncjax.experiment.stages.base import Context


LAYER_DECAY_METHODS = ("full", "lp_ft", "bitfit", "lora")  # optim.layer_decay applies to these


def finetune(spec: Spec, run: Run, train_ds: data.ArrayDataset,
             test_ds: data.ArrayDataset | None, pretrained: dict | None, workdir: str | None,
             mesh, on_log=None) -> tuple[records.Record, dict]:
  """Fine-tunes one cell; returns its record and final variables (no test accuracy without
  `test_ds`)."""
  t0 = time.time()
  bb, optim, seed = run.backbone, spec.optim, spec.seed
  model = assemble.build_model(spec, bb, train_ds.num_classes, run.method, run.unit)
  variables, origin = assemble.initial_variables(spec, bb, model, train_ds, pretrained)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  forward = train.model_forward(model)
  rank = run.lora_rank or spec.peft.lora_ranks[0]
  if run.method == "lora":  # the factors join the parameters; the forward merges them
    params = lora.add(params, spec.peft.lora_targets, rank, seed, models.units(model))
    forward = lora.forward(forward, spec.peft.lora_scale(rank))
  phases = methods.phase_masks(params, run.method, run.unit)
  mask = phases[-1]
  # Layer-wise lr decay is for methods that train several units (Layer FT tunes one).
  decayed = run.method in LAYER_DECAY_METHODS and optim.layer_decay != 1.0
  lr_scale = (methods.layer_decay_scales(params, models.units(model), optim.layer_decay)
              if decayed else None)
  prepare = assemble.prepare_for(bb, train_ds, optim.aug_level)
  batch = assemble.effective_batch(optim.batch_size, len(train_ds), mesh)
  steps = assemble.total_steps(optim, len(train_ds), batch)
  eval_batch = assemble.eval_batch(spec, mesh)
  recipe = assemble.optimizer(optim, len(train_ds), batch)
  rates = []  # examples per second of every log window, for the record's step time

  def log(entry):
    rates.append(entry["examples_per_s"])
    if on_log is not None:
      on_log(entry)
  common = dict(batch_size=batch, steps=steps, seed=seed, mesh=mesh,
                checkpoint_every=spec.checkpoint_every, desc=run.id, on_log=log,
                checkpoint_dir=workdir and records.checkpoint_dir(workdir, run.id))
  if run.method == "linear" and optim.aug_level <= 1 and spec.cache_linear_features:
    # Frozen backbone and no augmentation: its features are the same every epoch, so
    # compute them once (after updating BatchNorm statistics on the downstream data, as every
    # method does) and train the head on them with the same train step.
    batch_stats = measure.recalibrate_batch_stats(forward, params, batch_stats, prepare,
                                                  train_ds.images, batch, mesh, seed,
                                                  steps=min(steps, 50), desc=run.id)
    feats = measure.extract(model, {"params": params, "batch_stats": batch_stats}, prepare,
                            train_ds.images, eval_batch, mesh, names=("penultimate",),
                            desc=run.id)["penultimate"]
    state, history = train.train(train.head_forward(train_ds.num_classes), params, batch_stats,
                                 mask, recipe, feats, train_ds.labels, **common)
  elif len(phases) > 1:  # LP-FT: one run, two phases, resumable across the switch
    switch = lp_ft_switch(steps, spec.peft.lp_ft_probe_fraction)
    common.pop("steps")
    state, history = train.train_phases(
        forward, params, batch_stats, [(phases[0], switch), (phases[1], steps - switch)],
        recipe, train_ds.images, train_ds.labels, prepare=prepare, lr_scale=lr_scale, **common)
  else:
    state, history = train.train(forward, params, batch_stats, mask, recipe,
                                 train_ds.images, train_ds.labels, prepare=prepare,
                                 lr_scale=lr_scale, **common)
  # LoRA's factors merged into plain weights: what evaluation, NC and the caller see.
  final = (lora.merge(state.params, spec.peft.lora_scale(rank)) if run.method == "lora"
           else state.params)
  variables = {"params": final, "batch_stats": state.batch_stats}
  acc = records.NAN if test_ds is None else train.accuracy(
      train.model_forward(model), final, state.batch_stats, prepare, test_ds.images,
      test_ds.labels, eval_batch, mesh)
  record = records.Record(
      model=bb.model, dataset=run.dataset, method=run.method, unit=run.unit or "",
      accuracy=acc, percent_params=methods.percent_trainable(params, mask),
      num_train=len(train_ds), num_test=0 if test_ds is None else len(test_ds),
      num_classes=train_ds.num_classes,
      steps=steps, batch_size=batch, weights=origin,
      normalization=assemble.normalization_used(bb), seed=seed, run=run.id,
      pretrain=spec.variant, final_train_loss=records.final_loss(history),
      lora_rank=rank if run.method == "lora" else 0,
      step_s=batch / float(np.median(rates[1:] or rates)) if rates else records.NAN)
  if spec.collapse:
    pen, record.layerwise_nc1 = measure.collapse(model, variables, prepare, train_ds,
                                                 eval_batch, mesh, desc=run.id)
    record.nc1, record.cdnv, record.numerical_rank = (pen["nc1"], pen["cdnv"],
                                                      pen["numerical_rank"])
  record.wall_s = time.time() - t0
  logging.info("%s: accuracy %.2f%%, NC1 %.4g", run.id, acc, record.nc1)
  return record, variables


def lp_ft_switch(steps: int, probe_fraction: float) -> int:
  """LP-FT's linear-probe steps: ``round(probe_fraction * steps)``, at least 1 and leaving at
  least 1 fine-tuning step. Raises ValueError for a run of fewer than 2 steps."""
  if steps < 2:
    raise ValueError(f"lp_ft needs at least 2 steps (a probe and a fine-tuning one), got {steps}")
  return min(steps - 1, max(1, round(probe_fraction * steps)))


def split(ctx: Context, run: Run) -> tuple[data.ArrayDataset, data.ArrayDataset]:
  """The cell's (decoded) training and test splits; every method of a cell reads the same."""
  return ctx.shared((run.backbone.model, run.dataset, run.size),
                    lambda: assemble.downstream(ctx.spec, run.backbone, run.dataset, run.size))


def run(ctx: Context, run: Run, done: records.Record | None = None) -> records.Record:
  rec, _ = finetune(ctx.spec, run, *split(ctx, run), ctx.pretrained_for(run), ctx.workdir,
                    ctx.mesh, ctx.log(run.id))
  return rec
