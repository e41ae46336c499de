"""ncjax: neural-collapse metrics and NC-guided transfer learning in JAX/Flax.

The public API, module by module (each module's and function's ``help`` has the details).
Features are ``(N, d)`` float arrays, labels ``(N,)`` integers in ``[0, K)``, images NHWC.

``ncjax.metrics`` -- neural-collapse metrics of features and labels
  ``nc1(features, labels, num_classes=None)`` -> scalar jax.Array, tr(Sigma_W Sigma_B^+)/K
  (>= 0; lower: more collapsed); ``cdnv``, ``numerical_rank``, ``nc2_etf`` likewise,
  ``nc3_duality(features, labels, classifier)``. ``layerwise({layer: features}, labels, metrics=("nc1", ...))`` ->
  ``{layer: {metric: float}}`` (4-D maps and 3-D tokens pooled first).
  ``CollapseStats.create(num_classes, dim)``, ``.update(h, y)``, ``.merge``, ``.nc1()``:
  the same metrics streamed over batches (jittable). Malformed input (shapes, a class
  without examples, non-finite features) raises ``ValueError``.
``ncjax.models`` -- architectures (Flax linen)
  ``get(name, num_classes, **options)`` -> ``flax.linen.Module`` (``names()`` lists them);
  ``model.apply(variables, x, train=False)`` -> logits (N, num_classes);
  ``features(model, variables, x)`` -> ``{unit: (N, C), ..., "penultimate": (N, D)}``;
  ``units(name)`` -> the fine-tuning units in order.
``ncjax.weights`` -- pre-trained checkpoints
  ``load(path, name, variables)`` -> the variables of a torchvision, timm, Hugging Face,
  vit_jax or ncjax checkpoint, with a fresh head; raises ``ncjax.errors.CheckpointError``
  (saying what the file holds) when it does not fit, ``FileNotFoundError`` when it is not
  there. ``load_partial`` (keeps what does not fit fresh), ``preprocessing(path)``.
``ncjax.data`` -- datasets
  ``load(name, split, decode_size=None)`` -> ``ArrayDataset`` (``images`` uint8
  (N, H, W, C), lazily decoded for folders and TFDS; ``labels`` int32 (N,)); names:
  ``digits``, ``fashion_mnist``, ``folder:<dir>``, TFDS names; raises ``FileNotFoundError``
  (saying how to get the data) or ``ValueError``. ``materialize(ds)`` decodes;
  ``stats_for("imagenet")`` -> (mean, std) per channel in [0, 1] units.
``ncjax.transferability`` -- rank candidate models from their frozen features
  ``nc1_score``, ``logme``, ``hscore`` (features, labels), ``leep`` (source probabilities,
  labels), ``ncti`` (one features array per candidate) -> float scores, higher: expected to
  transfer better; ``kendall_tau(scores, accuracies)`` -> float in [-1, 1].
``ncjax.methods``, ``ncjax.train``, ``ncjax.measure`` -- fine-tuning as a trainable mask
  (``trainable_mask(params, method, unit)``), the one jitted train step and its loop, batched
  features and collapse; ``ncjax.experiment.runner.run(config, workdir)`` runs a whole config
  as ``python -m ncjax.main`` does.

Example::

  import numpy as np
  from ncjax import metrics
  h = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)  # (N, d)
  print(float(metrics.nc1(h, np.arange(100) % 4)))  # labels (N,) in [0, K); >= 0

Folders are floors, imports only go down (docs/design.md, tests/test_layering.py):
``errors``/``io`` -> the library (``metrics``, ``transferability``, ``losses``, ``methods``,
``telemetry``, ``models``, ``weights``, ``data``, ``fewshot``, ``train``, ``measure``) ->
``report`` -> ``experiment`` (spec, assets, runner, stages) -> ``main``.

Submodules are imported on demand, so that `import ncjax.metrics` pulls in jax and numpy only.
"""
__version__ = "0.1.0"
