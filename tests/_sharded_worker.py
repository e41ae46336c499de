"""Runs in a subprocess with 8 simulated CPU devices (XLA_FLAGS set by the test): trains a
small ResNet (BatchNorm, so batch statistics must be global) with Layer FT for 3 steps on
a 1-device mesh and on an 8-device mesh, and prints the largest relative parameter difference."""
import jax
import jax.numpy as jnp
import numpy as np

from ncjax import methods, models, train


def main():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, size=(64, 8, 8, 3), dtype=np.uint8)
  y = (np.arange(64) % 4).astype(np.int32)
  model = models.get("resnet18", 4, stem="cifar", width=4)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
  mask = methods.trainable_mask(v["params"], "scl", "block5")
  model = models.get("resnet18", 4, stem="cifar", width=4, scl_unit="block5")
  tx = train.make_optimizer(train.OptimConfig(lr=0.05), 3, mask)
  prepare = lambda rng, x, t: x.astype(jnp.float32) / 255.0
  step = train.make_train_step(train.model_forward(model), tx, mask, prepare)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = train.data_mesh(devices)
    state = train.init_state(v["params"], v["batch_stats"], tx)
    state, _ = train.fit(state, step, x, y, batch_size=16, total_steps=3, seed=0, mesh=mesh)
    results.append(jax.tree.map(np.asarray, (state.params, state.batch_stats)))
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)), *results))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                         results[0][0]["block5"], v["params"]["block5"]))
  assert any(changed), "block5 did not train"
  print(f"devices={len(jax.devices())} max_rel_diff={max(diffs):.3e}")


if __name__ == "__main__":
  main()
