"""Job 'rank' (ncjax.ranking): the summary against hand-made records and scipy, the
estimators' validation, a source head's class count, and the job end to end."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from ncjax import report, transferability, weights
from ncjax.experiment import runner, spec as spec_lib
from ncjax.experiment.stages import score as ranking
from ncjax.errors import ConfigError
from tiny_config import tiny_mlp_config


def _score(tag, nc1, logme, terms, leep=float("nan")):
  scores = {"nc1": -nc1, "logme": logme, "leep": leep,
            **dict(zip(ranking.NCTI_TERMS, terms))}
  return dict(stage="score", model="mlp", dataset="digits", method="score", unit="",
              candidate=f"{tag}/mlp", pretrain=tag, nc1=nc1, scores=scores,
              score_wall_s={"nc1": 0.1, "logme": 0.2, "leep": 0.3, "ncti": 0.4},
              num_train=100, weights="pretrain", wall_s=1.0)


def _cell(tag, method, accuracy):
  return dict(stage="transfer", model="mlp", dataset="digits", method=method,
              unit="layer2" if method == "layer" else "", pretrain=tag, accuracy=accuracy,
              percent_params=10.0, wall_s=5.0)


def test_summarize_joins_scores_and_accuracies_and_ranks_them_like_scipy():
  tags = ["a", "b", "c", "d"]
  nc1 = [0.5, 1.0, 2.0, 0.8]
  logme = [1.2, 0.9, 0.1, 0.3]
  terms = [(3.0, 0.9, -4.0), (2.0, 0.8, -5.0), (1.0, 0.5, -6.0), (2.5, 0.7, -4.5)]
  leep = [-0.5, float("nan"), -1.5, -0.7]   # b has no source classifier
  linear = [90.0, 80.0, 60.0, 85.0]
  layer = [95.0, 96.0, 70.0, 97.0]
  results = [_score(t, n, l, tm, lp) for t, n, l, tm, lp in zip(tags, nc1, logme, terms, leep)]
  results += [_cell(t, "linear", a) for t, a in zip(tags, linear)]
  results += [_cell(t, "layer", a) for t, a in zip(tags, layer)]
  out = ranking.summarize(results)
  assert [(r["method"], r["candidate"]) for r in out] == \
      [("linear", f"{t}/mlp") for t in tags] + [("layer", f"{t}/mlp") for t in tags]
  lin = out[:4]
  assert [r["accuracy"] for r in lin] == linear
  assert [r["score_nc1"] for r in lin] == [-v for v in nc1]
  # NCTI: min-max normalised terms over the four candidates, summed.
  t = np.array(terms)
  want = ((t - t.min(0)) / (t.max(0) - t.min(0))).sum(1)
  np.testing.assert_allclose([r["score_ncti"] for r in lin], want, rtol=1e-12)
  for e, column in (("nc1", [-v for v in nc1]), ("logme", logme), ("ncti", list(want))):
    assert lin[0][f"kendall_tau_{e}"] == pytest.approx(stats.kendalltau(column, linear)[0])
    assert lin[0][f"weighted_tau_{e}"] == pytest.approx(stats.weightedtau(column, linear)[0])
  # LEEP: only the three candidates with a source classifier are ranked.
  keep = [0, 2, 3]
  assert lin[0]["kendall_tau_leep"] == pytest.approx(
      stats.kendalltau([leep[i] for i in keep], [linear[i] for i in keep])[0])
  assert out[4]["kendall_tau_nc1"] == pytest.approx(
      stats.kendalltau([-v for v in nc1], layer)[0])
  assert lin[1]["seconds_ncti"] == 0.4 and lin[1]["finetune_wall_s"] == 5.0


def test_estimators_are_validated():
  c = tiny_mlp_config("rank")
  c.rank.estimators = ("nc1", "logmee")
  with pytest.raises(ConfigError, match=r"--config.rank.estimators=nc1,logmee: unknown "
                     r"estimator 'logmee', did you mean 'logme'\?"):
    spec_lib.build(c)
  c.rank.estimators = ()
  with pytest.raises(ConfigError, match=r"--config.rank.estimators=: must name at least one"):
    spec_lib.build(c)


def test_head_classes_reads_a_torchvision_file(tmp_path):
  from test_weights import torchvision_state_dict
  sd, _ = torchvision_state_dict("resnet18", shapes_only=False, num_classes=7)
  path = str(tmp_path / "r18.npz")
  np.savez(path, **sd)
  assert weights.head_classes(path, "resnet18") == 7
  headless = str(tmp_path / "headless.npz")
  np.savez(headless, **{k: v for k, v in sd.items() if not k.startswith("fc.")})
  assert weights.head_classes(headless, "resnet18") is None
  assert weights.head_classes(str(tmp_path), "resnet18") is None


def test_rank_job_end_to_end(tmp_path):
  """A zoo of three tiny pre-trainings (CE short / long, MSE) ranked for digits 5-9: one
  rank record per candidate and method, LEEP only where the source classifier is a CE
  head, taus that match the columns, and a report with the table and the plot."""
  c = tiny_mlp_config("rank")
  c.methods = ("linear",)
  c.variants = (dict(tag="ce4", overrides={"pretrain.optim.steps": 4}),
                dict(tag="ce40", overrides={"pretrain.optim.steps": 40}),
                dict(tag="mse", overrides={"pretrain.loss": "mse", "pretrain.optim.lr": 0.01,
                                           "pretrain.optim.steps": 40}))
  c.optim.steps = 30
  recs = runner.run(c, str(tmp_path))
  assert [r["candidate"] for r in recs] == ["ce4/mlp", "ce40/mlp", "mse/mlp"]
  assert all(r["stage"] == "rank" and r["method"] == "linear" for r in recs)
  leep = [r["score_leep"] for r in recs]
  assert leep[0] < 0 and leep[1] < 0 and math.isnan(leep[2])
  for r in recs:
    assert r["score_nc1"] == -r["nc1"] < 0 and r["score_hscore"] > 0
    assert 0 <= r["score_ncti"] <= 3 and 20 < r["accuracy"] <= 100
  for e in transferability.ESTIMATORS:
    column = [r[f"score_{e}"] for r in recs]
    if e == "leep":
      column, truth = column[:2], [r["accuracy"] for r in recs[:2]]
    else:
      truth = [r["accuracy"] for r in recs]
    want = transferability.kendall_tau(column, truth) if len(set(truth)) > 1 else float("nan")
    assert recs[0][f"kendall_tau_{e}"] == pytest.approx(want, nan_ok=True)
  md = open(tmp_path / "results.md").read()
  assert "Ranking pre-trained models" in md and "Kendall tau" in md and "LogME" in md
  assert os.path.exists(tmp_path / "scores_vs_accuracy.png")
  back = report.read_csv(str(tmp_path / "results.csv"))
  assert [r["score_logme"] for r in back] == pytest.approx([r["score_logme"] for r in recs])
  from ncjax import io
  assert io.dumps(runner.run(c, str(tmp_path))) == io.dumps(recs)  # all reused


def test_weights_file_candidates_use_their_own_source_head(tmp_path):
  """A torchvision-layout file (random weights, a 7-class source head) scored without
  pre-training: LEEP comes from the file's own head, and the source probabilities are the
  softmax of the file's logits (checked against the model applied directly)."""
  import jax
  from ncjax import models, train
  from ncjax.experiment import assemble
  from test_weights import torchvision_state_dict
  c = tiny_mlp_config("rank")
  c.pretrain.enabled = False
  c.models = ("resnet18",)
  c.methods = ("linear",)
  c.optim.steps = 3
  for i, name in enumerate(c.models):
    sd, _ = torchvision_state_dict(name, seed=i, num_classes=7, stem="cifar", width=8)
    np.savez(tmp_path / f"{name}.npz", **sd)
    c.backbone[name] = dict(c.backbone.default, weights=str(tmp_path / f"{name}.npz"),
                            unit=(), channels=3, options={"stem": "cifar", "width": 8})
  recs = runner.run(c, str(tmp_path / "w"))
  assert [r["candidate"] for r in recs] == ["resnet18"]
  assert np.isfinite(recs[0]["score_leep"]) and recs[0]["score_leep"] < 0
  (s,) = spec_lib.build(c)
  run = next(r for r in s.runs() if r.kind == "score")
  ds = assemble.materialize(s, assemble.load_split(s, "digits", "train", run.backbone,
                                                   s.downstream_classes))
  probs = ranking.source_probs(s, run, None, ds, train.data_mesh())
  model = models.get("resnet18", 7, stem="cifar", width=8)
  variables = weights.load(run.backbone.weights_path, "resnet18", assemble.init_variables(
      model, assemble.input_shape(run.backbone, ds), 0), keep_head=True)
  prepare = assemble.prepare_for(run.backbone, ds, 1)
  logits = model.apply(variables, prepare(None, ds.images[:50], False), train=False)
  np.testing.assert_allclose(probs[:50], jax.nn.softmax(np.asarray(logits, np.float64)),
                             atol=1e-5)
  assert probs.shape == (len(ds), 7)
  assert recs[0]["score_leep"] == pytest.approx(transferability.leep(probs, ds.labels))


