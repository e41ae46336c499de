"""The runner: a config's job, from validation to the report. `ncjax.main` calls
`run(config, workdir)`. Jobs a config can name in ``config.job``:

* ``transfer``     the fine-tuning grid (Tables 3, 5-7; Fig. 10, 11) -> results.* + plots
* ``pretrain``     train each model on the source data only and measure layer-wise NC1 there
                   (Fig. 2's progressive collapse; Table 1's source NC1)
* ``layer_probe``  a linear probe on every unit's pooled output (Fig. 9)
* ``fewshot``      RFS episodes on frozen embeddings (Table 2)
* ``rank``         transferability scores of candidate models beside their fine-tuning (Fig. 6)
* ``metrics``      the NC metrics of the embedded digits, raw and through a random ReLU map

Each run of a spec is one stage (`STAGES`, a registry by run kind, cf. big_vision's evaluators
by name); the runner walks them in order, reuses finished ones and writes their records.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time

import jax
import numpy as np

from ncjax import data, io, metrics, report, telemetry, train
from ncjax.errors import CheckpointError, ConfigError, Diverged, WorkdirError
from ncjax.experiment import assemble, assets, records, spec as spec_lib
from ncjax.experiment.spec import AUTO_UNIT, Run, Spec
from ncjax.experiment.stages import autounit, fewshot, finetune, pretrain, probe, score
from ncjax.experiment.stages.base import Context

# kind -> ``run(ctx, run, done) -> Record``; a cell of unit ``auto`` is stage ``autounit``.
STAGES = {"pretrain": pretrain.run, "finetune": finetune.run, "autounit": autounit.run,
          "probe": probe.run, "fewshot": fewshot.run, "score": score.run}
# Stages run also when finished: a pre-training's variables serve the runs after it.
RUN_WHEN_DONE = ("pretrain",)


def run(config, workdir: str, *, fresh: bool = False, dry_run: bool = False) -> list[dict]:
  """Validates the whole config, then runs its job into `workdir` and writes the report.

  Every variant, every run and every asset is checked before the first step (`ConfigError`
  lists all problems). Runs already in the workdir resume from their last readable
  checkpoint, or are not run again when finished; a run made with a different config stops
  the job before any work (`CheckpointError` naming the differing fields) unless `fresh`,
  which removes those runs first and says so. `dry_run` prints the grid and its assets and
  returns without training."""
  if config.job == "metrics":
    os.makedirs(workdir, exist_ok=True)
    return metrics_job(config, workdir)
  specs = spec_lib.build(config)
  runs = [r for s in specs for r in s.runs()]
  if dry_run:
    print(describe(specs, runs, workdir))
  assets.check_assets(specs, progress=(lambda m: print(f"  {m}")) if dry_run else
                        (lambda m: None))
  late = autounit.budget_problems(specs) + _schedule_problems(specs)
  if late:  # what only the data's sizes reveal, still before any work
    raise ConfigError("invalid config:\n  " + "\n  ".join(late))
  cannot_learn = schedule_warnings(specs)
  if cannot_learn and any(s.strict for s in specs):
    raise ConfigError("runs that cannot learn (--config.strict=True):\n  "
                      + "\n  ".join(cannot_learn))
  for line in cannot_learn:
    telemetry.warn(line)
  if dry_run:
    print("assets: all present and readable")
    return []
  problem = records.workdir_problem(workdir) if jax.process_index() == 0 else None
  if problem:
    finished = [records.load_record(workdir, r.id) for r in runs]
    if problem[1] and not fresh and all(finished):
      return _report_only(specs, workdir, finished)
    raise WorkdirError(problem[0])
  # Reads only: a refusal leaves the workdir as it was.
  interrupted = _check_workdir_runs(workdir, runs, fresh)
  with (records.workdir_lock(workdir) if jax.process_index() == 0 else
        contextlib.nullcontext()):
    for d in interrupted:
      print(f"ncjax: {d} has no fingerprint.json and no checkpoint or result (its start was "
            "interrupted): the run starts anew")
      shutil.rmtree(d)
    if fresh:
      _remove_runs(workdir, [r for r in runs if records.read_fingerprint(workdir, r.id)
                             is not None])
    return _run_specs(specs, workdir)


def _check_workdir_runs(workdir: str, runs, fresh: bool) -> list[str]:
  """Stops the job before any work when a run in the workdir was made with a different
  config, or lost its fingerprint.json while it holds checkpoints or results (unless
  `fresh`). Returns the run directories that lost it with nothing in them: they start anew."""
  lost, interrupted = [], []
  for r in runs:
    if records.NO_FINGERPRINT not in (records.read_fingerprint(workdir, r.id) or {}):
      continue
    d = records.run_dir(workdir, r.id)
    if records.load_record(workdir, r.id) is None and not records.has_checkpoints(workdir, r.id):
      interrupted.append(d)
    else:
      lost.append(d)
  if lost and not fresh:
    raise CheckpointError(
        f"{lost[0]}: its fingerprint.json is missing or unreadable, so its checkpoints and "
        "results cannot be matched to this config"
        + (f" (and {len(lost) - 1} more run(s))" if len(lost) > 1 else "")
        + "; pass --fresh to redo it (removes them), or use another --workdir")
  stale = _stale_runs(workdir, runs)
  if stale and not fresh:
    lines = [f"{records.run_dir(workdir, r.id)}: " + "; ".join(diff) for r, diff in stale]
    raise CheckpointError(
        f"{len(stale)} run(s) in --workdir={workdir} were made with a different config:\n  "
        + "\n  ".join(lines) + "\nRerun with that config, use another --workdir, or pass "
        "--fresh to start all runs of this config over (removes their checkpoints and "
        "results).")
  return interrupted


def _results(specs, out: list[dict]) -> list[dict]:
  """The report's rows of the job's records `out`: pre-training records only when
  pre-training is the job; job rank: one row per candidate."""
  if specs[0].job == "rank":  # one record per candidate: its scores beside its accuracy
    return score.summarize(out)
  return [r for r in out if r["stage"] != "pretrain"] or out


def _report_only(specs, workdir: str, finished) -> list[dict]:
  """A read-only workdir whose runs are all finished: their table, nothing written."""
  results = _results(specs, [rec.to_dict() for rec in finished])
  print(report.markdown_table(results))
  print(f"ncjax: --workdir={workdir} is read-only; every run is finished, so the table above "
        "is from its records (nothing was written)")
  return results


def _training_runs(specs):
  """``(spec, run, optim, field)`` for every run that trains: pre-trainings (`optim` the
  pre-training's, `field` ``'pretrain.optim'``), fine-tuning cells and layer probes."""
  for s in specs:
    for r in s.runs():
      if r.kind == "pretrain":
        yield s, r, s.pretrain.optim, "pretrain.optim"
      elif r.kind in ("finetune", "probe"):
        yield s, r, s.optim, "optim"


def _schedule_problems(specs) -> list[str]:
  """Step decays (in epochs) past the end of a run whose length ``steps`` sets: the steps per
  epoch come from the (lazily opened) training split's size, so spec cannot see them."""
  mesh, out = train.data_mesh(), []
  for s, r, optim, field in _training_runs(specs):
    if optim.schedule != "step" or not optim.steps:
      continue  # with epochs, spec already checks the decays against them
    ds = (assemble.source_train(s, r.backbone) if r.kind == "pretrain" else
          assemble.downstream_train(s, r.backbone, r.dataset, r.size))
    batch = assemble.effective_batch(optim.batch_size, len(ds), mesh)
    try:
      train.lr_schedule(assemble.optimizer(optim, len(ds), batch), optim.steps)
    except ValueError as e:
      line = (f"--config.{field}.decay_epochs={','.join(map(str, optim.decay_epochs))}: {e} "
              f"({r.id}: --config.{field}.steps={optim.steps}, "
              f"{assemble.steps_per_epoch(len(ds), batch)} steps per epoch)")
      if line not in out:
        out.append(line)
  return out


#: A run of fewer optimizer steps cannot learn: it is warned about (`schedule_warnings`).
MIN_STEPS = 20


def schedule_warnings(specs) -> list[str]:
  """One line per schedule under which runs cannot learn, from the training splits' sizes
  (opened lazily, before any work): fewer than `MIN_STEPS` optimizer steps, or a configured
  batch larger than the training data, which `assemble.effective_batch` caps at its size.
  Each line names the runs, the steps they take and the override that gives more. E.g.::

    resnet18-custom-linear ... resnet18-custom-full (4 runs): 1 optimizer step each (1 epoch
    of 120 training images; --config.optim.batch_size=128 exceeds them: capped at 120), too
    few to learn: --config.optim.epochs=20 gives 20 steps (or set --config.optim.steps)

  (one line). Runs that train nothing (few-shot, scores) and unit=auto's short probes are
  not checked."""
  mesh, groups, sizes = train.data_mesh(), {}, {}
  for s, r, optim, field in _training_runs(specs):
    key = ((s.source(s.pretrain.dataset), s.pretrain.classes, s.pretrain.train_size)
           if r.kind == "pretrain" else (s.source(r.dataset), s.downstream_classes, r.size),
           r.backbone.image_size, s.data_dir)
    if key not in sizes:  # a lazy split: labels only; once per split
      sizes[key] = len(assemble.source_train(s, r.backbone) if r.kind == "pretrain" else
                       assemble.downstream_train(s, r.backbone, r.dataset, r.size))
    n = sizes[key]
    batch = assemble.effective_batch(optim.batch_size, n, mesh)
    steps = assemble.total_steps(optim, n, batch)
    if steps < MIN_STEPS or optim.batch_size > n:
      groups.setdefault((field, optim, n, batch, steps), []).append(r.id)
  return [_cannot_learn(ids, *k) for k, ids in groups.items()]


def _cannot_learn(ids: list[str], field: str, optim, n: int, batch: int, steps: int) -> str:
  """The line of `schedule_warnings` for runs `ids`."""
  runs = ids[0] if len(ids) == 1 else f"{ids[0]} ... {ids[-1]} ({len(ids)} runs)"
  per_epoch = assemble.steps_per_epoch(n, batch)
  how = (f"--config.{field}.steps={optim.steps}" if optim.steps else
         f"{optim.epochs} epoch{'s' * (optim.epochs != 1)} of {n} training images")
  if optim.batch_size > n:
    how += (f"; --config.{field}.batch_size={optim.batch_size} exceeds them: capped at "
            f"{batch}")
  line = f"{runs}: {steps} optimizer step{'s' * (steps != 1)} each ({how})"
  if steps >= MIN_STEPS:
    return line + f"; --config.{field}.batch_size={batch} or less says so"
  if optim.steps:
    return line + f", too few to learn: --config.{field}.steps={MIN_STEPS} or more"
  epochs = -(-MIN_STEPS // per_epoch)
  return line + (f", too few to learn: --config.{field}.epochs={epochs} gives "
                 f"{epochs * per_epoch} steps (or set --config.{field}.steps)")


def _stale_runs(workdir: str, runs) -> list:
  """Runs of the grid whose workdir fingerprint differs from the config's, with the diff."""
  out = []
  for r in runs:
    stored = records.read_fingerprint(workdir, r.id)
    if stored is not None and records.NO_FINGERPRINT not in stored:
      diff = spec_lib.fingerprint_diff(stored, dict(r.fingerprint))
      if diff:
        out.append((r, diff))
  return out


def _remove_runs(workdir: str, runs) -> None:
  """--fresh: removes the runs' directories, TensorBoard events and metrics lines, listing
  each path."""
  ids = {r.id for r in runs}
  for r in runs:
    for path in (records.run_dir(workdir, r.id), os.path.join(workdir, "tensorboard", r.id)):
      if os.path.exists(path):
        print(f"ncjax: --fresh: removing {path}")
        shutil.rmtree(path)
  metrics = os.path.join(workdir, "metrics.jsonl")
  if ids and os.path.exists(metrics):
    kept = [m for m in telemetry.read_metrics(metrics) if m.get("run") not in ids]
    print(f"ncjax: --fresh: removing the metrics.jsonl lines of {len(ids)} run(s)")
    io.write_jsonl(metrics, kept)


def stage_of(run: Run) -> str:
  """The `STAGES` key of `run`."""
  return "autounit" if run.kind == "finetune" and run.unit == AUTO_UNIT else run.kind


def run_spec(spec: Spec, workdir: str, mesh, on_record, on_log=None,
             primary: bool = True) -> None:
  """Runs the spec's runs in order; a run whose record is in the workdir is not run again.

  Each run first stores its fingerprint (what defines it) in its run directory, so a later
  rerun can tell whether its checkpoints may be resumed. `on_record(record)` gets each record
  (pre-training ones included) as it is made; `on_log(run_id)` gives the per-step logger of
  a run (`ncjax.telemetry.RunLog`). Only the `primary` process writes files."""
  log = on_log or (lambda _: None)
  ctx = Context(spec, workdir, mesh, log, primary)
  for r in spec.runs():
    done = records.load_record(workdir, r.id)
    if primary and records.read_fingerprint(workdir, r.id) is None:
      records.write_fingerprint(workdir, r.id, dict(r.fingerprint))
    try:
      rec = (STAGES[stage_of(r)](ctx, r, done) if done is None or r.kind in RUN_WHEN_DONE
             else done)
    except Diverged as e:  # the loop knows the step, not the field to change
      optim, field = ((spec.pretrain.optim, "pretrain.optim") if r.kind == "pretrain" else
                      (spec.optim, "optim"))
      raise Diverged(f"{e}; the run's learning rate is --config.{field}.lr={optim.lr:g}: "
                     "lower it and rerun with --fresh") from e
    src = ctx.source.get(r.backbone.model)
    if done is None and src is not None and r.kind != "pretrain":
      rec.source_nc1, rec.source_accuracy = src.nc1, src.accuracy  # Table 1 / Fig. 4
    if done is None and primary:
      records.save_record(workdir, rec)
    if done is None and log(r.id) is not None:  # the evaluation, beside the training curve
      scalars = {"test_accuracy": rec.accuracy, "nc1": rec.nc1, "cdnv": rec.cdnv,
                 "numerical_rank": rec.numerical_rank}
      log(r.id)({"step": rec.steps, **{k: v for k, v in scalars.items() if v == v}})  # not NaN
    on_record(rec)


def describe(specs, runs, workdir: str) -> str:
  """The resolved grid and the assets it needs (--dry_run)."""
  lines = [f"job {specs[0].job}: {len(runs)} run(s) into {workdir}"]
  for r in runs:
    state = ("finished" if records.load_record(workdir, r.id) else
             "resumes" if records.read_fingerprint(workdir, r.id) is not None else "new")
    lines.append(f"  {r.kind:8s} {r.id}  [{state}]")
  lines.append("assets:")
  lines += [f"  --config.{field}: {what}" for field, what, _ in assets.assets(specs)]
  return "\n".join(lines)


def _run_specs(specs, workdir: str) -> list[dict]:
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if primary:
    io.write_json(os.path.join(workdir, "config.json"),
                       {**records.version_info(), "config": specs[0].resolved,
                        "variants": {s.tag: s.resolved for s in specs if s.tag}})
  try:
    cache = train.enable_compilation_cache(specs[0].compile_cache_dir)
  except OSError as e:  # spec checked its nearest ancestor; some (/proc, /sys) refuse anyway
    raise ConfigError(f"--config.compile_cache_dir={specs[0].compile_cache_dir}: cannot "
                      f"create it ({e.strerror}: {e.filename}); pass another directory, or '' "
                      "for no cache") from e
  compiles = train.compile_stats()
  since, t0 = compiles.snapshot(), time.time()
  mesh = train.data_mesh()
  out: list[dict] = []

  def on_record(rec):
    out.append(rec.to_dict())
    if primary:
      io.write_jsonl(os.path.join(workdir, "records.jsonl"), out)

  with telemetry.RunLog(workdir) as log:
    def on_log(run_id):
      def write(entry):
        entry = dict(entry)
        log.log(run_id, int(entry.pop("step")), **entry)
      return write
    for s in specs:
      run_spec(s, workdir, mesh, on_record=on_record, on_log=on_log, primary=primary)
  results = _results(specs, out)
  if primary:
    paths = report.write_all(results, workdir, plots=specs[0].plots)
    print(report.markdown_table(results))
    print("wrote: " + ", ".join(os.path.relpath(p, workdir) for p in paths if p))
    print(f"{time.time() - t0:.1f} s; {compiles.summary(since)}"
          + (f"; compilation cache {cache}" if cache else ""))
  return results


def metrics_job(config, workdir: str) -> list[dict]:
  """NC metrics of scikit-learn's digits: raw pixels and a fixed random ReLU feature map."""
  job = spec_lib.build_metrics(config)
  ds = data.load("digits", job.split)
  x = ds.images.reshape(len(ds), -1).astype(np.float32) / 255.0
  rng = np.random.default_rng(job.seed)
  width = job.random_features
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
  print(f"Neural-collapse metrics of the digits ({len(ds)} {job.split} "
        f"images, {ds.num_classes} classes)\n{table}")
  io.write_json(os.path.join(workdir, "metrics.json"), rows)
  io.atomic_write(os.path.join(workdir, "metrics.md"), table + "\n")
  return rows
