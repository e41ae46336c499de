"""The default config shrunk to a tiny MLP and a few steps, for end-to-end tests."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import default  # noqa: E402


def tiny_mlp_config(job: str, depth: int = 3):
  c = default.get_config()
  c.job = job
  c.models = ("mlp",)
  c.backbone.default.options = {"depth": depth, "width": 32}
  c.backbone.default.unit = ("layer2",)
  c.optim.steps = 3
  c.pretrain.optim.steps = 4
  c.eval_batch_size = 256
  return c


def get_config(arg: str = "transfer"):
  """``--config=tests/tiny_config.py:<job>`` on the command line."""
  return tiny_mlp_config(arg)
