"""ncjax: neural-collapse metrics and NC-guided transfer learning in JAX/Flax.

Submodules are imported on demand so that `import ncjax.metrics` pulls in jax only.
"""
__version__ = "0.1.0"
