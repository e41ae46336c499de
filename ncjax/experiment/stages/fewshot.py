"""Stage ``fewshot`` (Table 2): RFS episodes on the frozen backbone's embeddings of the
meta-test classes, one run per shots setting.
"""
from __future__ import annotations

import time

from absl import logging

from ncjax import data, fewshot
from ncjax.experiment import assemble, records
from ncjax.experiment.spec import Run, Spec
from ncjax.experiment.stages.base import Context


def run(ctx: Context, run: Run, done: records.Record | None = None) -> records.Record:
  # One embedding pass serves every shots setting of a (model, dataset).
  emb = ctx.shared(("fewshot", run.backbone.model, run.dataset),
                   lambda: assemble.embed(ctx.spec, run, ctx.pretrained_for(run), ctx.mesh))
  return fewshot_record(ctx.spec, run, *emb)


def fewshot_record(spec: Spec, run: Run, emb, ds: data.ArrayDataset, origin: str
                   ) -> records.Record:
  """Table 2: RFS episodes on the frozen embeddings; accuracy +- ci95 and their NC1."""
  t0, f = time.time(), spec.fewshot
  out = fewshot.evaluate(emb, ds.labels, ways=f.ways, shots=run.size, queries=f.queries,
                         episodes=f.episodes, seed=spec.seed, solver=f.solver, nc1=True)
  logging.info("%s: %.2f +- %.2f%%", run.id, out["accuracy"], out["ci95"])
  return records.Record(
      model=run.backbone.model, dataset=run.dataset, method="fewshot", unit="",
      stage="fewshot", accuracy=float(out["accuracy"]), ci95=float(out["ci95"]),
      nc1=float(out["nc1"]), ways=f.ways, shots=run.size, queries=f.queries,
      episodes=int(out["episodes"]), num_train=len(ds), num_classes=ds.num_classes,
      weights=origin, seed=spec.seed, run=run.id, pretrain=spec.variant, wall_s=time.time() - t0)
