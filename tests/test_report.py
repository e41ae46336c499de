"""Tests for ncjax.report (records -> json/csv/markdown/png). numpy + matplotlib only, except
the config test at the end (ncjax.spec).

Hand-made records carry the paper's numbers (Tables 1, 3, 5), so the tables are checked cell
by cell against what the paper prints."""

import copy
import csv
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from ncjax import report
from ncjax.report import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NC1_PEN = "NC1 evaluated on the penultimate layer feature (downstream training data)"
ACC = "Transfer accuracy"
PCT = "Percentage of parameters fine-tuned"
SOURCE_NC1 = "NC1 of the pre-trained model on the source data (training split)"
SOURCE_ACC = "Source test accuracy of the pre-trained model"

# Values from the paper's Table 3 (ResNet18 / ResNet50 on Cifar-10 and DTD).
_TABLE3 = {
  # (model, dataset): {method: (accuracy, nc1, percent_params)}
  ("resnet18", "cifar10"): {
    "linear": (81.64, 1.82, 0.05), "layer": (92.12, 0.32, 8.27),
    "scl": (93.11, 0.27, 8.27), "full": (92.11, 0.08, 100.0)},
  ("resnet18", "dtd"): {
    "linear": (60.16, 4.51, 0.22), "layer": (66.01, 1.80, 8.42),
    "scl": (69.84, 0.94, 8.42), "full": (41.38, 1.83, 100.0)},
  ("resnet50", "cifar10"): {
    "linear": (85.33, 1.84, 0.09), "layer": (94.04, 0.28, 6.52),
    "scl": (94.94, 0.22, 6.52), "full": (85.51, 0.17, 100.0)},
  ("resnet50", "dtd"): {
    "linear": (68.46, 3.52, 0.41), "layer": (67.66, 1.68, 6.82),
    "scl": (72.87, 0.64, 6.82), "full": (38.83, 1.85, 100.0)},
}
_UNITS = {"resnet18": ["block1", "block3", "block5", "block7"],
          "resnet50": ["block1", "block4", "block8", "block14"]}
_FT_UNIT = {"resnet18": "block5", "resnet50": "block8"}


def make_records():
  recs = []
  # Methods deliberately listed out of canonical order: the table must reorder them.
  for (model, dataset), by_method in _TABLE3.items():
    for method in ("full", "scl", "linear", "layer"):
      acc, nc1, pct = by_method[method]
      units = _UNITS[model]
      recs.append({
        "model": model, "dataset": dataset, "method": method,
        "unit": _FT_UNIT[model] if method in ("layer", "scl") else None,
        "accuracy": acc, "nc1": nc1, "cdnv": nc1 / 10, "numerical_rank": 9.0,
        "percent_params": pct,
        "layerwise_nc1": {u: 20.0 / (i + 1) + nc1 for i, u in enumerate(units)},
        "num_train": 50000 if dataset == "cifar10" else 1880,
        "seed": len(recs) % 3, "wall_s": 12.5 + len(recs),
      })
  return recs


def record(**kw):
  """A record as the jobs write it (`ncjax.records.Record` defaults), updated by ``kw``."""
  r = {"model": "resnet18", "dataset": "digits", "method": "linear", "unit": "",
       "accuracy": 90.0, "nc1": 1.0, "cdnv": 0.5, "numerical_rank": 2.0, "percent_params": 0.1,
       "layerwise_nc1": {}, "layerwise_accuracy": {}, "num_train": 720, "seed": 0,
       "stage": "transfer", "pretrain": "", "loss": "", "source_nc1": None,
       "source_accuracy": None, "wall_s": 1.0}
  r.update(kw)
  return r


def rows_of(md):
  """Markdown table -> list of cell lists (stripped), header included, rule row excluded."""
  out = []
  for line in md.strip().splitlines():
    if line.startswith("|:--"):
      continue
    assert line.startswith("| ") and line.endswith(" |"), line
    out.append([c.strip() for c in line[2:-2].split(" | ")])
  return out


def tables_of(md):
  """The Markdown tables of a document (lists of rows as `rows_of`)."""
  blocks, cur = [], []
  for line in md.splitlines() + [""]:
    if line.startswith("|"):
      cur.append(line)
    elif cur:
      blocks.append(rows_of("\n".join(cur)))
      cur = []
  return blocks


def _sectioned(md):
  sec = None
  for r in rows_of(md)[1:]:
    if r[0].startswith("**"):
      sec = r[0].strip("*")
    else:
      yield sec, r


def cells(md):
  """{(section, row label): cells} of a Table 3 layout table."""
  return {(s, r[0]): r[1:] for s, r in _sectioned(md)}


def assert_no_repeated_rows(md):
  """No table of ``md`` repeats a row label within a section, nor a whole row."""
  for table in tables_of(md):
    seen, sec = set(), None
    for row in table[1:]:
      if row[0].startswith("**"):
        sec = row[0]
        continue
      assert (sec, row[0]) not in seen, f"repeated row {row[0]!r} in section {sec!r}"
      seen.add((sec, row[0]))
    body = [tuple(r) for r in table[1:] if not r[0].startswith("**")]
    assert len(body) == len(set(body)), "a whole row is repeated"


# ----------------------------------------------------------------------------- Table 3


def test_markdown_header_sections_and_row_order():
  md = report.markdown_table(make_records())
  rows = rows_of(md)
  assert rows[0] == ["Method", "ResNet18 / Cifar-10", "ResNet18 / DTD",
                     "ResNet50 / Cifar-10", "ResNet50 / DTD"]
  labels = [r[0] for r in rows[1:]]
  methods = ["Linear Probe", "Layer FT", "SCL FT", "Full Model FT"]
  assert labels == ([f"**{ACC}**"] + methods + [f"**{NC1_PEN}**"] + methods
                    + [f"**{PCT}**"] + methods)
  # Section rows have empty value cells; every row has 1 + 4 cells.
  assert all(len(r) == 5 for r in rows)
  assert rows[1][1:] == ["", "", "", ""]
  assert_no_repeated_rows(md)


def test_markdown_exact_cells():
  rows = cells(report.markdown_table(make_records()))
  assert rows[(ACC, "Layer FT")] == ["92.12", "66.01", "94.04", "67.66"]
  assert rows[(ACC, "Linear Probe")] == ["81.64", "60.16", "85.33", "68.46"]
  assert rows[(NC1_PEN, "Layer FT")] == ["0.32", "1.80", "0.28", "1.68"]
  assert rows[(NC1_PEN, "Full Model FT")] == ["0.08", "1.83", "0.17", "1.85"]
  assert rows[(PCT, "Layer FT")] == ["8.27%", "8.42%", "6.52%", "6.82%"]
  assert rows[(PCT, "Linear Probe")] == ["0.05%", "0.22%", "0.09%", "0.41%"]
  assert rows[(PCT, "Full Model FT")] == ["100%", "100%", "100%", "100%"]


