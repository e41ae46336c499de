"""Results records -> JSON / CSV / Markdown tables / PNG plots that read like the paper.

This package only formats what the jobs produced (`schema`: the record, its checks and
files; `format`: names, numbers, grouping; `tables`; `plots`); it imports numpy, json, csv
and (lazily, inside the plotting functions) matplotlib through the Agg canvas. It never
imports jax, the models or the training code, and it never touches pyplot's global state.

Results records
---------------
A record is a dict (``ncjax.report.schema.Record.to_dict()``). Required fields
(``REQUIRED_FIELDS``):

* ``model`` (str): model name as in ``ncjax.models.get`` (``resnet18``, ``vit_b32``, ...).
* ``dataset`` (str): downstream dataset name (``cifar10``, ``dtd``, ``folder:<dir>`` ...);
  the source dataset for pre-training records.
* ``method`` (str): ``linear`` | ``layer`` | ``scl`` | ``full`` (others are shown as-is).
* ``unit`` (str or None): the fine-tuned unit (``block5``, ``layer8``); None or "" for
  methods without one.
* ``accuracy`` (float): test accuracy in **percent** (0-100).
* ``nc1`` (float): NC1 of the penultimate feature on the *training* data of ``dataset``.
* ``cdnv`` (float): class-distance normalised variance of the penultimate feature.
* ``numerical_rank`` (float): numerical rank of the penultimate feature.
* ``percent_params`` (float): share of the model's parameters fine-tuned, in **percent**.
* ``layerwise_nc1`` (dict unit -> float): NC1 of each unit's pooled feature on the same
  training data, in network order (may be empty).
* ``num_train`` (int): number of training examples used.

Optional fields: ``stage`` (``transfer`` | ``pretrain`` | ``probe``; a record without one is
a probe when it has ``layerwise_accuracy``, else a transfer), ``layerwise_accuracy`` (dict
unit -> percent: a linear probe on each unit's feature, Fig. 9), ``pretrain`` (the tag of the
pre-training variant), ``loss`` (pre-training loss), ``source_nc1`` / ``source_accuracy``
(the pre-trained model on its source data), ``seed``, ``wall_s``. Any other field is carried
through JSON and CSV. Numeric fields may be None or NaN (shown as "–"); a *missing* required
field is an error (``ValueError`` naming the field and the record's index).

What the report shows (``split_kinds``)
---------------------------------------
* **pretrain** records (Fig. 2): ``layerwise_nc1_table`` (rows = layers, columns = model /
  source dataset / loss or variant) and ``layerwise_nc1.png`` (NC1 against layer, log y).
* **transfer** records (Tables 3, 5-7, Figs. 10, 11, 14): ``transfer_table`` (Table 3: a
  column per (model, dataset), rows = methods, one row per unit for a unit sweep), with
  ``best_unit_table`` (Table 4) when a method was swept over units; ``layerwise_nc1.png``
  (Figs. 10 / 14: one panel per fine-tuned unit), ``nc1_vs_accuracy.png`` (accuracy against
  penultimate NC1 per dataset), ``accuracy_vs_size.png`` (Fig. 11).
* **variants**: transfer records of several pre-training variants of a model that carry the
  source NC1 (Table 1, Figs. 3-5, 13). One downstream dataset: Table 1's layout (a column
  per variant); several: ``variant_table`` (a row per variant). ``correlation_table`` gives
  Pearson's r of transfer accuracy with log10 NC1 (source data, the reference dataset of
  Fig. 5, the dataset itself). Plots: ``source_nc1_vs_accuracy.png`` (Table 1, Figs. 3, 4),
  ``nc1_vs_accuracy.png`` (Fig. 13: NC1 on each downstream dataset itself) and, with several
  downstream datasets, ``reference_nc1_vs_accuracy.png`` (Fig. 5: NC1 on CIFAR-10).
* **probe** records (Fig. 9): ``probe_table`` (rows = layers: probe accuracy, NC1) and
  ``nc1_vs_accuracy.png`` (left: accuracy and NC1 against layer; right: accuracy against NC1).
* **fewshot** records (Table 2; ``stage == "fewshot"``, one per (model, dataset, shots)
  with ``ways``, ``shots``, ``ci95`` and ``source_nc1`` = NC1 on the meta-train classes):
  ``fewshot_table`` (a column per model; accuracy ± ci95 per (dataset, ways, shots), NC1 on
  the meta-test / meta-train classes per dataset) and ``nc1_vs_fewshot_accuracy.png``.

A plot is only written when the records support it (e.g. no NC1 plot when NC1 was not
measured, no source plot without a variant sweep).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from ncjax.io import atomic_write
from ncjax.report.schema import (
    OPTIONAL_FIELDS, REQUIRED_FIELDS, Record, read_csv, read_json, stage, validate, write_csv,
    write_json,
)
from ncjax.report.format import (
    DATASET_NAMES, ESTIMATOR_NAMES, LOSS_NAMES, METHOD_NAMES, MISSING, MODEL_NAMES,
    dataset_name, fmt_accuracy, fmt_accuracy_ci, fmt_nc1, fmt_percent, fmt_r, fmt_sig,
    is_variant_sweep, method_name, model_name, pearson_r, reference_dataset, split_kinds,
)
from ncjax.report.tables import (
    auto_unit_table, best_unit_table, correlation_table, fewshot_table, layerwise_nc1_table,
    markdown_table, print_table, probe_table, rank_table, report_markdown, transfer_table,
    unit_sweep_table, variant_table,
)
from ncjax.report.plots import (
    plot_accuracy_vs_size, plot_layerwise_nc1, plot_nc1_vs_accuracy,
    plot_nc1_vs_fewshot_accuracy, plot_reference_nc1_vs_accuracy, plot_scores_vs_accuracy,
    plot_source_nc1_vs_accuracy, PLOTS,
)

__all__ = [
    "REQUIRED_FIELDS",
    "OPTIONAL_FIELDS",
    "METHOD_NAMES",
    "MODEL_NAMES",
    "DATASET_NAMES",
    "validate",
    "stage",
    "split_kinds",
    "is_variant_sweep",
    "reference_dataset",
    "write_json",
    "read_json",
    "write_csv",
    "read_csv",
    "markdown_table",
    "transfer_table",
    "best_unit_table",
    "auto_unit_table",
    "unit_sweep_table",
    "variant_table",
    "correlation_table",
    "layerwise_nc1_table",
    "probe_table",
    "fewshot_table",
    "print_table",
    "plot_layerwise_nc1",
    "plot_nc1_vs_accuracy",
    "plot_source_nc1_vs_accuracy",
    "plot_reference_nc1_vs_accuracy",
    "plot_accuracy_vs_size",
    "plot_nc1_vs_fewshot_accuracy",
    "rank_table",
    "plot_scores_vs_accuracy",
    "pearson_r",
    "report_markdown",
    "write_all",
    "Record",
    "LOSS_NAMES",
    "ESTIMATOR_NAMES",
    "MISSING",
    "PLOTS",
    "dataset_name",
    "method_name",
    "model_name",
    "fmt_accuracy",
    "fmt_accuracy_ci",
    "fmt_nc1",
    "fmt_percent",
    "fmt_r",
    "fmt_sig",
]


def write_all(records: Sequence[Mapping], workdir: str, plots: bool = True) -> list[str]:
  """Writes ``results.json``, ``results.csv``, ``results.md`` (`report_markdown`) and, if
  ``plots``, the PNGs of `PLOTS` that the records support into ``workdir``; a PNG of `PLOTS`
  left there by an earlier report that these records do not support is removed, so the
  workdir never shows a plot of other results. Returns the paths written."""
  records = validate(records)
  os.makedirs(workdir, exist_ok=True)
  paths = [
      write_json(records, os.path.join(workdir, "results.json")),
      write_csv(records, os.path.join(workdir, "results.csv")),
      atomic_write(os.path.join(workdir, "results.md"), report_markdown(records)),
  ]
  if plots:
    for name, fn in PLOTS:
      target = os.path.join(workdir, name)
      p = fn(records, target)
      if p is not None:
        paths.append(p)
      elif os.path.exists(target):
        os.remove(target)
  return paths
