"""Projection heads used during pre-training only (paper §3.1, Table 1, Fig. 3).

The head sits on the penultimate feature and is dropped after pre-training: the transferred
backbone is the encoder alone.
"""
from __future__ import annotations


import flax.linen as nn


class ProjectionHead(nn.Module):
  """`layers` Dense layers of `width` with ReLU between them, then (optionally) a classifier.

  * ``num_classes`` set (CE / MSE pre-training): every projection layer is followed by ReLU and
    a final ``Dense(num_classes)`` gives the logits. ``layers=0`` is a plain classifier.
  * ``num_classes=None`` (SupCon): the last projection layer is linear and its output, of
    size ``out_dim`` (default `width`), is the embedding. ``layers=1`` is the paper's
    "linear projection", ``layers=2`` its "MLP projection".

  Input (N, D) -> output (N, num_classes) or (N, out_dim).
  """
  layers: int
  width: int
  num_classes: int | None = None
  out_dim: int | None = None

  @nn.compact
  def __call__(self, h):
    if self.num_classes is not None:
      for i in range(self.layers):
        h = nn.relu(nn.Dense(self.width, name=f"proj{i}")(h))
      return nn.Dense(self.num_classes, name="classifier")(h)
    for i in range(self.layers):
      last = i == self.layers - 1
      h = nn.Dense((self.out_dim or self.width) if last else self.width, name=f"proj{i}")(h)
      if not last:
        h = nn.relu(h)
    return h
