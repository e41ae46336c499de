"""Fig. 2: progressive collapse. Train the 9-layer, width-784 MLP on Fashion-MNIST (IDX files,
e.g. Debian's `dataset-fashion-mnist`, /usr/share/datasets/fashion-mnist) and plot the NC1 of
every layer on the training data. Arguments: `configs/fig2.py:mnist` (MNIST IDX files in
--config.data_dir) or `configs/fig2.py:digits` (the embedded digits, offline, 8x8 -> width 64).
"""
from configs import default


def get_config(arg="fashion_mnist"):
  c = default.get_config()
  c.job = "pretrain"
  c.models = ("mlp",)
  c.backbone.default.options = {"depth": 9, "width": 64 if arg == "digits" else 784}
  c.backbone.default.normalization = "dataset"
  c.backbone.default.unit = ("layer5",)
  c.pretrain.dataset = arg
  c.pretrain.classes = ""
  # lr 0.1 diverges for a 9-layer plain MLP (NaN loss); 0.01 trains stably.
  c.pretrain.optim = {"epochs": 150 if arg != "digits" else 100, "steps": 0, "lr": 0.01}
  c.optim.batch_size = 128
  return c
