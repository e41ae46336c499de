"""Tests of the fine-tuning methods (masks) and the one train step."""
import dataclasses
import errno
import glob
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import orbax.checkpoint as ocp

from ncjax import methods, models, train
from ncjax.train import checkpoint as train_checkpoint
from ncjax.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _abstract_params(name, num_classes=10, image_size=32, **options):
  return models.param_shapes(name, num_classes, image_size=image_size, **options)["params"]


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("name,image_size,options", [
    ("resnet18", 32, {}), ("resnet34", 32, {}), ("resnet50", 32, {}),
    ("vit_ti16", 32, {}), ("mlp", 28, {}), ("convnet4", 32, {}), ("resnet12", 32, {}),
])
def test_masks_select_exactly_the_unit_and_head(name, image_size, options):
  params = _abstract_params(name, image_size=image_size, **options)
  all_units = models.units(name)
  total = methods.count(params)
  head = methods.count(params["head"])
  for unit in all_units:
    for method in ("layer", "scl"):
      mask = methods.trainable_mask(params, method, unit)
      flat = jax.tree_util.tree_flatten_with_path(mask)[0]
      for path, m in flat:
        top = path[0].key
        assert m == (top in (unit, "head")), (method, unit, jax.tree_util.keystr(path))
      assert methods.count(params, mask) == methods.count(params[unit]) + head
  assert methods.count(params, methods.trainable_mask(params, "linear")) == head
  assert methods.count(params, methods.trainable_mask(params, "full")) == total


def test_percent_trainable_matches_table3_resnet18():
  # Table 3: ResNet-18 Layer FT block5 on CIFAR-10 8.27%, linear 0.05%; CIFAR-100 8.64%.
  for k, layer, linear in ((10, 8.27, 0.05), (100, 8.64, 0.46)):
    params = _abstract_params("resnet18", num_classes=k, image_size=224)
    assert round(methods.percent_trainable(params, methods.trainable_mask(params, "layer", "block5")), 2) == layer
    assert round(methods.percent_trainable(params, methods.trainable_mask(params, "linear")), 2) == linear


def test_mask_errors_name_the_problem():
  params = _abstract_params("resnet18")
  with pytest.raises(ValueError, match="unknown fine-tuning method 'adapter'"):
    methods.trainable_mask(params, "adapter", "block5")
  with pytest.raises(ValueError, match="unit 'block9' is not a top-level module"):
    methods.trainable_mask(params, "layer", "block9")
  with pytest.raises(ValueError, match="needs a unit"):
    methods.trainable_mask(params, "scl", None)


def test_partition_combine_roundtrip():
  params = {"a": {"w": jnp.ones(2)}, "head": {"kernel": jnp.zeros((2, 3))}}
  mask = methods.trainable_mask(params, "linear")
  t, f = methods.partition(params, mask)
  assert t["a"]["w"] is None and f["head"]["kernel"] is None
  assert jax.tree.leaves(t) == [params["head"]["kernel"]]
  back = methods.combine(t, f)
  assert jax.tree.structure(back) == jax.tree.structure(params)


def test_frozen_leaves_have_no_optimizer_state():
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _abstract_params("resnet18"))
  mask = methods.trainable_mask(params, "layer", "block5")
  tx = train.make_optimizer(train.OptimConfig(), 10, mask)
  state = tx.init(params)
  n_state = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert n_state == methods.count(params, mask)  # one momentum buffer per trainable scalar


# ----------------------------------------------------------------------------- the train step

def _small_resnet(k=4, **kw):
  model = models.get("resnet18", k, stem="cifar", width=4, **kw)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 3)), jnp.float32)
  y = jnp.asarray(np.arange(8) % k, jnp.int32)
  v = model.init(jax.random.PRNGKey(0), x[:1], train=False)
  return model, v, x, y


