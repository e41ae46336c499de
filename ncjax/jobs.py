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
import time

import jax
import numpy as np

JOBS = ("transfer", "pretrain", "layer_probe", "metrics")


def parse_variants(spec: str) -> list[tuple[str, dict[str, str]]]:
  """``"mse: pretrain.loss=mse; supcon+mlp: pretrain.loss=supcon pretrain.projection_layers=2"``
  -> ``[('mse', {'pretrain.loss': 'mse'}), ('supcon+mlp', {...})]``."""
  out = []
  for part in (p.strip() for p in str(spec or "").split(";")):
    if not part:
      continue
    tag, sep, assigns = part.partition(":")
    if not sep or not tag.strip():
      raise ValueError(f"variant {part!r} must read 'tag: field=value ...'")
    fields = {}
    for a in assigns.split():
      key, eq, value = a.partition("=")
      if not eq:
        raise ValueError(f"variant {tag.strip()!r}: {a!r} is not field=value")
      fields[key] = value
    out.append((tag.strip(), fields))
  return out


def with_overrides(config, fields: dict[str, str]):
  """A copy of `config` with dotted `fields` set, each parsed as its existing field's type."""
  c = config.copy_and_resolve_references()
  for key, value in fields.items():
    *path, last = key.split(".")
    holder = c
    for p in path:
      holder = holder[p]
    if last not in holder:
      raise ValueError(f"variant field {key!r} is not a config field")
    old = holder[last]
    if isinstance(old, bool):
      value = value.lower() in ("1", "true", "yes")
    elif isinstance(old, int):
      value = int(value)
    elif isinstance(old, float):
      value = eval_number(value)
    holder[last] = value
  return c


def eval_number(text: str) -> float:
  """'8/255' -> 0.0313...; plain numbers as float."""
  num, sep, den = text.partition("/")
  return float(num) / float(den) if sep else float(num)


def run(config, workdir: str) -> list[dict]:
  job = config.job
  if job not in JOBS:
    raise ValueError(f"unknown job {job!r}; config.job must be one of {JOBS}")
  if job == "metrics":
    os.makedirs(workdir, exist_ok=True)
    return metrics_job(config, workdir)
  from ncjax import report, train, transfer
  variants = parse_variants(config.get("variants", ""))
  problems = []
  for tag, fields in variants or [("", {})]:  # every variant, before any work
    try:
      transfer.check_config(with_overrides(config, fields))
    except transfer.ConfigError as e:
      problems += [(f"variant {tag!r}: " if tag else "") + line.strip()
                   for line in str(e).splitlines()[1:]]
  if problems:
    raise transfer.ConfigError("invalid config:\n  " + "\n  ".join(problems))
  os.makedirs(workdir, exist_ok=True)
  cache = train.enable_compilation_cache(str(config.compile_cache_dir))
  compiles = train.compile_stats()
  since, t0 = compiles.snapshot(), time.time()
  if variants:
    records = []
    for tag, fields in variants:
      for r in _run_job(with_overrides(config, fields), os.path.join(workdir, tag)):
        records.append(dict(r, pretrain=tag))
  else:
    records = _run_job(config, workdir)
  if jax.process_index() == 0:
    paths = report.write_all(records, workdir, plots=bool(config.plots))
    print(report.markdown_table(records))
    print("wrote: " + ", ".join(os.path.relpath(p, workdir) for p in paths if p))
    print(f"{time.time() - t0:.1f} s; {compiles.summary(since)}"
          + (f"; compilation cache {cache}" if cache else ""))
  return records


def _run_job(config, workdir: str) -> list[dict]:
  from ncjax import transfer
  os.makedirs(workdir, exist_ok=True)
  if config.job == "transfer":
    return transfer.run(config, workdir)
  if config.job == "pretrain":
    return transfer.run_pretrain_only(config, workdir)
  return transfer.run_layer_probes(config, workdir)


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