def test_markdown_missing_cell_and_unknown_method():
  recs = [r for r in make_records()
          if not (r["model"] == "resnet50" and r["dataset"] == "dtd" and r["method"] == "scl")]
  extra = dict(recs[0], method="adapter", unit=None, accuracy=50.0)
  rows = cells(report.markdown_table(recs + [extra]))
  assert rows[(ACC, "SCL FT")] == ["93.11", "69.84", "94.94", "\u2013"]
  # Unknown methods come after the four known ones, displayed as-is.
  labels = [r[0] for s, r in _sectioned(report.markdown_table(recs + [extra])) if s == ACC]
  assert labels == ["Linear Probe", "Layer FT", "SCL FT", "Full Model FT", "adapter"]
  assert rows[(ACC, "adapter")] == ["50.00", "\u2013", "\u2013", "\u2013"]


def test_source_rows_are_one_row_each_not_one_per_method():
  """The default job: a model pre-trained on digits 0-4, four methods on 5-9. Source NC1 and
  accuracy belong to the pre-trained model: one row each, never repeated per method."""
  recs = [record(method=m, unit="block5" if m in ("layer", "scl") else "", accuracy=a, nc1=n,
                 percent_params=p, source_nc1=0.0375, source_accuracy=98.333)
          for m, a, n, p in (("linear", 86.03, 3.09, 0.09), ("layer", 97.77, 0.12, 8.33),
                             ("scl", 97.21, 0.13, 8.33), ("full", 97.77, 0.08, 100.0))]
  md = report.markdown_table(recs)
  assert_no_repeated_rows(md)
  rows = cells(md)
  assert rows[("The pre-trained model on its source data", SOURCE_NC1)] == ["0.04"]
  assert rows[("The pre-trained model on its source data", SOURCE_ACC)] == ["98.33"]
  assert [r[0] for r in rows_of(md)[1:]].count("Linear Probe") == 3  # acc, NC1, % params
  assert rows[(ACC, "SCL FT")] == ["97.21"] and rows[(PCT, "Full Model FT")] == ["100%"]
  assert md.count(SOURCE_NC1) == 1 and md.count(SOURCE_ACC) == 1


def test_markdown_unit_sweep_labels_rows():
  recs = make_records()
  # Add a ResNet18/Cifar-10 sweep of Layer FT over block1 and block7 (Table 5 values).
  base = next(r for r in recs if r["model"] == "resnet18" and r["dataset"] == "cifar10"
              and r["method"] == "layer")
  recs.append(dict(base, unit="block7", accuracy=93.08, nc1=0.22, percent_params=33.02))
  recs.append(dict(base, unit="block1", accuracy=91.23, nc1=0.72, percent_params=0.89))
  r50 = next(r for r in recs if r["model"] == "resnet50" and r["dataset"] == "dtd"
             and r["method"] == "layer")
  recs.append(dict(r50, unit="block14", accuracy=71.81, nc1=0.78))
  md = report.markdown_table(recs)
  rows = list(_sectioned(md))
  acc = {r[0]: r[1:] for s, r in rows if s == ACC}
  labels = [r[0] for s, r in rows if s == ACC]
  # Swept method: one row per unit, natural unit order, label includes unit. SCL FT is
  # not swept anywhere, so it keeps a plain label.
  assert labels == ["Linear Probe", "Layer FT (block1)", "Layer FT (block5)",
                    "Layer FT (block7)", "Layer FT (block8)", "Layer FT (block14)",
                    "SCL FT", "Full Model FT"]
  assert acc["Layer FT (block1)"] == ["91.23", "\u2013", "\u2013", "\u2013"]
  assert acc["Layer FT (block5)"] == ["92.12", "66.01", "\u2013", "\u2013"]
  assert acc["Layer FT (block8)"] == ["\u2013", "\u2013", "94.04", "67.66"]
  assert acc["Layer FT (block14)"] == ["\u2013", "\u2013", "\u2013", "71.81"]
  pct = {r[0]: r[1:] for s, r in rows if s == PCT}
  assert pct["Layer FT (block7)"][0] == "33.02%"
  assert_no_repeated_rows(md)


def test_unit_sweep_table_layout():
  recs = make_records()
  base = next(r for r in recs if r["model"] == "resnet18" and r["dataset"] == "cifar10"
              and r["method"] == "layer")
  scl = next(r for r in recs if r["model"] == "resnet18" and r["dataset"] == "cifar10"
             and r["method"] == "scl")
  recs += [dict(base, unit="block1", accuracy=91.23, nc1=0.72, percent_params=0.89),
           dict(scl, unit="block1", accuracy=91.76, nc1=0.64, percent_params=0.89)]
  md = report.unit_sweep_table([r for r in recs if r["model"] == "resnet18"
                                and r["dataset"] == "cifar10"])
  assert md.startswith("### ResNet18 / Cifar-10\n")
  rows = rows_of("\n".join(l for l in md.splitlines() if l.startswith("|")))
  assert rows[0] == ["Unit", "Layer FT acc", "SCL FT acc", "Layer FT NC1", "SCL FT NC1",
                     "Layer FT % params", "SCL FT % params"]
  assert rows[1] == ["block1", "91.23", "91.76", "0.72", "0.64", "0.89%", "0.89%"]
  assert rows[2] == ["block5", "92.12", "93.11", "0.32", "0.27", "8.27%", "8.27%"]
  assert len(rows) == 3
  assert "Linear Probe 81.64 (NC1 1.82, 0.05% params)" in md
  assert "Full Model FT 92.11 (NC1 0.08, 100% params)" in md
  # min_units: the single-unit (model, dataset) columns are left out.
  two = report.unit_sweep_table(recs, min_units=2)
  assert "### ResNet18 / Cifar-10\n" in two and "ResNet50" not in two and "DTD" not in two
  assert "### ResNet50 / DTD" in report.unit_sweep_table(recs)
  # Nothing unit-wise -> empty string.
  assert report.unit_sweep_table([r for r in recs if r["method"] in ("linear", "full")]) == ""


def test_formatters():
  assert report.fmt_accuracy(92.123) == "92.12"
  assert report.fmt_accuracy(None) == "\u2013"
  assert report.fmt_accuracy(float("nan")) == "\u2013"
  assert report.fmt_nc1(0.3249) == "0.32"
  assert report.fmt_nc1(0.0012) == "1.2e-03"
  assert report.fmt_nc1(0.0) == "0.00"
  assert report.fmt_sig(0.03750764) == "0.0375" and report.fmt_sig(2.991) == "2.99"
  assert report.fmt_r(-0.9712) == "-0.97" and report.fmt_r(float("nan")) == "\u2013"
  assert report.fmt_percent(8.271) == "8.27%"
  assert report.fmt_percent(100) == "100%"
  assert report.fmt_percent(99.999) == "100%"
  assert report.fmt_percent(99.5) == "99.50%"


