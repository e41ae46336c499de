"""The Python API as a notebook user meets it (issue 22): README's "Use it from Python" example
runs line for line on generated images and checkpoints, and `help(ncjax)` /
`help(ncjax.weights.load)` read as API documentation, with examples that run."""
import os
import pydoc
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import ncjax  # noqa: E402
from ncjax import metrics, weights  # noqa: E402
from test_weights import torchvision_state_dict  # noqa: E402


def readme_python_example() -> str:
  """The first ```python block under README's "## Use it from Python"."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("\n## Use it from Python\n", 1)[1].split("\n## ", 1)[0]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _flowers(root, per_class=3):
  """``<root>/train/<class>/*.jpg``: RGB photos of several sizes, 3 classes."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for k, name in enumerate(("daisy", "rose", "tulip")):
    os.makedirs(os.path.join(root, "train", name))
    for i in range(per_class):
      h, w = int(rng.integers(200, 300)), int(rng.integers(200, 300))
      small = (rng.random((6, 6, 3)) * 100 + 70 * k).astype(np.uint8)
      Image.fromarray(small).resize((w, h)).save(os.path.join(root, "train", name, f"{i}.jpg"))


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
  """Every line of the example, in a directory holding what it names: an image folder, a
  torchvision `.pth` and a timm `.safetensors` ResNet-18 (random weights)."""
  torch = pytest.importorskip("torch")
  from safetensors.numpy import save_file
  code = readme_python_example()
  for name in ("folder:flowers", "resnet18-f37072fd.pth", "resnet18.a1_in1k.safetensors"):
    assert name in code
  _flowers(str(tmp_path / "flowers"))
  sd, _ = torchvision_state_dict("resnet18", seed=0)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
             tmp_path / "resnet18-f37072fd.pth")
  sd, _ = torchvision_state_dict("resnet18", seed=1)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
            str(tmp_path / "resnet18.a1_in1k.safetensors"))
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
  out = capsys.readouterr().out.splitlines()
  assert list(scope["nc1"]) == [f"block{i}" for i in range(1, 9)] + ["penultimate"]
  assert all(np.isfinite(m["nc1"]) for m in scope["nc1"].values())
  assert sorted(eval(out[-1])) == sorted(scope["scores"])  # noqa: S307 - a printed list
  assert scope["x"].shape == (9, 224, 224, 3)


def test_help_reads_as_api_documentation():
  """help(ncjax): every public module with what it takes and returns, and an example that
  runs; help(ncjax.weights.load): takes, returns, raises, an example."""
  doc = pydoc.render_doc(ncjax, renderer=pydoc.plaintext)
  for name in ("ncjax.metrics", "ncjax.models", "ncjax.weights", "ncjax.data",
               "ncjax.transferability", "nc1(features, labels", "layerwise(",
               "load(path, name, variables)", "CheckpointError", "ValueError", "->"):
    assert name in doc, name
  example = ncjax.__doc__.split("Example::\n\n", 1)[1].split("\n\n", 1)[0]
  lines = [line[2:] for line in example.splitlines()]
  assert 3 <= len(lines) <= 4
  exec("\n".join(lines), {})  # noqa: S102
  doc = pydoc.render_doc(metrics, renderer=pydoc.plaintext)
  for part in ("nc1(features, labels", "Raises", "ValueError", "ZeroSpreadError", "Example::"):
    assert part in doc, part
  example = metrics.__doc__.split("Example::\n\n", 1)[1].split("\n\n", 1)[0]
  lines = [line[2:] for line in example.splitlines()]
  scope = {"np": np, "metrics": metrics}
  exec("\n".join(lines[:-1]), scope)  # noqa: S102 - the docstring's own example
  nc1, cdnv = eval(lines[-1], scope)  # noqa: S307
  assert float(nc1) > 0 and cdnv > 0
  doc = pydoc.render_doc(weights.load, renderer=pydoc.plaintext)
  for part in ("Args:", "Returns:", "Raises:", "CheckpointError", "FileNotFoundError",
               "Example::", "weights.load("):
    assert part in doc, part
