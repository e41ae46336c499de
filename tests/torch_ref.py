"""Independent PyTorch references used by the tests and benchmarks (torch only, no
torchvision): a ResNet with torchvision's module layout / state-dict keys, and a minimal
pre-LN ViT with vit_jax's computation (tanh-GELU, LayerNorm eps 1e-6, class token)."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, width, stride=1):
    super().__init__()
    cout = width * self.expansion
    self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    s = x if self.downsample is None else self.downsample(x)
    return F.relu(y + s)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, width, stride=1):
    super().__init__()
    cout = width * self.expansion
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    s = x if self.downsample is None else self.downsample(x)
    return F.relu(y + s)


CONFIGS = {'resnet18': (BasicBlock, (2, 2, 2, 2)), 'resnet34': (BasicBlock, (3, 4, 6, 3)),
           'resnet50': (Bottleneck, (3, 4, 6, 3))}


class TorchResNet(nn.Module):
  def __init__(self, name='resnet18', num_classes=1000, stem='imagenet'):
    super().__init__()
    block, stages = CONFIGS[name]
    self.stem = stem
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for s, n in enumerate(stages):
      blocks = []
      for j in range(n):
        blocks.append(block(cin, 64 * 2**s, 2 if (s > 0 and j == 0) else 1))
        cin = 64 * 2**s * block.expansion
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x, return_features=False):
    """x: (N, 3, H, W). Returns logits, and optionally the pooled output of each block."""
    x = F.relu(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = self.maxpool(x)
    feats = []
    for s in range(1, 5):
      for blk in getattr(self, f'layer{s}'):
        x = blk(x)
        feats.append(x.mean(dim=(2, 3)))
    pen = x.mean(dim=(2, 3))
    logits = self.fc(pen)
    return (logits, feats, pen) if return_features else logits


def randomize_(model: nn.Module, seed: int = 0):
  """Random weights and BN statistics (so eval mode is a non-trivial test)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
        m.bias.copy_(0.1 * torch.randn(m.out_features, generator=g))
  return model


class TorchViTBlock(nn.Module):
  def __init__(self, d, heads, mlp):
    super().__init__()
    self.ln1 = nn.LayerNorm(d, eps=1e-6)
    self.qkv = nn.Linear(d, 3 * d)
    self.proj = nn.Linear(d, d)
    self.ln2 = nn.LayerNorm(d, eps=1e-6)
    self.fc1 = nn.Linear(d, mlp)
    self.fc2 = nn.Linear(mlp, d)
    self.heads = heads

  def forward(self, x):
    n, t, d = x.shape
    y = self.ln1(x)
    q, k, v = self.qkv(y).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v)
    x = x + self.proj(y.transpose(1, 2).reshape(n, t, d))
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate='tanh'))


class TorchViT(nn.Module):
  """Minimal ViT (class token, pre-LN) for benchmarks."""

  def __init__(self, image_size=224, patch=32, d=768, layers=12, heads=12, mlp=3072,
               num_classes=1000):
    super().__init__()
    g = image_size // patch
    self.embedding = nn.Conv2d(3, d, patch, patch)
    self.cls = nn.Parameter(torch.zeros(1, 1, d))
    self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + g * g, d))
    self.blocks = nn.ModuleList([TorchViTBlock(d, heads, mlp) for _ in range(layers)])
    self.norm = nn.LayerNorm(d, eps=1e-6)
    self.head = nn.Linear(d, num_classes)

  def forward(self, x):
    x = self.embedding(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
    for b in self.blocks:
      x = b(x)
    return self.head(self.norm(x)[:, 0])


_TORCHVISION_OPS = None  # keeps the op schemas below registered (a Library undoes its own on GC)


def import_torchvision():
  """`torchvision`, importable beside a CPU build of torch.

  PyPI's torchvision wheel is built against torch's CUDA build: beside torch's CPU build its
  C++ ops library does not load (libtorch_cuda.so is missing), and `import torchvision` then
  fails registering fake kernels for `torchvision::nms` / `qnms` ('operator ... does not
  exist'). The models need none of those ops, so when the library does not load, the two
  op schemas are declared here first (the schemas of torchvision's csrc/ops/nms.cpp).
  """
  global _TORCHVISION_OPS
  import importlib.util
  import os
  import sys
  import torch
  if 'torchvision' not in sys.modules and _TORCHVISION_OPS is None:
    spec = importlib.util.find_spec('torchvision')
    if spec is None:
      raise ImportError('torchvision is not installed')
    lib = os.path.join(os.path.dirname(spec.origin), '_C.so')
    try:
      torch.ops.load_library(lib)
    except (OSError, RuntimeError):
      _TORCHVISION_OPS = torch.library.Library('torchvision', 'DEF')
      for op in ('nms', 'qnms'):
        _TORCHVISION_OPS.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  import torchvision
  return torchvision
