"""Fig. 11: ResNet-18 (ImageNet) on class-balanced CIFAR-10 subsets of 10 ... 4,898 images,
linear probe / Layer FT / SCL FT (block5) / full FT. Weights and data as in table3.py.
Writes accuracy_vs_size.png."""
from configs import table3

TRAIN_SIZES = (10, 24, 59, 142, 344, 835, 2022, 4898)  # the paper's subset sizes


def get_config():
  c = table3.get_config()
  c.models = ("resnet18",)
  c.datasets = ("cifar10",)
  c.train_sizes = TRAIN_SIZES
  c.collapse = False  # NC1 of 10 images is not meaningful; accuracy is what Fig. 11 plots
  return c
