"""Pre-training studies: losses in the train step, projection heads, PGD, variants sweeps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncjax import jobs, losses, methods, models, train, transfer
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
                                             ("ce", 1, 8 / 255)])
def test_pretrain_objectives(tmp_path, loss, layers, eps):
  c = _config()
  c.pretrain.loss, c.pretrain.projection_layers, c.pretrain.adversarial_eps = loss, layers, eps
  c.pretrain.optim.aug_level = 3
  mesh = train.data_mesh()
  bb = transfer.backbone_config(c, "mlp")
  variables, rec = transfer.pretrain(c, "mlp", bb, str(tmp_path), mesh)
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


def test_bad_pretrain_settings_are_named(tmp_path):
  c = _config()
  c.pretrain.loss = "triplet"
  with pytest.raises(ValueError, match="unknown loss 'triplet'"):
    transfer.pretrain(c, "mlp", transfer.backbone_config(c, "mlp"), str(tmp_path),
                      train.data_mesh())
  c.pretrain.loss, c.pretrain.adversarial_eps = "supcon", 0.01
  with pytest.raises(ValueError, match="adversarial pre-training"):
    transfer.pretrain(c, "mlp", transfer.backbone_config(c, "mlp"), str(tmp_path),
                      train.data_mesh())


def test_parse_variants_and_overrides():
  v = jobs.parse_variants("mse: pretrain.loss=mse; adv8: pretrain.adversarial_eps=8/255 "
                          "pretrain.optim.aug_level=3")
  assert v == [("mse", {"pretrain.loss": "mse"}),
               ("adv8", {"pretrain.adversarial_eps": "8/255", "pretrain.optim.aug_level": "3"})]
  c = jobs.with_overrides(_config(), v[1][1])
  assert c.pretrain.adversarial_eps == pytest.approx(8 / 255)
  assert c.pretrain.optim.aug_level == 3 and isinstance(c.pretrain.optim.aug_level, int)
  assert jobs.parse_variants("") == []
  with pytest.raises(ValueError, match="must read 'tag: field=value"):
    jobs.parse_variants("pretrain.loss=mse")
  with pytest.raises(ValueError, match="'loss' is not field=value"):
    jobs.parse_variants("a: loss")
  with pytest.raises(ValueError, match="'pretrain.nope' is not a config field"):
    jobs.with_overrides(_config(), {"pretrain.nope": "1"})


def test_variants_job_tags_records_and_reports_source_nc1(tmp_path):
  c = _config("transfer")
  c.methods = "linear"
  c.variants = "mse: pretrain.loss=mse; ce: pretrain.loss=ce"
  records = jobs.run(c, str(tmp_path))
  assert [r["pretrain"] for r in records] == ["mse", "ce"]
  assert all(r["source_nc1"] > 0 for r in records)
  assert records[0]["source_nc1"] != records[1]["source_nc1"]
  md = (tmp_path / "results.md").read_text()
  assert "MLP [mse] / Digits" in md and "NC1 of the pre-trained model on the source data" in md
  assert (tmp_path / "source_nc1_vs_accuracy.png").exists()
  assert (tmp_path / "mse" / "pretrain.jsonl").exists() and (tmp_path / "ce").is_dir()
