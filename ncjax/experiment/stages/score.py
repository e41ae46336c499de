"""Stage ``score`` of job ``rank``: rank candidate pre-trained models for a downstream dataset
without fine-tuning them, and measure how well each transferability estimator ranks them.

A candidate is one backbone of one variant: a pre-training variant the config produces
(Table 1 / Figs. 3-5 machinery) or a weights file (``backbone.<model>.weights``). For each
candidate and downstream dataset a ``score`` run embeds the training split with the frozen
backbone (penultimate features, eval mode) and computes every estimator of
``rank.estimators`` (`ncjax.transferability`; higher = predicted to transfer better):

* ``nc1``    minus the penultimate NC1 (the paper's Fig. 6 principle);
* ``logme``, ``hscore``;
* ``leep``   from the candidate's source classifier on the downstream images: an ncjax
  pre-training with the CE loss and no projection head, or a torchvision / vit_jax file's
  own head; NaN where the candidate has none (SupCon, MSE, projection heads);
* ``ncti``   normalised over the candidates of the dataset, so it is completed in
  `summarize` from each candidate's three terms.

The job's fine-tuning cells (``methods``, e.g. the linear probe and Layer FT) are the ground
truth. `summarize` joins them into one ``rank`` record per (candidate, dataset, method,
unit) with ``score_<estimator>``, ``seconds_<estimator>``, the measured ``accuracy``, and the
summary fields ``kendall_tau_<estimator>`` / ``weighted_tau_<estimator>`` of that (dataset,
method, unit) over the candidates with a finite score.
"""
from __future__ import annotations

import time

import numpy as np
from absl import logging

from ncjax import train, transferability, weights
from ncjax.experiment import assemble, records
from ncjax.experiment.spec import Run, Spec
from ncjax.experiment.stages.base import Context

NCTI_TERMS = tuple(f"ncti_{t}" for t in transferability.NCTITerms._fields)


def candidate(spec: Spec, run: Run) -> str:
  """``[<variant tag>/]<model>``: the name a candidate has in records and reports."""
  return f"{spec.tag}/{run.backbone.model}" if spec.tag else run.backbone.model