def _count_convs(jaxpr) -> int:
  """Convolutions in a jaxpr, sub-jaxprs (pjit, custom_vjp, ...) included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "conv_general_dilated"
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          n += _count_convs(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          n += _count_convs(sub)
  return n


def test_no_backward_pass_through_frozen_prefix():
  """Count convolutions in the step's jaxpr. ResNet-18 (CIFAR stem) has 20 convolutions (stem,
  16 in the blocks, 3 downsample). Full FT: 20 forward + 20 weight gradients + 19 input
  gradients = 59. Layer FT block5: 20 forward + 3 weight gradients (block5's two convs and its
  downsample) + 8 input gradients (blocks 6-8: 2 + 3 + 2, block5's conv2: 1) = 31. Linear
  probe: the 20 forward convolutions only."""
  model, v, x, y = _small_resnet()
  expected = {"full": 59, "layer": 31, "linear": 20}
  for method, n in expected.items():
    mask = methods.trainable_mask(v["params"], method, "block5")
    tx = train.make_optimizer(train.OptimConfig(), 10, mask)
    state = train.init_state(v["params"], v["batch_stats"], tx)
    step = train.make_train_step(train.model_forward(model), tx, mask)
    jaxpr = jax.make_jaxpr(step)(state, x, y, jax.random.PRNGKey(0))
    assert _count_convs(jaxpr.jaxpr) == n, method


def test_layer_ft_keeps_frozen_params_bit_identical_and_updates_batch_stats():
  model, v, x, y = _small_resnet()
  mask = methods.trainable_mask(v["params"], "layer", "block5")
  tx = train.make_optimizer(train.OptimConfig(lr=0.05), 4, mask)
  state = train.init_state(v["params"], v["batch_stats"], tx)
  step = jax.jit(train.make_train_step(train.model_forward(model), tx, mask))
  new = state
  for i in range(2):
    new, m = step(new, x, y, jax.random.PRNGKey(i))
    assert np.isfinite(float(m["loss"]))
  for top in v["params"]:
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                        v["params"][top], new.params[top]))
    if top in ("block5", "head"):
      assert not all(same), top
    else:
      assert all(same), top
  # Every BatchNorm's running statistics moved, frozen blocks included (REFERENCE §3).
  for top in v["batch_stats"]:
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b),
                                         v["batch_stats"][top], new.batch_stats[top]))
    assert all(moved), top


def test_linear_probe_matches_closed_form_gradient():
  """One SGD step of the head-only forward equals a hand-computed softmax-regression step."""
  rng = np.random.default_rng(0)
  f = rng.normal(size=(6, 5)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2], np.int32)
  params = {"body": {"w": jnp.ones(3)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                     "bias": jnp.zeros(3, jnp.float32)}}
  mask = methods.trainable_mask(params, "linear")
  cfg = train.OptimConfig(lr=0.5, lr_end=0.5, momentum=0.0, weight_decay=0.0)
  tx = train.make_optimizer(cfg, 1, mask)
  state = train.init_state(params, {}, tx)
  step = train.make_train_step(train.head_forward(3), tx, mask)
  new, _ = step(state, jnp.asarray(f), jnp.asarray(y), jax.random.PRNGKey(0))
  w = np.asarray(params["head"]["kernel"], np.float64)
  z = f @ w
  p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
  g = p - np.eye(3)[y]
  np.testing.assert_allclose(new.params["head"]["kernel"], w - 0.5 * f.T @ g / 6, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.params["head"]["bias"], -0.5 * g.mean(0), rtol=1e-5, atol=1e-6)
  assert new.params["body"]["w"] is not None and np.array_equal(new.params["body"]["w"], np.ones(3))


# ----------------------------------------------------------------------------- the loop

def _tiny_problem(n=64, k=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 255, size=(n, 6, 6, 1), dtype=np.uint8)
  y = (np.arange(n) % k).astype(np.int32)
  model = models.get("mlp", k, depth=2, width=16)
  v = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 6, 6, 1)), train=False)
  prepare = lambda rng, x, t: x.astype(jnp.float32) / 255.0
  return model, v, x, y, prepare


def _fit_tiny(tmp, total, stop=None, lr=0.1, **kw):
  """`fit` on the tiny problem with the schedule of a `total`-step run, stopped after `stop`
  steps (a shorter run) if given; `kw` go to `fit` (checkpoints every 2 steps by default)."""
  model, v, x, y, prepare = _tiny_problem()
  mask = methods.trainable_mask(v["params"], "full")
  tx = train.make_optimizer(train.OptimConfig(lr=lr), total, mask)
  step = train.make_train_step(train.model_forward(model), tx, mask, prepare)
  state = train.init_state(v["params"], {}, tx)
  kw.setdefault("checkpoint_every", 2)
  return train.fit(state, step, x, y, batch_size=16, total_steps=stop or total, seed=3,
                   checkpoint_dir=tmp, **kw)


def _tiny_like(lr=0.1, total=10):
  """A replicated state of the tiny problem, as a restore target."""
  model, v, *_ = _tiny_problem()
  mask = methods.trainable_mask(v["params"], "full")
  tx = train.make_optimizer(train.OptimConfig(lr=lr), total, mask)
  return train.put_replicated(train.data_mesh(), train.init_state(v["params"], {}, tx))


def _assert_same_state(a, b):
  leaves = lambda s: jax.tree.leaves((s.params, s.opt_state))
  for x, y in zip(leaves(a), leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def _jit_options(jitted):
  """The XLA options a jitted function hands to its compilation (jax 0.10's Lowered)."""
  lowered = jitted.lower(jnp.zeros(()), jnp.zeros((2,)), jnp.zeros((2,)), jnp.zeros(()))
  return dict(lowered._lowering._compiler_options_kvs)


def test_jit_train_step_compiler_options_none_means_ncjax_choice_and_empty_the_defaults():
  # Options given to jax.jit survive compile(compiler_options=None): a benchmark that meant
  # to time jaxlib's defaults that way timed ncjax's CPU options twice (issue 20).
  mesh = train.data_mesh()
  step = lambda s, x, y, r: (s, jnp.sum(x))  # noqa: E731
  want = train.compile._cpu_train_options() or {}
  assert want == train.CPU_TRAIN_COMPILER_OPTIONS  # this jaxlib knows the option
  assert _jit_options(train.jit_train_step(step, mesh)) == want
  assert _jit_options(train.jit_train_step(step, mesh, {})) == {}
  other = {"xla_cpu_enable_fast_math": False}
  assert _jit_options(train.jit_train_step(step, mesh, other)) == other


def test_lr_schedule_is_the_optimizers_schedule():
  cfg = train.OptimConfig(lr=0.2, lr_end=0.01, warmup_steps=2)
  sched = train.lr_schedule(cfg, 10)
  assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(0.2)
  assert float(sched(10)) == pytest.approx(0.01)
  # One plain SGD step (no momentum history, no weight decay) moves w by lr(0) * grad.
  cfg = train.OptimConfig(lr=0.3, lr_end=0.1, momentum=0.0, weight_decay=0.0)
  params = {"head": {"w": jnp.ones(3)}}
  tx = train.make_optimizer(cfg, 5, methods.trainable_mask(params, "full"))
  updates, _ = tx.update({"head": {"w": jnp.ones(3)}}, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["w"], -float(train.lr_schedule(cfg, 5)(0)))
  with pytest.raises(ValueError, match="total_steps must be >= 1"):
    train.lr_schedule(cfg, 0)


def test_step_schedule_by_hand():
  """RFS's x0.1 decays: lr 0.05, 3 steps an epoch, decays after epochs 2, 3, 4 of 5 -> steps
  6, 9, 12 of 15; with warm-up the first steps ramp linearly from 0 as the cosine's do."""
  cfg = train.OptimConfig(lr=0.05, schedule="step", decay_steps=(6, 9, 12), decay_factor=0.1)
  got = [float(train.lr_schedule(cfg, 15)(i)) for i in range(15)]
  want = [0.05] * 6 + [0.005] * 3 + [0.0005] * 3 + [0.00005] * 3
  np.testing.assert_allclose(got, want, rtol=1e-6)
  warm = dataclasses.replace(cfg, warmup_steps=4, decay_factor=0.5)
  got = [float(train.lr_schedule(warm, 15)(i)) for i in (0, 1, 3, 4, 5, 6, 9, 14)]
  np.testing.assert_allclose(got, [0.0, 0.0125, 0.0375, 0.05, 0.05, 0.025, 0.0125, 0.00625],
                             rtol=1e-6)
  # The optimizer follows it: plain SGD moves w by -lr(step) * grad at each step.
  sgd = dataclasses.replace(cfg, momentum=0.0, weight_decay=0.0)
  params = {"head": {"w": jnp.ones(2)}}
  tx = train.make_optimizer(sgd, 15, methods.trainable_mask(params, "full"))
  state = tx.init(params)
  for i in range(15):
    updates, state = tx.update({"head": {"w": jnp.ones(2)}}, state, params)
    np.testing.assert_allclose(updates["head"]["w"], -want[i], rtol=1e-6)
  for bad, match in (((6, 6), "must increase"), ((0, 3), "must increase"),
                     ((6, 15), "must increase within \\(0, 15\\)")):
    with pytest.raises(ValueError, match=match):
      train.lr_schedule(dataclasses.replace(cfg, decay_steps=bad), 15)
  with pytest.raises(ValueError, match="decay_factor"):
    train.lr_schedule(dataclasses.replace(cfg, decay_factor=0.0), 15)
  with pytest.raises(ValueError, match="schedule must be"):
    train.lr_schedule(dataclasses.replace(cfg, schedule="linear"), 15)
  # No milestones: a constant learning rate.
  flat = dataclasses.replace(cfg, decay_steps=())
  assert float(train.lr_schedule(flat, 15)(14)) == pytest.approx(0.05)


def test_resume_is_bit_identical(tmp_path):
  full, _ = _fit_tiny(str(tmp_path / "a"), total=10)
  _fit_tiny(str(tmp_path / "b"), total=10, stop=5)        # a shorter run, to step 5
  resumed, _ = _fit_tiny(str(tmp_path / "b"), total=10)   # continues from its checkpoint
  assert int(resumed.step) == 10
  _assert_same_state(full, resumed)


class _Killed(BaseException):
  """Stands for SIGKILL: raised from inside `fit`, caught by no `except Exception`."""


def test_killed_and_resumed_run_returns_the_uninterrupted_history(tmp_path):
  """Windows end every 4 steps, at every checkpoint (3, 6, 9) and at the end: 3 4 6 8 9 10.
  A run killed at step 8 (after the checkpoint at 6, before the one at 9) and resumed returns
  the same history as an uninterrupted run, bit for bit (floats round-trip through json)."""
  kw = dict(total=10, checkpoint_every=3, log_every=4)
  full, history = _fit_tiny(str(tmp_path / "a"), **kw)
  assert [h["step"] for h in history] == [3, 4, 6, 8, 9, 10]
  _, no_dir = _fit_tiny(None, **kw)
  assert no_dir == history  # windows do not depend on where checkpoints go

  def kill_at_8(entry):
    if entry["step"] == 8:
      raise _Killed()
  d = str(tmp_path / "b")
  with pytest.raises(_Killed):
    _fit_tiny(d, on_log=kill_at_8, **kw)
  assert train_checkpoint._checkpoint_manager(d).latest_step() == 6
  resumed, resumed_history = _fit_tiny(d, **kw)
  assert resumed_history == history
  assert all(type(h["loss"]) is float and type(h["step"]) is int for h in resumed_history)
  _assert_same_state(full, resumed)
  # The checkpoint holds the history: resuming a finished run returns it unchanged.
  state, again = _fit_tiny(d, **kw)
  assert again == history and int(state.step) == 10
  restored_state, restored_history = train.restore_latest(d, _tiny_like())
  assert restored_history == history and int(restored_state.step) == 10


def test_on_log_entries(tmp_path):
  cfg = train.OptimConfig(lr=0.1)
  lr_fn = train.lr_schedule(cfg, 7)
  entries = []
  _, history = _fit_tiny(None, total=7, log_every=3, checkpoint_every=0, lr_fn=lr_fn,
                         on_log=entries.append)
  assert [e["step"] for e in entries] == [h["step"] for h in history] == [3, 6, 7]
  for e, h in zip(entries, history):
    assert set(e) == {"step", "loss", "accuracy", "lr", "examples_per_s"}
    assert e["lr"] == float(lr_fn(e["step"]))
    assert (e["loss"], e["accuracy"]) == (h["loss"], h["accuracy"])
    assert np.isfinite(e["examples_per_s"]) and e["examples_per_s"] > 0
  entries.clear()
  _fit_tiny(None, total=2, log_every=1, on_log=entries.append)
  assert len(entries) == 2 and all(np.isnan(e["lr"]) for e in entries)  # no lr_fn


def _corrupt(step_dir, how):
  """Damages a saved checkpoint's files the way a crash or a bad disk would."""
  if how == "empty step dir":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
    return
  pattern, action = {"garbled arrays": ("state/d/*", "garble"),
                     "truncated ocdbt manifest": ("state/manifest.ocdbt", "truncate"),
                     "truncated array metadata": ("state/_METADATA", "truncate"),
                     "garbled history": ("history/metadata", "garble"),
                     "no history": ("history", "remove")}[how]
  paths = glob.glob(os.path.join(step_dir, pattern))
  assert paths, (step_dir, pattern, sorted(os.listdir(step_dir)))
  for p in paths:
    if action == "remove":
      shutil.rmtree(p)
    elif action == "truncate":
      with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    else:
      with open(p, "rb") as f:
        b = bytearray(f.read())
      b[::7] = bytes(c ^ 0xFF for c in b[::7])
      with open(p, "wb") as f:
        f.write(bytes(b))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 6-step run checkpointed every 2 steps (orbax keeps 4 and 6): dir, state, history."""
  d = str(tmp_path_factory.mktemp("finished") / "ckpt")
  state, history = _fit_tiny(d, total=6)
  assert train_checkpoint._checkpoint_manager(d).all_steps() == [4, 6]
  return d, state, history


@pytest.mark.parametrize("how", ["garbled arrays", "truncated ocdbt manifest",
                                 "truncated array metadata", "garbled history", "no history",
                                 "empty step dir"])
def test_unreadable_newest_checkpoint_falls_back_with_a_warning(finished_run, tmp_path, how,
                                                                capsys, caplog):
  src, full, history = finished_run
  d = str(tmp_path / "ckpt")
  shutil.copytree(src, d)
  _corrupt(os.path.join(d, "6"), how)
  with caplog.at_level(logging.WARNING):
    state, resumed_history = _fit_tiny(d, total=6)  # resumes from 4, saves 6 again
  err = capsys.readouterr().err
  assert re.search(rf"checkpoint step 6 in {re.escape(d)} is unreadable .*renamed it to "
                   r"6\.unreadable .*resuming from step 4", err), err
  assert any(r.levelno == logging.WARNING and "6.unreadable" in r.getMessage()
             for r in caplog.records)
  assert os.path.isdir(os.path.join(d, "6.unreadable"))  # set aside, not deleted
  assert train_checkpoint._checkpoint_manager(d).all_steps() == [4, 6]
  assert resumed_history == history
  _assert_same_state(full, state)


def test_no_readable_checkpoint_is_a_one_line_checkpoint_error(finished_run, tmp_path):
  src, *_ = finished_run
  d = str(tmp_path / "ckpt")
  shutil.copytree(src, d)
  _corrupt(os.path.join(d, "6"), "garbled arrays")
  _corrupt(os.path.join(d, "4"), "empty step dir")
  with pytest.raises(CheckpointError) as e:
    _fit_tiny(d, total=6)
  msg = str(e.value)
  assert "\n" not in msg and f"no readable checkpoint in {d} " in msg and "steps 6, 4" in msg
  assert sorted(os.listdir(d)) == ["4", "6"]  # nothing renamed when there is no fallback
  assert train.restore_latest(str(tmp_path / "none"), _tiny_like()) is None


def test_partial_save_leftovers_are_removed_with_a_warning(tmp_path, monkeypatch, capsys,
                                                           caplog):
  """A run killed while writing checkpoint 4 (after its state, inside the history's save)
  leaves orbax's ``4.orbax-checkpoint-tmp``; the next run removes it, saying so, and resumes
  from 2."""
  d = str(tmp_path / "ckpt")
  full, history = _fit_tiny(str(tmp_path / "ref"), total=4)

  async def killed(*args, **kwargs):
    raise _Killed()
  with monkeypatch.context() as m:
    m.setattr(ocp.JsonCheckpointHandler, "async_save", killed)
    with pytest.raises(_Killed):
      _fit_tiny(d, total=4, checkpoint_every=4)  # killed inside the only save, at step 4
  leftovers = [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n]
  assert leftovers, sorted(os.listdir(d))
  with caplog.at_level(logging.WARNING):
    state, resumed_history = _fit_tiny(d, total=4, checkpoint_every=4)
  err = capsys.readouterr().err
  assert f"removing 1 incomplete checkpoint save(s) left by an interrupted run in {d}: " \
         f"{leftovers[0]}" in err, err
  assert any(leftovers[0] in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(d)) == ["4"]
  _assert_same_state(full, state)
  assert [h["step"] for h in resumed_history] == [4]


def _wrapped_enospc(self, *args, **kwargs):
  """What a full disk looks like through orbax: an OSError deep in a chain of wrappers."""
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/x/state/d/abc")
    except OSError as e:
      raise ValueError("Error writing local file: tensorstore failed") from e
  except ValueError:
    raise RuntimeError("Task exception was never retrieved")  # __context__, not __cause__


def _text_only_enospc(self, *args, **kwargs):
  raise ValueError('Error writing "state/d/abc": [OS error 28: No space left on device]')


@pytest.mark.parametrize("save,cause", [(_wrapped_enospc, RuntimeError),
                                        (_text_only_enospc, ValueError)])
def test_disk_full_while_saving_is_an_enospc_oserror(tmp_path, monkeypatch, save, cause):
  d = str(tmp_path / "ckpt")
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(OSError) as e:
    _fit_tiny(d, total=4)
  assert e.value.errno == errno.ENOSPC and e.value.filename == os.path.join(d, "2")
  assert str(e.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{d}/2'"
  assert type(e.value.__cause__) is cause  # raised from what orbax raised


def test_other_save_errors_pass_through(tmp_path, monkeypatch):
  def denied(self, *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", "/x")
  monkeypatch.setattr(ocp.CheckpointManager, "save", denied)
  with pytest.raises(PermissionError, match="Permission denied"):
    _fit_tiny(str(tmp_path / "ckpt"), total=4)


def test_nan_loss_stops_and_names_the_step(tmp_path):
  with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step \d+"):
    _fit_tiny(None, total=6, lr=1e38)


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path):
  """lr 1e8 diverges within a few steps. Losses and parameters are checked before every save,
  so the run stops naming the step and no non-finite state rotates the finite ones out
  (before: checkpoints every 2 steps, NaN found at the end, both kept checkpoints NaN)."""
  d = str(tmp_path / "ckpt")
  with pytest.raises(FloatingPointError, match=r"non-finite .* step \d+"):
    _fit_tiny(d, total=12, lr=1e8)
  mngr = train_checkpoint._checkpoint_manager(d)
  assert mngr.all_steps(), "the finite checkpoint written before the divergence is kept"
  like = train_checkpoint._abstract(_tiny_like(lr=1e8, total=12))
  for s in mngr.all_steps():
    restored = mngr.restore(s, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(like), history=ocp.args.JsonRestore()))
    for leaf in jax.tree.leaves((restored.state.params, restored.state.opt_state)):
      assert np.all(np.isfinite(np.asarray(leaf))), s
    assert all(np.isfinite(h["loss"]) for h in restored.history), s


def test_batch_iterator_is_deterministic_and_resumable():
  x = np.arange(20)[:, None]
  y = np.arange(20, dtype=np.int32)
  full = [b[1] for b in train.batch_iterator(x, y, 4, seed=1, start_step=0, total_steps=12)]
  tail = [b[1] for b in train.batch_iterator(x, y, 4, seed=1, start_step=7, total_steps=12)]
  assert len(full) == 12 and all(np.array_equal(a, b) for a, b in zip(full[7:], tail))
  assert sorted(np.concatenate(full[:5]).tolist()) == list(range(20))  # one epoch = each once
  with pytest.raises(ValueError, match="batch size 32 exceeds the 20"):
    next(train.batch_iterator(x, y, 32, seed=0, start_step=0, total_steps=1))


def test_padded_batches_cover_everything_once():
  seen = []
  for idx, valid in train.padded_batches(10, 4):
    assert len(idx) == 4
    seen.extend(idx[:valid].tolist())
  assert seen == list(range(10))


def test_sharded_step_on_8_devices_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_sharded_worker.py")],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  m = re.search(r"devices=(\d+) max_rel_diff=([0-9.e+-]+)", out.stdout)
  assert m, out.stdout
  assert int(m.group(1)) == 8
  assert float(m.group(2)) < 1e-4


def test_two_process_jax_distributed_matches_single_process(tmp_path):
  """Two processes on localhost (jax.distributed, gloo), each feeding half of every global
  batch, end with the same parameters as one process feeding the whole batch."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  worker = os.path.join(ROOT, "tests", "_multihost_worker.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, worker, str(i), port, str(tmp_path / f"p{i}")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  ref = subprocess.run([sys.executable, worker, "-1", port, str(tmp_path / "ref")], env=env,
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  r = np.load(tmp_path / "ref.npz")
  assert int(r["devices"]) == 1
  for i in (0, 1):
    d = np.load(tmp_path / f"p{i}.npz")
    assert int(d["devices"]) == 2
    assert float(d["acc"]) == pytest.approx(float(r["acc"]))
    for k in r.files:
      if k.startswith("p"):
        np.testing.assert_allclose(d[k], r[k], rtol=1e-5, atol=1e-6)
