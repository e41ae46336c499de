"""Every plot of the report (matplotlib's Agg canvas, imported inside the functions; pyplot's
global state untouched).
"""
from __future__ import annotations

import math
import os
import re
import textwrap
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ncjax.report.format import (
    _Columns, dataset_name, ESTIMATOR_NAMES, _estimators, _fewshot_columns, _first_seen, fmt_r,
    _layer_units, _log_r, _mean, _mean_layerwise, method_name, _method_rank, MISSING,
    model_name, _natural_key, _num, _ordered_rows, pearson_r, _positive, _pretrain_groups,
    _rank_groups, reference_dataset, _row_key, _row_label, _setting, split_kinds,
    _split_methods, _tag, _variant_points, PEFT_METHODS, peft_groups,
)


def _makedirs_for(path: str) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)


def _save(fig, path: str) -> str:
  _makedirs_for(path)
  fig.savefig(path, dpi=110, format="png")
  return path


_METHOD_COLORS = {"linear": "C0", "layer": "C1", "scl": "C2", "full": "C3"}

_LABEL_SIZE = 8.5


def _method_color(method: str, rank: Mapping[str, int]) -> str:
  return _METHOD_COLORS.get(method, f"C{4 + rank[method] % 6}")


# A panel is a callable that draws on one Axes; a figure is rows of panels. Panels of a row
# may share their y axis (the same quantity on the same data, e.g. one dataset's Fig. 14 row),
# and a whole figure its x axis (e.g. the source NC1, the same for every downstream panel).
Panel = Callable[[Any], None]


def _pack(panels: Sequence[Panel], per_row: int = 3) -> list[list[Panel]]:
  return [list(panels[i:i + per_row]) for i in range(0, len(panels), per_row)]


