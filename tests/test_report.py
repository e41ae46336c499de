"""Tests for ncjax.report (records -> json/csv/markdown/png). numpy + matplotlib only."""

import copy
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from ncjax import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

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


def rows_of(md):
    """Markdown table -> list of cell lists (stripped), header included, rule row excluded."""
    out = []
    for line in md.strip().splitlines():
        if line.startswith("|:--"):
            continue
        assert line.startswith("| ") and line.endswith(" |"), line
        out.append([c.strip() for c in line[2:-2].split(" | ")])
    return out


# ----------------------------------------------------------------------------- markdown


def test_markdown_header_sections_and_row_order():
    rows = rows_of(report.markdown_table(make_records()))
    assert rows[0] == ["Method", "ResNet18 / Cifar-10", "ResNet18 / DTD",
                       "ResNet50 / Cifar-10", "ResNet50 / DTD"]
    labels = [r[0] for r in rows[1:]]
    methods = ["Linear Probe", "Layer FT", "SCL FT", "Full Model FT"]
    assert labels == (["**Transfer accuracy**"] + methods
                      + ["**NC1 evaluated on the penultimate layer feature**"] + methods
                      + ["**Percentage of parameters fine-tuned**"] + methods)
    # Section rows have empty value cells; every row has 1 + 4 cells.
    assert all(len(r) == 5 for r in rows)
    assert rows[1][1:] == ["", "", "", ""]


def test_markdown_exact_cells():
    rows = {(sec, r[0]): r[1:] for sec, r in _sectioned(report.markdown_table(make_records()))}
    assert rows[("Transfer accuracy", "Layer FT")] == ["92.12", "66.01", "94.04", "67.66"]
    assert rows[("Transfer accuracy", "Linear Probe")] == ["81.64", "60.16", "85.33", "68.46"]
    assert rows[("NC1 evaluated on the penultimate layer feature", "Layer FT")] == [
        "0.32", "1.80", "0.28", "1.68"]
    assert rows[("NC1 evaluated on the penultimate layer feature", "Full Model FT")] == [
        "0.08", "1.83", "0.17", "1.85"]
    pct = "Percentage of parameters fine-tuned"
    assert rows[(pct, "Layer FT")] == ["8.27%", "8.42%", "6.52%", "6.82%"]
    assert rows[(pct, "Linear Probe")] == ["0.05%", "0.22%", "0.09%", "0.41%"]
    assert rows[(pct, "Full Model FT")] == ["100%", "100%", "100%", "100%"]


def _sectioned(md):
    sec = None
    for r in rows_of(md)[1:]:
        if r[0].startswith("**"):
            sec = r[0].strip("*")
        else:
            yield sec, r


def test_markdown_missing_cell_and_unknown_method():
    recs = [r for r in make_records()
            if not (r["model"] == "resnet50" and r["dataset"] == "dtd" and r["method"] == "scl")]
    extra = dict(recs[0], method="lora", unit=None, accuracy=50.0)
    rows = {(s, r[0]): r[1:] for s, r in _sectioned(report.markdown_table(recs + [extra]))}
    assert rows[("Transfer accuracy", "SCL FT")] == ["93.11", "69.84", "94.94", "\u2013"]
    # Unknown methods come after the four known ones, displayed as-is.
    labels = [r[0] for s, r in _sectioned(report.markdown_table(recs + [extra]))
              if s == "Transfer accuracy"]
    assert labels == ["Linear Probe", "Layer FT", "SCL FT", "Full Model FT", "lora"]
    assert rows[("Transfer accuracy", "lora")] == ["50.00", "\u2013", "\u2013", "\u2013"]


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
    rows = [(s, r) for s, r in _sectioned(report.markdown_table(recs))]
    acc = {r[0]: r[1:] for s, r in rows if s == "Transfer accuracy"}
    labels = [r[0] for s, r in rows if s == "Transfer accuracy"]
    # Swept method: one row per unit, natural unit order, label includes unit. SCL FT is
    # not swept anywhere, so it keeps a plain label.
    assert labels == ["Linear Probe", "Layer FT (block1)", "Layer FT (block5)",
                      "Layer FT (block7)", "Layer FT (block8)", "Layer FT (block14)",
                      "SCL FT", "Full Model FT"]
    assert acc["Layer FT (block1)"] == ["91.23", "\u2013", "\u2013", "\u2013"]
    assert acc["Layer FT (block5)"] == ["92.12", "66.01", "\u2013", "\u2013"]
    assert acc["Layer FT (block8)"] == ["\u2013", "\u2013", "94.04", "67.66"]
    assert acc["Layer FT (block14)"] == ["\u2013", "\u2013", "\u2013", "71.81"]
    pct = {r[0]: r[1:] for s, r in rows if s == "Percentage of parameters fine-tuned"}
    assert pct["Layer FT (block7)"][0] == "33.02%"


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
    assert report.fmt_percent(8.271) == "8.27%"
    assert report.fmt_percent(100) == "100%"
    assert report.fmt_percent(99.999) == "100%"
    assert report.fmt_percent(99.5) == "99.50%"


