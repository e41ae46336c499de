"""A config's field names and the did-you-mean of a mistyped one. Pure Python, so the command
line can answer a typo before jax loads.
"""
from __future__ import annotations

import difflib


def field_names(config, prefix: str = "") -> list[str]:
  """Every dotted field of `config` (``optim.batch_size``, ...)."""
  out = []
  for k in config:
    v = config[k]
    out.append(prefix + k)
    if hasattr(v, "items") and not isinstance(v, dict):
      out += field_names(v, f"{prefix}{k}.")
  return out


def did_you_mean(word: str, choices) -> str:
  """``", did you mean 'x'?"`` for the choice closest to `word`, or ""."""
  close = difflib.get_close_matches(word, list(choices), n=1)
  return f", did you mean {close[0]!r}?" if close else ""


def suggest_fields(path: str, names: list[str]) -> list[str]:
  """The config fields `path` most likely meant, best first: fields whose last part is
  (nearly) `path`'s (a typo, or the right name in the wrong section), else whole dotted paths
  close to it; ranked by both similarities, only those about as close as the best."""
  ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()
  leaf = lambda name: name.rsplit(".", 1)[-1]
  scores = {n: (ratio(leaf(path), leaf(n)), ratio(path, n)) for n in names}
  close = [n for n, (tail, _) in scores.items() if tail >= 0.8]
  close = close or [n for n, (_, whole) in scores.items() if whole >= 0.75]
  close.sort(key=lambda n: -sum(scores[n]))
  return [n for n in close if sum(scores[n]) >= sum(scores[close[0]]) - 0.2][:3]