def _draw(path: str, rows: Sequence[tuple[Sequence[Panel], bool]], title: str,
          sharex: bool = False, w: float = 4.4, h: float = 3.4) -> str:
  """Draws ``rows`` = [(panels, share y within the row)] on a pyplot-free Agg figure with
  ``title`` on top and saves it to ``path``."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  ncols = max(len(p) for p, _ in rows)
  fig = Figure(figsize=(w * ncols, h * len(rows) + 0.4), layout="constrained")
  FigureCanvasAgg(fig)
  grid = fig.subplots(len(rows), ncols, squeeze=False)
  for i, (panels, share) in enumerate(rows):
    for j in range(ncols):
      ax = grid[i][j]
      if j >= len(panels):
        ax.set_visible(False)
        continue
      if sharex and (i, j) != (0, 0):
        ax.sharex(grid[0][0])
      if share and j > 0:
        ax.sharey(grid[i][0])
      panels[j](ax)
      if share and j > 0:  # one y label and tick labels per shared row
        ax.set_ylabel("")
        ax.tick_params(labelleft=False)
  # ~11 characters of 10-pt text per inch: wrap rather than clip a narrow figure's title.
  title = re.sub(r"\b(Figs?\.|Tables?) (?=\d)", "\\1\u00a0", title)  # never wrap "Fig. | 2"
  fig.suptitle(textwrap.fill(title, width=max(40, int(11 * w * ncols)), break_on_hyphens=False),
               fontsize=10)
  return _save(fig, path)


def _log_ticks(lo: float, hi: float) -> list[float]:
  """Readable ticks for a log axis over [lo, hi]: decades when the range spans several, else
  1-2-5, else finer steps, so that there are at least 3 labelled ticks and at most ~7."""
  from matplotlib import ticker
  k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
  ticks: list[float] = []
  for subs in ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
    ticks = [float(f"{m}e{k}") for k in range(k0, k1 + 1) for m in subs]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) >= 3:
      break
  if len(ticks) < 3:  # under a factor ~1.5: evenly spaced values read best
    ticks = [float(t) for t in ticker.MaxNLocator(4).tick_values(lo, hi) if lo <= t <= hi and t > 0]
  if len(ticks) > 7:
    ticks = ticks[::-(-len(ticks) // 6)]
  return ticks


def _tick_label(t: float) -> str:
  return f"{t:.0f}" if t >= 1000 else f"{t:.3g}"


def _log_axis(ax, which: str, values: Iterable[Any], room: float = 0.0) -> None:
  """Log scale on ``which`` ('x' | 'y') with limits around ``values`` and plain-number tick
  labels ("0.05", "0.1", "2"); matplotlib's defaults label a range within one decade with
  unreadable minor ticks ("6x10^-1") or none at all. ``room``: extra space after the
  largest value, as a share of the range (for the labels of annotated points)."""
  from matplotlib import ticker
  vals = [v for v in (_positive(v) for v in values) if v is not None]
  (ax.set_xscale if which == "x" else ax.set_yscale)("log")
  if not vals:
    return
  lo, hi = min(vals), max(vals)
  if hi / lo < 1.6:  # a near-constant quantity: show it as such, not as a steep range
    c = math.sqrt(lo * hi)
    lo, hi = c / 1.26, c * 1.26
  span = hi / lo
  lo, hi = lo / span ** 0.08, hi * span ** (0.08 + room)
  (ax.set_xlim if which == "x" else ax.set_ylim)(lo, hi)
  ticks = _log_ticks(lo, hi)
  axis = ax.xaxis if which == "x" else ax.yaxis
  axis.set_major_locator(ticker.FixedLocator(ticks))
  axis.set_major_formatter(ticker.FixedFormatter([_tick_label(t) for t in ticks]))
  axis.set_minor_formatter(ticker.NullFormatter())


def _layer_xaxis(ax, units: Sequence[str]) -> None:
  """x = unit position 1..L. Units named <prefix><n> with one prefix ("block1".."block8")
  are labelled by their number under "<prefix> index"; others by their names."""
  ax.set_xticks(range(1, len(units) + 1))
  m = [re.fullmatch(r"([A-Za-z_]+?)(\d+)", u) for u in units]
  if units and all(m) and len({x.group(1) for x in m}) == 1:
    labels = [x.group(2) for x in m]
    if len(units) > 16:
      labels = [l if i % 2 == 0 else "" for i, l in enumerate(labels)]
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel(f"{m[0].group(1)} index (from the input)", fontsize=_LABEL_SIZE)
  else:
    ax.set_xticklabels(units, rotation=60, fontsize=7)
    ax.set_xlabel("unit", fontsize=_LABEL_SIZE)
  ax.set_xlim(0.5, len(units) + 0.5)


def _unit_number(unit: str) -> str:
  """"block7" -> "7" (other names as they are)."""
  return re.sub(r"^[A-Za-z_]+(?=\d+$)", "", unit)


def _unit_kind(units: Sequence[str]) -> str:
  """"block" for block1, block7; "unit" when the names differ in kind."""
  kinds = {re.sub(r"\d+$", "", u) for u in units}
  return kinds.pop() if len(kinds) == 1 and "" not in kinds else "unit"


def _fit_line(ax, xs, ys) -> None:
  """Least-squares line of y on log10(x) (straight on the log-x axis), r in the legend."""
  lx = np.log10(np.asarray(xs, dtype=np.float64))
  ys = np.asarray(ys, dtype=np.float64)
  if lx.size < 3 or lx.std() == 0:
    return
  slope, icpt = np.polyfit(lx, ys, 1)
  grid = np.linspace(lx.min(), lx.max(), 50)
  ax.plot(10**grid, slope * grid + icpt, color="0.35", ls="--", lw=1, zorder=1,
          label=f"fit on log10 NC1, r = {pearson_r(lx, ys):+.2f}")


def _annotate(ax, xs, ys, labels, color="0.15") -> None:
  """Labels points; points at the same place (e.g. two augmentation levels that do nothing
  to grayscale digits) get one joined label ("aug4, aug5"), not two overprinted ones."""
  spots: dict[tuple, list] = OrderedDict()
  for x, y, t in zip(xs, ys, labels):
    spots.setdefault((float(f"{x:.6g}"), float(f"{y:.6g}")), []).append(str(t))
  for (x, y), ts in spots.items():
    ax.annotate(", ".join(ts), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points",
                color=color)


def _family(tag: str) -> str:
  """A variant's family: its tag without the trailing level ("aug3" -> "aug", "adv8" ->
  "adv", "ce-proj2" -> "ce-proj"); a tag without a number is its own family."""
  return re.sub(r"[-_+]?[\d.]+$", "", tag) or tag


def _variant_scatter(ax, pts: Sequence[tuple[str, float, float]], fit: bool) -> None:
  """Pre-training variants as points (x, y) labelled by their tag, one colour per family;
  members of a family (augmentation levels, PGD radii, projection depths) are joined in
  tag order so that the family's trend reads as in Figs. 3, 4. ``fit``: a least-squares
  line on log10 x over all points."""
  families = _first_seen(_family(t) for t, _, _ in pts)
  sized = {f: sum(_family(t) == f for t, _, _ in pts) for f in families}
  for i, f in enumerate(families):
    sel = sorted((p for p in pts if _family(p[0]) == f), key=lambda p: _natural_key(p[0]))
    xs, ys = [p[1] for p in sel], [p[2] for p in sel]
    ax.plot(xs, ys, color=f"C{i % 10}", marker="o", ms=5, lw=1 if sized[f] > 1 else 0,
            label=f if sized[f] > 1 else None, zorder=3)
    _annotate(ax, xs, ys, [p[0] for p in sel], color=f"C{i % 10}")
  if fit:
    _fit_line(ax, [p[1] for p in pts], [p[2] for p in pts])
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def _r_note(pts) -> str:
  """" (r = +0.80)": Pearson's r of y with log10 x, for a title; "" below 3 points."""
  r, n = _log_r([(x, y) for _, x, y in pts])
  return f" (r = {r:+.2f} with log10 NC1)" if n >= 3 and not math.isnan(r) else ""


