"""`unit = auto`: choose the unit Layer FT / SCL FT tunes by neural collapse (paper §3.3).

The paper finds that the best unit to fine-tune is the one that collapses the penultimate
features most on the downstream training data. `choose_and_finetune` turns that into a
decision for one cell (model, dataset, train size, method):

1. candidates: every unit of the model whose parameters are at most ``spec.unit_budget`` of
   the backbone's (the classifier excluded);
2. a short probe per candidate: the cell's own recipe for ``ceil(unit_probe_fraction x
   steps)`` steps on a cosine schedule compressed to that length (warm-up scaled; a step
   schedule's decays become that cosine), then the penultimate NC1 on the training split —
   no test data is looked at;
3. the candidate with the lowest probe NC1 is fine-tuned with the full schedule.

With ``unit_selector`` ``rgn`` (or ``both``: one run per selector) the choice is Auto-RGN's
instead (Lee et al., ICLR 2023, `rgn_scores`): per candidate, the mean over its tensors of
the relative gradient norm ``|g| / |theta|`` of the cross-entropy gradient on the run's first
5 batches from the starting weights (normalised by the largest); the largest is chosen. It
costs 5 gradient evaluations of the whole model, not probes.

Compute is counted in XLA's flop estimate of the compiled programs (`step_flops`), not in wall
time, so the fractions do not depend on the machine's load: a probe costs its train steps plus
one forward pass over the training split (the NC1); the exhaustive sweep costs every
candidate's full schedule of train steps. The record keeps the choice (`unit`), every
candidate's probe (`unit_choice`), ``probe_cost_fraction`` (probes / sweep),
``cost_fraction`` ((probes + the chosen full run) / sweep) and, when the same job also runs
the sweep over every candidate, ``regret`` (best sweep accuracy - the chosen unit's, points).
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ncjax import data, measure, methods, models, train
from ncjax.errors import ConfigError
from ncjax.experiment import assemble, records
from ncjax.experiment.spec import AUTO_UNIT, Run, Spec
from ncjax.experiment.stages import finetune as finetune_stage
from ncjax.experiment.stages.base import Context


def unit_fractions(model, params) -> dict[str, float]:
  """Each unit of `model` (a Flax module) -> its parameters over the backbone's (every
  top-level module but the head), in unit order. `params` may be abstract
  (`jax.ShapeDtypeStruct` leaves)."""
  size = lambda tree: int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))
  total = sum(size(v) for k, v in params.items() if k != methods.HEAD)
  return {u: size(params[u]) / total for u in models.units(model)}


def candidates(spec: Spec, run: Run, model, params) -> dict[str, float]:
  """The units of `model` within ``spec.unit_budget`` -> their parameter fraction. Raises
  ConfigError when no unit fits (the message names the smallest)."""
  fractions = unit_fractions(model, params)
  out = {u: f for u, f in fractions.items() if f <= spec.unit_budget}
  if not out:
    smallest = min(fractions, key=fractions.get)
    raise ConfigError(f"--config.unit_budget={spec.unit_budget:g}: no unit of "
                      f"{run.backbone.model} fits (the smallest, {smallest}, holds "
                      f"{fractions[smallest]:.3g} of the parameters)")
  return out


def _abstract(spec: Spec, run: Run, ds: data.ArrayDataset, unit: str | None = None):
  """`run`'s model on `ds` (the plain backbone; with `unit`, its method's model for that
  unit) and the shapes of its initial variables (`jax.ShapeDtypeStruct` leaves)."""
  model = assemble.build_model(spec, run.backbone, ds.num_classes, run.method if unit else "",
                               unit)
  shape = assemble.input_shape(run.backbone, ds)
  return model, jax.eval_shape(lambda: assemble.init_variables(model, shape, spec.seed))


def budget_problems(specs: list[Spec]) -> list[str]:
  """Every ``unit=auto`` cell whose `unit_budget` no unit fits, as one line each, found from
  the models' parameter shapes and the (lazily opened) downstream splits before any work."""
  out = []
  for spec in specs:
    for run in spec.runs():
      if run.kind != "finetune" or run.unit != AUTO_UNIT:
        continue
      model, variables = _abstract(
          spec, run, assemble.downstream_train(spec, run.backbone, run.dataset, run.size))
      try:
        candidates(spec, run, model, variables["params"])
      except ConfigError as e:
        if str(e) not in out:
          out.append(str(e))
  return out