def test_seeds_are_averaged_and_pretrain_and_sizes_split_columns():
  recs = [r for r in make_records() if r["model"] == "resnet18" and r["dataset"] == "cifar10"]
  lin = next(r for r in recs if r["method"] == "linear")
  recs.append(dict(lin, seed=1, accuracy=81.66))  # mean of 81.64 and 81.66 = 81.65
  acc = {r[0]: r[1:] for s, r in _sectioned(report.markdown_table(recs)) if s == ACC}
  assert acc["Linear Probe"] == ["81.65"]
  # Several pre-trained sources without a source NC1 (ViT-B from JFT and from ImageNet-21k,
  # Table 3) are columns of the Table 3 layout, not a variant sweep.
  two_pre = recs + [dict(lin, pretrain="jft")]
  assert not report.is_variant_sweep(two_pre)
  assert rows_of(report.markdown_table(two_pre))[0] == [
    "Method", "ResNet18 / Cifar-10", "ResNet18 [jft] / Cifar-10"]
  sizes = recs + [dict(lin, num_train=500, accuracy=70.0)]
  assert rows_of(report.markdown_table(sizes))[0] == [
    "Method", "ResNet18 / Cifar-10 (n=500)", "ResNet18 / Cifar-10 (n=50000)"]


def test_print_table(capsys):
  text = report.print_table(make_records())
  assert capsys.readouterr().out == text
  assert "| Layer FT | 92.12 |" in text


# ----------------------------------------------------------------------------- Table 4

# Table 5 of the paper (ResNet18, ImageNet): unit -> (Layer FT acc, SCL FT acc, Layer FT NC1,
# SCL FT NC1); % params per unit below. Linear probe and full FT: (acc, NC1).
_TABLE5 = {
  "cifar10": {"block1": (91.23, 91.76, 0.72, 0.64), "block3": (92.02, 92.43, 0.51, 0.41),
              "block5": (92.12, 93.11, 0.32, 0.27), "block7": (93.08, 93.65, 0.22, 0.16)},
  "dtd": {"block1": (60.00, 62.07, 4.05, 3.20), "block3": (61.70, 65.11, 2.85, 1.82),
          "block5": (66.01, 69.84, 1.80, 0.94), "block7": (68.56, 71.22, 1.10, 0.56)},
  "oxford_iiit_pet": {"block1": (86.67, 88.14, 2.00, 1.56), "block3": (88.01, 89.02, 1.49, 1.08),
                      "block5": (87.90, 89.78, 1.05, 0.63), "block7": (86.56, 89.18, 0.61, 0.37)},
}
_TABLE5_REF = {"cifar10": ((81.64, 1.82), (92.11, 0.08)), "dtd": ((60.16, 4.51), (41.38, 1.83)),
               "oxford_iiit_pet": ((86.26, 2.32), (74.24, 0.38))}
_TABLE5_PCT = {"block1": 0.89, "block3": 2.28, "block5": 8.43, "block7": 33.02}


def table5_records():
  recs = []
  for d, by_unit in _TABLE5.items():
    (la, ln), (fa, fn) = _TABLE5_REF[d]
    recs.append(record(dataset=d, method="linear", accuracy=la, nc1=ln, percent_params=0.23))
    for u, (a_l, a_s, n_l, n_s) in by_unit.items():
      recs.append(record(dataset=d, method="layer", unit=u, accuracy=a_l, nc1=n_l,
                         percent_params=_TABLE5_PCT[u]))
      recs.append(record(dataset=d, method="scl", unit=u, accuracy=a_s, nc1=n_s,
                         percent_params=_TABLE5_PCT[u]))
    recs.append(record(dataset=d, method="full", accuracy=fa, nc1=fn, percent_params=100.0))
  return recs


def test_best_unit_table_is_table4_from_the_table5_sweep():
  md = report.best_unit_table(table5_records())
  assert rows_of(md)[0] == ["Method", "ResNet18 / Cifar-10", "ResNet18 / DTD", "ResNet18 / PET"]
  rows = cells(md)
  # The paper's Table 4, ResNet18 columns Cifar-10, DTD, PET.
  assert rows[(ACC, "Linear Probe")] == ["81.64", "60.16", "86.26"]
  assert rows[(ACC, "Layer FT")] == ["93.08", "68.56", "88.01"]
  assert rows[(ACC, "SCL FT")] == ["93.65", "71.22", "89.78"]
  assert rows[(ACC, "Full Model FT")] == ["92.11", "41.38", "74.24"]
  assert rows[(NC1_PEN, "Layer FT")] == ["0.22", "1.10", "1.49"]
  assert rows[(NC1_PEN, "SCL FT")] == ["0.16", "0.56", "0.63"]
  assert rows[(PCT, "Layer FT")] == ["33.02%", "33.02%", "2.28%"]
  assert rows[(PCT, "SCL FT")] == ["33.02%", "33.02%", "8.43%"]
  unit = "Fine-tuned unit of the best result"
  assert rows[(unit, "Layer FT")] == ["block7", "block7", "block3"]
  assert rows[(unit, "SCL FT")] == ["block7", "block7", "block5"]
  assert (unit, "Linear Probe") not in rows
  assert_no_repeated_rows(md)


def test_best_unit_ties_go_to_the_unit_nearer_the_input_and_no_sweep_no_table():
  recs = [record(method="layer", unit=u, accuracy=90.0, percent_params=p)
          for u, p in (("block7", 33.0), ("block3", 2.3))]
  assert cells(report.best_unit_table(recs))[
    ("Fine-tuned unit of the best result", "Layer FT")] == ["block3"]
  assert report.best_unit_table(make_records()) == ""  # one unit per method: Table 3 only


def test_results_md_of_a_unit_sweep_has_table3_rows_per_unit_and_table4(tmp_path):
  paths = report.write_all(table5_records(), str(tmp_path), plots=False)
  md = open(paths[2]).read()
  assert md.startswith("## Transfer results (Table 3)\n")
  assert "## Best unit per method (Table 4)" in md
  assert "Unit sweeps" not in md  # Tables 5-7 are the unit rows of Table 3: not repeated
  assert "| Layer FT (block7) | 93.08 | 68.56 | 86.56 |" in md
  assert_no_repeated_rows(md)


# ----------------------------------------------------------------------------- pre-training


def fig2_records():
  """Two 9-layer MLPs trained on digits with CE and MSE (a variant sweep of a pre-training
  job), NC1 falling by 0.8 and 0.6 per layer."""
  return [record(model="mlp", method="full", stage="pretrain", pretrain=tag, loss=tag,
                 percent_params=100.0, accuracy=acc, nc1=0.9 * f ** 8, num_train=1438,
                 layerwise_nc1={f"layer{i}": 0.9 * f ** (i - 1) for i in range(1, 10)})
          for tag, f, acc in (("ce", 0.8, 93.59), ("mse", 0.6, 91.2))]


