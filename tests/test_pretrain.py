"""Pre-training studies: losses in the train step, projection heads, PGD, variants sweeps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import losses, models, train
from ncjax.experiment import runner, spec
from ncjax.experiment.stages import pretrain
from ncjax.errors import ConfigError
from tiny_config import tiny_mlp_config


def _config(job="pretrain"):
  return tiny_mlp_config(job, depth=2)


def test_projection_head_shapes():
  h = jnp.ones((4, 16))
  ce = models.ProjectionHead(layers=2, width=8, num_classes=3)
  v = ce.init(jax.random.PRNGKey(0), h)
  assert ce.apply(v, h).shape == (4, 3)
  assert sorted(v["params"]) == ["classifier", "proj0", "proj1"]
  sc = models.ProjectionHead(layers=1, width=16, out_dim=5)
  v = sc.init(jax.random.PRNGKey(0), h)
  assert sc.apply(v, h).shape == (4, 5) and sorted(v["params"]) == ["proj0"]
  # A linear SupCon projection is exactly one affine map.
  w, b = v["params"]["proj0"]["kernel"], v["params"]["proj0"]["bias"]
  np.testing.assert_allclose(sc.apply(v, h), h @ w + b, rtol=1e-6)


def test_pgd_stays_in_the_ball_and_raises_the_loss():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  forward = lambda p, s, x, t: (x @ p, s)
  x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
  eps = jnp.asarray([0.1, 0.2, 0.1, 0.3, 0.1, 0.05])
  attack = train.pgd_adversary(forward, losses.cross_entropy, eps, steps=5)
  x_adv = attack(w, {}, x, y, jax.random.PRNGKey(1))
  assert np.all(np.abs(np.asarray(x_adv - x)) <= np.asarray(eps) + 1e-6)
  clean = float(losses.cross_entropy(x @ w, y))
  adv = float(losses.cross_entropy(x_adv @ w, y))
  # For a linear model the worst case in the box is x + eps * sign(grad): PGD reaches it.
  g = jax.grad(lambda xx: losses.cross_entropy(xx @ w, y))(x)
  best = float(losses.cross_entropy((x + eps * jnp.sign(g)) @ w, y))
  assert clean < adv <= best + 1e-5 and adv > clean + 0.5 * (best - clean)


@pytest.mark.parametrize("loss,layers,eps", [("mse", 0, 0.0), ("supcon", 2, 0.0),
                                             ("supcon", 0, 0.0), ("ce", 1, 8 / 255)])
def test_pretrain_objectives(tmp_path, loss, layers, eps):
  c = _config()
  c.pretrain.loss, c.pretrain.projection_layers, c.pretrain.adversarial_eps = loss, layers, eps
  c.pretrain.optim.aug_level = 3
  (s,) = spec.build(c)
  run = s.runs()[0]
  assert run.kind == "pretrain"
  variables, rec = pretrain.pretrain(s, run, str(tmp_path), train.data_mesh())
  rec = rec.to_dict()
  model = models.get("mlp", 5, depth=2, width=32)
  fresh = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
  # The projection head is dropped: the returned backbone has the model's own structure.
  assert jax.tree.structure(variables["params"]) == jax.tree.structure(fresh["params"])
  assert rec["loss"] == loss and rec["projection_layers"] == layers
  assert rec["adversarial_eps"] == pytest.approx(eps)
  assert np.isfinite(rec["final_train_loss"]) and rec["nc1"] > 0
  assert np.isnan(rec["accuracy"]) if loss == "supcon" else 0 <= rec["accuracy"] <= 100
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                         variables["params"]["layer1"], fresh["params"]["layer1"]))
  assert any(changed)


def test_bad_pretrain_settings_are_named():
  c = _config()
  c.pretrain.loss = "triplet"
  with pytest.raises(ConfigError, match="--config.pretrain.loss=triplet: must be one of ce, mse"):
    spec.build(c)
  c.pretrain.loss, c.pretrain.adversarial_eps = "supcon", 0.01
  with pytest.raises(ConfigError, match="adversarial pre-training"):
    spec.build(c)


def test_variant_overrides_are_typed():
  """A variant's value must have its field's type (an int may set a float): a bool typo or
  a number written as a string is an error naming the variant and the field, not a
  coercion."""
  c = _config()
  c.variants = (dict(tag="adv8", overrides={"pretrain.adversarial_eps": 8 / 255,
                                            "pretrain.optim.aug_level": 3,
                                            "pretrain.optim.lr": 1}),)
  (s,) = spec.build(c)
  assert s.tag == "adv8" and s.pretrain.adversarial_eps == pytest.approx(8 / 255)
  assert s.pretrain.optim.aug_level == 3 and s.pretrain.optim.lr == 1.0
  c.variants = (dict(tag="a", overrides={"collapse": "flase", "pretrain.optim.steps": "3",
                                         "pretrain.nope": 1}),
                dict(tag="a", overrides={}), dict(tag="..", overrides={}),
                dict(tag="b", overrides={"seed": True}))
  with pytest.raises(ConfigError) as e:
    spec.build(c)
  msg = str(e.value)
  assert "variant 'a': --config.collapse=flase: must be a bool" in msg
  assert "variant 'a': --config.pretrain.optim.steps=3: must be a int" in msg
  assert "variant 'a': --config.pretrain.nope=1: no such config field" in msg
  assert "--config.variants[1].tag=a: is used twice" in msg
  assert "--config.variants[2].tag=..: must be a path-safe name" in msg
  assert "variant 'b': --config.seed=True: must be a int" in msg


def test_seeds_sweep_the_whole_job_crossed_with_the_variants():
  """`seeds` (issue 19): the whole job once per seed, an int field per run, crossed with
  every variant; bad entries are named one by one, with the rest of the config's problems."""
  c = _config()
  c.seeds = (3, 0)
  specs = spec.build(c)
  assert [(s.tag, s.variant, s.seed) for s in specs] == [("s3", "", 3), ("s0", "", 0)]
  assert specs[0].runs()[0].id.startswith("s3/")
  c.variants = (dict(tag="mse", overrides={"pretrain.loss": "mse"}),
                dict(tag="ce", overrides={}))
  got = [(s.tag, s.variant, s.seed, s.pretrain.loss) for s in spec.build(c)]
  assert got == [("mse-s3", "mse", 3, "mse"), ("mse-s0", "mse", 0, "mse"),
                 ("ce-s3", "ce", 3, "ce"), ("ce-s0", "ce", 0, "ce")]
  c.seeds = ()
  assert [(s.tag, s.seed) for s in spec.build(c)] == [("mse", 0), ("ce", 0)]
  c.variants = ()
  c.seeds = (1, 1, True, -1, 2 ** 31)
  c.eval_batch_size = 0
  with pytest.raises(ConfigError) as e:
    spec.build(c)
  msg = str(e.value)
  assert "--config.seeds[1]=1: is given twice" in msg
  assert "--config.seeds[2]=True: must be an integer" in msg
  assert "--config.seeds[3]=-1: must be an integer >= 0" in msg
  assert "--config.seeds[4]=2147483648: must be an integer" in msg
  assert "--config.eval_batch_size=0: must be an integer >= 1" in msg


