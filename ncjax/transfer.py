"""Fine-tuning: one cell of the grid (`finetune`) and the grid of a spec (`run`).

A cell is (model, dataset, train size, method, unit); its method decides which parameters
train (`ncjax.methods`) and every method runs `ncjax.train`'s one train step. After training,
the cell is evaluated on the test split and its collapse measured on the training split.
"""
from __future__ import annotations

import time

from absl import logging

from ncjax import assemble, autounit, data, measure, methods, records, train
from ncjax.pretrain import pretrain
from ncjax.spec import AUTO_UNIT, Run, Spec


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
  mask = methods.trainable_mask(params, run.method, run.unit)
  prepare = assemble.prepare_for(bb, train_ds, optim.aug_level)
  batch = assemble.effective_batch(optim.batch_size, len(train_ds), mesh)
  steps = assemble.total_steps(optim, len(train_ds), batch)
  eval_batch = assemble.eval_batch(spec, mesh)
  recipe = assemble.optimizer(optim, len(train_ds), batch)
  forward = train.model_forward(model)
  common = dict(batch_size=batch, steps=steps, seed=seed, mesh=mesh,
                checkpoint_every=spec.checkpoint_every, desc=run.id, on_log=on_log,
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
  else:
    state, history = train.train(forward, params, batch_stats, mask, recipe,
                                 train_ds.images, train_ds.labels, prepare=prepare, **common)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  acc = records.NAN if test_ds is None else train.accuracy(
      forward, state.params, state.batch_stats, prepare, test_ds.images, test_ds.labels,
      eval_batch, mesh)
  record = records.Record(
      model=bb.model, dataset=run.dataset, method=run.method, unit=run.unit or "",
      accuracy=acc, percent_params=methods.percent_trainable(params, mask),
      num_train=len(train_ds), num_test=0 if test_ds is None else len(test_ds), num_classes=train_ds.num_classes,
      steps=steps, batch_size=batch, weights=origin, seed=seed, run=run.id, pretrain=spec.tag,
      final_train_loss=records.final_loss(history))
  if spec.collapse:
    pen, record.layerwise_nc1 = measure.collapse(model, variables, prepare, train_ds,
                                                 eval_batch, mesh, desc=run.id)
    record.nc1, record.cdnv, record.numerical_rank = (pen["nc1"], pen["cdnv"],
                                                      pen["numerical_rank"])
  record.wall_s = time.time() - t0
  logging.info("%s: accuracy %.2f%%, NC1 %.4g", run.id, acc, record.nc1)
  return record, variables


def run(spec: Spec, workdir: str, mesh, on_record, on_log=None, primary: bool = True) -> None:
  """Runs the spec's runs in order; a run whose record is in the workdir is not run again.

  Each run first stores its fingerprint (what defines it) in its run directory, so a later
  rerun can tell whether its checkpoints may be resumed. `on_record(record)` gets each record
  (pre-training ones included) as it is made; `on_log(run_id)` gives the per-step logger of
  a run (`ncjax.telemetry.RunLog`). Only the `primary` process writes files."""
  from ncjax import probes
  log = on_log or (lambda _: None)
  pretrained, source, splits = {}, {}, {}
  for r in spec.runs():
    done = records.load_record(workdir, r.id)
    if primary and records.read_fingerprint(workdir, r.id) is None:
      records.write_fingerprint(workdir, r.id, dict(r.fingerprint))
    if r.kind == "pretrain":
      pretrained[r.backbone.model], rec = pretrain(spec, r, workdir, mesh, log(r.id), done)
      source[r.backbone.model] = rec
    elif done is not None:
      rec = done
    elif r.kind == "probe":
      rec = probes.probe(spec, r, pretrained.get(r.backbone.model), mesh)
    elif r.kind == "score":
      from ncjax import ranking
      rec = ranking.score(spec, r, pretrained.get(r.backbone.model), mesh)
    elif r.kind == "fewshot":
      key = ("fewshot", r.backbone.model, r.dataset)
      if key not in splits:  # one embedding pass serves every shots setting
        splits.clear()
        splits[key] = embed(spec, r, pretrained.get(r.backbone.model), mesh)
      rec = fewshot_record(spec, r, *splits[key])
    else:
      key = (r.backbone.model, r.dataset, r.size)
      if key not in splits:  # each method of a cell reads the same (decoded) split
        splits.clear()
        splits[key] = assemble.downstream(spec, r.backbone, r.dataset, r.size)
      if r.unit == AUTO_UNIT:
        rec = autounit.choose_and_finetune(spec, r, *splits[key], pretrained.get(r.backbone.model),
                                           workdir, mesh, finetune, log(r.id), primary)
      else:
        rec, _ = finetune(spec, r, *splits[key], pretrained.get(r.backbone.model), workdir,
                          mesh, log(r.id))

    src = source.get(r.backbone.model)
    if done is None and src is not None and r.kind != "pretrain":
      rec.source_nc1, rec.source_accuracy = src.nc1, src.accuracy  # Table 1 / Fig. 4
    if done is None and primary:
      records.save_record(workdir, rec)
    if done is None and log(r.id) is not None:  # the evaluation, beside the training curve
      scalars = {"test_accuracy": rec.accuracy, "nc1": rec.nc1, "cdnv": rec.cdnv,
                 "numerical_rank": rec.numerical_rank}
      log(r.id)({"step": rec.steps, **{k: v for k, v in scalars.items() if v == v}})  # not NaN
    on_record(rec)


def embed(spec: Spec, run: Run, pretrained: dict | None, mesh, split: str | None = None):
  """Penultimate embeddings (N, D) float32 of the frozen backbone (eval mode) on the
  downstream classes' images of `split` (default ``fewshot.split``: the meta-test classes,
  ``meta_test`` of ``cifar_fs`` / ``mini_imagenet``), the split and where the weights came
  from."""
  ds = assemble.materialize(spec, assemble.load_split(spec, run.dataset,
                                                      split or spec.fewshot.split,
                                                      run.backbone, spec.downstream_classes))
  model = assemble.build_model(spec, run.backbone, ds.num_classes)
  variables, origin = assemble.initial_variables(spec, run.backbone, model, ds, pretrained)
  prepare = assemble.prepare_for(run.backbone, ds, 1)
  emb = measure.extract(model, variables, prepare, ds.images, assemble.eval_batch(spec, mesh),
                        mesh, names=("penultimate",), desc=run.id)["penultimate"]
  return emb, ds, origin


def fewshot_record(spec: Spec, run: Run, emb, ds: data.ArrayDataset, origin: str
                   ) -> records.Record:
  """Table 2: RFS episodes on the frozen embeddings; accuracy +- ci95 and their NC1."""
  from ncjax import fewshot
  t0, f = time.time(), spec.fewshot
  out = fewshot.evaluate(emb, ds.labels, ways=f.ways, shots=run.size, queries=f.queries,
                         episodes=f.episodes, seed=spec.seed, solver=f.solver, nc1=True)
  logging.info("%s: %.2f +- %.2f%%", run.id, out["accuracy"], out["ci95"])
  return records.Record(
      model=run.backbone.model, dataset=run.dataset, method="fewshot", unit="",
      stage="fewshot", accuracy=float(out["accuracy"]), ci95=float(out["ci95"]),
      nc1=float(out["nc1"]), ways=f.ways, shots=run.size, queries=f.queries,
      episodes=int(out["episodes"]), num_train=len(ds), num_classes=ds.num_classes,
      weights=origin, seed=spec.seed, run=run.id, pretrain=spec.tag, wall_s=time.time() - t0)