def test_seeds_are_averaged_and_pretrain_and_sizes_split_columns():
    recs = [r for r in make_records() if r["model"] == "resnet18" and r["dataset"] == "cifar10"]
    lin = next(r for r in recs if r["method"] == "linear")
    recs.append(dict(lin, seed=1, accuracy=81.66))  # mean of 81.64 and 81.66 = 81.65
    acc = {r[0]: r[1:] for s, r in _sectioned(report.markdown_table(recs))
           if s == "Transfer accuracy"}
    assert acc["Linear Probe"] == ["81.65"]
    two_pre = recs + [dict(lin, pretrain="jft"), ]
    assert rows_of(report.markdown_table(two_pre))[0] == [
        "Method", "ResNet18 / Cifar-10", "ResNet18 [jft] / Cifar-10"]
    sizes = recs + [dict(lin, num_train=500, accuracy=70.0)]
    assert rows_of(report.markdown_table(sizes))[0] == [
        "Method", "ResNet18 / Cifar-10 (n=500)", "ResNet18 / Cifar-10 (n=50000)"]


def test_print_table(capsys):
    text = report.print_table(make_records())
    assert capsys.readouterr().out == text
    assert "| Layer FT | 92.12 |" in text


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
    np = pytest.importorskip("numpy")
    rec = make_records()[0]
    rec.update(accuracy=np.float32(92.5), num_train=np.int64(100),
               layerwise_nc1={"block1": np.float64(1.5)})
    back = report.read_json(report.write_json([rec], str(tmp_path / "r.json")))
    assert back[0]["accuracy"] == 92.5 and back[0]["num_train"] == 100
    assert back[0]["layerwise_nc1"] == {"block1": 1.5}


def test_csv_one_row_per_record_and_parses_back(tmp_path):
    recs = make_records()
    recs[3]["layerwise_accuracy"] = {"block1": 40.0}
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


def test_write_all_writes_files_and_plots(tmp_path):
    recs = make_records()
    # Fig. 9 data on one record, Fig. 11 data (two more sizes) for ResNet18 / Cifar-10.
    recs[2]["layerwise_accuracy"] = {u: 50.0 + 10 * i for i, u in enumerate(_UNITS["resnet18"])}
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
    assert "Unit sweeps" not in md  # no method was swept over units
    recs.append(dict(recs[1], unit="block7"))  # ResNet18/Cifar-10 SCL FT at block7 too
    md = open(report.write_all(recs, out, plots=False)[2]).read()
    assert "## Unit sweeps" in md and "| block7 |" in md and "### ResNet50" not in md


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


def test_nc1_vs_accuracy_layerwise_only(tmp_path):
    rec = make_records()[2]
    rec["layerwise_accuracy"] = {u: 50.0 + 10 * i for i, u in enumerate(_UNITS["resnet18"])}
    assert_png(report.plot_nc1_vs_accuracy([rec], str(tmp_path / "f9.png")))


def test_pearson_r():
    assert report.pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert report.pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(report.pearson_r([1, 1, 1], [1, 2, 3]))


def test_no_jax_import_and_pyplot_untouched():
    code = ("import sys, ncjax.report as r, tempfile, os;"
            "d = tempfile.mkdtemp();"
            "import tests.test_report as t;"
            "r.write_all(t.make_records(), d);"
            "bad = [m for m in ('jax', 'flax', 'ncjax.models', 'ncjax.train', 'matplotlib.pyplot')"
            " if m in sys.modules];"
            "print('BAD', bad) if bad else print('OK')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=root, timeout=60)
    assert res.stdout.strip() == "OK", res.stdout + res.stderr


def test_inputs_not_mutated():
    recs = make_records()
    snapshot = copy.deepcopy(recs)
    report.markdown_table(recs)
    report.unit_sweep_table(recs)
    assert recs == snapshot