def test_a_degenerate_candidate_is_named_and_ranked_last_after_a_json_round_trip():
  """A candidate whose features are constant scores -inf (transferability.WORST); JSON keeps
  it as null, so `score` lists it in ``degenerate`` and `summarize` ranks it below all."""
  from ncjax import io
  tags = ["a", "b", "c"]
  results = [_score("a", 0.5, 1.2, (3.0, 0.9, -4.0)), _score("b", 1.0, 0.9, (2.0, 0.8, -5.0)),
             _score("c", 1.0, 0.0, (1.0, 0.5, -6.0))]
  dead = results[2]
  dead["scores"] = {k: -np.inf for k in dead["scores"] if k != "leep"} | {"leep": np.nan}
  dead["degenerate"], dead["nc1"] = ["logme", "ncti", "nc1"], np.nan
  results += [_cell(t, "linear", a) for t, a in zip(tags, [90.0, 80.0, 95.0])]
  out = ranking.summarize(json.loads(io.dumps(results)))
  assert [r["score_nc1"] for r in out] == [-0.5, -1.0, -np.inf]
  assert out[2]["score_logme"] == -np.inf and out[2]["score_ncti"] == -np.inf
  assert out[2]["degenerate"] == ["logme", "ncti", "nc1"] and out[0]["degenerate"] == []
  # c is last by every score although it fine-tunes best: tau as scipy's with c ranked last.
  want = stats.kendalltau([-0.5, -1.0, -99.0], [90.0, 80.0, 95.0])[0]
  assert out[0]["kendall_tau_nc1"] == pytest.approx(want)
  assert out[0]["kendall_tau_logme"] == pytest.approx(want)
