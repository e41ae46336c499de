"""What the stages of one spec's runs share while the runner walks them."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ncjax.experiment.spec import Run, Spec


@dataclasses.dataclass
class Context:
  """One spec's run-time state, handed to every stage.

  `log(run_id)` gives the per-step logger of a run (`ncjax.telemetry.RunLog`) or None;
  `pretrained` maps a model name to the variables its pre-training run left, `source` to that
  run's record; only the `primary` process writes files."""
  spec: Spec
  workdir: str | None
  mesh: Any
  log: Callable[[str], Callable | None] = lambda _: None
  primary: bool = True
  pretrained: dict = dataclasses.field(default_factory=dict)
  source: dict = dataclasses.field(default_factory=dict)
  _shared: dict = dataclasses.field(default_factory=dict)

  def pretrained_for(self, run: Run) -> dict | None:
    return self.pretrained.get(run.backbone.model)

  def shared(self, key: tuple, make: Callable[[], Any]) -> Any:
    """`make()`, reused by consecutive runs that ask with the same `key`: runs come grouped
    (every method of a cell, every shots setting of a few-shot pass), so one value is kept."""
    if key not in self._shared:
      self._shared.clear()
      self._shared[key] = make()
    return self._shared[key]
