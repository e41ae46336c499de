"""The one train step of every model and method, its optimizer and learning-rate schedule.

`make_train_step` splits the parameters with the method's mask and differentiates the loss
with respect to the trainable partition only; `pgd_adversary` makes it adversarial (Figs. 4/5).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ncjax import methods


PyTree = Any
# forward(params, batch_stats, x, train) -> (logits, new_batch_stats)
Forward = Callable[[PyTree, PyTree, jax.Array, bool], tuple[jax.Array, PyTree]]
# prepare(rng, images, train) -> model input (normalise, resize, augment on device)
Prepare = Callable[[jax.Array, jax.Array, bool], jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The paper's recipe (Appendix B): SGD momentum 0.9, wd 1e-4, cosine 0.1 -> 1e-4.

  ``schedule='step'`` is RFS's instead (Table 2): ``lr`` multiplied by ``decay_factor`` at
  each of ``decay_steps`` (optimizer steps, increasing; ``lr_end`` unused)."""
  lr: float = 0.1
  lr_end: float = 1e-4
  momentum: float = 0.9
  weight_decay: float = 1e-4
  warmup_steps: int = 0
  schedule: str = "cosine"            # cosine | step
  decay_steps: tuple[int, ...] = ()   # step: the steps from which each further decay applies
  decay_factor: float = 0.1           # step: the factor per decay, in (0, 1]

  @classmethod
  def from_config(cls, cfg) -> "OptimConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: cfg[k] for k in fields if k in cfg})


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """The learning rate of update ``count`` (0-based optimizer steps): linear warm-up from 0
  over ``cfg.warmup_steps`` (none: starts at ``cfg.lr``), then

  * ``cosine``: cosine from ``cfg.lr`` down to ``cfg.lr_end`` at `total_steps`;
  * ``step``: ``cfg.lr * cfg.decay_factor ** d`` with d the number of ``cfg.decay_steps``
    <= count. RFS (``adjust_learning_rate``: ``lr * rate ** sum(epoch > decay_epochs)``, epochs
    from 1) decays after ``e`` full epochs, i.e. from step ``e * steps_per_epoch`` on.

  Raises ValueError for a milestone outside ``(0, total_steps)``, a non-increasing one, or a
  factor outside (0, 1]."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if cfg.schedule == "step":
    bounds = tuple(int(b) for b in cfg.decay_steps)
    if (any(b <= a for a, b in zip(bounds, bounds[1:]))
        or any(not 0 < b < total_steps for b in bounds)):
      raise ValueError(f"decay_steps {bounds} must increase within (0, {total_steps})")
    if not 0 < cfg.decay_factor <= 1:
      raise ValueError(f"decay_factor must be in (0, 1], got {cfg.decay_factor}")
    lr, factor, warmup = cfg.lr, cfg.decay_factor, cfg.warmup_steps
    marks = jnp.asarray(bounds or (total_steps,), jnp.int32)  # no bounds: constant lr

    def step_schedule(count):
      decayed = lr * factor ** jnp.sum(count >= marks)
      if warmup:  # as optax's warm-up of the cosine schedule: 0 -> lr linearly
        decayed = jnp.where(count < warmup, lr * count / warmup, decayed)
      return decayed
    return step_schedule
  if cfg.schedule != "cosine":
    raise ValueError(f"schedule must be 'cosine' or 'step', got {cfg.schedule!r}")
  if cfg.lr_end > cfg.lr:
    raise ValueError(f"lr_end ({cfg.lr_end}) must not exceed lr ({cfg.lr})")
  return optax.warmup_cosine_decay_schedule(
      init_value=cfg.lr if cfg.warmup_steps == 0 else 0.0, peak_value=cfg.lr,
      warmup_steps=cfg.warmup_steps, decay_steps=max(total_steps, cfg.warmup_steps + 1),
      end_value=cfg.lr_end)


def make_optimizer(cfg: OptimConfig, total_steps: int, mask: PyTree,
                   lr_scale: PyTree | None = None) -> optax.GradientTransformation:
  """Masked SGD on `lr_schedule`: frozen leaves (``mask`` False) get neither updates nor
  optimizer state. `lr_scale` (a float per leaf like the parameters, e.g.
  `methods.layer_decay_scales`) multiplies each leaf's update: its learning rate."""
  inner = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay),  # PyTorch-style L2 on the gradient
      optax.sgd(lr_schedule(cfg, total_steps), momentum=cfg.momentum),
  )
  tx = optax.masked(inner, mask)
  if lr_scale is None:
    return tx
  factors = methods.partition(lr_scale, mask)[0]  # the updates' structure: None where frozen

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * f, updates, factors), state
  return optax.chain(tx, optax.GradientTransformation(lambda _: optax.EmptyState(), update))


