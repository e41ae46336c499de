"""`unit=auto` (ncjax.autounit): candidates by parameter budget, flop counts, validation, and
the choice end to end against the sweep it replaces."""
import dataclasses
import math

import jax
import pytest

from ncjax import models
from ncjax.experiment.stages import autounit
from ncjax.experiment import runner, spec as spec_lib
from ncjax.errors import ConfigError
from tiny_config import tiny_mlp_config

# MLP(depth 3, width 32) on digits' 8x8 = 64 inputs: Dense layers of (in x out) + out.
HAND = {"layer1": 64 * 32 + 32, "layer2": 32 * 32 + 32, "layer3": 32 * 32 + 32}


def _mlp_params(num_classes=5):
  model = models.get("mlp", num_classes, depth=3, width=32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.numpy.zeros((1, 8, 8, 1)))
  return model, params["params"]


def _config(units, **top):
  c = tiny_mlp_config("transfer")
  c.methods = ("layer",)
  c.backbone.default.unit = units
  for k, v in top.items():
    setattr(c, k, v)
  return c


def test_unit_fractions_match_a_hand_count():
  model, params = _mlp_params()
  total = sum(HAND.values())  # the head (32 x 5 + 5) is not part of the backbone
  got = autounit.unit_fractions(model, params)
  assert list(got) == ["layer1", "layer2", "layer3"]
  for u, n in HAND.items():
    assert got[u] == pytest.approx(n / total, rel=1e-12)


def test_the_budget_keeps_the_units_that_fit_and_none_fitting_is_an_error():
  model, params = _mlp_params()
  total = sum(HAND.values())
  spec = spec_lib.build(_config(("auto",), unit_budget=0.3))[0]
  run = next(r for r in spec.runs() if r.kind == "finetune")
  assert set(autounit.candidates(spec, run, model, params)) == {"layer2", "layer3"}  # 0.252
  tight = dataclasses.replace(spec, unit_budget=0.2)
  with pytest.raises(ConfigError, match=r"--config.unit_budget=0.2: no unit of mlp fits "
                     r"\(the smallest, layer2, holds 0.252"):
    autounit.candidates(tight, run, model, params)
  assert HAND["layer2"] / total == pytest.approx(0.2519, abs=1e-4)


def test_a_budget_no_unit_fits_stops_the_job_before_any_work(tmp_path):
  with pytest.raises(ConfigError, match=r"unit_budget=0.2: no unit of mlp fits"):
    runner.run(_config(("layer1", "auto"), unit_budget=0.2), str(tmp_path))
  assert not (tmp_path / "runs").exists()


def test_step_flops_count_the_dense_layers():
  """XLA's estimate of one inference example is the dense layers' 2*in*out multiply-adds
  plus a few elementwise ops (bias, ReLU, normalisation); a train step of B examples costs
  more than B inferences (the backward) and less for a later unit (a shorter backward)."""
  spec = spec_lib.build(_config(("layer1", "layer3")))[0]
  run = next(r for r in spec.runs() if r.kind == "finetune")
  from ncjax.experiment import assemble
  train_ds, _ = assemble.downstream(spec, run.backbone, "digits")
  matmuls = 2 * (64 * 32 + 32 * 32 + 32 * 32 + 32 * 5)
  step1, infer = autounit.step_flops(spec, run, "layer1", train_ds, 16)
  step3, infer3 = autounit.step_flops(spec, run, "layer3", train_ds, 16)
  assert infer == infer3
  assert matmuls <= infer < 1.1 * matmuls
  assert 16 * infer < step3 < step1 < 3.5 * 16 * infer
  c = _config(("layer1",))
  c.optim.update(dict(steps=0, epochs=3, schedule="step", decay_epochs=(1, 2)))
  stepped = spec_lib.build(c)[0]
  assert autounit.step_flops(stepped, run, "layer1", train_ds, 16)[0] == pytest.approx(
      step1, rel=1e-3)  # the schedule changes the learning rate, not the work


def test_auto_is_validated_ordered_last_and_fingerprinted():
  with pytest.raises(ConfigError) as e:
    spec_lib.build(_config(("auto", "layer9"), unit_budget=0.0, unit_probe_fraction=1.5))
  text = str(e.value)
  assert "--config.unit_budget=0.0: must be in (0, 1]" in text
  assert "--config.unit_probe_fraction=1.5: must be in (0, 1]" in text
  assert "unknown unit of mlp 'layer9'" in text and "auto" in text
  spec = spec_lib.build(_config(("auto", "layer1", "layer3"), unit_budget=0.5))[0]
  runs = [r for r in spec.runs() if r.kind == "finetune"]
  assert [r.unit for r in runs] == ["layer1", "layer3", "auto"]
  auto, plain = dict(runs[-1].fingerprint), dict(runs[0].fingerprint)
  assert auto["unit_budget"] == 0.5 and auto["unit_probe_fraction"] == 0.1
  assert "unit_budget" not in plain  # a swept run does not depend on the choice's settings


