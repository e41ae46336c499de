"""Every table of the report, laid out like the paper's, and results.md.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ncjax.report.schema import stage, validate
from ncjax.report.format import (
    _Columns, dataset_name, DEFAULT_SECTIONS, default_sections, ESTIMATOR_NAMES, _estimators,
    _fewshot_columns, _first_seen, fmt_accuracy, fmt_accuracy_ci, fmt_nc1, fmt_percent, fmt_r,
    fmt_sig, _FORMATTERS, _KIND_TITLES, _log_r, _md_row, _md_table, _mean, _mean_layerwise,
    method_name, _method_rank, MISSING, model_name, _natural_key, _num, _ordered_rows,
    _positive, _pretrain_groups, _pretrain_label, _rank_groups, reference_dataset, _row_key,
    _row_label, _SECTION_TITLES, _setting, _SOURCE_FIELDS, _SOURCE_SECTION, split_kinds,
    _split_methods, _tag, _unit, _variant_keys, _variant_points, mean_ci95, PEFT_METHODS,
    peft_groups, is_seed_replicates,
)


def markdown_table(records: Sequence[Mapping], sections: Sequence[str] | None = None) -> str:
  """The job's main table as GitHub Markdown (what the runner prints), by kind
  (`split_kinds`): pre-training -> `layerwise_nc1_table`; layer probes -> `probe_table`;
  transfer -> `transfer_table`; few-shot -> `fewshot_table`; a variant sweep ->
  `transfer_table` with one column per variant (Table 1's layout) when it has one downstream dataset, else `variant_table`.
  Records of several kinds give one table each under a "## <what it reproduces>" heading.
  With ``sections``, always the Table 3 layout of `transfer_table`. "" for no records."""
  records = validate(records)
  if not records:
    return ""
  if sections is not None:
    return transfer_table(records, sections)
  parts = [(kind, _main_table(kind, rs)) for kind, rs in split_kinds(records).items()]
  if len(parts) == 1:
    return parts[0][1]
  return "\n".join(f"## {_KIND_TITLES[k]}\n\n{t}" for k, t in parts)


def _main_table(kind: str, rs: list[dict]) -> str:
  if kind == "pretrain":
    return layerwise_nc1_table(rs)
  if kind == "probe":
    return probe_table(rs)
  if kind == "fewshot":
    return fewshot_table(rs)
  if kind == "rank":
    return rank_table(rs)
  if kind == "variants" and len({r["dataset"] for r in rs}) > 1:
    return variant_table(rs)
  return transfer_table(rs)


def transfer_table(records: Sequence[Mapping], sections: Sequence[str] | None = None) -> str:
  """Table 3 layout.

  Columns: (model, dataset) pairs in first-seen order, headed "ResNet18 / Cifar-10"; one
  column per ``pretrain`` tag when a pair has several ("MLP [mse] / Digits": Table 1's
  variants), per ``num_train`` when it has several sizes ("ResNet18 / Cifar-10 (n=500)").
  Sections (default): "Transfer accuracy" (percent, 2 decimals), "NC1 evaluated on the
  penultimate layer feature (downstream training data)" (2 decimals), "Percentage of
  parameters fine-tuned" ("8.27%", "100%"); ``sections`` may also name ``cdnv`` and
  ``numerical_rank``. Rows: one per method in the order linear, layer, scl, full, then others
  in first-seen order; a method with several units within one column (a unit sweep, Tables
  5-7) gets one row per unit, "Layer FT (block5)". When records carry ``source_nc1`` /
  ``source_accuracy`` (a model pre-trained by the job) these are properties of the
  pre-trained model, not of the method: one row each under "The pre-trained model on its
  source data". Missing cells are "–"; records sharing a cell are averaged.
  """
  records = validate(records)
  if not records:
    return ""
  if sections is None:
    sections = default_sections(records)
  for s in sections:
    if s not in _FORMATTERS:
      raise ValueError(f"unknown section {s!r}; choose from {sorted(_FORMATTERS)}")
  cols = _Columns(records)
  split = _split_methods(records, cols.key)
  rank = _method_rank(records)
  cells: dict[tuple, list] = {}
  for r in records:
    cells.setdefault((cols.key(r), _row_key(r, split)), []).append(r)
  rows = _ordered_rows((rk for (_, rk) in cells), rank)
  by_col: dict[tuple, list] = {}
  for r in records:
    by_col.setdefault(cols.key(r), []).append(r)

  n = len(cols.keys)
  lines = [
      _md_row(["Method"] + [cols.label(k) for k in cols.keys]),
      "|:--" + "|--:" * n + "|",
  ]
  in_source = False
  for field in sections:
    fmt = _FORMATTERS[field]
    if field in _SOURCE_FIELDS:
      if not in_source:
        lines.append(_md_row([f"**{_SOURCE_SECTION}**"] + [""] * n))
        in_source = True
      lines.append(_md_row([_SECTION_TITLES[field]]
                           + [fmt(_mean(r.get(field) for r in by_col[k])) for k in cols.keys]))
      continue
    in_source = False
    lines.append(_md_row([f"**{_SECTION_TITLES[field]}**"] + [""] * n))
    for row in rows:
      vals = []
      for k in cols.keys:
        rs = cells.get((k, row))
        vals.append(fmt(_mean(r.get(field) for r in rs)) if rs else MISSING)
      lines.append(_md_row([_row_label(row)] + vals))
  return "\n".join(lines) + "\n"


_BEST_UNIT_TITLE = "Fine-tuned unit of the best result"


def _best_units(records: Sequence[Mapping], colkey) -> dict[tuple, tuple[str, list]]:
  """(column, method) -> (unit, records) of the unit with the highest mean accuracy, for
  methods that tune a unit. Ties go to the unit nearest the input (fewer parameters)."""
  groups: dict[tuple, dict] = {}
  for r in records:
    if r["unit"] and not r.get("unit_choice"):  # the best of the sweep, not of a choice
      groups.setdefault((colkey(r), r["method"]), {}).setdefault(r["unit"], []).append(r)
  best = {}
  for key, by_unit in groups.items():
    scored = [(u, rs, _mean(r["accuracy"] for r in rs)) for u, rs in by_unit.items()]
    scored = [s for s in scored if s[2] is not None]
    if scored:
      scored.sort(key=lambda s: _natural_key(s[0]))
      u, rs, _ = max(scored, key=lambda s: s[2])  # max keeps the first of equal scores
      best[key] = (u, rs)
  return best


def best_unit_table(records: Sequence[Mapping]) -> str:
  """Table 4: for each (model, dataset) column, the best result of each unit-wise method
  (Layer FT, SCL FT) over its unit sweep, i.e. the unit with the highest transfer accuracy,
  next to linear probing and full fine-tuning. Sections: transfer accuracy, penultimate NC1
  and percentage of parameters (of that best unit), then the unit itself. Computed from the
  Tables 5-7 sweep records; "" unless some method was run with several units in a column."""
  records = [r for r in validate(records) if stage(r) not in ("pretrain", "probe")]
  cols = _Columns(records)
  if not records or not _split_methods(records, cols.key):
    return ""
  rank = _method_rank(records)
  best = _best_units(records, cols.key)
  methods = sorted({r["method"] for r in records}, key=rank.__getitem__)
  unit_methods = [m for m in methods if any(k[1] == m for k in best)]
  n = len(cols.keys)

  def group(k, m):
    if (k, m) in best:
      return best[(k, m)][1]
    if m in unit_methods:  # every unit of this column lacked an accuracy
      return []
    return [r for r in records if cols.key(r) == k and r["method"] == m]

  lines = [_md_row(["Method"] + [cols.label(k) for k in cols.keys]), "|:--" + "|--:" * n + "|"]
  for field in DEFAULT_SECTIONS:
    lines.append(_md_row([f"**{_SECTION_TITLES[field]}**"] + [""] * n))
    for m in methods:
      vals = []
      for k in cols.keys:
        g = group(k, m)
        vals.append(_FORMATTERS[field](_mean(r.get(field) for r in g)) if g else MISSING)
      lines.append(_md_row([method_name(m)] + vals))
  lines.append(_md_row([f"**{_BEST_UNIT_TITLE}**"] + [""] * n))
  for m in unit_methods:
    lines.append(_md_row([method_name(m)]
                         + [best[(k, m)][0] if (k, m) in best else MISSING for k in cols.keys]))
  return "\n".join(lines) + "\n"


def _percent_of(fraction: Any) -> float | None:
  v = _num(fraction)
  return None if v is None else 100.0 * v


def auto_unit_table(records: Sequence[Mapping]) -> str:
  """The units chosen by NC (`stages.autounit`): one row per choice with the chosen unit, its
  accuracy, the best unit of the job's sweep over the same candidates (when it ran), the
  regret (points), and the compute of the probes and of the whole choice as fractions of the
  sweep's; then each choice's probe NC1 per candidate (the chosen one in bold). "" when no
  record was chosen by NC."""
  records = validate(records)
  auto = [r for r in records if r.get("unit_choice")]
  if not auto:
    return ""
  cols = _Columns(records)
  # Over seeds, each choice is compared with its own seed's sweep (as its `regret` is).
  seed_of = (lambda x: x.get("seed", 0)) if is_seed_replicates(records) else (lambda x: None)
  best = {s: _best_units([x for x in records if seed_of(x) == s], cols.key)
          for s in {seed_of(x) for x in records}}
  lines = [_md_row(["Model / dataset", "Method", "Selector", "Chosen unit", "Accuracy",
                    "Best swept unit", "Its accuracy", "Regret (points)", "Probe cost",
                    "Choice cost"]),
           "|:--|:--|:--|:--|--:|:--|--:|--:|--:|--:|"]
  probes, scores = [], []
  for r in auto:
    label, method = cols.label(cols.key(r)), method_name(r["method"])
    if seed_of(r) is not None:
      label += f", seed {seed_of(r)}"
    rgn = r.get("unit_selector") == "rgn"
    b_unit, b_rs = best[seed_of(r)].get((cols.key(r), r["method"]), (None, []))
    covered = _num(r.get("regret")) is not None
    lines.append(_md_row([
        label, method, "RGN" if rgn else "NC", r["unit"], fmt_accuracy(r["accuracy"]),
        b_unit if covered else MISSING,
        fmt_accuracy(_mean(x["accuracy"] for x in b_rs)) if covered else MISSING,
        f"{r['regret']:.2f}" if covered else MISSING,
        fmt_percent(_percent_of(r.get("probe_cost_fraction"))),
        fmt_percent(_percent_of(r.get("cost_fraction")))]))
    key, show = ("rgn", lambda v: f"{v:.3f}") if rgn else ("nc1", fmt_nc1)
    nc1 = ", ".join((f"**{u} {show(c.get(key))}**" if u == r["unit"] else
                     f"{u} {show(c.get(key))}") for u, c in r["unit_choice"].items())
    (scores if rgn else probes).append(f"- {label}, {method}: {nc1}")
  out = "\n".join(lines) + "\n"
  if probes:
    out += "\nProbe NC1 (penultimate, downstream training data):\n\n" + "\n".join(probes) + "\n"
  if scores:
    out += ("\nAuto-RGN: mean relative gradient norm |g|/|theta| over each unit's tensors, "
            "first 5 batches, normalised by the largest:\n\n" + "\n".join(scores) + "\n")
  return out


def peft_table(records: Sequence[Mapping]) -> str:
  """The comparison of configs/peft.py (issue 19): per (model, dataset, train size) and
  method (LoRA per rank, Layer FT / SCL FT per unit, ``auto`` / ``auto-rgn`` for the chosen
  ones) the accuracy mean ± 95% CI over seeds (Student's t), the penultimate NC1 (mean),
  the percentage of parameters trained and the median train-step time (ms, measured on the
  machine as loaded). "" unless a PEFT method ran or the records hold several seeds."""
  records = [r for r in validate(records) if stage(r) == "transfer"]
  if not records or not (any(r["method"] in PEFT_METHODS for r in records)
                         or is_seed_replicates(records)):
    return ""
  lines = [_md_row(["Method", "Accuracy (mean ± 95% CI)", "Seeds", "NC1", "% parameters",
                    "Step (ms)"]), "|:--|--:|--:|--:|--:|--:|"]
  for col, rows in peft_groups(records):
    lines.append(_md_row([f"**{col}**"] + [""] * 5))
    for name, rs in rows:
      m, ci, n = mean_ci95(r["accuracy"] for r in rs)
      step = _mean(r.get("step_s") for r in rs)
      lines.append(_md_row([name, fmt_accuracy_ci(m, ci), str(n),
                            fmt_nc1(_mean(r.get("nc1") for r in rs)),
                            fmt_percent(_mean(r.get("percent_params") for r in rs)),
                            MISSING if step is None else f"{1e3 * step:.1f}"]))
  return "\n".join(lines) + "\n"


def unit_sweep_table(records: Sequence[Mapping], min_units: int = 1) -> str:
  """Tables 5-7 transposed, one Markdown table per (model, dataset): rows = units (natural
  order: block1, block3, ..., block10), columns = accuracy (percent), penultimate NC1 and
  percentage of parameters for each unit-wise method present (layer, scl, then others
  that have a unit). Linear probe / full fine-tuning results, if present, are given below
  each table as a reference line. Only (model, dataset) columns with at least
  ``min_units`` distinct units get a table. Returns "" when there is none. (``write_all``
  does not repeat it: `transfer_table` already has one row per unit.)
  """
  records = validate(records)
  cols = _Columns(records)
  rank = _method_rank(records)
  out = []
  for key in cols.keys:
    rs = [r for r in records if cols.key(r) == key]
    sweep = [r for r in rs if r["method"] not in ("linear", "full") and r["unit"]]
    if not sweep:
      continue
    methods = sorted({r["method"] for r in sweep}, key=rank.__getitem__)
    units = sorted({_unit(r) for r in sweep}, key=_natural_key)
    if len(units) < min_units:
      continue
    groups: dict[tuple, list] = {}
    for r in sweep:
      groups.setdefault((_unit(r), r["method"]), []).append(r)
    header = ["Unit"]
    for title in ("acc", "NC1", "% params"):
      header += [f"{method_name(m)} {title}" for m in methods]
    lines = [f"### {cols.label(key)}", "", _md_row(header),
             "|:--" + "|--:" * (len(header) - 1) + "|"]
    for u in units:
      row = [u]
      for field in ("accuracy", "nc1", "percent_params"):
        for m in methods:
          g = groups.get((u, m))
          row.append(_FORMATTERS[field](_mean(r[field] for r in g)) if g else MISSING)
      lines.append(_md_row(row))
    refs = []
    for m in ("linear", "full"):
      g = [r for r in rs if r["method"] == m]
      if g:
        refs.append(
            f"{method_name(m)} {fmt_accuracy(_mean(r['accuracy'] for r in g))} "
            f"(NC1 {fmt_nc1(_mean(r['nc1'] for r in g))}, "
            f"{fmt_percent(_mean(r['percent_params'] for r in g))} params)"
        )
    if refs:
      lines += ["", "Reference: " + "; ".join(refs) + "."]
    out.append("\n".join(lines))
  return "\n\n".join(out) + ("\n" if out else "")


def variant_table(records: Sequence[Mapping]) -> str:
  """A variant sweep over several downstream datasets (Fig. 5 / 13): one row per pre-training
  variant (``pretrain`` tag; "ResNet50 [aug3]" when several models), columns: the pre-trained
  model's NC1 on its source training data and its source test accuracy, then for each
  downstream dataset (and method, when several) the transfer accuracy and the penultimate NC1
  on that dataset's training data. Seeds are averaged."""
  records = validate(records)
  if not records:
    return ""
  keys, label = _variant_keys(records)
  rank = _method_rank(records)
  methods = sorted({r["method"] for r in records}, key=rank.__getitem__)
  datasets = _first_seen(r["dataset"] for r in records)
  combos = [(d, m) for d in datasets for m in methods
            if any(r["dataset"] == d and r["method"] == m for r in records)]
  header = ["Pre-training", "Source NC1 (source train)", "Source acc. (%)"]
  for d, m in combos:
    what = dataset_name(d) + (f" {method_name(m)}" if len(methods) > 1 else "")
    header += [f"{what} acc. (%)", f"{what} NC1 (train)"]
  rows = []
  for key in keys:
    rs = [r for r in records if (r["model"], _tag(r)) == key]
    row = [label(key), fmt_nc1(_mean(r.get("source_nc1") for r in rs)),
           fmt_accuracy(_mean(r.get("source_accuracy") for r in rs))]
    for d, m in combos:
      g = [r for r in rs if r["dataset"] == d and r["method"] == m]
      row += [fmt_accuracy(_mean(r["accuracy"] for r in g)), fmt_nc1(_mean(r["nc1"] for r in g))]
    rows.append(row)
  return _md_table(header, rows)


def correlation_table(records: Sequence[Mapping]) -> str:
  """How NC1 predicts transfer accuracy across pre-training variants: Pearson's r of the
  transfer accuracy with log10 NC1 measured on the source training data (Table 1, Figs. 3,
  4: the paper finds r > 0 up to a point), on the reference dataset (Fig. 5, only with
  several downstream datasets) and on the downstream dataset itself (Fig. 13). One row per
  (model, downstream dataset, method); "–" with fewer than 3 variants."""
  records = validate(records)
  if not records:
    return ""
  ref = reference_dataset(records)
  several = len({r["dataset"] for r in records}) > 1
  rank = _method_rank(records)
  header = ["Downstream", "Variants", "r: source NC1 (source train)"]
  if several:
    header.append(f"r: NC1 on {dataset_name(ref)} (train)")
  header.append("r: NC1 on the downstream data (train)")
  rows = []
  combos = _first_seen((r["model"], r["dataset"], r["method"]) for r in records)
  combos.sort(key=lambda c: rank[c[2]])  # stable: datasets keep their order within a method
  multi_model = len({c[0] for c in combos}) > 1
  for model, dataset, method in combos:
    pts = _variant_points(records, model, dataset, method)
    accs = [_mean(r["accuracy"] for r in g) for _, g in pts]
    src, n = _log_r([(_mean(r.get("source_nc1") for r in g), a) for (_, g), a in zip(pts, accs)])
    own, _ = _log_r([(_mean(r["nc1"] for r in g), a) for (_, g), a in zip(pts, accs)])
    what = dataset_name(dataset) + f" ({method_name(method)})"
    if multi_model:
      what = f"{model_name(model)} / {what}"
    row = [what, str(len(pts)), fmt_r(src)]
    if several:
      ref_nc1 = dict((t, _mean(r["nc1"] for r in g))
                     for t, g in _variant_points(records, model, ref, method))
      row.append(fmt_r(_log_r([(ref_nc1.get(t), a) for (t, _), a in zip(pts, accs)])[0]))
    row.append(fmt_r(own))
    rows.append(row)
  return _md_table(header, rows)


def layerwise_nc1_table(records: Sequence[Mapping]) -> str:
  """Fig. 2 as a table: the NC1 of each layer's feature on the source training data, one
  row per layer (network order; "1", "2", ... counted from the input when the columns'
  models name their layers differently), one column per (model, source dataset, variant or
  loss). Below: the geometric-mean NC1 ratio of consecutive layers (Fig. 2's "roughly equal
  multiplicative factor" per layer) and the model's test accuracy on the source data."""
  records = validate(records)
  groups = _pretrain_groups(records)
  if not groups:
    return ""
  values = [_mean_layerwise(g[-1], "layerwise_nc1") for g in groups]
  unit_lists = [list(v) for v in values]
  by_name = all(u == unit_lists[0] for u in unit_lists)
  depth = max(len(u) for u in unit_lists)
  rows = []
  for i in range(depth):
    name = unit_lists[0][i] if by_name else str(i + 1)
    rows.append([name] + [fmt_sig(list(v.values())[i]) if i < len(v) else MISSING
                          for v in values])
  ratio = []
  for v in values:
    pos = [x for x in v.values() if _positive(x) is not None]
    ratio.append(fmt_sig((pos[-1] / pos[0]) ** (1 / (len(pos) - 1))) if len(pos) > 1
                 else MISSING)
  rows.append(["NC1 ratio per layer (geometric mean)"] + ratio)
  rows.append(["Source test accuracy (%)"]
              + [fmt_accuracy(_mean(r["accuracy"] for r in g[-1])) for g in groups])
  header = (["Layer" if by_name else "Layer (from the input)"]
            + [_pretrain_label(*g[:3]) for g in groups])
  return _md_table(header, rows)


def probe_table(records: Sequence[Mapping]) -> str:
  """Fig. 9 as tables, one per (model, dataset[, variant]): rows = units in network order,
  columns = the test accuracy of a linear probe on the unit's pooled feature and the
  feature's NC1 on the downstream training data; a "penultimate" row when the classifier's
  input is not the last unit's feature (e.g. ViT's final LayerNorm); below, Pearson's r of
  the accuracy with log10 NC1 over the units (Fig. 9 right: near-linear, negative)."""
  records = validate(records)
  cols = _Columns(records)
  out = []
  for key in cols.keys:
    rs = [r for r in records if cols.key(r) == key]
    acc = _mean_layerwise(rs, "layerwise_accuracy")
    nc1 = _mean_layerwise(rs, "layerwise_nc1")
    units = _first_seen(list(acc) + list(nc1))
    rows = [[u, fmt_accuracy(acc.get(u)), fmt_sig(nc1.get(u))] for u in units]
    pen_acc, pen_nc1 = _mean(r["accuracy"] for r in rs), _mean(r["nc1"] for r in rs)
    last = nc1.get(units[-1]) if units else None
    if pen_nc1 is not None and (last is None or abs(pen_nc1 - last) > 1e-6 * abs(last)):
      rows.append(["penultimate", fmt_accuracy(pen_acc), fmt_sig(pen_nc1)])
    r_, n = _log_r([(nc1.get(u), acc.get(u)) for u in units])
    d = dataset_name(key[1])
    out.append(f"### {cols.label(key)}\n\n"
               + _md_table(["Layer", "Probe test accuracy (%)", f"NC1 ({d} training data)"], rows)
               + f"\nPearson r of probe accuracy with log10 NC1 over {n} layers: {fmt_r(r_)}.\n")
  return "\n".join(out)


FEWSHOT_ACCURACY = "Few-shot accuracy (%, mean ± 95% CI over episodes)"

FEWSHOT_NC1 = "NC1 (meta-test): penultimate NC1 on the meta-test classes"

FEWSHOT_SOURCE_NC1 = "NC1 (meta-train): penultimate NC1 on the meta-train classes"


def fewshot_table(records: Sequence[Mapping]) -> str:
  """Table 2 layout. Columns: the models in first-seen order ("ConvNet4", "ResNet12",
  "SEResNet12"; "ResNet12 [tag]" when a model comes in several ``pretrain`` variants).
  Sections: few-shot accuracy, a row per (dataset, "<ways>-way <shots>-shot") in dataset
  first-seen order and ascending (ways, shots), cells "accuracy ± ci95" (percent, 2
  decimals); NC1 of the frozen penultimate embeddings on the meta-test classes, a row per
  dataset (3 significant digits; it does not depend on the shots, so records of one model
  and dataset share it); when some record has a finite ``source_nc1``, the NC1 on the
  meta-train classes, a row per dataset that has one. Records sharing a cell are averaged
  (accuracy and ci95 alike); missing cells are "–"."""
  records = validate(records)
  if not records:
    return ""
  keys, key, label = _fewshot_columns(records)
  datasets = _first_seen(r["dataset"] for r in records)

  def mean(field, dataset, k, setting=None):
    return _mean(r.get(field) for r in records if r["dataset"] == dataset and key(r) == k
                 and (setting is None or _setting(r) == setting))

  n = len(keys)
  lines = [_md_row(["Dataset"] + [label(k) for k in keys]), "|:--" + "|--:" * n + "|",
           _md_row([f"**{FEWSHOT_ACCURACY}**"] + [""] * n)]
  for d in datasets:
    for ways, shots in sorted({_setting(r) for r in records if r["dataset"] == d}):
      cells = [fmt_accuracy_ci(mean("accuracy", d, k, (ways, shots)),
                               mean("ci95", d, k, (ways, shots))) for k in keys]
      lines.append(_md_row([f"{dataset_name(d)} {ways}-way {shots}-shot"] + cells))
  lines.append(_md_row([f"**{FEWSHOT_NC1}**"] + [""] * n))
  for d in datasets:
    lines.append(_md_row([dataset_name(d)] + [fmt_sig(mean("nc1", d, k)) for k in keys]))
  src = [d for d in datasets
         if any(_num(r.get("source_nc1")) is not None for r in records if r["dataset"] == d)]
  if src:
    lines.append(_md_row([f"**{FEWSHOT_SOURCE_NC1}**"] + [""] * n))
    for d in src:
      lines.append(_md_row([dataset_name(d)]
                           + [fmt_sig(mean("source_nc1", d, k)) for k in keys]))
  return "\n".join(lines) + "\n"


def print_table(records: Sequence[Mapping], file=None) -> str:
  """Prints ``markdown_table(records)`` (to ``file`` or stdout) and returns it."""
  text = markdown_table(records)
  print(text, end="", file=file)
  return text


def rank_table(records: Sequence[Mapping]) -> str:
  """Job ``rank`` (`stages.score`): per (dataset, fine-tuning method) one table, a row per
  candidate with its measured accuracy and every estimator's score (higher = predicted to
  transfer better), then each estimator's Kendall tau and weighted tau against the
  accuracy, and its mean seconds beside one fine-tuning's."""
  rs = [r for r in validate(records) if stage(r) == "rank"]
  ests = _estimators(rs)
  out = []
  for d, (method, unit), g in _rank_groups(rs):
    truth = method_name(method) + (f" ({unit})" if unit else "")
    lines = [f"### {dataset_name(d)}: {truth} accuracy as the ground truth", "",
             _md_row(["Candidate", "Accuracy"] + [ESTIMATOR_NAMES.get(e, e) for e in ests]),
             "|:--|--:" + "|--:" * len(ests) + "|"]
    for r in sorted(g, key=lambda r: -(_num(r["accuracy"]) or -math.inf)):
      lines.append(_md_row([r["candidate"], fmt_accuracy(r["accuracy"])]
                           + [fmt_sig(r.get(f"score_{e}")) for e in ests]))
    for title, field in (("Kendall tau", "kendall_tau"), ("weighted tau", "weighted_tau")):
      lines.append(_md_row([f"**{title}**", ""] + [fmt_r(g[0].get(f"{field}_{e}"))
                                                   for e in ests]))
    tune = _mean(r.get("finetune_wall_s") for r in g)
    lines.append(_md_row(["**seconds** (one fine-tuning: "
                          f"{'–' if tune is None else f'{tune:.1f}'})", ""]
                         + [fmt_sig(_mean(r.get(f"seconds_{e}") for r in g)) for e in ests]))
    out.append("\n".join(lines))
  return "\n\n".join(out) + ("\n" if out else "")


def report_markdown(records: Sequence[Mapping]) -> str:
  """results.md: for each kind of record (`split_kinds`) a "## <what it reproduces>" section
  with its main table (`markdown_table`); transfer records swept over units add Table 4
  (`best_unit_table`), variant sweeps the correlation of accuracy with NC1
  (`correlation_table`)."""
  out = []
  for kind, rs in split_kinds(records).items():
    out.append(f"## {_KIND_TITLES[kind]}\n\n{_main_table(kind, rs)}")
    if kind == "transfer":
      best = best_unit_table(rs)
      if best:
        out.append("## Best unit per method (Table 4)\n\nLayer FT / SCL FT: the unit of "
                   "each sweep with the highest transfer accuracy (ties: the unit nearer the "
                   "input).\n\n" + best)
      auto = auto_unit_table(rs)
      if auto:
        out.append("## Units chosen by NC\n\nLayer FT / SCL FT with `unit=auto`: a short "
                   "probe per candidate unit, then the unit with the lowest penultimate NC1 "
                   "on the training data is fine-tuned fully (selector NC), or the unit with "
                   "the largest relative gradient norm (selector RGN, Auto-RGN). Costs are "
                   "fractions of the compute (XLA flops) of fine-tuning every candidate "
                   "fully.\n\n" + auto)
    peft = peft_table(rs) if kind == "transfer" else ""
    if peft:
      out.append("## Fine-tuning methods compared (configs/peft.py)\n\nAccuracy over seeds "
                 "(Student's t 95% interval), penultimate NC1, the share of parameters trained "
                 "(adapters and prompts counted as trained, the denominator the backbone and "
                 "head) and the median train-step time (measured under the machine's load "
                 "at the time).\n\n" + peft)
    if kind == "variants":
      out.append("## Does NC1 predict transfer accuracy?\n\nPearson's r of the transfer "
                 "accuracy with log10 NC1 over the pre-training variants (r > 0: more NC1, "
                 "more accuracy).\n\n" + correlation_table(rs))
  return "\n".join(out)
