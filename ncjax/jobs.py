"""Jobs a config can name in ``config.job``; `ncjax.main` calls `run(config, workdir)`.

* ``transfer``     the fine-tuning grid (Tables 3, 5-7; Fig. 10, 11) -> results.* + plots
* ``pretrain``     train each model on the source data only and measure layer-wise NC1 there
                   (Fig. 2's progressive collapse; Table 1's source NC1)
* ``layer_probe``  a linear probe on every unit's pooled output (Fig. 9)
* ``metrics``      the NC metrics of the embedded digits, raw and through a random ReLU map
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

JOBS = ("transfer", "pretrain", "layer_probe", "metrics")


def run(config, workdir: str) -> list[dict]:
  job = config.job
  if job not in JOBS:
    raise ValueError(f"unknown job {job!r}; config.job must be one of {JOBS}")
  os.makedirs(workdir, exist_ok=True)
  if job == "metrics":
    return metrics_job(config, workdir)
  from ncjax import report, transfer
  if job == "transfer":
    records = transfer.run(config, workdir)
  elif job == "pretrain":
    records = transfer.run_pretrain_only(config, workdir)
  else:
    records = transfer.run_layer_probes(config, workdir)
  if jax.process_index() == 0:
    paths = report.write_all(records, workdir, plots=bool(config.plots))
    print(report.markdown_table(records))
    print("wrote: " + ", ".join(os.path.relpath(p, workdir) for p in paths if p))
  return records


def metrics_job(config, workdir: str) -> list[dict]:
  """NC metrics of scikit-learn's digits: raw pixels and a fixed random ReLU feature map."""
  from ncjax import data, metrics
  ds = data.load("digits", config.get("split", "train"))
  x = ds.images.reshape(len(ds), -1).astype(np.float32) / 255.0
  rng = np.random.default_rng(int(config.seed))
  width = int(config.get("random_features", 2048))
  w = rng.standard_normal((x.shape[1], width)).astype(np.float32) / np.sqrt(x.shape[1])
  b = rng.standard_normal(width).astype(np.float32) * 0.1
  feats = {"pixels": x, f"random_relu_{width}": np.maximum(x @ w + b, 0.0)}
  rows = []
  for name, f in feats.items():
    row = {"features": name, "dim": f.shape[1], "num_examples": len(f),
           "nc1": float(metrics.nc1(f, ds.labels, ds.num_classes)),
           "nc1_pinv": float(metrics.nc1_pinv(f, ds.labels, ds.num_classes)),
           "cdnv": float(metrics.cdnv(f, ds.labels, ds.num_classes)),
           "numerical_rank": float(metrics.numerical_rank(f, ds.labels, ds.num_classes)),
           "nc2_etf": float(metrics.nc2_etf(f, ds.labels, ds.num_classes))}
    rows.append(row)
  cols = ["features", "dim", "nc1", "nc1_pinv", "cdnv", "numerical_rank", "nc2_etf"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                                   for c in cols) + " |")
  table = "\n".join(lines)
  print(f"Neural-collapse metrics of the digits ({len(ds)} {config.get('split', 'train')} "
        f"images, {ds.num_classes} classes)\n{table}")
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(workdir, "metrics.md"), "w") as f:
    f.write(table + "\n")
  return rows