def test_the_choice_end_to_end_against_its_sweep(tmp_path):
  """The sweep over every unit, then `auto`: the lowest probe NC1 is chosen, its sweep run
  is reused, the regret is the best sweep accuracy minus the chosen one, and the costs are
  fractions of the sweep. The same choice without the sweep fine-tunes the chosen unit
  itself and gets the sweep's accuracy to the bit (same recipe, same seed)."""
  c = _config(("layer1", "layer2", "layer3", "auto"), unit_probe_fraction=0.25)
  c.optim.steps = 12
  c.pretrain.optim.steps = 20
  recs = runner.run(c, str(tmp_path / "sweep"))
  sweep = {r["unit"]: r for r in recs if not r["unit_choice"]}
  (auto,) = [r for r in recs if r["unit_choice"]]
  probes = auto["unit_choice"]
  assert set(probes) == set(sweep) == {"layer1", "layer2", "layer3"}
  assert auto["unit"] == min(probes, key=lambda u: probes[u]["nc1"])
  assert all(p["steps"] == 3 for p in probes.values())  # ceil(0.25 * 12)
  assert auto["accuracy"] == sweep[auto["unit"]]["accuracy"]
  assert auto["regret"] == max(r["accuracy"] for r in sweep.values()) - auto["accuracy"]
  assert 0 < auto["probe_cost_fraction"] < auto["cost_fraction"] < 1
  assert (tmp_path / "sweep/runs/mlp-digits-layer-auto/probe-layer2/record.json").exists()
  assert runner.run(c, str(tmp_path / "sweep")) == recs  # finished runs and probes are reused

  c.backbone.default.unit = ("auto",)
  (alone,) = runner.run(c, str(tmp_path / "alone"))
  timeless = lambda choice: {u: {k: v for k, v in p.items() if k != "wall_s"}
                             for u, p in choice.items()}
  assert alone["unit"] == auto["unit"]
  assert timeless(alone["unit_choice"]) == timeless(probes)
  assert alone["accuracy"] == auto["accuracy"] and math.isnan(alone["regret"])
  assert alone["cost_fraction"] == auto["cost_fraction"]


def test_probes_of_a_step_schedule_run_on_a_compressed_cosine(tmp_path):
  """A cell on RFS-style step decays (in epochs): its 2-step probes cannot hold the decays,
  so they run a cosine of their own length, and the chosen unit then gets the real schedule."""
  c = _config(("layer1", "layer3", "auto"))
  c.optim.update(dict(steps=0, epochs=4, schedule="step", decay_epochs=(2, 3)))
  c.pretrain.optim.schedule = "cosine"  # its 4 steps end before the fine-tuning decays
  recs = runner.run(c, str(tmp_path))
  (auto,) = [r for r in recs if r["unit_choice"]]
  assert all(p["steps"] == 2 for p in auto["unit_choice"].values())  # ceil(0.1 * 4 * 5)
  assert auto["steps"] == 20
  assert math.isnan(auto["regret"])  # the sweep lacks layer2: no regret against a partial one


# ----------------------------------------------------------------------------- Auto-RGN

