"""Tests of the parameter-efficient methods (issue 19): BitFit, LoRA, LP-FT, VPT, in the one
masked train step."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import lora, methods, models, train
from ncjax.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import _count_convs, _small_resnet  # noqa: E402


def _abstract(name, k=10, image_size=224, **options):
  return models.param_shapes(name, k, image_size=image_size, **options)["params"]


def _leaves(tree):
  return {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- BitFit

@pytest.mark.parametrize("name,image_size", [("resnet18", 32), ("vit_ti16", 32), ("mlp", 28)])
def test_bitfit_mask_selects_exactly_biases_norms_and_head(name, image_size):
  params = _abstract(name, image_size=image_size, **({"depth": 3} if name == "mlp" else {}))
  for path, m in _leaves(methods.trainable_mask(params, "bitfit")).items():
    leaf = path.rsplit("'", 2)[-2]
    assert m == (path.startswith("['head']") or leaf in ("bias", "scale")), path


def _vit_b32_counts(k, grid=49, d=768, mlp=3072, layers=12):
  """Hand counts of ViT-B/32 at 224 (7 x 7 patches): (all parameters, BitFit's, LoRA's per
  rank on attention + MLP)."""
  head = d * k + k
  per_layer = (2 * d) * 2 + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  total = (32 * 32 * 3 * d + d) + d + (1 + grid) * d + layers * per_layer + 2 * d + head
  bias_norm = layers * (2 * d + 3 * d + d + 2 * d + mlp + d) + d + 2 * d  # + embedding, final LN
  lora_per_rank = layers * (4 * (d + d) + (d + mlp) + (mlp + d))
  return total, bias_norm + head, lora_per_rank


def _resnet18_counts(k):
  """Hand counts of ImageNet ResNet-18: (all parameters, BitFit's, LoRA's per rank on the
  units' convolutions)."""
  convs = [(7, 3, 64)]   # (k, C_in, C_out) of every conv, stem first
  bns = [64]
  lora_convs = []
  c_in = 64
  for c in (64, 64, 128, 128, 256, 256, 512, 512):
    block = [(3, c_in, c), (3, c, c)] + ([(1, c_in, c)] if c_in != c else [])
    convs += block
    lora_convs += block
    bns += [c for _ in block]
    c_in = c
  conv = sum(kk * kk * ci * co for kk, ci, co in convs)
  head = 512 * k + k
  return (conv + 2 * sum(bns) + head, 2 * sum(bns) + head,
          sum(kk * kk * ci + co for kk, ci, co in lora_convs))


def test_bitfit_and_lora_parameter_counts_by_hand():
  k = 10
  total, bitfit, lora_r = _vit_b32_counts(k)
  params = _abstract("vit_b32", k)
  assert methods.count(params) == total == 87_455_232 + 768 * k + k  # timm: 88.2M with 1000 classes
  assert methods.count(params, methods.trainable_mask(params, "bitfit")) == bitfit
  for r in (4, 16):
    p = lora.add(params, ("attention", "mlp"), r, 0, models.units("vit_b32"))
    mask = methods.trainable_mask(p, "lora")
    assert lora.count(p) == r * lora_r
    assert methods.count(p, mask) == r * lora_r + 768 * k + k
    # Adapters count as trained; the denominator stays the backbone plus head.
    assert methods.percent_trainable(p, mask) == pytest.approx(
        100 * (r * lora_r + 768 * k + k) / total, rel=1e-12)
  total, bitfit, lora_r = _resnet18_counts(k)
  params = _abstract("resnet18", k)
  assert methods.count(params) == total
  assert methods.count(params, methods.trainable_mask(params, "bitfit")) == bitfit
  p = lora.add(params, ("conv",), 8, 0, models.units("resnet18"))
  assert lora.count(p) == 8 * lora_r
  assert methods.percent_trainable(p, methods.trainable_mask(p, "lora")) == pytest.approx(
      100 * (8 * lora_r + 512 * k + k) / total, rel=1e-12)


def test_jaxpr_no_gradient_for_frozen_kernels():
  """Convolutions in the step's jaxpr (ResNet-18, CIFAR stem: 20 convolutions, see
  test_train.test_no_backward_pass_through_frozen_prefix). BitFit trains every BatchNorm, so
  the backward pass runs down to the stem's BN: 20 forward + 19 input gradients (every conv
  above the stem) + no weight gradient = 39. LoRA on block8 only: 20 forward + block8's 2
  weight gradients (of the merged kernels) + 1 input gradient (block8's conv2, down to conv1)
  = 23 -- nothing runs below block8. LoRA on every unit conv: 20 + 19 weight gradients (not
  the stem's) + 18 input gradients (not block1's conv1) = 57; full FT is 59."""
  model, v, x, y = _small_resnet()
  units = models.units(model)
  cases = {("bitfit", None): 39, ("lora", ("block8/conv",)): 23, ("lora", ("conv",)): 57}
  for (method, targets), n in cases.items():
    params, forward = v["params"], train.model_forward(model)
    if targets:
      params = lora.add(params, targets, 2, 0, units)
      forward = lora.forward(forward, 1.0)
    mask = methods.trainable_mask(params, method)
    tx = train.make_optimizer(train.OptimConfig(), 10, mask)
    state = train.init_state(params, v["batch_stats"], tx)
    step = train.make_train_step(forward, tx, mask)
    assert _count_convs(jax.make_jaxpr(step)(state, x, y, jax.random.PRNGKey(0)).jaxpr) == n, \
        (method, targets)


def test_bitfit_step_keeps_kernels_bit_identical():
  model, v, x, y = _small_resnet()
  mask = methods.trainable_mask(v["params"], "bitfit")
  tx = train.make_optimizer(train.OptimConfig(lr=0.05), 4, mask)
  state = train.init_state(v["params"], v["batch_stats"], tx)
  step = jax.jit(train.make_train_step(train.model_forward(model), tx, mask))
  new, _ = step(state, x, y, jax.random.PRNGKey(0))
  before, after = _leaves(v["params"]), _leaves(new.params)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and all(p.endswith(("['bias']", "['scale']")) or p.startswith("['head']")
                         for p in changed)
  assert not any(p.endswith("['kernel']") and not p.startswith("['head']") for p in changed)


# ----------------------------------------------------------------------------- LoRA

def _tiny_vit(k=3, **kw):
  model = models.get("vit_ti16", k, **kw).clone(num_layers=2, hidden_size=16, num_heads=2,
                                                mlp_dim=32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  return model, x


def test_lora_with_b_zero_is_the_base_model_exactly_and_merge_matches():
  model, x = _tiny_vit()
  v = model.init(jax.random.PRNGKey(0), x[:1])
  # A non-zero head, so the logits depend on the backbone.
  v = {"params": {**v["params"], "head": {
      "kernel": jax.random.normal(jax.random.PRNGKey(1), v["params"]["head"]["kernel"].shape),
      "bias": v["params"]["head"]["bias"]}}}
  base = train.model_forward(model)
  p = lora.add(v["params"], ("attention", "mlp"), 4, 0, models.units(model))
  assert len(lora.targeted(p, ("attention", "mlp"), models.units(model))) == 2 * 6
  fwd = lora.forward(base, 2.0)
  np.testing.assert_array_equal(fwd(p, {}, x, False)[0], base(v["params"], {}, x, False)[0])
  # Random B: the merged export is a plain model computing the same function.
  p = jax.tree_util.tree_map_with_path(
      lambda path, a: jax.random.normal(jax.random.PRNGKey(2), a.shape) * 0.1
      if methods._leaf_name(path) == "lora_b" else a, p)
  merged = lora.merge(p, 2.0)
  assert jax.tree.structure(merged) == jax.tree.structure(v["params"])
  got = base(merged, {}, x, False)[0]
  np.testing.assert_allclose(got, fwd(p, {}, x, False)[0], atol=1e-6)
  assert not np.allclose(got, base(v["params"], {}, x, False)[0], atol=1e-3)
  # The merged query kernel by hand, float64: W + s * (A @ B) reshaped (D, H, D_h).
  q = p["layer1"]["MultiHeadDotProductAttention_1"]["query"]
  want = np.asarray(q["kernel"], np.float64) + 2.0 * (
      np.asarray(q["lora_a"], np.float64) @ np.asarray(q["lora_b"], np.float64)).reshape(16, 2, 8)
  np.testing.assert_allclose(merged["layer1"]["MultiHeadDotProductAttention_1"]["query"]["kernel"],
                             want, rtol=1e-6, atol=1e-7)


def test_lora_conv_kernel_reshape_by_hand():
  model, v, x, _ = _small_resnet()
  p = lora.add(v["params"], ("block3/conv",), 3, 0, models.units(model))
  sites = lora.targeted(p, ("block3/conv",), models.units(model))
  shapes = {path: fans for path, fans in sites}
  k = v["params"]["block3"]["conv1"]["kernel"].shape  # (3, 3, C_in, C_out)
  assert shapes[("block3", "conv1")] == (9 * k[2], k[3])
  assert p["block3"]["conv1"]["lora_a"].shape == (9 * k[2], 3)
  bound = 1 / np.sqrt(9 * k[2])
  assert float(jnp.max(jnp.abs(p["block3"]["conv1"]["lora_a"]))) <= bound
  assert lora.check_targets(("nope", "block9/conv", "layer1/query"), models.units(model)) == [
      "unknown LoRA target 'nope' (kinds: query, key, value, out, attention, mlp, conv, dense, "
      "optionally as <unit>/<kind>)",
      "LoRA target 'block9/conv': 'block9' is not a unit (units: block1, block2, block3, block4, "
      "block5, block6, block7, block8)",
      "LoRA target 'layer1/query': 'layer1' is not a unit (units: block1, block2, block3, "
      "block4, block5, block6, block7, block8)"]
  with pytest.raises(ValueError, match="select no kernel"):
    lora.add(v["params"], ("query",), 2, 0, models.units(model))
  with pytest.raises(ValueError, match="no LoRA factors"):
    methods.trainable_mask(v["params"], "lora")


# ----------------------------------------------------------------------------- LP-FT

def _tiny_problem():
  from test_train import _tiny_problem as tp
  return tp()


def _lp_ft(tmp, on_log=None):
  model, v, x, y, prepare = _tiny_problem()
  lin, full = methods.phase_masks(v["params"], "lp_ft")
  return train.train_phases(train.model_forward(model), v["params"], {}, [(lin, 4), (full, 6)],
                            train.OptimConfig(lr=0.1), x, y, batch_size=16, seed=3,
                            prepare=prepare, checkpoint_dir=tmp, checkpoint_every=2,
                            log_every=3, on_log=on_log)


class _Killed(BaseException):
  pass


@pytest.mark.parametrize("kill_at", [3, 8])
def test_lp_ft_resumes_across_the_switch_to_the_uninterrupted_result(tmp_path, kill_at):
  full, history = _lp_ft(None)
  assert [h["step"] for h in history] == [2, 3, 4, 6, 8, 9, 10]
  assert int(full.step) == 10

  def kill(entry):
    if entry["step"] == kill_at:
      raise _Killed()
  d = str(tmp_path / "ckpt")
  with pytest.raises(_Killed):
    _lp_ft(d, on_log=kill)
  resumed, resumed_history = _lp_ft(d)
  assert resumed_history == history
  for a, b in zip(jax.tree.leaves((full.params, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt-phase1"]


def test_lp_ft_probes_first_then_tunes_everything():
  model, v, x, y, prepare = _tiny_problem()
  lin, full = methods.phase_masks(v["params"], "lp_ft")
  fwd = train.model_forward(model)
  probe, _ = train.train_phases(fwd, v["params"], {}, [(lin, 4)], train.OptimConfig(lr=0.1),
                                x, y, batch_size=16, seed=3, prepare=prepare)
  both, _ = train.train_phases(fwd, v["params"], {}, [(lin, 4), (full, 2)],
                               train.OptimConfig(lr=0.1), x, y, batch_size=16, seed=3,
                               prepare=prepare)
  before, mid, after = (_leaves(t) for t in (v["params"], probe.params, both.params))
  for path in before:
    head = path.startswith("['head']")
    assert np.array_equal(before[path], mid[path]) != head, path  # phase 1: the head only
    assert not np.array_equal(mid[path], after[path]), path       # phase 2: everything
  from ncjax.experiment.stages.finetune import lp_ft_switch
  assert [lp_ft_switch(n, 0.5) for n in (2, 3, 10)] == [1, 2, 5]
  assert lp_ft_switch(10, 0.01) == 1 and lp_ft_switch(10, 0.99) == 9
  with pytest.raises(ValueError, match="at least 2 steps"):
    lp_ft_switch(1, 0.5)


# ----------------------------------------------------------------------------- VPT

def test_vpt_zero_tokens_is_the_plain_vit():
  model, x = _tiny_vit()
  v = model.init(jax.random.PRNGKey(0), x[:1])
  v0 = model.clone(vpt_tokens=0).init(jax.random.PRNGKey(0), x[:1])
  assert jax.tree.structure(v) == jax.tree.structure(v0)
  np.testing.assert_array_equal(model.clone(vpt_tokens=0).apply(v, x), model.apply(v, x))


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_against_a_hand_loop_over_the_plain_blocks(deep):
  """The prompted ViT equals the plain ViT's blocks applied by hand: tokens [cls, prompts,
  patches] into layer1; deep: the previous layer's prompt outputs replaced by the next
  layer's prompts; then the class token after encoder_norm into the head."""
  from ncjax.models.vit import EncoderBlock
  import flax.linen as nn
  base, x = _tiny_vit()
  model = base.clone(vpt_tokens=3, vpt_deep=deep)
  v = model.init(jax.random.PRNGKey(0), x[:1])
  pr = v["params"]
  assert pr["prompts"].shape == ((2 if deep else 1), 3, 16)
  bound = np.sqrt(6 / (3 * 16 * 16 + 16))
  assert float(jnp.max(jnp.abs(pr["prompts"]))) <= bound
  pr = {**pr, "head": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (16, 3)),
                       "bias": pr["head"]["bias"]}}
  n = x.shape[0]
  emb = nn.Conv(16, (16, 16), strides=(16, 16), padding="VALID").apply(
      {"params": pr["embedding"]}, x).reshape(n, -1, 16)
  t = jnp.concatenate([jnp.broadcast_to(pr["cls"], (n, 1, 16)), emb], 1) + pr["pos_embedding"]
  for i in range(2):
    if i == 0 or deep:
      rest = t[:, 1:] if i == 0 else t[:, 4:]
      t = jnp.concatenate([t[:, :1], jnp.broadcast_to(pr["prompts"][i], (n, 3, 16)), rest], 1)
    t = EncoderBlock(2, 32).apply({"params": pr[f"layer{i + 1}"]}, t)
  feat = nn.LayerNorm(epsilon=1e-6).apply({"params": pr["encoder_norm"]}, t)[:, 0]
  want = feat @ pr["head"]["kernel"] + pr["head"]["bias"]
  np.testing.assert_allclose(model.apply({"params": pr}, x), want, rtol=1e-5, atol=1e-5)
  mask = methods.trainable_mask(pr, "vpt")
  assert {p for p, m in _leaves(mask).items() if m} == {
      "['prompts']", "['head']['kernel']", "['head']['bias']"}
  # The prompts count as trained, not in the denominator.
  base_count = methods.count(pr) - pr["prompts"].size
  assert methods.percent_trainable(pr, mask) == pytest.approx(
      100 * (pr["prompts"].size + 16 * 3 + 3) / base_count)
  # 'mean' pooling leaves the prompt positions out.
  y = jnp.arange(2 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 1)
  np.testing.assert_allclose(model.clone(pool="mean").unit_feature(y)[:, 0],
                             [(0 + 4 + 5) / 3, (6 + 10 + 11) / 3])


# ----------------------------------------------------------------------------- the config

def _config(**fields):
  from tiny_config import tiny_mlp_config
  c = tiny_mlp_config("transfer")
  for k, val in fields.items():
    *path, last = k.split(".")
    holder = c
    for part in path:
      holder = holder[part]
    holder[last] = val
  return c


def test_invalid_peft_fields_are_config_errors_naming_the_field():
  from ncjax.experiment import spec
  c = _config(**{"methods": ("lora", "lp_ft", "vpt"), "lora.rank": (0,), "lora.alpha": -1.0,
                 "lora.targets": ("query", "layer9/dense"), "lp_ft.probe_fraction": 1.0,
                 "vpt.tokens": 0, "unit_selector": "best"})
  with pytest.raises(ConfigError) as e:
    spec.build(c)
  text = str(e.value)
  for line in ("--config.lora.rank=0: must be an integer >= 1 or distinct ones (a sweep)",
               "--config.lora.alpha=-1.0: must be > 0",
               "--config.lora.targets=query,layer9/dense: LoRA target 'layer9/dense': 'layer9' is "
               "not a unit",
               "--config.lp_ft.probe_fraction=1.0: must be < 1",
               "--config.vpt.tokens=0: must be an integer >= 1",
               "--config.methods=lora,lp_ft,vpt: vpt prompts a ViT; mlp is not one",
               "--config.unit_selector=best: must be one of nc, rgn, both"):
    assert line in text, line
  with pytest.raises(ConfigError, match=r"lora.targets=conv: selects no kernel of mlp's units"):
    spec.build(_config(**{"methods": ("lora",), "lora.targets": ("conv",)}))
  # Fields of methods the grid does not run are not read; each method's fields join its
  # runs' fingerprints only.
  (s,) = spec.build(_config(**{"methods": ("linear", "lora"), "lora.targets": ("dense",),
                               "vpt.tokens": 0}))
  prints = {r.method: dict(r.fingerprint) for r in s.runs() if r.kind == "finetune"}
  assert prints["lora"]["lora.rank"] == 8 and "lora.rank" not in prints["linear"]
  assert s.peft.lora_scale(8) == 1.0
  # A rank sweep: one lora run per rank, each fingerprinted with its own.
  (s,) = spec.build(_config(**{"methods": ("lora",), "lora.targets": ("dense",),
                               "lora.rank": (4, 16)}))
  runs = [r for r in s.runs() if r.kind == "finetune"]
  assert [(r.id, r.lora_rank, dict(r.fingerprint)["lora.rank"]) for r in runs] == [
      ("mlp-digits-lora-r4", 4, 4), ("mlp-digits-lora-r16", 16, 16)]
  with pytest.raises(ConfigError, match=r"--config.lora.rank=4,4: must be an integer >= 1 or "
                     "distinct ones"):
    spec.build(_config(**{"methods": ("lora",), "lora.rank": (4, 4)}))


def test_peft_config_digits_end_to_end(tmp_path):
  """configs/peft.py:digits, shortened to fit CI (2 seeds, 4 steps, the tiny MLP for
  ResNet-18 -- its LoRA on the dense layers --, the sweep over two units): every method runs,
  LoRA once per rank, the auto cells once per selector; results.md compares the methods over
  the seeds (Table 3 stays Table 3: seed replicates are not pre-training variants) and the
  plot is drawn. (With ResNet-18, width 4, it took 15 min under load.)"""
  from configs import peft
  from ncjax.experiment import runner
  c = peft.get_config("digits")
  c.seeds = (0, 1)
  c.models = ("mlp",)
  c.backbone.default.options = {"depth": 3, "width": 16}
  c.backbone.default.unit = ("layer2", "layer3", "auto")
  c.lora.targets = ("dense",)
  c.optim.steps = 4
  c.pretrain.optim.steps = 4
  recs = runner.run(c, str(tmp_path))
  assert {r["pretrain"] for r in recs} == {""}  # a seed is not a variant
  assert {r["run"].split("/")[0] for r in recs} == {"s0", "s1"}  # each seed its directory
  done = {(r["seed"], r["method"], r.get("lora_rank"), r["unit"] if not r["unit_choice"]
           else r["unit_selector"]) for r in recs if r["stage"] == "transfer"}
  for tag in (0, 1):
    for m in ("linear", "bitfit", "lp_ft", "full"):
      assert (tag, m, 0, "") in done, (tag, m)
    for r in (4, 16):
      assert (tag, "lora", r, "") in done
    for m in ("layer", "scl"):
      assert {(tag, m, 0, u) for u in ("layer2", "layer3", "nc", "rgn")} <= done
  by = {(r["seed"], r["method"], r.get("lora_rank")): r for r in recs
        if r["stage"] == "transfer" and not r["unit"]}
  assert by[(0, "lp_ft", 0)]["percent_params"] == 100.0
  assert by[(0, "lora", 4)]["percent_params"] < by[(0, "lora", 16)]["percent_params"]
  assert by[(0, "linear", 0)]["percent_params"] < by[(0, "bitfit", 0)]["percent_params"]
  assert all(r["step_s"] > 0 for r in by.values())
  md = (tmp_path / "results.md").read_text()
  assert "## Fine-tuning methods compared" in md and "| LoRA r16 |" in md
  assert "Transfer results (Table 3)" in md  # seed replicates are not pre-training variants
  assert "| LoRA (r4) |" in md  # Table 3: a row per rank
  assert "| **MLP / Digits, n=717** |" in md
  row = next(line for line in md.splitlines() if "| BitFit | " in line and " ± " in line)
  assert "| 2 |" in row
  assert (tmp_path / "accuracy_vs_params.png").exists()


def test_a_lora_run_loads_back_as_plain_merged_weights(tmp_path):
  """`weights.load` of a LoRA run merges its factors (scale from the run's fingerprint): the
  plain model with those weights has the record's test accuracy, to the example."""
  import shutil
  from ncjax import weights
  from ncjax.errors import CheckpointError
  from ncjax.experiment import assemble, runner, spec as spec_lib
  c = _config(**{"methods": ("lora",), "lora.targets": ("dense",), "lora.rank": (2,),
                 "lora.alpha": 4.0, "optim.steps": 6})
  (rec,) = runner.run(c, str(tmp_path / "w"))
  (s,) = spec_lib.build(c)
  run = next(r for r in s.runs() if r.method == "lora")
  train_ds, test_ds = assemble.downstream(s, run.backbone, run.dataset)
  model = assemble.build_model(s, run.backbone, train_ds.num_classes)
  fresh = assemble.init_variables(model, assemble.input_shape(run.backbone, train_ds), 0)
  run_dir = str(tmp_path / "w" / "runs" / run.id)
  loaded = weights.load(run_dir, "mlp", fresh, keep_head=True)
  assert lora.count(loaded["params"]) == 0
  acc = train.accuracy(train.model_forward(model), loaded["params"], loaded["batch_stats"],
                       assemble.prepare_for(run.backbone, train_ds, 1), test_ds.images,
                       test_ds.labels, 256, train.data_mesh())
  assert acc == rec["accuracy"]
  step = weights.ncjax_step_dir(run_dir)
  shutil.copytree(step, tmp_path / "copy")
  with pytest.raises(CheckpointError, match="holds LoRA factors, but no fingerprint.json"):
    weights.load(str(tmp_path / "copy"), "mlp", fresh)


# ----------------------------------------------------------------------------- layer decay

def test_layer_decay_scales_and_the_update_they_give():
  params = {"embedding": {"kernel": jnp.ones(2)}, "cls": jnp.ones(1),
            "layer1": {"w": jnp.ones(2)}, "layer2": {"w": jnp.ones(2), "lora_a": jnp.ones(1)},
            "layer3": {"w": jnp.ones(2)}, "encoder_norm": {"scale": jnp.ones(2)},
            "head": {"kernel": jnp.ones(2)}}
  got = _leaves(methods.layer_decay_scales(params, ("layer1", "layer2", "layer3"), 0.5))
  assert got == {"['cls']": 0.125, "['embedding']['kernel']": 0.125, "['layer1']['w']": 0.25,
                 "['layer2']['lora_a']": 0.5, "['layer2']['w']": 0.5, "['layer3']['w']": 1.0,
                 "['encoder_norm']['scale']": 1.0, "['head']['kernel']": 1.0}
  # One plain SGD step (no momentum, no weight decay): update = -lr x scale x gradient, and
  # nothing for a frozen leaf (BitFit: the kernel of layer1 stays frozen).
  mask = {k: jax.tree.map(lambda _: k != "layer1", v) for k, v in params.items()}
  cfg = train.OptimConfig(lr=0.2, lr_end=0.2, momentum=0.0, weight_decay=0.0)
  tx = train.make_optimizer(cfg, 5, mask, methods.layer_decay_scales(
      params, ("layer1", "layer2", "layer3"), 0.5))
  trainable, _ = methods.partition(params, mask)
  grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  up = _leaves(updates)
  assert "['layer1']['w']" not in up
  np.testing.assert_allclose(up["['embedding']['kernel']"], -0.2 * 0.125 * 3.0)
  np.testing.assert_allclose(up["['layer2']['w']"], -0.2 * 0.5 * 3.0)
  np.testing.assert_allclose(up["['head']['kernel']"], -0.2 * 3.0)


def test_vpt_through_the_pipeline_from_a_pretrained_vit(tmp_path):
  """VPT-deep end to end: the pre-trained ViT's weights transplanted into the prompted model
  (the prompts, in no checkpoint, keep their fresh values), then the prompts and head train."""
  from ncjax.experiment import runner
  c = _config(**{"models": ("vit_ti16",), "methods": ("vpt",), "vpt.tokens": 2,
                 "optim.steps": 2, "pretrain.optim.steps": 2, "collapse": False})
  c.backbone.default.options = {"pool": "mean"}
  c.backbone.default.unit = ()
  c.backbone.default.image_size = 32
  c.backbone.default.channels = 3
  (rec,) = [r for r in runner.run(c, str(tmp_path)) if r["stage"] == "transfer"]
  assert rec["method"] == "vpt" and rec["weights"] == "pretrain"
  # 12 x 2 prompts of width 192 + the 5-way head, over the plain ViT-Ti/16 at 32x32.
  total = models.count_params(_abstract("vit_ti16", 5, image_size=32))
  assert rec["percent_params"] == pytest.approx(100 * (12 * 2 * 192 + 192 * 5 + 5) / total)
  assert 0 <= rec["accuracy"] <= 100