def source_probs(spec: Spec, run: Run, pretrained: dict | None, ds, mesh) -> np.ndarray | None:
  """(N, C_s) float64 softmax of the candidate's source classifier on `ds`'s images (eval
  mode), or None when the candidate has no source classifier (module docstring)."""
  bb = run.backbone
  if bb.weights_path:
    classes = weights.head_classes(bb.weights_path, bb.model)
    if not classes:
      return None
    model = assemble.build_model(spec, bb, classes)
    variables = weights.load(bb.weights_path, bb.model, assemble.init_variables(
        model, assemble.input_shape(bb, ds), spec.seed), keep_head=True)
  elif (pretrained is not None and spec.pretrain.loss == "ce"
        and spec.pretrain.projection_layers == 0 and "head" in pretrained["params"]):
    classes = int(pretrained["params"]["head"]["bias"].shape[0])
    model, variables = assemble.build_model(spec, bb, classes), pretrained
  else:
    return None
  prepare = assemble.prepare_for(bb, ds, 1)
  fn = train.logits_fn(train.model_forward(model))
  logits = np.concatenate([out for out, _ in train.predict(
      fn, ds.images, assemble.eval_batch(spec, mesh), mesh=mesh, desc=f"{run.id} source head",
      args=(variables["params"], variables.get("batch_stats", {}), prepare))])
  z = logits.astype(np.float64)
  z -= z.max(1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(1, keepdims=True)


def score(spec: Spec, run: Run, pretrained: dict | None, mesh) -> records.Record:
  """The ``score`` run: every estimator of ``rank.estimators`` on the candidate's frozen
  penultimate features of the downstream training split, each timed (``score_wall_s``; the
  embedding pass, shared by all, is in ``wall_s``)."""
  t0 = time.time()
  emb, ds, origin = assemble.embed(spec, run, pretrained, mesh, split="train")
  feats, labels = np.asarray(emb), np.asarray(ds.labels)
  scores, seconds = {}, {}
  for name in spec.rank_estimators:
    t = time.time()
    if name == "nc1":
      scores[name] = transferability.nc1_score(feats, labels)
    elif name == "logme":
      scores[name] = transferability.logme(feats, labels)
    elif name == "hscore":
      scores[name] = transferability.hscore(feats, labels)
    elif name == "leep":
      probs = source_probs(spec, run, pretrained, ds, mesh)
      scores[name] = records.NAN if probs is None else transferability.leep(probs, labels)
    elif name == "ncti":
      scores.update(zip(NCTI_TERMS, transferability.ncti_terms(feats, labels)))
    seconds[name] = time.time() - t
  logging.info("%s: %s", run.id, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
  # -inf (the worst score) is null in JSON like a missing one: keep which it was.
  worst = sorted({k.split("_")[0] for k, v in scores.items() if v == transferability.WORST})
  if worst:
    logging.warning("%s: candidate %s has constant features (%s score it -inf): ranked last",
                    run.id, candidate(spec, run), ", ".join(worst))
  return records.Record(
      degenerate=worst,
      model=run.backbone.model, dataset=run.dataset, method="score", unit="", stage="score",
      nc1=-scores["nc1"] if "nc1" in scores and "nc1" not in worst else records.NAN,
      candidate=candidate(spec, run), scores=scores, score_wall_s=seconds, num_train=len(ds),
      num_classes=ds.num_classes, weights=origin,
      normalization=assemble.normalization_used(run.backbone), seed=spec.seed, run=run.id, pretrain=spec.variant,
      wall_s=time.time() - t0)


def _finite_pairs(xs, ys) -> tuple[list[float], list[float]]:
  keep = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None
          and np.isfinite(x) and np.isfinite(y)]
  return [x for x, _ in keep], [y for _, y in keep]


def _tau(fn, scores, truth) -> float:
  """Kendall tau of `scores` against `truth`; a -inf score (a degenerate candidate) ranks
  below every finite one, NaN ones are left out."""
  finite = [x for x in scores if x is not None and np.isfinite(x)]
  low = min(finite) - abs(min(finite)) - 1.0 if finite else 0.0
  scores = [low if x is not None and x == -np.inf else x for x in scores]
  xs, ys = _finite_pairs(scores, truth)
  if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
    return records.NAN
  return float(fn(xs, ys))


def summarize(results: list[dict]) -> list[dict]:
  """The ``rank`` records of a rank job's results (its ``score`` and fine-tuning records;
  module docstring), ordered by dataset, method, unit and candidate."""
  scores = [r for r in results if r["stage"] == "score"]
  cells = [r for r in results if r["stage"] == "transfer"]
  estimators = list(dict.fromkeys(k for s in scores for k in s["score_wall_s"]))
  out = []
  for dataset in dict.fromkeys(s["dataset"] for s in scores):
    ss = [s for s in scores if s["dataset"] == dataset]
    # A record read back from JSON holds None where a score was NaN.
    # -inf where the candidate was degenerate (`score` lists the estimators).
    per = [{k: (transferability.WORST if k.split("_")[0] in s.get("degenerate", ()) else
                records.NAN) if v is None else v for k, v in s["scores"].items()} for s in ss]
    if "ncti" in estimators:
      combined = transferability.ncti_from_terms([[p[t] for t in NCTI_TERMS] for p in per])
      for p, v in zip(per, combined):
        p["ncti"] = float(v)
    for method, unit in dict.fromkeys((c["method"], c["unit"]) for c in cells
                                      if c["dataset"] == dataset):
      rows = []
      for s, p in zip(ss, per):
        match = [c for c in cells if (c["dataset"], c["method"], c["unit"], c["model"],
                                      c.get("pretrain") or "") ==
                 (dataset, method, unit, s["model"], s.get("pretrain") or "")]
        cell = match[0] if match else {}
        rows.append(dict(
            model=s["model"], dataset=dataset, method=method, unit=unit, stage="rank",
            candidate=s["candidate"], pretrain=s.get("pretrain") or "",
            degenerate=list(s.get("degenerate", ())),
            accuracy=cell.get("accuracy", records.NAN), nc1=s["nc1"],
            cdnv=records.NAN, numerical_rank=records.NAN,
            percent_params=cell.get("percent_params", records.NAN), layerwise_nc1={},
            num_train=s["num_train"], weights=s["weights"],
            finetune_wall_s=cell.get("wall_s", records.NAN), score_wall_s=s["wall_s"],
            **{f"score_{e}": p.get(e, records.NAN) for e in estimators},
            **{f"seconds_{e}": s["score_wall_s"][e] for e in estimators}))
      truth = [r["accuracy"] for r in rows]
      for e in estimators:
        column = [r[f"score_{e}"] for r in rows]
        tau = _tau(transferability.kendall_tau, column, truth)
        weighted = _tau(transferability.weighted_kendall_tau, column, truth)
        for r in rows:
          r[f"kendall_tau_{e}"], r[f"weighted_tau_{e}"] = tau, weighted
      out += rows
  return out


def run(ctx: Context, run: Run, done: records.Record | None = None) -> records.Record:
  return score(ctx.spec, run, ctx.pretrained_for(run), ctx.mesh)