def _layer_line(ax, units: Sequence[str], values: Mapping[str, Any], **kw) -> list[float]:
  pos = {u: i + 1 for i, u in enumerate(units)}
  pts = [(pos[u], _positive(v)) for u, v in values.items() if u in pos]
  pts = [(x, y) for x, y in pts if y is not None]
  ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, **kw)
  return [p[1] for p in pts]


def _pretrain_layer_panels(records: Sequence[Mapping]) -> list[Panel]:
  """Fig. 2: one panel per (model, source dataset), one line per variant / loss."""
  by_md: dict[tuple, list] = OrderedDict()
  for r in records:
    by_md.setdefault((r["model"], r["dataset"]), []).append(r)
  panels = []
  for (model, dataset), rs in by_md.items():
    def panel(ax, model=model, dataset=dataset, rs=rs):
      units = _layer_units(rs)
      vals = []
      for i, (_, _, what, g) in enumerate(_pretrain_groups(rs)):
        vals += _layer_line(ax, units, _mean_layerwise(g, "layerwise_nc1"), color=f"C{i % 10}",
                            label=what or "trained")
      _layer_xaxis(ax, units)
      _log_axis(ax, "y", vals)
      ax.set_ylabel("NC1 on the source training data", fontsize=_LABEL_SIZE)
      ax.set_title(f"{model_name(model)} trained on {dataset_name(dataset)}", fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  return panels


def _transfer_layer_rows(records: Sequence[Mapping]) -> list[tuple[list[Panel], bool]]:
  """Figs. 10 / 14: per (model, dataset), one panel per fine-tuned unit of a unit sweep with
  the methods that tuned that unit and the ones without a unit (linear probe, full FT) as
  reference; without a sweep one panel with every method. The tuned unit is marked."""
  cols = _Columns(records)
  split = _split_methods(records, cols.key)
  rank = _method_rank(records)
  rows, single = [], []
  for key in cols.keys:
    rs = [r for r in records if cols.key(r) == key]
    swept = {r["method"] for r in rs if r["method"] in split and r["unit"]}
    units = _layer_units(rs)
    tuned_all = sorted({r["unit"] for r in rs if r["unit"]}, key=_natural_key)
    panels_units = ([u for u in tuned_all if any(r["unit"] == u and r["method"] in swept
                                                 for r in rs)] if swept else [None])
    panels = []
    for i, tuned in enumerate(panels_units):
      sel = [r for r in rs if tuned is None or r["method"] not in swept or r["unit"] == tuned]

      # The panels of a sweep row draw the same methods: one legend per row is enough.
      def panel(ax, sel=sel, tuned=tuned, key=key, units=units, legend=i == 0):
        lines: dict[tuple, list] = OrderedDict()
        for r in sorted(sel, key=lambda r: (rank[r["method"]], _natural_key(r["unit"]))):
          lines.setdefault(_row_key(r, split), []).append(r)
        vals = []
        for (method, unit), g in lines.items():
          vals += _layer_line(ax, units, _mean_layerwise(g, "layerwise_nc1"),
                              color=_method_color(method, rank),
                              label=_row_label((method, unit if tuned is None else None)))
        marks = [tuned] if tuned else sorted({r["unit"] for r in sel if r["unit"]},
                                             key=_natural_key)
        for u in marks:
          if u in units:
            ax.axvline(units.index(u) + 1, color="0.6", ls=":", lw=1)
        _layer_xaxis(ax, units)
        _log_axis(ax, "y", vals)
        ax.set_ylabel("NC1 on the downstream training data", fontsize=_LABEL_SIZE)
        what = f": {tuned} fine-tuned" if tuned else (
            f" (dotted: {', '.join(m for m in marks if m in units)} fine-tuned)" if marks else "")
        ax.set_title(cols.label(key) + what, fontsize=9)
        if legend:
          ax.legend(fontsize=7)
      panels.append(panel)
    if swept:
      rows.append((panels, True))
    else:
      single += panels
  return rows + [(row, False) for row in _pack(single)]


def _layer_points(r: Mapping) -> bool:
  return sum(_positive(v) is not None for v in (r["layerwise_nc1"] or {}).values()) >= 2


def plot_layerwise_nc1(records: Sequence[Mapping], path: str) -> str | None:
  """NC1 of each layer's feature against the layer (log y). Pre-training records: Fig. 2,
  NC1 on the source training data, one panel per (model, source dataset), a line per
  variant or loss. Transfer records: Figs. 10 / 14, NC1 on the downstream training data; a
  unit sweep gives one row per (model, dataset) and one panel per fine-tuned unit (linear
  probe, Layer FT and SCL FT of that unit, full FT), rows sharing their y axis. Variant
  sweeps and layer probes are left to their own plots. Returns ``path``, or None when no
  record has NC1 for two layers or more."""
  kinds = split_kinds(records)
  rows: list[tuple[list[Panel], bool]] = []
  pre = [r for r in kinds.get("pretrain", []) if _layer_points(r)]
  if pre:
    rows += [(row, False) for row in _pack(_pretrain_layer_panels(pre))]
  tr = [r for r in kinds.get("transfer", []) if _layer_points(r)]
  if tr:
    rows += _transfer_layer_rows(tr)
  if not rows:
    return None
  title = ("Layer-wise NC1 of the pre-trained models (Fig. 2)" if not tr else
           "Layer-wise NC1 per method (Figs. 10, 14)" if not pre else
           "Layer-wise NC1: pre-training (Fig. 2) and fine-tuning (Figs. 10, 14)")
  return _draw(path, rows, title)


def _probe_panels(r: Mapping, label: str) -> list[Panel] | None:
  """Fig. 9: (left) probe accuracy and NC1 against the layer, (right) accuracy against NC1."""
  acc, nc1 = r.get("layerwise_accuracy") or {}, r["layerwise_nc1"] or {}
  units = [u for u in nc1 if u in acc and _positive(nc1[u]) is not None
           and _num(acc[u]) is not None]
  if len(units) < 2:
    return None
  d = dataset_name(r["dataset"])
  xs, ys = [float(nc1[u]) for u in units], [float(acc[u]) for u in units]

  def left(ax):
    ax.plot(range(1, len(units) + 1), ys, color="C0", marker="o", ms=4)
    ax.set_ylabel("linear-probe test accuracy (%)", fontsize=_LABEL_SIZE, color="C0")
    _layer_xaxis(ax, units)
    twin = ax.twinx()
    twin.plot(range(1, len(units) + 1), xs, color="C3", marker="s", ms=4, ls="--")
    _log_axis(twin, "y", xs)
    twin.set_ylabel(f"NC1 on the {d} training data", fontsize=_LABEL_SIZE, color="C3")
    # Coloured axes and the title say which line is which: a legend would sit on a line.
    ax.set_title(f"{label}: probe accuracy (blue), NC1 (red)", fontsize=9)

  def right(ax):
    names = [_unit_number(u) for u in units]
    ax.scatter(xs, ys, color="C0", s=22, zorder=3)
    _annotate(ax, xs, ys, names)
    _fit_line(ax, xs, ys)
    _log_axis(ax, "x", xs, room=0.1)
    ax.margins(y=0.1)
    ax.set_xlabel(f"NC1 of the layer's feature on the {d} training data", fontsize=_LABEL_SIZE)
    ax.set_ylabel("linear-probe test accuracy (%)", fontsize=_LABEL_SIZE)
    ax.set_title(f"{label}: accuracy vs NC1 (points: layers)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return [left, right]


def _transfer_nc1_panels(records: Sequence[Mapping]) -> list[Panel]:
  """Per (model, dataset) column with two results or more: transfer accuracy against the
  penultimate NC1 on that dataset's training data, a point per method (and unit)."""
  cols = _Columns(records)
  split = _split_methods(records, cols.key)
  rank = _method_rank(records)
  panels = []
  for key in cols.keys:
    groups: dict[tuple, list] = OrderedDict()
    for r in records:
      if cols.key(r) == key:
        groups.setdefault(_row_key(r, split), []).append(r)
    pts = [(row, _mean(r["nc1"] for r in g), _mean(r["accuracy"] for r in g))
           for row, g in groups.items()]
    pts = [(row, x, y) for row, x, y in pts if _positive(x) is not None and y is not None]
    if len(pts) < 2:
      continue
    pts.sort(key=lambda p: (rank[p[0][0]], _natural_key(p[0][1])))

    def panel(ax, pts=pts, key=key):
      for m in _first_seen(row[0] for row, _, _ in pts):
        sel = [(row, x, y) for row, x, y in pts if row[0] == m]
        ax.scatter([p[1] for p in sel], [p[2] for p in sel], color=_method_color(m, rank),
                   s=26, zorder=3, label=method_name(m))
        if m in split:  # the unit's number: "block7" labels would cover each other
          _annotate(ax, [p[1] for p in sel], [p[2] for p in sel],
                    [_unit_number(p[0][1]) for p in sel], color=_method_color(m, rank))
      _fit_line(ax, [p[1] for p in pts], [p[2] for p in pts])
      _log_axis(ax, "x", [p[1] for p in pts], room=0.1)
      ax.margins(y=0.1)
      ax.set_xlabel(f"penultimate NC1 on the {dataset_name(key[1])} training data",
                    fontsize=_LABEL_SIZE)
      ax.set_ylabel("transfer test accuracy (%)", fontsize=_LABEL_SIZE)
      swept = [row[1] for row, _, _ in pts if row[0] in split]
      ax.set_title(cols.label(key) + (f" (numbers: fine-tuned {_unit_kind(swept)})"
                                       if swept else ""), fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  return panels


def _variant_panels(records: Sequence[Mapping], x_of: Callable[[str, str, str, list], Any],
                    xlabel: Callable[[str], str], fit: bool) -> list[tuple[str, list[Panel]]]:
  """Variant-sweep scatter panels grouped by downstream dataset: [(dataset, panels)], one
  panel per (model, method) with >= 2 variants that have x and accuracy; ``x_of(model,
  dataset, method, tag) -> x``."""
  several_models = len({r["model"] for r in records}) > 1
  rank = _method_rank(records)
  out = []
  for dataset in _first_seen(r["dataset"] for r in records):
    panels = []
    combos = _first_seen((r["model"], r["method"]) for r in records if r["dataset"] == dataset)
    for model, method in sorted(combos, key=lambda c: rank[c[1]]):
      pts = []
      for tag, g in _variant_points(records, model, dataset, method):
        x, y = _positive(x_of(model, dataset, method, tag)), _mean(r["accuracy"] for r in g)
        if x is not None and y is not None:
          pts.append((tag or MISSING, x, y))
      if len(pts) < 2:
        continue

      def panel(ax, pts=pts, model=model, method=method, dataset=dataset):
        _variant_scatter(ax, pts, fit)
        ax.margins(y=0.12)  # room for the point labels
        ax.set_xlabel(xlabel(dataset), fontsize=_LABEL_SIZE)
        ax.set_ylabel(f"{dataset_name(dataset)} test accuracy (%)", fontsize=_LABEL_SIZE)
        ax.set_title((f"{model_name(model)}: " if several_models else "")
                     + f"{method_name(method)} on {dataset_name(dataset)}"
                     + ("" if fit else _r_note(pts)), fontsize=9)
      panels.append((panel, [p[1] for p in pts]))
    if panels:
      out.append((dataset, panels))
  return out


def _variant_rows(groups, share_x: bool) -> list[tuple[list[Panel], bool]]:
  """Lays out `_variant_panels` groups: a row per downstream dataset sharing its y axis when
  a dataset has several panels (methods, models), else all panels in rows of 4 (datasets
  differ in accuracy range: Aircraft ~40%, CIFAR-10 ~85%, so no shared y). ``share_x``:
  every panel gets the same x range (the x quantity is the same for all panels)."""
  xs = [x for _, ps in groups for _, px in ps for x in px]

  def wrap(p, px):
    def panel(ax):
      p(ax)
      _log_axis(ax, "x", xs if share_x else px, room=0.2)
    return panel
  if any(len(ps) > 1 for _, ps in groups):
    return [(row, True) for _, ps in groups for row in _pack([wrap(*q) for q in ps], 4)]
  return [(row, False) for row in _pack([wrap(*q) for _, ps in groups for q in ps], 4)]


def _nc1_by_variant(records: Sequence[Mapping]) -> dict[tuple, float | None]:
  """(model, dataset, method, tag) -> mean penultimate NC1 on that dataset."""
  groups: dict[tuple, list] = {}
  for r in records:
    groups.setdefault((r["model"], r["dataset"], r["method"], _tag(r)), []).append(r["nc1"])
  return {k: _mean(v) for k, v in groups.items()}


def plot_nc1_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Accuracy against NC1 measured on the same downstream training data (log x).

  * Layer probes (Fig. 9): a row per (model, dataset): left, probe accuracy and NC1
    against the layer; right, accuracy against NC1 over the layers with a least-squares
    line (accuracy on log10 NC1) and Pearson's r.
  * Transfer records (Table 3): a panel per (model, dataset) with >= 2 results, a point per
    method (and unit of a sweep), with the fit when there are >= 3.
  * Variant sweeps (Fig. 13): a panel per downstream dataset (and method), a point per
    pre-training variant labelled by its tag, coloured by family, with the fit.
  Returns None when nothing has NC1 and accuracy for two points (e.g. ``collapse=False``)."""
  kinds = split_kinds(records)
  rows: list[tuple[list[Panel], bool]] = []
  titles = []
  probes = kinds.get("probe", [])
  pcols = _Columns(probes) if probes else None
  for r in probes:
    p = _probe_panels(r, pcols.label(pcols.key(r)))
    if p:
      rows.append((p, False))
  if len(rows):
    titles.append("Layer-wise transfer: probe accuracy and NC1 of each layer (Fig. 9)")
  if kinds.get("transfer"):
    panels = _transfer_nc1_panels(kinds["transfer"])
    if panels:
      rows += [(row, False) for row in _pack(panels)]
      titles.append("Transfer accuracy vs penultimate NC1 per fine-tuning method")
  if kinds.get("variants"):
    rs = kinds["variants"]
    nc1 = _nc1_by_variant(rs)
    groups = _variant_panels(
        rs, lambda m, d, meth, t: nc1.get((m, d, meth, t)),
        lambda d: f"penultimate NC1 on the {dataset_name(d)} training data", fit=True)
    vrows = _variant_rows(groups, share_x=False)
    if vrows:
      rows += vrows
      titles.append("Transfer accuracy vs NC1 on each downstream dataset (Fig. 13)")
  if not rows:
    return None
  return _draw(path, rows, "; ".join(titles))


def plot_source_nc1_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Table 1 / Figs. 3, 4: transfer accuracy (y) against the pre-trained model's NC1 on its
  *source* training data (``source_nc1``, x, log) over the variants of a sweep, each point
  labelled by its variant tag, one colour per family (aug1-aug5, adv1-adv8, ...). One panel
  per (downstream dataset, method); all panels share x (the source NC1 of a variant is the
  same everywhere) and a dataset's panels share y. Returns None unless the records are a
  variant sweep (`is_variant_sweep`) with two variants or more in some panel."""
  rs = split_kinds(records).get("variants")
  if not rs:
    return None
  src = {}
  for r in rs:
    src.setdefault((r["model"], _tag(r)), []).append(r.get("source_nc1"))
  groups = _variant_panels(rs, lambda m, d, meth, t: _mean(src.get((m, t), [])),
                           lambda d: "NC1 of the pre-trained model on the source training data",
                           fit=False)
  rows = _variant_rows(groups, share_x=True)
  if not rows:
    return None
  return _draw(path, rows, "Source NC1 vs transfer accuracy across pre-training variants "
               "(Table 1, Figs. 3, 4)", sharex=True)


def plot_reference_nc1_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Fig. 5: transfer accuracy on each downstream dataset (one panel each) against the NC1
  of the same pre-trained variant measured on one reference dataset (CIFAR-10 when present,
  `reference_dataset`), a point per variant, with a least-squares line and Pearson's r.
  Only for variant sweeps over two downstream datasets or more (else it is Fig. 13's
  ``nc1_vs_accuracy.png``); returns None otherwise."""
  rs = split_kinds(records).get("variants")
  if not rs or len({r["dataset"] for r in rs}) < 2:
    return None
  ref = reference_dataset(rs)
  nc1 = _nc1_by_variant(rs)
  groups = _variant_panels(rs, lambda m, d, meth, t: nc1.get((m, ref, meth, t)),
                           lambda d: f"penultimate NC1 on the {dataset_name(ref)} training data",
                           fit=True)
  rows = _variant_rows(groups, share_x=True)
  if not rows:
    return None
  return _draw(path, rows, f"Transfer accuracy vs NC1 on {dataset_name(ref)} (Fig. 5)",
               sharex=True)


def plot_accuracy_vs_size(records: Sequence[Mapping], path: str) -> str | None:
  """Fig. 11: transfer accuracy (percent) against ``num_train`` (log x), one line per
  method (and unit for swept methods), one subplot per (model, dataset) that has more
  than one ``num_train`` value; seeds at one size are averaged. Returns None when no
  (model, dataset) has several sizes."""
  records = split_kinds(records).get("transfer", [])
  if not records:
    return None
  cols = _Columns(records, by_size=False)
  keys = [k for k in cols.keys
          if len({int(r["num_train"]) for r in records if cols.key(r) == k}) > 1]
  if not keys:
    return None
  split = _split_methods(records, lambda r: (cols.key(r), int(r["num_train"])))
  rank = _method_rank(records)
  panels = []
  for key in keys:
    def panel(ax, key=key):
      lines: dict[tuple, dict[int, list]] = {}
      for r in records:
        if cols.key(r) == key:
          lines.setdefault(_row_key(r, split), {}).setdefault(int(r["num_train"]), []).append(
              r["accuracy"])
      sizes = []
      for row in _ordered_rows(lines, rank):
        pts = [(n, _mean(v)) for n, v in sorted(lines[row].items())]
        pts = [(n, a) for n, a in pts if a is not None]
        if pts:
          ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5,
                  color=_method_color(row[0], rank), label=_row_label(row))
          sizes += [p[0] for p in pts]
      _log_axis(ax, "x", sizes)
      ax.set_xlabel("downstream training examples", fontsize=_LABEL_SIZE)
      ax.set_ylabel("transfer test accuracy (%)", fontsize=_LABEL_SIZE)
      ax.set_title(cols.label(key), fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  return _draw(path, [(row, False) for row in _pack(panels)],
               "Transfer accuracy vs downstream training-set size (Fig. 11)")


_SHOT_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_nc1_vs_fewshot_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """Table 2's negative correlation: few-shot accuracy (y) against the penultimate NC1 on
  the meta-test classes (x, log), one panel per dataset, one point per (model, shots)
  labelled by the model, one marker and colour per (ways, shots) setting with Pearson's r
  of accuracy with log10 NC1 over the models in the legend (3 models or more). Returns None
  unless some dataset has two points with NC1 and accuracy."""
  rs = split_kinds(records).get("fewshot", [])
  if not rs:
    return None
  keys, key, label = _fewshot_columns(rs)
  panels = []
  for d in _first_seen(r["dataset"] for r in rs):
    settings = sorted({_setting(r) for r in rs if r["dataset"] == d})
    series = []
    for s in settings:
      pts = []
      for k in keys:
        g = [r for r in rs if r["dataset"] == d and key(r) == k and _setting(r) == s]
        x, y = _positive(_mean(r["nc1"] for r in g)), _mean(r["accuracy"] for r in g)
        if g and x is not None and y is not None:
          pts.append((label(k), x, y))
      if pts:
        series.append((s, pts))
    if sum(len(p) for _, p in series) < 2:
      continue

    def panel(ax, d=d, series=series):
      xs = []
      for i, ((ways, shots), pts) in enumerate(series):
        r_, n = _log_r([(x, y) for _, x, y in pts])
        note = f" (r = {r_:+.2f})" if n >= 3 and not math.isnan(r_) else ""
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], color=f"C{i % 10}",
                   marker=_SHOT_MARKERS[i % len(_SHOT_MARKERS)], s=30, zorder=3,
                   label=f"{ways}-way {shots}-shot{note}")
        _annotate(ax, [p[1] for p in pts], [p[2] for p in pts], [p[0] for p in pts],
                  color=f"C{i % 10}")
        xs += [p[1] for p in pts]
      _log_axis(ax, "x", xs, room=0.25)
      ax.margins(y=0.12)
      ax.set_xlabel(f"penultimate NC1 on the meta-test classes ({dataset_name(d)})",
                    fontsize=_LABEL_SIZE)
      ax.set_ylabel("few-shot query accuracy (%)", fontsize=_LABEL_SIZE)
      ax.set_title(f"{dataset_name(d)}: few-shot accuracy vs NC1 (points: models)",
                   fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  if not panels:
    return None
  return _draw(path, [(row, False) for row in _pack(panels)],
               "Few-shot accuracy vs NC1 of the frozen embeddings on the meta-test classes "
               "(Table 2)")


def plot_scores_vs_accuracy(records: Sequence[Mapping], path: str) -> str | None:
  """One panel per estimator: the measured accuracy (y) of every candidate against its score
  (x), a colour per (dataset, method) with Kendall's tau in the legend. None without rank
  records of two candidates."""
  rs = split_kinds(records).get("rank", [])
  groups = [(d, mu, g) for d, mu, g in _rank_groups(rs) if len(g) >= 2]
  if not groups:
    return None
  one_model = len({r["model"] for r in rs}) == 1  # then the variant tag names a point
  name = lambda r: (r.get("pretrain") if one_model and r.get("pretrain") else r["candidate"])
  panels = []
  for e in _estimators(rs):
    def panel(ax, e=e):
      for i, (d, (method, unit), g) in enumerate(groups):
        pts = [(r[f"score_{e}"], r["accuracy"], name(r)) for r in g
               if _num(r.get(f"score_{e}")) is not None and _num(r["accuracy"]) is not None]
        if not pts:
          continue
        tau = g[0].get(f"kendall_tau_{e}")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", s=30,
                   zorder=3, label=f"{dataset_name(d)}, {method_name(method)} "
                   f"(tau = {fmt_r(tau)})")
        _annotate(ax, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                  color=f"C{i % 10}")
      ax.margins(x=0.2, y=0.12)
      ax.set_xlabel(f"{ESTIMATOR_NAMES.get(e, e)} score (higher: predicted better)",
                    fontsize=_LABEL_SIZE)
      ax.set_ylabel("transfer accuracy (%)", fontsize=_LABEL_SIZE)
      ax.set_title(ESTIMATOR_NAMES.get(e, e), fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  return _draw(path, [(row, True) for row in _pack(panels)],
               "Transferability scores of the frozen candidates vs their transfer accuracy")


# What write_all may write, in order; a rerun removes the ones the records no longer support.
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points (x = % parameters, y = accuracy) no other point dominates (as
  few parameters or fewer and as accurate or more, one of them strictly), by increasing x."""
  out = []
  for i, (x, y) in enumerate(points):
    if not any((a <= x and b >= y) and (a < x or b > y) for a, b in points):
      out.append(i)
  return sorted(out, key=lambda i: points[i])


def plot_accuracy_vs_params(records: Sequence[Mapping], path: str) -> str | None:
  """Issue 19: accuracy (mean over seeds) against the percentage of parameters trained (log
  x), one point per method (`format.peft_label`), the Pareto front drawn as a step line; one
  panel per (model, dataset, train size). None unless a PEFT method ran."""
  records = split_kinds(records).get("transfer", [])
  if not any(r["method"] in PEFT_METHODS for r in records):
    return None
  panels = []
  for col, rows in peft_groups(records):
    pts = [(name, _mean(r.get("percent_params") for r in rs), _mean(r["accuracy"] for r in rs))
           for name, rs in rows]
    pts = [(n, x, y) for n, x, y in pts if x is not None and x > 0 and y is not None]
    if not pts:
      continue

    def panel(ax, pts=pts, col=col):
      xs, ys = [p[1] for p in pts], [p[2] for p in pts]
      ax.scatter(xs, ys, s=18, color="C0", zorder=3)
      _annotate(ax, xs, ys, [p[0] for p in pts])
      front = pareto_front(list(zip(xs, ys)))
      ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="C3",
              lw=1.2, label="Pareto front")
      _log_axis(ax, "x", xs)
      ax.set_xlabel("parameters trained (%)", fontsize=_LABEL_SIZE)
      ax.set_ylabel("transfer test accuracy (%)", fontsize=_LABEL_SIZE)
      ax.set_title(col, fontsize=9)
      ax.legend(fontsize=7)
    panels.append(panel)
  if not panels:
    return None
  return _draw(path, [(row, False) for row in _pack(panels)],
               "Accuracy vs parameters trained (issue 19)")


PLOTS = (
    ("layerwise_nc1.png", plot_layerwise_nc1),
    ("nc1_vs_accuracy.png", plot_nc1_vs_accuracy),
    ("reference_nc1_vs_accuracy.png", plot_reference_nc1_vs_accuracy),
    ("source_nc1_vs_accuracy.png", plot_source_nc1_vs_accuracy),
    ("accuracy_vs_size.png", plot_accuracy_vs_size),
    ("nc1_vs_fewshot_accuracy.png", plot_nc1_vs_fewshot_accuracy),
    ("scores_vs_accuracy.png", plot_scores_vs_accuracy),
    ("accuracy_vs_params.png", plot_accuracy_vs_params),
)
