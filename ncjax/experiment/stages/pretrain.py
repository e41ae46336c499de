"""Stage ``pretrain``: training on the source data (Table 1, Figs. 2-5); every parameter
trains from scratch.

The spec's `Pretrain` selects the loss (``ce`` | ``mse`` | ``supcon``), an optional
projection head (``projection_layers``; dropped afterwards), augmentation
(``optim.aug_level``) and l_inf adversarial training (``adversarial_eps`` in [0, 1] pixel
units, PGD).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ncjax import losses, measure, models, train
from ncjax.experiment import assemble, records
from ncjax.experiment.spec import Run, Spec
from ncjax.experiment.stages.base import Context


def projected_forward(model, head) -> train.Forward:
  """`Forward` over ``params = {'backbone': …, 'projection': …}``: the backbone's penultimate
  feature through a `ncjax.models.ProjectionHead` (the backbone's own classifier is unused)."""
  def forward(params, batch_stats, x, is_train):
    variables = {"params": params["backbone"]}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    mutable = ["intermediates"] + (["batch_stats"] if is_train and batch_stats else [])
    _, state = model.apply(variables, x, train=is_train, mutable=mutable)
    z = head.apply({"params": params["projection"]}, state["intermediates"]["penultimate"][0])
    return z, state.get("batch_stats", batch_stats)
  return forward


def two_views(prepare) -> train.Prepare:
  """Training input of two independent augmentations of the batch, stacked (2N, ...)."""
  def p(rng, x, is_train):
    if not is_train:
      return prepare(rng, x, False)
    k1, k2 = jax.random.split(rng)
    return jnp.concatenate([prepare(k1, x, True), prepare(k2, x, True)])
  return p


def supcon_objective(temperature: float):
  """SupCon on the stacked two-view embeddings (2N, D) produced with `two_views`."""
  def loss(z, labels):
    n = labels.shape[0]
    return losses.supcon(z.reshape(2, n, -1).swapaxes(0, 1), labels, temperature)
  return loss


def pretrain(spec: Spec, run: Run, workdir: str | None, mesh, on_log=None,
             done: records.Record | None = None) -> tuple[dict, records.Record]:
  """Trains `run.backbone` on the source data; returns the backbone's variables and a record
  of its source test accuracy (NaN for SupCon, which has no classifier) and its collapse on
  the source training data. A finished run (`done`: its record from the workdir) is restored
  from its last checkpoint and not measured again."""
  t0 = time.time()
  pc, bb, seed = spec.pretrain, run.backbone, spec.seed
  supcon = pc.loss == "supcon"
  src = assemble.materialize(spec, assemble.source_train(spec, bb))
  model = assemble.build_model(spec, bb, src.num_classes)
  in_shape = assemble.input_shape(bb, src)
  variables = assemble.init_variables(model, in_shape, seed)
  prepare = assemble.prepare_for(bb, src, pc.optim.aug_level)
  if pc.projection_layers == 0 and not supcon:
    forward, params, loss_fn = train.model_forward(model), variables["params"], losses.get(pc.loss)
  else:
    dim = jax.eval_shape(lambda v, x: models.features(model, v, x), variables,
                         jnp.zeros(in_shape, jnp.float32))["penultimate"].shape[-1]
    head = models.ProjectionHead(
        layers=pc.projection_layers, width=pc.projection_width or dim,
        num_classes=None if supcon else src.num_classes,
        out_dim=pc.projection_dim if supcon else None)
    params = {"backbone": variables["params"],
              # SupCon without projection layers embeds the feature itself: no parameters
              "projection": head.init(jax.random.PRNGKey(seed + 1),
                                      jnp.zeros((1, dim))).get("params", {})}
    forward = projected_forward(model, head)
    loss_fn = supcon_objective(pc.temperature) if supcon else losses.get(pc.loss)
  adversary = None
  if pc.adversarial_eps > 0:
    adversary = train.pgd_adversary(forward, loss_fn,
                                    pc.adversarial_eps / np.asarray(prepare.std, np.float32),
                                    steps=pc.adversarial_steps)
  batch = assemble.effective_batch(pc.optim.batch_size, len(src), mesh)
  steps = assemble.total_steps(pc.optim, len(src), batch)
  recipe = assemble.optimizer(pc.optim, len(src), batch)
  state, history = train.train(
      forward, params, variables["batch_stats"], None, recipe, src.images, src.labels,
      batch_size=batch, steps=steps, seed=seed, mesh=mesh,
      prepare=two_views(prepare) if supcon else prepare, loss_fn=loss_fn, adversary=adversary,
      checkpoint_dir=workdir and records.checkpoint_dir(workdir, run.id),
      checkpoint_every=spec.checkpoint_every, desc=run.id, on_log=on_log)
  projected = "backbone" in state.params
  backbone = {"params": state.params["backbone"] if projected else state.params,
              "batch_stats": state.batch_stats}
  if done is not None:
    return backbone, done
  src_test = assemble.materialize(spec, assemble.load_split(spec, pc.dataset, "test", bb,
                                                            pc.classes))
  eval_batch = assemble.eval_batch(spec, mesh)
  acc = float("nan") if supcon else train.accuracy(
      forward, state.params, state.batch_stats, prepare, src_test.images, src_test.labels,
      eval_batch, mesh)
  pen, layerwise = measure.collapse(model, backbone, prepare, src, eval_batch, mesh, desc=run.id)
  record = records.Record(
      model=bb.model, dataset=src.name, method="full", unit="", accuracy=acc,
      percent_params=100.0, num_train=len(src), num_test=len(src_test),
      num_classes=src.num_classes, steps=steps, batch_size=batch, weights="scratch",
      normalization=assemble.normalization_used(bb), seed=seed, stage="pretrain", run=run.id, pretrain=spec.variant, loss=pc.loss,
      projection_layers=pc.projection_layers, adversarial_eps=pc.adversarial_eps,
      aug_level=pc.optim.aug_level, final_train_loss=records.final_loss(history),
      layerwise_nc1=layerwise, wall_s=time.time() - t0, **pen)
  logging.info("%s: source accuracy %.2f%%, source NC1 %.4g", run.id, acc, pen["nc1"])
  return backbone, record


def run(ctx: Context, run: Run, done: records.Record | None = None) -> records.Record:
  """Also for a finished run (`done`): its variables serve the runs after it."""
  ctx.pretrained[run.backbone.model], rec = pretrain(ctx.spec, run, ctx.workdir, ctx.mesh,
                                                     ctx.log(run.id), done)
  ctx.source[run.backbone.model] = rec
  return rec