def test_pretrain_records_give_the_layerwise_nc1_table(tmp_path):
  recs = fig2_records()
  md = report.markdown_table(recs)
  rows = rows_of(md)
  assert rows[0] == ["Layer", "MLP / Digits (ce)", "MLP / Digits (mse)"]
  assert [r[0] for r in rows[1:10]] == [f"layer{i}" for i in range(1, 10)]
  assert rows[1][1:] == ["0.9", "0.9"]
  assert rows[2][1:] == ["0.72", "0.54"]
  assert rows[9][1:] == ["0.151", "0.0151"]
  assert rows[10] == ["NC1 ratio per layer (geometric mean)", "0.8", "0.6"]
  assert rows[11] == ["Source test accuracy (%)", "93.59", "91.20"]
  for wrong in ("Transfer", "Full Model FT", "Percentage of parameters"):
    assert wrong not in md
  paths = report.write_all(recs, str(tmp_path))
  text = open(paths[2]).read()
  assert text.startswith("## Layer-wise NC1 on the source training data (Fig. 2)\n")
  assert "Transfer results" not in text and "Full Model FT" not in text
  # Fig. 2 is the only plot a pre-training job supports.
  assert [os.path.basename(p) for p in paths[3:]] == ["layerwise_nc1.png"]
  assert_png(paths[3])


def test_pretrain_without_tag_is_labelled_by_its_loss_and_mixed_models_by_position():
  mlp = dict(fig2_records()[0], pretrain="")
  resnet = record(stage="pretrain", method="full", loss="mse", accuracy=98.0,
                  layerwise_nc1={f"block{i}": 2.0 / i for i in range(1, 9)})
  rows = rows_of(report.layerwise_nc1_table([mlp, resnet]))
  assert rows[0] == ["Layer (from the input)", "MLP / Digits (CE)", "ResNet18 / Digits (MSE)"]
  assert rows[1] == ["1", "0.9", "2"] and rows[8] == ["8", "0.189", "0.25"]
  assert rows[9] == ["9", "0.151", "\u2013"]


# ----------------------------------------------------------------------------- variants

# Table 1 of the paper: ResNet18 pre-trained on Cifar-100, linear probe on Cifar-10.
_TABLE1 = (("mse", 0.001, 53.96), ("ce", 0.771, 71.2), ("supcon+linear", 0.792, 69.89),
           ("supcon+mlp", 2.991, 79.51))


def table1_records():
  return [record(dataset="cifar10", pretrain=tag, source_nc1=s, accuracy=a, nc1=3.0 - a / 40,
                 source_accuracy=None if tag.startswith("supcon") else 75.0)
          for tag, s, a in _TABLE1]


def _log_r(xs, ys):
  return np.corrcoef(np.log10(xs), ys)[0, 1]


def test_table1_variant_sweep_reads_like_table1(tmp_path):
  recs = table1_records()
  assert report.is_variant_sweep(recs)
  md = report.markdown_table(recs)
  rows = cells(md)
  assert rows_of(md)[0] == ["Method", "ResNet18 [mse] / Cifar-10", "ResNet18 [ce] / Cifar-10",
                            "ResNet18 [supcon+linear] / Cifar-10",
                            "ResNet18 [supcon+mlp] / Cifar-10"]
  src = "The pre-trained model on its source data"
  assert rows[(src, SOURCE_NC1)] == ["1.0e-03", "0.77", "0.79", "2.99"]
  assert rows[(src, SOURCE_ACC)] == ["75.00", "75.00", "\u2013", "\u2013"]
  assert rows[(ACC, "Linear Probe")] == ["53.96", "71.20", "69.89", "79.51"]
  assert_no_repeated_rows(md)
  paths = report.write_all(recs, str(tmp_path))
  text = open(paths[2]).read()
  assert text.startswith("## Pre-training variants: source NC1 and transfer accuracy")
  (corr,) = [t for t in tables_of(text) if t[0][0] == "Downstream"]
  expect = _log_r([s for _, s, _ in _TABLE1], [a for _, _, a in _TABLE1])
  assert corr[0] == ["Downstream", "Variants", "r: source NC1 (source train)",
                     "r: NC1 on the downstream data (train)"]
  assert corr[1][:3] == ["Cifar-10 (Linear Probe)", "4", f"{expect:+.2f}"]
  assert corr[1][2] == "+0.97"  # Table 1: more source NC1, better transfer
  # Source plot (Table 1) and Fig. 13's plot; no Fig. 5 plot (one downstream dataset), no
  # layer-wise plot (not a per-method study), no size plot.
  assert [os.path.basename(p) for p in paths[3:]] == ["nc1_vs_accuracy.png",
                                                      "source_nc1_vs_accuracy.png"]
  for p in paths[3:]:
    assert_png(p)


def fig5_records():
  """Fig. 5 / 13: 5 augmentation levels and 2 PGD radii, linear probes on 3 datasets; NC1 on
  Cifar-10 falls with the level, accuracy rises everywhere."""
  recs = []
  for i, tag in enumerate(("aug1", "aug2", "aug3", "aug4", "aug5", "adv1", "adv8")):
    for d, base in (("cifar10", 80.0), ("aircraft", 35.0), ("dtd", 60.0)):
      recs.append(record(dataset=d, pretrain=tag, source_nc1=0.2 + 0.1 * i,
                         accuracy=base + i + (0.5 if d == "dtd" and i == 3 else 0.0),
                         nc1=(2.0 if d == "cifar10" else 9.0) / (1 + i)))
  return recs


def test_fig5_variant_sweep_over_datasets(tmp_path):
  recs = fig5_records()
  md = report.markdown_table(recs)
  rows = rows_of(md)
  assert rows[0] == ["Pre-training", "Source NC1 (source train)", "Source acc. (%)",
                     "Cifar-10 acc. (%)", "Cifar-10 NC1 (train)", "Aircraft acc. (%)",
                     "Aircraft NC1 (train)", "DTD acc. (%)", "DTD NC1 (train)"]
  assert [r[0] for r in rows[1:]] == ["aug1", "aug2", "aug3", "aug4", "aug5", "adv1", "adv8"]
  assert rows[4] == ["aug4", "0.50", "\u2013", "83.00", "0.50", "38.00", "2.25", "63.50", "2.25"]
  assert_no_repeated_rows(md)
  paths = report.write_all(recs, str(tmp_path))
  (corr,) = [t for t in tables_of(open(paths[2]).read()) if t[0][0] == "Downstream"]
  assert corr[0][3] == "r: NC1 on Cifar-10 (train)"
  nc1_c10 = [2.0 / (1 + i) for i in range(7)]
  dtd_acc = [60.0 + i + (0.5 if i == 3 else 0.0) for i in range(7)]
  assert corr[3][0] == "DTD (Linear Probe)" and corr[3][3] == f"{_log_r(nc1_c10, dtd_acc):+.2f}"
  assert corr[1][4] == "-0.96"  # Cifar-10 against its own NC1
  names = [os.path.basename(p) for p in paths[3:]]
  assert names == ["nc1_vs_accuracy.png", "reference_nc1_vs_accuracy.png",
                   "source_nc1_vs_accuracy.png"]
  for p in paths[3:]:
    assert_png(p)
  assert report.reference_dataset([r for r in recs if r["dataset"] != "cifar10"]) == "aircraft"