def test_variants_job_tags_records_and_reports_source_nc1(tmp_path):
  c = _config("transfer")
  c.methods = ("linear",)
  c.variants = (dict(tag="mse", overrides={"pretrain.loss": "mse"}),
                dict(tag="ce", overrides={"pretrain.loss": "ce"}))
  records = runner.run(c, str(tmp_path))
  assert [r["pretrain"] for r in records] == ["mse", "ce"]
  assert all(r["source_nc1"] > 0 for r in records)
  assert records[0]["source_nc1"] != records[1]["source_nc1"]
  md = (tmp_path / "results.md").read_text()
  assert "MLP [mse] / Digits" in md and "NC1 of the pre-trained model on the source data" in md
  assert (tmp_path / "source_nc1_vs_accuracy.png").exists()
  assert (tmp_path / "runs" / "mse" / "pretrain-mlp-digits" / "record.json").exists()
  assert (tmp_path / "runs" / "ce" / "mlp-digits-linear").is_dir()


def test_pretrain_train_size_is_a_balanced_subset_of_the_source_split(tmp_path):
  """`pretrain.train_size` trains (and measures collapse) on a class-balanced subset; it is
  part of the pre-training run's fingerprint, a non-integer is an error naming the field, and
  a size the split cannot fill is named before the user reads a traceback."""
  c = _config()
  c.pretrain.train_size = 50
  (r,) = runner.run(c, str(tmp_path / "sub"))
  assert r["num_train"] == 50 and r["dataset"] == "digits"
  fingerprint = lambda c: dict(spec.build(c)[0].runs()[0].fingerprint)
  assert fingerprint(c)["pretrain.train_size"] == 50
  c.pretrain.train_size = 0  # left out at its default: workdirs made before the field resume
  assert "pretrain.train_size" not in fingerprint(c)
  c.pretrain.train_size = -1
  with pytest.raises(ConfigError, match="--config.pretrain.train_size=-1: must be an integer >= 0"):
    spec.build(c)
  c.pretrain.train_size = 100_000
  with pytest.raises(ConfigError, match="--config.pretrain.train_size=100000: class 0 "):
    runner.run(c, str(tmp_path / "big"))
