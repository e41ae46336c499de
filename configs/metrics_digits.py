"""NC metrics of the embedded digits: raw pixels and a fixed random ReLU feature map.

python -m ncjax.main --config=configs/metrics_digits.py --workdir=/tmp/nc
"""
from configs import default


def get_config():
  c = default.get_config()
  c.job = "metrics"
  c.split = "train"
  c.random_features = 2048
  return c
