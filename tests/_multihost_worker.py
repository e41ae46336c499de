"""One process of a 2-process jax.distributed run on localhost CPU (gloo collectives), or the
single-process reference (process_id -1). Trains a tiny MLP for 4 steps with ncjax.train.fit on
a global batch of 16 (each process feeds its 8 rows), evaluates accuracy on every process, and
writes the final parameters to <out>.npz."""
import sys

import jax

pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if pid >= 0:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ncjax import methods, models, train  # noqa: E402


def main():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, size=(64, 6, 6, 1), dtype=np.uint8)
  y = (np.arange(64) % 4).astype(np.int32)
  model = models.get("mlp", 4, depth=2, width=16, batch_norm=True)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 6, 6, 1)), train=False)
  mask = methods.trainable_mask(v["params"], "full")
  tx = train.make_optimizer(train.OptimConfig(lr=0.05), 4, mask)
  prepare = lambda rng, x, t: x.astype(jnp.float32) / 255.0
  step = train.make_train_step(train.model_forward(model), tx, mask, prepare)
  mesh = train.data_mesh()
  state = train.init_state(v["params"], v.get("batch_stats", {}), tx)
  state, hist = train.fit(state, step, x, y, batch_size=16, total_steps=4, seed=0, mesh=mesh,
                          log_every=1)
  acc = train.accuracy(train.model_forward(model), state.params, state.batch_stats, prepare,
                       x, y, 16, mesh)
  # Replicated arrays: each process's local copy is the whole value.
  leaves = {f"p{i}": np.asarray(a.addressable_data(0)) for i, a in enumerate(jax.tree.leaves((state.params, state.batch_stats)))}
  np.savez(out, acc=acc, loss=hist[-1]["loss"], devices=jax.device_count(), **leaves)
  print(f"process {pid}: devices={jax.device_count()} acc={acc:.4f} loss={hist[-1]['loss']:.6f}")


if __name__ == "__main__":
  main()
