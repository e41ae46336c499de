"""Stage ``probe`` (Fig. 9): layer-wise transfer. A linear classifier on every unit's pooled
output of a frozen backbone, with that unit's NC1 on the downstream training data.

Features are computed once (eval mode, after updating BatchNorm statistics on the
downstream data); each unit's classifier trains with `ncjax.train`'s one train step.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax

from ncjax import measure, methods, metrics, models, telemetry, train
from ncjax.experiment import assemble, records
from ncjax.experiment.spec import Run, Spec
from ncjax.experiment.stages.base import Context


def probe(spec: Spec, run: Run, pretrained: dict | None, mesh) -> records.Record:
  """The record of one (model, dataset): ``layerwise_accuracy`` and ``layerwise_nc1``
  ({unit: value}); ``accuracy`` / ``nc1`` / ``cdnv`` / ``numerical_rank`` are the
  penultimate feature's."""
  t0 = time.time()
  bb, seed, optim = run.backbone, spec.seed, spec.optim
  train_ds, test_ds = assemble.downstream(spec, bb, run.dataset)
  model = assemble.build_model(spec, bb, train_ds.num_classes)
  variables, origin = assemble.initial_variables(spec, bb, model, train_ds, pretrained)
  prepare = assemble.prepare_for(bb, train_ds, 1)
  batch = assemble.effective_batch(optim.batch_size, len(train_ds), mesh)
  eval_batch = assemble.eval_batch(spec, mesh)
  stats = measure.recalibrate_batch_stats(train.model_forward(model), variables["params"],
                                          variables["batch_stats"], prepare, train_ds.images,
                                          batch, mesh, seed, steps=50, desc=run.id)
  variables = {"params": variables["params"], "batch_stats": stats}
  f_train = measure.extract(model, variables, prepare, train_ds.images, eval_batch, mesh,
                            desc=f"{run.id} train")
  f_test = measure.extract(model, variables, prepare, test_ds.images, eval_batch, mesh,
                           desc=f"{run.id} test")
  k = train_ds.num_classes
  steps = assemble.total_steps(optim, len(train_ds), batch)
  recipe = assemble.optimizer(optim, len(train_ds), batch)
  accs, nc1s = {}, {}
  for unit in list(models.units(model)) + ["penultimate"]:
    head = nn.Dense(k)
    forward = lambda p, s, f, t, head=head: (head.apply({"params": p}, f), s)
    params = head.init(jax.random.PRNGKey(seed), f_train[unit][:1])["params"]
    state, _ = train.train(forward, params, {}, None, recipe, f_train[unit],
                           train_ds.labels, batch_size=batch, steps=steps, seed=seed, mesh=mesh,
                           desc=f"{run.id} {unit}")
    accs[unit] = train.accuracy(forward, state.params, {}, None, f_test[unit], test_ds.labels,
                                eval_batch, mesh)
    nc1s[unit] = telemetry.defined(lambda: metrics.nc1(f_train[unit], train_ds.labels, k),
                                   f"{run.id}: {unit} features")
  pen = f_train["penultimate"]
  params = variables["params"]
  return records.Record(
      model=bb.model, dataset=run.dataset, method="linear", unit="", stage="probe",
      accuracy=accs.pop("penultimate"), nc1=nc1s.pop("penultimate"),
      cdnv=telemetry.defined(lambda: metrics.cdnv(pen, train_ds.labels, k),
                             f"{run.id}: penultimate features"),
      numerical_rank=float(metrics.numerical_rank(pen, train_ds.labels, k)),
      percent_params=methods.percent_trainable(params,
                                               methods.trainable_mask(params, "linear")),
      layerwise_nc1=nc1s, layerwise_accuracy=accs, num_train=len(train_ds),
      num_test=len(test_ds), num_classes=k, steps=steps, batch_size=batch, weights=origin,
      normalization=assemble.normalization_used(bb),
      seed=seed, run=run.id, pretrain=spec.variant, wall_s=time.time() - t0)


def run(ctx: Context, run: Run, done: records.Record | None = None) -> records.Record:
  return probe(ctx.spec, run, ctx.pretrained_for(run), ctx.mesh)