def test_rgn_of_a_two_layer_model_by_hand():
  """`measure.relative_gradient_norms` against a float64 numpy backward pass of x -> tanh(x
  W1 + b1) -> tanh(. W2 + b2) -> . W3 + b3 -> softmax cross-entropy, on the run's first 5
  batches (the batch order written out from `train.batch_iterator`'s rule: epoch e is
  ``default_rng((seed, e)).permutation(n)``, each batch's indices sorted), per unit the mean
  of |dW|/|W| and |db|/|b| averaged over the batches."""
  import flax.linen as nn
  import numpy as np
  from ncjax import data, measure, train

  class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      h = jnp.tanh(nn.Dense(3, name="layer1")(x.reshape(len(x), -1)))
      h = jnp.tanh(nn.Dense(3, name="layer2")(h))
      return nn.Dense(2, name="head")(h)

  jnp = jax.numpy
  rng = np.random.default_rng(0)
  n, seed, bs = 12, 7, 4
  x = rng.integers(0, 256, size=(n, 2, 2, 1), dtype=np.uint8)  # -> x / 255 (N, 4)
  y = (np.arange(n) % 2).astype(np.int32)
  params = {k: {"kernel": rng.normal(size=s).astype(np.float32),
                "bias": rng.normal(size=s[1:]).astype(np.float32)}
            for k, s in (("layer1", (4, 3)), ("layer2", (3, 3)), ("head", (3, 2)))}
  model = TwoLayer()
  scores, flops = measure.relative_gradient_norms(
      train.model_forward(model), params, {}, data.Preprocess(np.zeros(1, np.float32),
                                                              np.ones(1, np.float32)),
      x, y, bs, seed,
      ("layer1", "layer2"))
  P = {k: {kk: vv.astype(np.float64) for kk, vv in v.items()} for k, v in params.items()}
  want = {"layer1": 0.0, "layer2": 0.0}
  order = [np.sort(np.random.default_rng((seed, e)).permutation(n)[j * bs:(j + 1) * bs])
           for e in range(2) for j in range(3)][:5]
  for idx in order:
    xb, yb = x[idx].reshape(len(idx), 4).astype(np.float64) / 255, y[idx]
    h1 = np.tanh(xb @ P["layer1"]["kernel"] + P["layer1"]["bias"])
    h2 = np.tanh(h1 @ P["layer2"]["kernel"] + P["layer2"]["bias"])
    z = h2 @ P["head"]["kernel"] + P["head"]["bias"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - np.eye(2)[yb]) / len(idx)
    dz2 = (d @ P["head"]["kernel"].T) * (1 - h2 ** 2)
    dz1 = (dz2 @ P["layer2"]["kernel"].T) * (1 - h1 ** 2)
    for u, a, dz in (("layer1", xb, dz1), ("layer2", h1, dz2)):
      rel = [np.linalg.norm(a.T @ dz) / np.linalg.norm(P[u]["kernel"]),
             np.linalg.norm(dz.sum(0)) / np.linalg.norm(P[u]["bias"])]
      want[u] += np.mean(rel) / 5
  assert scores == pytest.approx(want, rel=1e-5)
  assert flops > 0
  # A tensor with |theta| = 0 has no relative norm and is left out.
  zero = {"layer1": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}}
  got = measure.tensor_rgn(zero, {"layer1": {"kernel": np.full((2, 2), 3.0),
                                             "bias": np.ones(2)}}, ("layer1",))
  assert got == {"layer1": pytest.approx(3.0)}


def test_rgn_and_nc_choose_side_by_side(tmp_path):
  """unit_selector 'both': the NC run keeps its id and fingerprint, Auto-RGN's gets
  ``-auto-rgn``; RGN chooses its largest score (normalised to 1), costs 5 gradient
  evaluations (less than NC's probes here) and is compared to the same sweep."""
  c = _config(("layer1", "layer2", "layer3", "auto"), unit_probe_fraction=0.25,
              unit_selector="both")
  c.optim.steps = 12
  c.pretrain.optim.steps = 20
  spec = spec_lib.build(c)[0]
  runs = [r for r in spec.runs() if r.kind == "finetune"]
  assert [r.id for r in runs][-2:] == ["mlp-digits-layer-auto", "mlp-digits-layer-auto-rgn"]
  assert "unit_selector" not in dict(runs[-2].fingerprint)
  assert dict(runs[-1].fingerprint)["unit_selector"] == "rgn"
  recs = runner.run(c, str(tmp_path))
  sweep = {r["unit"]: r for r in recs if not r["unit_choice"]}
  nc, rgn = [r for r in recs if r["unit_choice"]]
  assert (nc["unit_selector"], rgn["unit_selector"]) == ("nc", "rgn")
  scores = {u: c["rgn"] for u, c in rgn["unit_choice"].items()}
  assert max(scores.values()) == 1.0 and scores[rgn["unit"]] == 1.0
  assert rgn["accuracy"] == sweep[rgn["unit"]]["accuracy"]
  assert rgn["regret"] == max(r["accuracy"] for r in sweep.values()) - rgn["accuracy"]
  assert 0 < rgn["probe_cost_fraction"] < nc["probe_cost_fraction"]
  md = (tmp_path / "results.md").read_text()
  assert "| RGN |" in md and "| NC |" in md and "Auto-RGN: mean relative gradient norm" in md