def init_state(params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats if batch_stats is not None else {},
                    opt_state=jax.jit(tx.init)(params))  # one program, not one per shape


@functools.lru_cache(maxsize=None)
def model_forward(model) -> Forward:
  """`Forward` of a Flax model whose ``__call__(x, train)`` returns logits.

  Cached per model (Flax modules hash by their fields), so the jitted evaluation functions
  below, keyed on the forward, compile once per model and input shape, not once per run."""
  def forward(params, batch_stats, x, train):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if train and batch_stats:
      logits, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return logits, mutated["batch_stats"]
    return model.apply(variables, x, train=train), batch_stats
  return forward


@functools.lru_cache(maxsize=None)
def head_forward(num_classes: int) -> Forward:
  """`Forward` that runs only the classifier ``params['head']`` (a Dense layer, see
  docs/design.md) on cached penultimate features (N, D)."""
  dense = nn.Dense(num_classes)

  def forward(params, batch_stats, feats, train):
    del train
    return dense.apply({"params": params[methods.HEAD]}, feats), batch_stats
  return forward


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


# adversary(params, batch_stats, x, labels, rng) -> perturbed x (model-input units)
Adversary = Callable[[PyTree, PyTree, jax.Array, jax.Array, jax.Array], jax.Array]


def make_train_step(forward: Forward, tx: optax.GradientTransformation, mask: PyTree,
                    prepare: Prepare | None = None,
                    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
                    adversary: Adversary | None = None):
  """The one train step shared by every model and method (not jitted; see `jit_train_step`).

  `prepare` turns the raw batch into model input on device (augmentation draws from the step's
  key); `adversary` (e.g. `pgd_adversary`) perturbs that input before the update (adversarial
  pre-training). Returns ``step(state, x, labels, rng) -> (state, metrics)``; ``metrics``
  holds the scalar ``loss`` and ``accuracy`` (fraction; NaN when the outputs are not one row
  of logits per label, e.g. SupCon embeddings) of the batch before the update.
  """
  def step(state: TrainState, x, labels, rng):
    rng = jax.random.fold_in(rng, state.step)
    if prepare is not None:
      x = prepare(rng, x, True)
    if adversary is not None:
      x = adversary(state.params, state.batch_stats, x, labels, jax.random.fold_in(rng, 1))
    trainable, frozen = methods.partition(state.params, mask)

    def objective(trainable):
      params = methods.combine(trainable, frozen)
      logits, new_stats = forward(params, state.batch_stats, x, True)
      logits = logits.astype(jnp.float32)  # a bfloat16 model's loss is still float32
      return loss_fn(logits, labels), (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=methods.combine(trainable, frozen),
                              batch_stats=new_stats, opt_state=opt_state)
    if logits.shape[0] == labels.shape[0]:
      acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    else:
      acc = jnp.full((), jnp.nan)
    return new_state, {"loss": loss, "accuracy": acc}
  return step


def pgd_adversary(forward: Forward, loss_fn, eps, *, steps: int = 7,
                  step_size=None) -> Adversary:
  """l_inf PGD (Madry et al.): `steps` signed-gradient ascent steps of size `step_size`
  (default 2.5 eps / steps) from a uniform random start in the eps-ball.

  `eps` is in model-input units: for inputs normalised per channel by `std`, pass
  ``eps_pixels / std`` (shape (C,)) to bound the attack in [0, 1] pixel units. The attack runs
  the model in train mode (batch statistics, as the update does) and discards its BatchNorm
  updates."""
  eps = jnp.asarray(eps, jnp.float32)
  size = 2.5 * eps / steps if step_size is None else jnp.asarray(step_size, jnp.float32)

  def attack(params, batch_stats, x, labels, rng):
    def loss_of(delta):
      return loss_fn(forward(params, batch_stats, x + delta, True)[0], labels)

    def body(_, delta):
      g = jax.grad(loss_of)(delta)
      return jnp.clip(delta + size * jnp.sign(g), -eps, eps)

    delta = jax.random.uniform(rng, x.shape, x.dtype, -1.0, 1.0) * eps
    delta = jax.lax.fori_loop(0, steps, body, delta)
    return jax.lax.stop_gradient(x + delta)
  return attack