# ----------------------------------------------------------------------------- probes


def probe_records():
  """Fig. 9: a ResNet34-like model (the classifier reads the last block) and a ViT whose
  penultimate feature (after the final LayerNorm) differs from layer 12's."""
  res = record(model="resnet34", dataset="cifar10", stage="probe", accuracy=85.0, nc1=1.2,
               layerwise_accuracy={f"block{i}": 40.0 + 3 * i for i in range(1, 17)},
               layerwise_nc1={f"block{i}": 30.0 / i for i in range(1, 16)} | {"block16": 1.2})
  vit = record(model="vit_b32", dataset="cifar10", stage="probe", accuracy=95.5, nc1=0.5,
               layerwise_accuracy={f"layer{i}": 50.0 + 3.5 * i for i in range(1, 13)},
               layerwise_nc1={f"layer{i}": 12.0 / i for i in range(1, 13)})
  return [res, vit]


def test_probe_records_give_layer_tables_and_fig9(tmp_path):
  recs = probe_records()
  md = report.markdown_table(recs)
  assert "### ResNet34 / Cifar-10" in md and "### ViT-B/32 / Cifar-10" in md
  res, vit = tables_of(md)
  assert res[0] == ["Layer", "Probe test accuracy (%)", "NC1 (Cifar-10 training data)"]
  assert res[1] == ["block1", "43.00", "30"] and res[16] == ["block16", "88.00", "1.2"]
  assert len(res) == 17  # the last block is the penultimate feature: no extra row
  assert vit[-1] == ["penultimate", "95.50", "0.5"] and vit[-2] == ["layer12", "92.00", "1"]
  r = _log_r([12.0 / i for i in range(1, 13)], [50.0 + 3.5 * i for i in range(1, 13)])
  assert f"Pearson r of probe accuracy with log10 NC1 over 12 layers: {r:+.2f}." in md
  assert "Transfer accuracy" not in md
  paths = report.write_all(recs, str(tmp_path))
  assert open(paths[2]).read().startswith("## Layer-wise linear probes (Fig. 9)\n")
  # Fig. 9 (left: accuracy and NC1 against the layer; right: accuracy against NC1) is
  # nc1_vs_accuracy.png; the probes' NC1 is not drawn again as a Fig. 10 plot.
  assert [os.path.basename(p) for p in paths[3:]] == ["nc1_vs_accuracy.png"]
  assert_png(paths[3])
  w, h = png_size(paths[3])
  assert 2 * 400 < w < 2 * 560 and 2 * 300 < h < 2 * 450  # a row per model, 2 panels a row


# ----------------------------------------------------------------------------- json / csv


def test_json_round_trip(tmp_path):
  recs = make_records()
  recs[0]["layerwise_accuracy"] = {"block1": 40.0, "block3": 55.5}
  recs[1]["pretrain"] = "imagenet1k"
  path = report.write_json(recs, str(tmp_path / "r.json"))
  back = report.read_json(path)
  assert back == recs
  assert list(back[0]["layerwise_nc1"]) == _UNITS["resnet18"]  # order kept


def test_json_accepts_numpy_values(tmp_path):
  rec = make_records()[0]
  rec.update(accuracy=np.float32(92.5), num_train=np.int64(100),
             layerwise_nc1={"block1": np.float64(1.5)})
  back = report.read_json(report.write_json([rec], str(tmp_path / "r.json")))
  assert back[0]["accuracy"] == 92.5 and back[0]["num_train"] == 100
  assert back[0]["layerwise_nc1"] == {"block1": 1.5}


def test_csv_one_row_per_record_and_parses_back(tmp_path):
  recs = make_records()
  recs[3]["layerwise_accuracy"] = {"block1": 40.0}
  recs[4]["pretrain"] = "1"  # a tag that looks like a number stays a string
  recs[4]["stage"] = "transfer"
  path = report.write_csv(recs, str(tmp_path / "r.csv"))
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(recs)
  assert list(rows[0])[:len(report.REQUIRED_FIELDS)] == list(report.REQUIRED_FIELDS)
  assert json.loads(rows[0]["layerwise_nc1"]) == recs[0]["layerwise_nc1"]
  assert float(rows[5]["accuracy"]) == recs[5]["accuracy"]
  assert rows[0]["unit"] == ""  # None -> empty cell (full FT has no unit)
  assert report.read_csv(path) == recs


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field", ["nc1", "unit", "layerwise_nc1", "num_train"])
def test_missing_field_names_field_and_index(field, tmp_path):
  recs = make_records()
  del recs[5][field]
  for fn in (report.markdown_table,
             lambda r: report.write_json(r, str(tmp_path / "x.json")),
             lambda r: report.write_all(r, str(tmp_path / "w"))):
    with pytest.raises(ValueError, match=rf"record 5: missing required field '{field}'"):
      fn(recs)


def test_bad_types_rejected():
  recs = make_records()
  recs[2]["accuracy"] = "92%"
  with pytest.raises(ValueError, match="record 2: field 'accuracy'"):
    report.markdown_table(recs)
  recs = make_records()
  recs[1]["layerwise_nc1"] = [1.0, 2.0]
  with pytest.raises(ValueError, match="record 1: field 'layerwise_nc1'"):
    report.validate(recs)
  recs = make_records()
  recs[4]["num_train"] = 12.5
  with pytest.raises(ValueError, match="record 4: field 'num_train'"):
    report.validate(recs)
  with pytest.raises(ValueError, match="record 0: expected a dict"):
    report.validate(["not a record"])


# ----------------------------------------------------------------------------- plots


def assert_png(path):
  assert path is not None and os.path.isfile(path)
  with open(path, "rb") as f:
    head = f.read(8)
  assert head == PNG_SIGNATURE
  assert os.path.getsize(path) > 5000


def png_size(path):
  """(width, height) in pixels, from the PNG's IHDR chunk."""
  with open(path, "rb") as f:
    head = f.read(24)
  return struct.unpack(">II", head[16:24])


def test_write_all_writes_files_and_plots(tmp_path):
  recs = make_records()
  # Fig. 11 data (two more sizes) for ResNet18 / Cifar-10.
  for r in [r for r in recs if r["model"] == "resnet18" and r["dataset"] == "cifar10"]:
    for n, drop in ((500, 20.0), (5000, 8.0)):
      recs.append(dict(r, num_train=n, accuracy=r["accuracy"] - drop))
  out = str(tmp_path / "work")
  paths = report.write_all(recs, out)
  names = [os.path.basename(p) for p in paths]
  assert names == ["results.json", "results.csv", "results.md", "layerwise_nc1.png",
                   "nc1_vs_accuracy.png", "accuracy_vs_size.png"]
  for p in paths:
    assert os.path.dirname(p) == out and os.path.getsize(p) > 0
  for p in paths[3:]:
    assert_png(p)
  assert report.read_json(paths[0]) == recs
  md = open(paths[2]).read()
  assert "ResNet18 / Cifar-10 (n=500)" in md and "| Layer FT |" in md
  assert "Table 4" not in md  # no method was swept over units
  assert_no_repeated_rows(md)
  recs.append(dict(recs[1], unit="block7"))  # ResNet18/Cifar-10 SCL FT at block7 too
  md = open(report.write_all(recs, out, plots=False)[2]).read()
  assert "## Best unit per method (Table 4)" in md and "| SCL FT (block7) |" in md