def step_flops(spec: Spec, run: Run, unit: str, train_ds: data.ArrayDataset, batch: int
               ) -> tuple[float, float]:
  """XLA's flop estimates for `run`'s method on `unit`: one train step of `batch` examples,
  and one inference forward pass per example (the NC1 measurement). Nothing is compiled or
  run: the programs are only lowered, on abstract inputs."""
  model, variables = _abstract(spec, run, train_ds, unit)
  params, stats = variables["params"], variables.get("batch_stats", {})
  mask = methods.trainable_mask(params, run.method, unit)
  prepare = assemble.prepare_for(run.backbone, train_ds, spec.optim.aug_level)
  forward = train.model_forward(model)
  steps = assemble.total_steps(spec.optim, len(train_ds), batch)
  tx = train.make_optimizer(assemble.optimizer(spec.optim, len(train_ds), batch), steps, mask)
  step = train.make_train_step(forward, tx, mask, prepare)
  state = jax.eval_shape(lambda p, s: train.init_state(p, s, tx), params, stats)
  raw = jax.ShapeDtypeStruct((batch,) + tuple(train_ds.images.shape[1:]), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  flops = lambda lowered: float(lowered.cost_analysis()["flops"])
  train_flops = flops(jax.jit(step).lower(state, raw, labels, key))
  infer = lambda p, s, x: forward(p, s, prepare(None, x, False), False)[0]
  infer_flops = flops(jax.jit(infer).lower(params, stats, raw)) / batch
  return train_flops, infer_flops


RGN_BATCHES = 5  # Lee et al.: the relative gradient norms of the first few batches


def rgn_scores(spec: Spec, run: Run, train_ds: data.ArrayDataset, pretrained: dict | None,
               mesh, batch: int, units) -> tuple[dict[str, float], float]:
  """Auto-RGN's score of each of `units` (`measure.relative_gradient_norms` over the run's
  first `RGN_BATCHES` batches, from its starting weights: the plain backbone, no SCL skip,
  and its new head) and the flops that took.

  A zero-initialised head (the ViT's) passes no gradient to the backbone, so every score
  would be 0: the measurement then uses a LeCun-normal head drawn with the run's seed (the
  fine-tuning itself keeps the model's own head)."""
  model = assemble.build_model(spec, run.backbone, train_ds.num_classes)
  variables, _ = assemble.initial_variables(spec, run.backbone, model, train_ds, pretrained)
  params = dict(variables["params"])
  head = params[methods.HEAD]
  if not np.any(np.asarray(head["kernel"])):
    kernel = jax.nn.initializers.lecun_normal()(jax.random.PRNGKey(spec.seed),
                                                head["kernel"].shape, jnp.float32)
    params[methods.HEAD] = {**head, "kernel": kernel}
  prepare = assemble.prepare_for(run.backbone, train_ds, spec.optim.aug_level)
  return measure.relative_gradient_norms(
      train.model_forward(model), params, variables.get("batch_stats", {}), prepare,
      train_ds.images, train_ds.labels, batch, spec.seed, tuple(units), RGN_BATCHES,
      desc=run.id)


def _sweep_runs(spec: Spec, run: Run) -> dict[str, Run]:
  """The job's explicit-unit runs of `run`'s cell: unit -> run."""
  return {r.unit: r for r in spec.runs()
          if r.kind == "finetune" and r.unit != AUTO_UNIT and
          (r.backbone.model, r.dataset, r.size, r.method) ==
          (run.backbone.model, run.dataset, run.size, run.method)}


def choose_and_finetune(spec: Spec, run: Run, train_ds: data.ArrayDataset,
                        test_ds: data.ArrayDataset, pretrained: dict | None,
                        workdir: str | None, mesh, on_log=None,
                        primary: bool = True) -> records.Record:
  """Probes every candidate unit, fine-tunes the one with the lowest probe NC1 and returns
  its record with the choice (module docstring).

  Probes keep their checkpoints and records under ``runs/<run id>/probe-<unit>/``, so a
  killed job resumes them; when the job's sweep already fine-tuned the chosen unit (same
  cell, same recipe), its record is reused instead of training the same run again."""
  t0 = time.time()
  model, variables = _abstract(spec, run, train_ds)
  fractions = candidates(spec, run, model, variables["params"])
  batch = assemble.effective_batch(spec.optim.batch_size, len(train_ds), mesh)
  full_steps = assemble.total_steps(spec.optim, len(train_ds), batch)
  probe_steps = max(1, math.ceil(spec.unit_probe_fraction * full_steps))
  # A probe is the cell's recipe on a cosine schedule of `probe_steps` (a step schedule's
  # decays, in epochs, would fall after the probe's end); any warm-up shrinks with it.
  probe_spec = dataclasses.replace(spec, collapse=True, optim=dataclasses.replace(
      spec.optim, steps=probe_steps, schedule="cosine", decay_epochs=(),
      warmup_steps=round(spec.optim.warmup_steps * probe_steps / full_steps)))
  n_measured = len(train_ds)

  choice, full_flops, probe_flops = {}, {}, 0.0
  if run.selector == "rgn":
    scores, probe_flops = rgn_scores(spec, run, train_ds, pretrained, mesh, batch, fractions)
    top = max((v for v in scores.values() if v == v), default=float("nan"))
    for unit, fraction in fractions.items():
      full_flops[unit] = full_steps * step_flops(spec, run, unit, train_ds, batch)[0]
      choice[unit] = {"rgn": scores[unit] / top, "params_fraction": fraction,
                      "steps": RGN_BATCHES, "flops": probe_flops / len(fractions)}
  for unit, fraction in fractions.items() if run.selector != "rgn" else ():
    train_f, infer_f = step_flops(spec, run, unit, train_ds, batch)
    probe_id = f"{run.id}/probe-{unit}"
    rec = workdir and records.load_record(workdir, probe_id)
    if not rec:
      rec, _ = finetune_stage.finetune(probe_spec, dataclasses.replace(run, id=probe_id, unit=unit),
                                       train_ds, None, pretrained, workdir, mesh, on_log)
      rec.stage = "unit_probe"
      if workdir and primary:
        records.save_record(workdir, rec)
    cost = probe_steps * train_f + n_measured * infer_f
    choice[unit] = {"nc1": rec.nc1, "params_fraction": fraction, "steps": probe_steps,
                    "flops": cost, "wall_s": rec.wall_s}
    full_flops[unit] = full_steps * train_f
    probe_flops += cost
  what = "rgn" if run.selector == "rgn" else "nc1"
  finite = {u: c[what] for u, c in choice.items() if c[what] == c[what]}
  if not finite:
    raise FloatingPointError(f"{run.id}: every candidate's {what} is NaN; no unit can be chosen")
  # NC: the lowest probe NC1; Auto-RGN: the largest relative gradient norm.
  chosen = (max if what == "rgn" else min)(finite, key=finite.get)
  logging.info("%s: %s %s -> %s", run.id, "RGN" if what == "rgn" else "probe NC1",
               ", ".join(f"{u} {c:.4g}" for u, c in finite.items()), chosen)

  swept = {u: workdir and records.load_record(workdir, r.id)  # the sweep's finished runs
           for u, r in _sweep_runs(spec, run).items()}
  done = swept.get(chosen)
  if done:
    rec = dataclasses.replace(done, run=run.id)
  else:
    rec, _ = finetune_stage.finetune(spec, dataclasses.replace(run, unit=chosen), train_ds,
                                     test_ds, pretrained, workdir, mesh, on_log)
  sweep_flops = sum(full_flops.values())
  rec.unit_choice = choice
  rec.unit_selector = run.selector or "nc"
  rec.probe_cost_fraction = probe_flops / sweep_flops
  rec.cost_fraction = (probe_flops + full_flops[chosen]) / sweep_flops
  if all(swept.get(u) for u in fractions):  # the job's sweep covers every candidate
    rec.regret = max(swept[u].accuracy for u in fractions) - rec.accuracy
  # A reused run's time counts: wall_s is what the choice costs without the sweep.
  rec.wall_s = time.time() - t0 + (done.wall_s if done else 0.0)
  return rec


def run(ctx: Context, run: Run, done: records.Record | None = None) -> records.Record:
  return choose_and_finetune(ctx.spec, run, *finetune_stage.split(ctx, run),
                             ctx.pretrained_for(run), ctx.workdir, ctx.mesh, ctx.log(run.id),
                             ctx.primary)
