"""ncjax: neural-collapse metrics and NC-guided transfer learning in JAX/Flax.

Folders are floors, imports only go down (docs/design.md, tests/test_layering.py):
``errors``/``io`` -> the library (``metrics``, ``transferability``, ``losses``, ``methods``,
``telemetry``, ``models``, ``weights``, ``data``, ``fewshot``, ``train``, ``measure``) ->
``report`` -> ``experiment`` (spec, assets, runner, stages) -> ``main``.

Submodules are imported on demand, so that `import ncjax.metrics` pulls in jax and numpy only.
"""
__version__ = "0.1.0"