def test_layerwise_plot_of_a_unit_sweep_is_a_grid_of_datasets_by_units(tmp_path):
  """Figs. 10 / 14: a row per dataset, a panel per fine-tuned unit."""
  recs = table5_records()
  for r in recs:
    r["layerwise_nc1"] = {f"block{i}": r["nc1"] * (9 - i) for i in range(1, 9)}
  path = report.plot_layerwise_nc1(recs, str(tmp_path / "f10.png"))
  assert_png(path)
  w, h = png_size(path)
  assert 4 * 400 < w < 4 * 560 and 3 * 300 < h < 3 * 450  # 4 panels x 3 rows at 110 dpi


def test_write_all_skips_plots_records_cannot_support(tmp_path):
  recs = [dict(r, layerwise_nc1={}) for r in make_records()]  # no layer-wise data, one size
  paths = report.write_all(recs, str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["nc1_vs_accuracy.png", "results.csv", "results.json", "results.md"]
  assert report.plot_layerwise_nc1(recs, str(tmp_path / "a.png")) is None
  assert report.plot_accuracy_vs_size(recs, str(tmp_path / "b.png")) is None
  assert not os.path.exists(tmp_path / "a.png") and not os.path.exists(tmp_path / "b.png")
  # A single record cannot make a scatter; no layerwise_accuracy either.
  assert report.plot_nc1_vs_accuracy(recs[:1], str(tmp_path / "c.png")) is None
  assert report.write_all(recs, str(tmp_path / "np"), plots=False)[-1].endswith("results.md")
  assert len(report.write_all(recs, str(tmp_path / "np"), plots=False)) == 3


def test_fig11_writes_only_the_size_plot_and_removes_stale_ones(tmp_path):
  """Fig. 11's job: one model, no pre-training on a source, no NC1 (collapse=False). Only
  accuracy_vs_size.png means something; a plot an earlier report left there is removed."""
  recs = [record(model="resnet18", dataset="cifar10", method=m, num_train=n,
                 unit="block5" if m in ("layer", "scl") else "", nc1=None, cdnv=None,
                 numerical_rank=None, accuracy=a + (0 if m == "full" else 5) * math.log10(n))
          for n in (10, 24, 59, 142) for m, a in (("linear", 30.0), ("layer", 28.0),
                                                  ("scl", 29.0), ("full", 20.0))]
  stale = tmp_path / "source_nc1_vs_accuracy.png"
  stale.write_bytes(PNG_SIGNATURE)
  paths = report.write_all(recs, str(tmp_path))
  assert [os.path.basename(p) for p in paths[3:]] == ["accuracy_vs_size.png"]
  assert_png(paths[3])
  assert not stale.exists()
  for name in ("nc1_vs_accuracy.png", "layerwise_nc1.png", "reference_nc1_vs_accuracy.png"):
    assert not (tmp_path / name).exists()
  md = open(paths[2]).read()
  assert "source data" not in md and "Table 4" not in md
  assert cells(report.markdown_table(recs))[(NC1_PEN, "SCL FT")] == ["\u2013"] * 4


def drawn_figures(monkeypatch):
  """Keeps the figures the plot functions save (drawn, so that tick labels exist)."""
  figs = []

  def save(fig, path):
    fig.canvas.draw()
    figs.append(fig)
    return path
  monkeypatch.setattr(plots, "_save", save)
  return figs


def visible_axes(fig):
  return [ax for ax in fig.axes if ax.get_visible()]


def test_variant_plots_label_points_share_axes_and_name_the_split(monkeypatch, tmp_path):
  figs = drawn_figures(monkeypatch)
  recs = fig5_records()
  report.plot_source_nc1_vs_accuracy(recs, str(tmp_path / "s.png"))
  report.plot_reference_nc1_vs_accuracy(recs, str(tmp_path / "r.png"))
  report.plot_nc1_vs_accuracy(recs, str(tmp_path / "n.png"))
  source, reference, own = (visible_axes(f) for f in figs)
  tags = ["aug1", "aug2", "aug3", "aug4", "aug5", "adv1", "adv8"]
  for axes in (source, reference, own):
    assert len(axes) == 3  # Cifar-10, Aircraft, DTD
    for ax in axes:
      assert sorted(t.get_text() for t in ax.texts) == sorted(tags)  # every point labelled
      assert ax.get_xscale() == "log"
      ticks = [t.get_text() for t in ax.get_xticklabels()]
      assert len(ticks) >= 2 and all(t.replace(".", "").isdigit() for t in ticks), ticks
      assert ax.get_legend() is not None  # the families aug / adv
  assert {ax.get_xlabel() for ax in source} == {
    "NC1 of the pre-trained model on the source training data"}
  assert {ax.get_xlabel() for ax in reference} == {
    "penultimate NC1 on the Cifar-10 training data"}
  assert [ax.get_xlabel() for ax in own] == [
    f"penultimate NC1 on the {d} training data" for d in ("Cifar-10", "Aircraft", "DTD")]
  # One x axis for the source NC1 (a property of the variant, the same in every panel).
  assert all(source[0].get_shared_x_axes().joined(source[0], ax) for ax in source[1:])
  assert [ax.get_ylabel() for ax in own] == [
    f"{d} test accuracy (%)" for d in ("Cifar-10", "Aircraft", "DTD")]


def test_table1_plot_is_one_panel_with_one_colour_per_variant(monkeypatch, tmp_path):
  figs = drawn_figures(monkeypatch)
  report.plot_source_nc1_vs_accuracy(table1_records(), str(tmp_path / "s.png"))
  (ax,) = visible_axes(figs[0])
  assert sorted(t.get_text() for t in ax.texts) == sorted(t for t, _, _ in _TABLE1)
  colours = {str(line.get_color()) for line in ax.get_lines()}
  assert len(colours) == 4  # no two variants share a colour
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.01", "0.1", "1", "10"]
  assert "r = +0.97" in ax.get_title()


def test_unit_sweep_rows_share_y_and_probe_plots_both_quantities(monkeypatch, tmp_path):
  figs = drawn_figures(monkeypatch)
  recs = table5_records()
  for r in recs:
    r["layerwise_nc1"] = {f"block{i}": r["nc1"] * (9 - i) for i in range(1, 9)}
  report.plot_layerwise_nc1(recs, str(tmp_path / "l.png"))
  axes = visible_axes(figs[0])
  assert [ax.get_title() for ax in axes[:4]] == [
    f"ResNet18 / Cifar-10: block{u} fine-tuned" for u in (1, 3, 5, 7)]
  row = axes[4:8]  # DTD
  assert all(row[0].get_shared_y_axes().joined(row[0], ax) for ax in row[1:])
  assert not axes[0].get_shared_y_axes().joined(axes[0], row[0])  # datasets differ
  assert row[0].get_ylabel() == "NC1 on the downstream training data"
  assert [l.get_label() for l in row[1].get_lines() if not l.get_label().startswith("_")] == [
    "Linear Probe", "Layer FT", "SCL FT", "Full Model FT"]
  report.plot_nc1_vs_accuracy(probe_records(), str(tmp_path / "p.png"))
  left = visible_axes(figs[1])[0]
  twin = [ax for ax in visible_axes(figs[1]) if ax.get_ylabel().startswith("NC1")][0]
  assert left.get_ylabel() == "linear-probe test accuracy (%)"
  assert twin.get_ylabel() == "NC1 on the Cifar-10 training data" and twin.get_yscale() == "log"
  report.plot_layerwise_nc1(fig2_records(), str(tmp_path / "f2.png"))
  (ax,) = visible_axes(figs[2])
  assert ax.get_ylabel() == "NC1 on the source training data" and ax.get_yscale() == "log"
  assert ax.get_xlabel() == "layer index (from the input)"


def test_nc1_vs_accuracy_layerwise_only(tmp_path):
  rec = make_records()[2]
  rec["layerwise_accuracy"] = {u: 50.0 + 10 * i for i, u in enumerate(_UNITS["resnet18"])}
  assert_png(report.plot_nc1_vs_accuracy([rec], str(tmp_path / "f9.png")))


def test_log_ticks_are_few_plain_numbers():
  assert plots._log_ticks(0.009, 11.0) == [0.01, 0.1, 1.0, 10.0]
  assert plots._log_ticks(0.08, 0.9) == [0.1, 0.2, 0.5]
  assert plots._log_ticks(0.42, 0.9) == [0.5, 0.6, 0.7, 0.8, 0.9]
  assert 3 <= len(plots._log_ticks(1.02, 1.3)) <= 7  # within a factor 1.3: still labelled
  assert len(plots._log_ticks(1e-9, 1e3)) <= 7
  assert [plots._tick_label(t) for t in (0.001, 0.05, 1.0, 2.5, 2000.0)] == [
    "0.001", "0.05", "1", "2.5", "2000"]


def test_pearson_r():
  assert report.pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  assert report.pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert math.isnan(report.pearson_r([1, 1, 1], [1, 2, 3]))


def test_no_jax_import_and_pyplot_untouched():
  code = ("import sys, ncjax.report as r, tempfile, os;"
          "d = tempfile.mkdtemp();"
          "import tests.test_report as t;"
          "[r.write_all(rs, tempfile.mkdtemp()) for rs in (t.make_records(), t.fig2_records(),"
          " t.fig5_records(), t.probe_records(), t.table5_records())];"
          "bad = [m for m in ('jax', 'flax', 'ncjax.models', 'ncjax.train', 'matplotlib.pyplot')"
          " if m in sys.modules];"
          "print('BAD', bad) if bad else print('OK')")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
  assert res.stdout.strip() == "OK", res.stdout + res.stderr


def test_inputs_not_mutated():
  for recs in (make_records(), table5_records(), fig2_records(), fig5_records(),
               probe_records()):
    snapshot = copy.deepcopy(recs)
    report.markdown_table(recs)
    report.unit_sweep_table(recs)
    report.report_markdown(recs)
    assert recs == snapshot


# ----------------------------------------------------------------------------- few-shot

# Table 2's numbers (1-shot, 5-shot accuracy; NC1 on the meta-test classes), with made-up
# ci95 and meta-train NC1.
_TABLE2 = {
  # (model, dataset): (acc 1-shot, acc 5-shot, nc1)
  ("convnet4", "cifar_fs"): (61.59, 77.45, 38.12),
  ("resnet12", "cifar_fs"): (68.61, 82.81, 29.13),
  ("seresnet12", "cifar_fs"): (69.99, 83.34, 28.40),
  ("convnet4", "miniimagenet"): (52.04, 69.07, 51.82),
  ("resnet12", "miniimagenet"): (59.52, 75.92, 28.24),
  ("seresnet12", "miniimagenet"): (60.21, 77.17, 25.58),
}


def fewshot_records(source_nc1=True):
  recs = []
  for (model, dataset), (a1, a5, nc1) in _TABLE2.items():
    for shots, acc, ci in ((5, a5, 0.6), (1, a1, 0.855)):  # 5-shot first: rows are sorted
      recs.append({
        "model": model, "dataset": dataset, "method": "fewshot", "unit": "",
        "stage": "fewshot", "ways": 5, "shots": shots, "queries": 15, "episodes": 600,
        "accuracy": acc, "ci95": ci, "nc1": nc1,
        "source_nc1": (nc1 / 10 if source_nc1 and dataset == "cifar_fs" else float("nan")),
        "num_train": 5 * (shots + 15), "layerwise_nc1": {}, "percent_params": float("nan"),
        "cdnv": 0.5, "numerical_rank": float("nan"), "pretrain": "", "weights": "pretrain",
        "seed": 0, "run": f"{model}-{dataset}-{shots}"})
  return recs


FEWSHOT_TABLE = """\
| Dataset | ConvNet4 | ResNet12 | SEResNet12 |
|:--|--:|--:|--:|
| **Few-shot accuracy (%, mean ± 95% CI over episodes)** |  |  |  |
| CIFAR-FS 5-way 1-shot | 61.59 ± 0.85 | 68.61 ± 0.85 | 69.99 ± 0.85 |
| CIFAR-FS 5-way 5-shot | 77.45 ± 0.60 | 82.81 ± 0.60 | 83.34 ± 0.60 |
| miniImageNet 5-way 1-shot | 52.04 ± 0.85 | 59.52 ± 0.85 | 60.21 ± 0.85 |
| miniImageNet 5-way 5-shot | 69.07 ± 0.60 | 75.92 ± 0.60 | 77.17 ± 0.60 |
| **NC1 (meta-test): penultimate NC1 on the meta-test classes** |  |  |  |
| CIFAR-FS | 38.1 | 29.1 | 28.4 |
| miniImageNet | 51.8 | 28.2 | 25.6 |
"""
FEWSHOT_SOURCE_ROWS = """\
| **NC1 (meta-train): penultimate NC1 on the meta-train classes** |  |  |  |
| CIFAR-FS | 3.81 | 2.91 | 2.84 |
"""


def test_fewshot_records_give_table2():
  recs = fewshot_records()
  assert set(report.split_kinds(recs)) == {"fewshot"}
  assert report.markdown_table(recs) == FEWSHOT_TABLE + FEWSHOT_SOURCE_ROWS
  assert report.fewshot_table(recs) == FEWSHOT_TABLE + FEWSHOT_SOURCE_ROWS
  # No finite meta-train NC1 anywhere: no meta-train section.
  assert report.markdown_table(fewshot_records(source_nc1=False)) == FEWSHOT_TABLE
  # The NC1 rows appear once per dataset, whatever the number of shots.
  md = report.markdown_table(recs)
  labels = [line.split(" | ")[0][2:] for line in md.splitlines()]
  assert labels.count("CIFAR-FS") == 2 and labels.count("miniImageNet") == 1


def test_fewshot_table_missing_cells_ci_and_variant_columns():
  recs = [r for r in fewshot_records(source_nc1=False)
          if not (r["model"] == "resnet12" and r["dataset"] == "miniimagenet"
                  and r["shots"] == 5)]
  recs[0]["ci95"] = None  # convnet4 / cifar_fs 5-shot: accuracy alone
  recs.append(dict(recs[0], model="convnet4", pretrain="aug", accuracy=70.0, ci95=1.0))
  md = report.fewshot_table(recs)
  lines = md.splitlines()
  assert lines[0] == ("| Dataset | ConvNet4 [\u2013] | ResNet12 | SEResNet12 | ConvNet4 [aug] |")
  assert "| CIFAR-FS 5-way 5-shot | 77.45 | 82.81 ± 0.60 | 83.34 ± 0.60 | 70.00 ± 1.00 |" in lines
  assert ("| miniImageNet 5-way 5-shot | 69.07 ± 0.60 | \u2013 | 77.17 ± 0.60 | \u2013 |"
          in lines)
  # The NC1 of ResNet12 on miniImageNet still comes from its 1-shot record.
  assert "| miniImageNet | 51.8 | 28.2 | 25.6 | \u2013 |" in lines


def test_fewshot_records_need_ways_and_shots():
  rec = fewshot_records()[0]
  del rec["shots"]
  with pytest.raises(ValueError, match="record 0: few-shot field 'shots'"):
    report.validate([rec])


def test_fewshot_write_all_plot_and_no_transfer_plots(monkeypatch, tmp_path):
  (tmp_path / "nc1_vs_accuracy.png").write_bytes(b"stale")  # from an earlier report
  paths = report.write_all(fewshot_records(), str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["nc1_vs_fewshot_accuracy.png", "results.csv", "results.json", "results.md"]
  assert sorted(os.listdir(tmp_path)) == names
  assert_png(str(tmp_path / "nc1_vs_fewshot_accuracy.png"))
  md = (tmp_path / "results.md").read_text()
  assert md.startswith("## Few-shot accuracy and NC1 on the meta-test classes (Table 2)\n")
  assert FEWSHOT_TABLE in md
  back = report.read_csv(str(tmp_path / "results.csv"))
  assert [(r["ways"], r["shots"], r["ci95"]) for r in back][:2] == [(5, 5, 0.6), (5, 1, 0.855)]
  assert report.fewshot_table(back) == report.fewshot_table(fewshot_records())

  figs = drawn_figures(monkeypatch)
  report.plot_nc1_vs_fewshot_accuracy(fewshot_records(), str(tmp_path / "f.png"))
  (fig,) = figs
  axes = visible_axes(fig)
  assert len(axes) == 2  # CIFAR-FS, miniImageNet
  for ax, d in zip(axes, ("CIFAR-FS", "miniImageNet")):
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == f"penultimate NC1 on the meta-test classes ({d})"
    assert sorted(t.get_text() for t in ax.texts) == sorted(
      ["ConvNet4", "ResNet12", "SEResNet12"] * 2)  # a point per (model, shots)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [l.split(" (")[0] for l in legend] == ["5-way 1-shot", "5-way 5-shot"]
    assert all("r = -" in l for l in legend)  # Table 2: more collapse, more accuracy
    markers = {c.get_paths()[0].vertices.shape for c in ax.collections}
    assert len(ax.collections) == 2 and len(markers) == 2  # one marker per shots


def test_fewshot_next_to_transfer_records_keeps_both():
  recs = make_records() + fewshot_records()
  kinds = report.split_kinds(recs)
  assert list(kinds) == ["transfer", "fewshot"]
  md = report.markdown_table(recs)
  assert "## Transfer results (Table 3)" in md and FEWSHOT_TABLE in md
  # Transfer plots only see the transfer records.
  assert report.plot_nc1_vs_fewshot_accuracy(make_records(), "unused.png") is None


# ----------------------------------------------------------------------------- configs


def test_fig13_and_fig14_configs_reuse_the_runs_of_fig5_and_table7():
  """Fig. 13 is Fig. 5's runs reported against each dataset's own NC1; Fig. 14 is Table 7's
  Layer FT / SCL FT / linear runs of ViT-B/32 with the class token as each layer's feature.
  Same run ids and fingerprints: a workdir of the one serves the other."""
  sys.path.insert(0, ROOT)
  from configs import fig5, fig13, fig14, table7
  from ncjax.experiment import spec

  def runs(c):
    return {r.id: dict(r.fingerprint) for s in spec.build(c) for r in s.runs()}
  assert runs(fig13.get_config()) == runs(fig5.get_config())
  f14, t7 = runs(fig14.get_config()), runs(table7.get_config())
  assert f14 and all(t7[k] == v for k, v in f14.items())
  assert sorted({k.split("-")[1] for k in f14}) == ["aircraft", "dtd", "oxford_iiit_pet"]
  assert sorted({"-".join(k.split("-")[2:]) for k in f14}) == [
    "layer-layer11", "layer-layer2", "layer-layer5", "layer-layer8", "linear",
    "scl-layer11", "scl-layer2", "scl-layer5", "scl-layer8"]
  (s,) = spec.build(fig14.get_config())
  assert s.backbones[0].options["pool"] == "cls"


def test_auto_unit_table_compares_each_seed_with_its_own_sweep():
  """Over seeds, a choice's "best swept unit" and its accuracy are its own seed's (so that
  accuracy + regret = that accuracy), and the row names the seed."""
  from ncjax.report import tables
  recs = []
  for seed, (a1, a2) in ((0, (70.0, 80.0)), (1, (90.0, 60.0))):
    recs += [record(method="layer", unit="block1", accuracy=a1, seed=seed),
             record(method="layer", unit="block2", accuracy=a2, seed=seed),
             record(method="layer", unit="block1", accuracy=a1, seed=seed, unit_selector="nc",
                    regret=max(a1, a2) - a1, unit_choice={"block1": {"nc1": 1.0},
                                                          "block2": {"nc1": 2.0}})]
  rows = rows_of(tables.auto_unit_table(recs).split("\n\n")[0])
  got = [(r[0].split(", ")[-1], r[5], r[6], r[7]) for r in rows[1:]]
  assert got == [("seed 0", "block2", "80.00", "10.00"), ("seed 1", "block1", "90.00", "0.00")]
