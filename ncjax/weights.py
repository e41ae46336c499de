"""Import pre-trained weights into ncjax models.

`load(path, name, variables, *, keep_head=False) -> variables` (strict) and
`load_partial(...) -> (variables, skipped)` (lenient):

* ResNets (`resnet18/34/50`): a torchvision or timm state dict (the same key names) in
  `.safetensors`, `.npz` (flat, torch key names, torch layouts) or `.pth`/`.pt`/`.bin`
  (needs torch, imported lazily); or a Hugging Face `ResNetModel` /
  `ResNetForImageClassification` (`embedder.embedder.*`, `encoder.stages.{s}.layers.{l}.
  layer.{i}` / `.shortcut`, `classifier.1`), renamed to torchvision's names first.
  Conv kernels OIHW -> HWIO; BatchNorm `weight, bias, running_mean, running_var` ->
  params `scale, bias` and batch_stats `mean, var` (`num_batches_tracked` ignored);
  `fc` -> `head` only with `keep_head=True` and a matching shape (else the fresh head of
  `variables` is kept, with a warning when `keep_head=True`). A `module.` prefix
  (DataParallel) is stripped; `{'state_dict': ...}` / `{'model': ...}` wrappers are opened.
* DenseNets (`densenet121/161/169/201`) and `mobilenet_v2`: a torchvision state dict, read
  and converted like the ResNets' (depthwise kernels (C, 1, 3, 3) -> (3, 3, 1, C));
  `classifier` / `classifier.1` -> `head`. The keys of torchvision's own DenseNet files
  (`...denselayer1.norm.1.weight`, from LuaTorch) are renamed as torchvision's loader renames
  them (`...denselayer1.norm1.weight`).
* ViTs (`vit_*`): a vit_jax `.npz` (flat, '/'-joined Flax paths); a timm state dict
  (`.safetensors` / `.pth` / `.bin`: `cls_token`, `pos_embed`, `patch_embed.proj`,
  `blocks.{i}.attn.qkv` with fused q|k|v rows, `attn.proj`, `norm1/2`, `mlp.fc1/2`, `norm`,
  `head`); or a Hugging Face `ViTModel` / `ViTForImageClassification` (`embeddings.*`,
  `encoder.layer.{i}.attention.attention.{query,key,value}`, ..., `layernorm`,
  `classifier`; a ViTModel's `pooler` is its `pre_logits`). timm's and Hugging Face's are
  renamed to vit_jax's names first (torch (out, in) weights -> kernels, split into heads of
  64). Both libraries compute GELU exactly where ncjax's ViT (as vit_jax) uses the tanh
  approximation, and Hugging Face's LayerNorm eps is 1e-12 (ncjax: 1e-6): the logits differ
  by a few 1e-4 of their scale, nearly all from the GELU (logged at INFO). `Transformer/
  encoderblock_{i-1}` -> `layer{i}`, `Transformer/posembed_input/pos_embedding` ->
  `pos_embedding`, `Transformer/encoder_norm` -> `encoder_norm`. The position embedding is
  resized to the grid of `variables` (class slot kept; the g0 x g0 grid resized linearly
  with corner alignment, i.e. the same values as vit_jax's `scipy.ndimage.zoom(order=1)`,
  implemented in numpy). The head is replaced by the fresh one unless `keep_head=True`
  and the shapes match. `pre_logits` is loaded when the model has it (representation_size
  set); when the model has none, a checkpoint's `pre_logits` is dropped and reported in
  `skipped` -- also by `load`, where it is *not* an error (the standard
  fine-tuning recipe drops it).

* Hugging Face / timm model directories (what `huggingface_hub.snapshot_download` or the
  model page's "Files" give: `config.json` + `model.safetensors`, or `pytorch_model.bin`,
  or a sharded `model.safetensors.index.json`), or their `model.safetensors` named directly
  with the `config.json` beside it. The config is checked first: a model ncjax lacks
  (another `model_type`, a timm `architecture` other than a ViT or ResNet-18/34/50, a ResNet
  v1 or a ViT of other heads) is refused before the weights are read, saying what it is.
  `preprocessing(path)` gives the mean, std and input size the checkpoint was trained with
  (from `preprocessor_config.json` or timm's `pretrained_cfg`), where the files say.

* ncjax's own checkpoints (any model): a run directory ``<workdir>/runs/<run id>`` (its
  newest checkpoint), its ``checkpoints/`` directory or one step ``checkpoints/<step>/``, as
  written by `ncjax.train.fit` (pre-training or fine-tuning). Only the parameters and
  BatchNorm statistics are read (not the optimizer state; nothing in the directory is
  changed); the backbone is transplanted like `ncjax.experiment.assemble.transplant`: the head follows
  `keep_head` as above, a pre-training projection head is dropped.

`load` is strict: a missing key, an unexpected key or a shape mismatch raises
`ncjax.errors.CheckpointError` naming the key and both shapes (a timm or Hugging Face key in
vit_jax's / torchvision's names, with the file's own name beside it); a file that is not a
readable checkpoint raises `CheckpointError` naming the file and the expected format. When
the checkpoint holds another architecture, the error first says what it looks like
(`describe_checkpoint`: "resnet50 (ImageNet stem, width 64)", "vit_b16 (patch 16, hidden
768, 12 layers)"; for an ncjax run also the model and settings it was made with), then a few
of the mismatches.
`load_partial` keeps the fresh values for whatever could not be loaded and returns
`(variables, skipped)`, `skipped` a list of `"<checkpoint key> (<reason>)"` strings (the
file's own key names).
A missing file raises FileNotFoundError saying where such weights come from.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from absl import logging
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from ncjax import lora
from ncjax.errors import CheckpointError
from ncjax.models.densenet import CONFIGS as DENSENET_CONFIGS
from ncjax.models.resnet import CONFIGS as RESNET_CONFIGS
from ncjax.models.vit import CONFIGS as VIT_CONFIGS

__all__ = ["CheckpointError", "describe_checkpoint", "describe_variables", "head_classes",
           "load", "load_partial", "ncjax_step_dir", "preprocessing", "read_checkpoint",
           "read_ncjax", "resize_pos_embedding", "torchvision_key_map", "vit_key_map"]

_SOURCES = {
    "resnet": ("ResNet state dicts come from the torchvision model zoo, e.g. "
               "https://download.pytorch.org/models/resnet18-f37072fd.pth (resnet34-b627a593.pth, "
               "resnet50-11ad3fa6.pth / resnet50-0676ba61.pth), or timm (the same key names); "
               "expected a .pth, .safetensors or .npz file holding a flat state dict "
               "(conv1.weight, bn1.*, layer1.0.conv1.weight, ..., fc.weight), or a Hugging Face "
               "ResNetModel / ResNetForImageClassification directory (config.json + "
               "model.safetensors)."),
    "densenet": ("torchvision DenseNet state dicts come from the torchvision model zoo, e.g. "
                 "https://download.pytorch.org/models/densenet121-a639ec97.pth "
                 "(densenet161-8d451a50.pth, densenet169-b2777c0a.pth, densenet201-c1103571.pth);"
                 " expected a .pth, .safetensors or .npz file holding a flat state dict "
                 "(features.conv0.weight, features.denseblock1.denselayer1.norm1.*, ..., "
                 "features.norm5.*, classifier.weight)."),
    "mobilenet_v2": ("torchvision MobileNetV2 state dicts come from the torchvision model zoo, "
                     "e.g. https://download.pytorch.org/models/mobilenet_v2-b0353104.pth "
                     "(IMAGENET1K_V1) or mobilenet_v2-7ebf99e0.pth (IMAGENET1K_V2); expected a "
                     ".pth, .safetensors or .npz file holding a flat state dict "
                     "(features.0.0.weight, features.1.conv.0.0.weight, ..., "
                     "features.18.1.*, classifier.1.weight)."),
    "vit": ("ViT checkpoints come from vit_jax (google-research/vision_transformer, e.g. "
            "gs://vit_models/imagenet21k/ViT-B_32.npz: a flat .npz whose keys are '/'-joined "
            "Flax paths, embedding/kernel, cls, Transformer/encoderblock_0/...), timm (a state "
            "dict .safetensors / .pth / .bin with cls_token, pos_embed, patch_embed.proj, "
            "blocks.0.attn.qkv, ..., head; or a timm hub directory, config.json + "
            "model.safetensors) or Hugging Face transformers (a ViTModel / "
            "ViTForImageClassification directory, config.json + model.safetensors)."),
}
_NCJAX_SOURCE = ("ncjax's own checkpoints (any model) are directories: a run directory "
                 "<workdir>/runs/<run id>, its checkpoints/ or a step directory "
                 "checkpoints/<step>/.")


# ----------------------------------------------------------------------------- reading


# Families whose files are torchvision state dicts.
_TORCHVISION = ("resnet", "densenet", "mobilenet_v2")


def _family(name: str, strict: bool = True) -> str | None:
  """'resnet', 'densenet', 'mobilenet_v2' or 'vit': which importer reads `name`'s files;
  None (`strict=False`) or a CheckpointError when none does."""
  if name in RESNET_CONFIGS:
    return "resnet"
  if name in DENSENET_CONFIGS:
    return "densenet"
  if name == "mobilenet_v2":
    return "mobilenet_v2"
  if name.startswith("vit_"):
    return "vit"
  if not strict:
    return None
  raise CheckpointError(f"no weight importer for model {name!r} from a file; supported: "
                   f"{', '.join(RESNET_CONFIGS)}, {', '.join(DENSENET_CONFIGS)}, mobilenet_v2, "
                   f"vit_* (vit_b32, vit_b16, vit_s16, vit_ti16). {_NCJAX_SOURCE}")


def _read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    if not isinstance(f, np.lib.npyio.NpzFile):
      raise CheckpointError(f"{path}: a single .npy array, not an .npz archive")
    return {k: np.asarray(f[k]) for k in f.files}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return dict(load_file(path))


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs PyTorch, which is not an ncjax dependency; install torch, "
        "or convert the state dict to .safetensors / .npz first") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model", "model_state_dict"):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not torch.is_tensor(v):
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    v = v.detach().cpu()
    if v.dtype in (torch.bfloat16, torch.float16):
      v = v.float()
    out[k] = v.numpy()
  return out


_READERS = {".npz": _read_npz, ".safetensors": _read_safetensors,
            ".pth": _read_torch, ".pt": _read_torch, ".bin": _read_torch}


def read_checkpoint(path, family: str) -> dict[str, np.ndarray]:
  """Reads a flat checkpoint into `{key: numpy array}`, dispatching on the suffix."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path!r}. {_SOURCES[family]} {_NCJAX_SOURCE}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _READERS:
    raise CheckpointError(f"{path}: unsupported suffix {suffix!r}. {_SOURCES[family]}")
  try:
    flat = _READERS[suffix](path)
  except (CheckpointError, ImportError):
    raise
  except Exception as e:  # pylint: disable=broad-except  # BadZipFile, EOFError, pickle errors, ...
    raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}). "
                          f"{_SOURCES[family]}") from e
  if not flat:
    raise CheckpointError(f"{path}: the checkpoint is empty. {_SOURCES[family]}")
  return flat


# ----------------------------------------------------------------------------- architectures

# torchvision's own DenseNet files keep LuaTorch's names, `denselayer1.norm.1.weight`;
# torchvision's `densenet._load_state_dict` renames them to `denselayer1.norm1.weight`.
_DENSENET_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                                  r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")

# Architectures of the torchvision and vit_jax zoos that ncjax has no model for, by name.
_OTHER_RESNETS = {((2, 2, 2, 2), "bottleneck"): "resnet26 (timm)"}
# What a timm / Hugging Face ViT has that ncjax's ViT lacks, by a key (a regular expression).
_VIT_VARIANTS = ((r"reg_token", "register tokens (reg_token)"),
                 (r"dist_token", "a distillation token (DeiT)"),
                 (r"fc_norm\.weight", "average pooling (fc_norm)"),
                 (r"norm_pre\.weight", "a pre-norm (norm_pre, as CLIP)"),
                 (r"blocks\.\d+\.ls1\.gamma", "layer scale (ls1, ls2)"),
                 (r"blocks\.\d+\.attn\.q_norm\.weight", "query / key norms"),
                 (r"attn_pool\..+", "attention pooling (attn_pool)"))
# Families ncjax has no model for, by a key only they have.
_OTHER_MODELS = (
    (r"(.+\.)?stages\.\d+\.blocks\.\d+\.conv_dw\.weight", "a ConvNeXt (timm)"),
    (r"(convnext\.)?encoder\.stages\.\d+\.layers\.\d+\.dwconv\.weight",
     "a ConvNeXt (Hugging Face)"),
    (r".+\.relative_position_bias_table", "a Swin Transformer"),
    (r"conv_stem\.weight", "an EfficientNet / MobileNetV3 (timm)"),
    (r"(visual\.)?transformer\.resblocks\.\d+\..+", "a CLIP ViT (OpenAI / open_clip)"),
    (r"conv1\.0\.weight", "a ResNet-D (timm resnet*d: a deep 3-conv stem)"),
    (r"(?!vit\.|resnet\.)([a-z0-9_]+)\.(embeddings|encoder|embedder)\..+",
     "a Hugging Face model of another family"))
_OTHER_VITS = {(16, 1024, 24, 16, 4096): "ViT-L/16", (32, 1024, 24, 16, 4096): "ViT-L/32",
               (14, 1280, 32, 16, 5120): "ViT-H/14", (8, 768, 12, 12, 3072): "ViT-B/8"}


def _channels_text(channels) -> list:
  return [] if channels in (3, None) else [f"{channels} input channel" + "s" * (channels != 1)]


def _resnet_text(stages, bottleneck: bool, kernel: int, width: int, channels: int,
                 variant: str = "") -> str:
  """'resnet50 (ImageNet stem, width 64)' from a ResNet's blocks per stage, block type, stem
  kernel size, stem width and input channels."""
  block = "bottleneck" if bottleneck else "basic"
  stages = tuple(int(n) for n in stages)
  base = next((n for n, (st, b) in RESNET_CONFIGS.items() if tuple(st) == stages and b == block),
              _OTHER_RESNETS.get((stages, block)))
  name = base if base in RESNET_CONFIGS and not variant else None
  label = (f"{variant}{base}" if base else
           f"a {variant}ResNet of {'-'.join(map(str, stages))} {block} blocks per stage")
  stem = {7: "ImageNet stem", 3: "CIFAR stem"}.get(kernel, f"{kernel}x{kernel} stem")
  text = f"{label} ({', '.join([stem, f'width {width}'] + _channels_text(channels))})"
  if name is None:
    text += f"; ncjax has no such model (it has {', '.join(RESNET_CONFIGS)})"
  return text


def _vit_text(patch, hidden, layers, heads, mlp, channels) -> str:
  """'vit_b16 (patch 16, hidden 768, 12 layers)' from a ViT's dimensions."""
  dims = (patch, hidden, layers, heads, mlp)
  name = next((n for n, c in VIT_CONFIGS.items() if tuple(c) == dims), None)
  label = name or _OTHER_VITS.get(dims) or "a ViT"
  text = (f"{label} (" + ", ".join([f"patch {patch}", f"hidden {hidden}", f"{layers} layers"]
                                   + _channels_text(channels)) + ")")
  if name is None:
    text += (f"{' with ' + str(heads) + ' heads and MLP ' + str(mlp) if label == 'a ViT' else ''}"
             f"; ncjax has no such model (it has {', '.join(VIT_CONFIGS)})")
  return text


def _densenet_text(shape: dict[str, tuple]) -> str:
  """'densenet121 (growth rate 32, 64 initial features)' from a torchvision DenseNet's
  {key: shape} (keys renamed as torchvision renames its own files')."""
  layers = {}
  for k in shape:
    if m := re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", k):
      layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  blocks = tuple(len(layers[b]) for b in sorted(layers))
  growth = shape.get("features.denseblock1.denselayer1.conv2.weight", (None,))[0]
  conv0 = shape["features.conv0.weight"]
  name = next((n for n, c in DENSENET_CONFIGS.items() if c == (growth, blocks, conv0[0])), None)
  label = name or f"a DenseNet of {'-'.join(map(str, blocks))} layers per block"
  text = (f"{label} (" + ", ".join([f"growth rate {growth}", f"{conv0[0]} initial features"]
                                   + _channels_text(conv0[1])) + ")")
  if name is None:
    text += f"; ncjax has no such model (it has {', '.join(DENSENET_CONFIGS)})"
  return text


def _mobilenet_text(shape: dict[str, tuple]) -> str:
  """'mobilenet_v2 (32 stem channels, 1280 final channels)' from a torchvision MobileNetV2's
  {key: shape}."""
  stem = shape["features.0.0.weight"]
  blocks = len({m.group(1) for k in shape if (m := re.match(r"features\.(\d+)\.conv\.", k))})
  last = shape.get(f"features.{blocks + 1}.0.weight", (None,))[0]
  label = "mobilenet_v2" if blocks == 17 else f"a MobileNetV2 of {blocks} blocks"
  text = (f"{label} (" + ", ".join([f"{stem[0]} stem channels", f"{last} final channels"]
                                   + _channels_text(stem[1])) + ")")
  if (blocks, stem[0], last) != (17, 32, 1280):
    text += "; ncjax has no such model (it has mobilenet_v2 at width 1.0: 32 and 1280 channels)"
  return text


def describe_checkpoint(flat: dict[str, Any]) -> str | None:
  """What architecture a torchvision or vit_jax state dict (`{key: array}`) holds, in words:
  'resnet50 (ImageNet stem, width 64)', 'densenet121 (growth rate 32, 64 initial features)',
  'mobilenet_v2 (32 stem channels, 1280 final channels)', 'vit_b16 (patch 16, hidden 768,
  12 layers)', ...; None when it is none of them. Read from key names and shapes: ResNets from
  the blocks per stage, bottleneck vs basic blocks and conv1 (kernel 7: ImageNet stem, 3:
  CIFAR stem; its width and input channels); DenseNets from the layers per block, the growth
  rate and conv0; MobileNetV2s from the blocks and the widths of the first and last convs;
  ViTs from the patch embedding, the encoder blocks and their widths (a timm or Hugging Face
  ViT also names what of it ncjax's ViT lacks: register tokens, average pooling, ...);
  a few other families by a key only they have ("a ConvNeXt (timm); ncjax has no such
  model")."""
  try:
    flat = _canonical(flat)[0]
  except (CheckpointError, KeyError, ValueError):
    pass
  shape = {}
  for k, v in flat.items():
    for prefix in ("module.", "params/"):
      k = k[len(prefix):] if k.startswith(prefix) else k
    shape[_DENSENET_LEGACY_KEY.sub(r"\1\2", k)] = tuple(getattr(v, "shape", ()))
  if len(shape.get("features.conv0.weight", ())) == 4:
    return _densenet_text(shape)
  if len(shape.get("features.0.0.weight", ())) == 4:
    return _mobilenet_text(shape)
  conv1 = shape.get("conv1.weight", ())
  if len(conv1) == 4:
    blocks = {}
    for k in shape:
      if m := re.match(r"layer(\d+)\.(\d+)\.", k):
        blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = tuple(len(blocks[s]) for s in sorted(blocks))
    bottleneck = any(re.fullmatch(r"layer\d+\.\d+\.conv3\.weight", k) for k in shape)
    first, second = shape.get("layer1.0.conv1.weight", ()), shape.get("layer1.0.conv2.weight", ())
    variant = ""
    if len(second) == 4 and second[1] != second[0]:
      variant = "grouped-convolution (ResNeXt) "
    elif bottleneck and len(first) == 4 and first[0] == 2 * conv1[0]:
      variant = "wide "
    return _resnet_text(stages, bottleneck, conv1[2], conv1[0], conv1[1], variant)
  embed = shape.get("embedding/kernel", ())
  if len(embed) == 4:
    layers = len({m.group(1) for k in shape
                  if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    block = "Transformer/encoderblock_0/"
    query = shape.get(block + "MultiHeadDotProductAttention_1/query/kernel", (None, None))
    mlp = shape.get(block + "MlpBlock_3/Dense_0/kernel", (None, None))
    text = _vit_text(embed[0], embed[3], layers, query[1], mlp[1], embed[2])
    extras = [what for key, what in _VIT_VARIANTS if any(re.fullmatch(key, k) for k in shape)]
    extras += ["no class token"] if "cls" not in shape else []
    if extras:
      text += f", with {', '.join(extras)}; ncjax's ViT has none of these"
    return text
  return next((f"{what}; ncjax has no such model" for key, what in _OTHER_MODELS
               if any(re.fullmatch(key, k) for k in shape)), None)


def describe_variables(name: str | None, variables) -> str:
  """What architecture ncjax variables (``{'params': ...}``, arrays or shapes) hold, in the
  words of `describe_checkpoint`; `name` (or 'an ncjax model') when not a ResNet, DenseNet,
  MobileNetV2, ViT or MLP."""
  params = unfreeze(variables.get("params", variables))
  if set(params) == {"backbone", "projection"}:  # pre-training with a projection head
    params = params["backbone"]
  flat = traverse_util.flatten_dict(params)
  try:
    torchvision = {("stem", "conv0", "kernel"): "densenet121",
                   ("block1", "depthwise", "conv", "kernel"): "mobilenet_v2"}
    for probe, family_name in torchvision.items():
      if probe in flat:  # described through the torchvision names of its keys
        keys = torchvision_key_map(family_name, {("params",) + p: v for p, v in flat.items()})
        return describe_checkpoint({k: np.broadcast_to(np.float32(0), _torch_shape(
            flat[p[1:]].shape, fn)) for p, (k, fn) in keys.items()})
    if ("stem", "conv", "kernel") in flat:
      kernel = flat[("stem", "conv", "kernel")].shape  # (kh, kw, in, width)
      blocks = sorted({p[0] for p in flat if re.fullmatch(r"block\d+", p[0])},
                      key=lambda b: int(b[5:]))
      # A stage starts at block1 and at every block that downsamples.
      starts = [i for i, b in enumerate(blocks)
                if i == 0 or (b, "downsample_conv", "kernel") in flat] + [len(blocks)]
      return _resnet_text(np.diff(starts), ("block1", "conv3", "kernel") in flat, kernel[0],
                          kernel[3], kernel[2])
    if ("embedding", "kernel") in flat:
      keys = vit_key_map({("params",) + p: v for p, v in flat.items()})
      return describe_checkpoint({k: flat[p[1:]] for p, k in keys.items()})
    if ("layer1", "dense", "kernel") in flat:
      kernel = flat[("layer1", "dense", "kernel")].shape
      depth = len({p[0] for p in flat if re.fullmatch(r"layer\d+", p[0])})
      return f"mlp ({depth} layers, width {kernel[1]}, {kernel[0]} input features)"
  except (KeyError, IndexError, ValueError, CheckpointError):
    pass
  return name or "an ncjax model"


def _params_first(flat: dict) -> dict:
  """`flat` with the parameters before the BatchNorm statistics (errors list them first)."""
  return dict(sorted(flat.items(), key=lambda kv: kv[0][0] != "params"))


def _cannot_load(path, target: str, found: str | None, errors: list[str],
                 lead: str | None = None, note: str = "") -> str:
  """The strict-mode error: when the checkpoint's architecture `found` is not the model's
  `target`, that first (`lead`, default 'this looks like <found>') and a few of the
  mismatches, which all follow from it; else up to 20 mismatches; then `note`."""
  if found and found != target:
    lead = f"{lead or 'this looks like ' + found}; {len(errors)} problem(s), e.g. "
    shown = errors[:3]
  else:
    lead, shown = "", errors[:20]
  more = [f"... and {len(errors) - len(shown)} more"] if len(errors) > len(shown) else []
  return (f"cannot load {os.fspath(path)} into {target}: {lead}" + "; ".join(shown + more)
          + note)


# ----------------------------------------------------------------------------- ncjax runs


def _steps(directory: str) -> list[int]:
  """The complete checkpoint steps in an orbax checkpoints directory, oldest first (orbax
  names a save in progress ``<step>.orbax-checkpoint-tmp...``, an unreadable one is renamed
  ``<step>.unreadable``)."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names
                if n.isdigit() and os.path.isdir(os.path.join(directory, n, "state")))


def _runs_below(path: str, depth: int = 4) -> list[str]:
  """Run directories (holding checkpoints/<step>/) under `path`, relative to it."""
  out = []
  for root, dirs, _ in os.walk(path):
    if os.path.basename(root) == "checkpoints" and _steps(root):
      out.append(os.path.relpath(os.path.dirname(root), path))
      dirs[:] = []
    elif os.path.relpath(root, path).count(os.sep) >= depth:
      dirs[:] = []
  return sorted(out)


def ncjax_step_dir(path) -> str:
  """The checkpoint step directory an ncjax weights path names: a step directory
  ``<run>/checkpoints/<step>`` itself, else the newest step of a run's ``checkpoints/``
  directory or of a run directory. Raises `CheckpointError` saying what the directory holds
  instead (several runs, no checkpoint yet, something else)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isdir(os.path.join(path, "state")):
    return path
  checkpoints = os.path.join(path, "checkpoints")
  checkpoints = checkpoints if os.path.isdir(checkpoints) else path
  steps = _steps(checkpoints)
  if steps:
    return os.path.join(checkpoints, str(steps[-1]))
  runs = _runs_below(path)
  if runs:
    listed = ", ".join(runs[:5]) + (f", ... ({len(runs)} runs)" if len(runs) > 5 else "")
    raise CheckpointError(f"{path} holds ncjax runs, not one run: pass one of them as the "
                          f"weights, e.g. {os.path.join(path, runs[0])} (runs: {listed})")
  if checkpoints != path or os.path.basename(path) == "checkpoints":
    raise CheckpointError(f"{path}: this ncjax run has no checkpoint yet (a run saves one "
                          "when it ends, and every checkpoint_every steps)")
  raise CheckpointError(f"{path} is a directory but not an ncjax checkpoint. {_NCJAX_SOURCE} "
                        "Other weights are files (torchvision / timm .pth / .safetensors / .npz, "
                        "vit_jax .npz) or Hugging Face / timm model directories (config.json + "
                        "model.safetensors).")


def _run_fingerprint(step_dir: str) -> tuple[str, dict] | tuple[None, None]:
  """(run directory, its fingerprint.json) of a step directory, when it has them."""
  run_dir = os.path.dirname(os.path.dirname(step_dir))
  if os.path.basename(os.path.dirname(step_dir)) != "checkpoints":
    return None, None  # a step directory copied out of its run
  try:
    with open(os.path.join(run_dir, "fingerprint.json")) as f:
      return run_dir, dict(json.load(f))
  except (OSError, ValueError, TypeError):
    return None, None


def read_ncjax(step_dir: str) -> dict:
  """``{'params', 'batch_stats'}`` (numpy) of an ncjax checkpoint step directory; a
  pre-training projection head is dropped (``params['backbone']``). The optimizer state is
  not read, and nothing in the directory is changed (unlike resuming a run)."""
  import jax
  import orbax.checkpoint as ocp
  handler = ocp.CompositeCheckpointHandler(state=ocp.PyTreeCheckpointHandler(),
                                           history=ocp.JsonCheckpointHandler())
  checkpointer = ocp.Checkpointer(handler)
  try:
    tree = checkpointer.metadata(step_dir).item_metadata["state"]
    tree = getattr(tree, "tree", tree)
    wanted = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    if "params" not in wanted:
      raise KeyError("the checkpoint has no params")
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    state = checkpointer.restore(step_dir, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore, partial_restore=True)))["state"]
  except Exception as e:  # pylint: disable=broad-except  # orbax, tensorstore, json, ...
    others = [s for s in _steps(os.path.dirname(step_dir))
              if str(s) != os.path.basename(step_dir)]
    raise CheckpointError(
        f"{step_dir} is not a readable ncjax checkpoint ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:300]})"
        + (f"; its run has other steps: {', '.join(map(str, others))}" if others else "")) from e
  finally:
    checkpointer.close()
  params = dict(state["params"])
  if set(params) == {"backbone", "projection"}:
    params = params["backbone"]
  if lora.count(params):  # a LoRA run: its updates merged into plain weights
    _, fingerprint = _run_fingerprint(step_dir)
    if not fingerprint or "lora.alpha" not in fingerprint or "lora.rank" not in fingerprint:
      raise CheckpointError(f"{step_dir} holds LoRA factors, but no fingerprint.json of its "
                            "run gives lora.alpha and lora.rank to merge them (load the run "
                            "directory, not a copy of the step)")
    params = lora.merge(params, float(fingerprint["lora.alpha"]) / int(fingerprint["lora.rank"]))
  return {"params": params, "batch_stats": dict(state.get("batch_stats") or {})}


def _ncjax_source(step_dir: str, source: dict) -> tuple[str, str]:
  """What an ncjax checkpoint holds: ('resnet18 (CIFAR stem, width 16, 1 input channel)',
  'an ncjax checkpoint of resnet18 (...) (run <id>: model resnet18, options.stem=cifar, ...)'),
  the settings from the run's fingerprint when there is one."""
  run_dir, fingerprint = _run_fingerprint(step_dir)
  model = (fingerprint or {}).get("model")
  arch = describe_variables(model, source)
  text = f"an ncjax checkpoint of {arch}"
  if fingerprint and model:
    prefix = f"backbone.{model}."
    settings = [f"{k[len(prefix):]}={v}" for k, v in sorted(fingerprint.items())
                if k.startswith(prefix) and k[len(prefix):].split(".")[0] in (
                    "options", "channels", "image_size")]
    text += (f" (run {os.path.basename(run_dir)}: model {model}"
             + (f", {', '.join(settings)}" if settings else "") + ")")
  return arch, text


def _load_ncjax(path, name: str, variables, *, keep_head: bool, strict: bool):
  """`load` for an ncjax run / checkpoints / step directory: the checkpoint's parameters and
  BatchNorm statistics where `variables` has them, the head by `keep_head`."""
  step_dir = ncjax_step_dir(path)
  source = read_ncjax(step_dir)
  variables = unfreeze(variables)
  flat_vars = _params_first(traverse_util.flatten_dict(
      {k: v for k, v in variables.items() if k in ("params", "batch_stats")}))
  flat_src = traverse_util.flatten_dict(source)
  key = "/".join
  head_paths = [p for p in flat_vars if p[1] == "head"]
  use_head = keep_head and all(p in flat_src and tuple(flat_src[p].shape) ==
                               tuple(flat_vars[p].shape) for p in head_paths)
  skipped: list[str] = []
  errors: list[str] = []
  unusable: list[str] = []
  if keep_head and not use_head:
    logging.warning("keep_head=True but the head of %s does not fit the model; keeping the fresh "
                    "head", step_dir)
    skipped += [f"{key(p)} (head shape differs)" for p in head_paths]
  new_flat = dict(flat_vars)
  for p, v in flat_vars.items():
    if p[1] == "head" and not use_head:
      continue
    want = tuple(v.shape)
    if p not in flat_src:
      errors.append(f"missing {key(p)} (model expects shape {want})")
      skipped.append(f"{key(p)} (missing)")
    elif tuple(flat_src[p].shape) != want:
      got = tuple(flat_src[p].shape)
      errors.append(f"shape mismatch for {key(p)}: checkpoint has {got}, the model expects "
                    f"{want}")
      skipped.append(f"{key(p)} (shape {got} != {want})")
    else:
      is_var = p[0] == "batch_stats" and p[-1] == "var"
      unusable += _unusable(key(p), flat_src[p], variance=is_var)
      new_flat[p] = jnp.asarray(flat_src[p], dtype=v.dtype)
  _refuse_unusable(step_dir, unusable)
  for p in sorted(set(flat_src) - set(flat_vars)):
    if p[1] != "head":  # the source's classifier is never needed
      errors.append(f"unexpected {key(p)} (shape {tuple(flat_src[p].shape)}) in the checkpoint")
      skipped.append(f"{key(p)} (unexpected)")
  if errors and strict:
    arch, text = _ncjax_source(step_dir, source)
    raise CheckpointError(_cannot_load(step_dir, describe_variables(name, variables), arch,
                                       errors, lead=f"it holds {text}"))
  out = dict(variables)
  loaded = traverse_util.unflatten_dict(new_flat)
  for col in loaded:
    out[col] = loaded[col]
  return out, skipped


def _unusable(name: str, arr, *, variance: bool) -> list[str]:
  """Why tensor `name` of a checkpoint cannot be trained from: NaN or Inf values (they reach
  the first loss), a negative BatchNorm running variance (its square root is NaN)."""
  a = np.asarray(arr)
  if not np.issubdtype(a.dtype, np.floating):
    return []
  bad = int(a.size - np.count_nonzero(np.isfinite(a)))
  if bad:
    return [f"{name} has {bad} of {a.size} values NaN or Inf"]
  if variance and a.size and a.min() < 0:
    return [f"{name} (a BatchNorm running variance) has {int(np.sum(a < 0))} negative "
            f"value(s), down to {float(a.min()):.3g}"]
  return []


def _refuse_unusable(path, unusable: list[str]) -> None:
  if unusable:
    shown = "; ".join(unusable[:5]) + (f"; and {len(unusable) - 5} more tensors"
                                       if len(unusable) > 5 else "")
    raise CheckpointError(f"{os.fspath(path)}: the weights cannot be used: {shown} (the file "
                          "is damaged or was saved from a diverged run: re-download or "
                          "re-export it)")


# ----------------------------------------------------------------------------- key maps

_BN_PARAM = {"scale": "weight", "bias": "bias"}
_BN_STAT = {"mean": "running_mean", "var": "running_var"}


def _oihw_to_hwio(a):
  return np.transpose(a, (2, 3, 1, 0))


def _transpose2(a):
  return np.transpose(a, (1, 0))


def _torch_shape(shape, fn) -> tuple:
  """The shape in torch's layout of an ncjax leaf of `shape` that `fn` converts to."""
  shape = tuple(shape)
  if fn is _oihw_to_hwio:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if fn is _transpose2 else shape


def _resnet_module(name: str, path: tuple[str, ...]) -> str:
  """ncjax module path (top-level, module) of a ResNet -> torchvision module path."""
  top, mod = path[0], path[1]
  if top == "stem":
    return {"conv": "conv1", "bn": "bn1"}[mod]
  stages, _ = RESNET_CONFIGS[name]
  i = int(top[len("block"):]) - 1
  s = 0
  while i >= stages[s]:
    i -= stages[s]
    s += 1
  prefix = f"layer{s + 1}.{i}"
  sub = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(mod, mod)
  return f"{prefix}.{sub}"


def _densenet_module(path: tuple[str, ...]) -> str:
  """ncjax module path of a DenseNet -> torchvision's: stem/conv0 -> features.conv0,
  denseblock{i}/denselayer{j}/norm1 -> features.denseblock{i}.denselayer{j}.norm1,
  denseblock{i}/transition_conv -> features.transition{i}.conv, denseblock4/norm5 ->
  features.norm5."""
  top, mod = path[0], path[1]
  if top == "stem" or mod == "norm5":
    return f"features.{mod}"
  if mod.startswith("transition_"):
    return f"features.transition{top[len('denseblock'):]}.{mod[len('transition_'):]}"
  return f"features.{'.'.join(path)}"


def _mobilenet_module(path: tuple[str, ...], expands: bool) -> str:
  """ncjax module path of a MobileNetV2 -> torchvision's. `block{i}` is `features.{i}`,
  `stem` is `features.0`; a conv-BN-ReLU6 has `conv` -> `.0`, `bn` -> `.1`; inside an
  inverted residual (`expands`: it has the 1x1 expansion) `expand` -> `conv.0`, `depthwise`
  -> `conv.{0|1}`, `project_conv`, `project_bn` -> the two entries after it."""
  top, mod = path[0], path[1]
  index = 0 if top == "stem" else int(top[len("block"):])
  cbr = {"conv": "0", "bn": "1"}
  if mod in cbr:  # stem, block18
    return f"features.{index}.{cbr[mod]}"
  e = int(expands)
  at = {"expand": 0, "depthwise": e, "project_conv": e + 1, "project_bn": e + 2}[mod]
  sub = f".{cbr[path[2]]}" if mod in ("expand", "depthwise") else ""
  return f"features.{index}.conv.{at}{sub}"


_HEADS = {"resnet": "fc", "densenet": "classifier", "mobilenet_v2": "classifier.1"}


def torchvision_key_map(name: str, flat_vars: dict[tuple[str, ...], Any]):
  """{ncjax flat path: (torch key, transform)} for every leaf of the target variables of
  torchvision model `name` (a ResNet, DenseNet or MobileNetV2)."""
  family = _family(name)
  if family not in _TORCHVISION:
    raise ValueError(f"{name!r} is not a torchvision model")
  expanding = {p[1] for p in flat_vars if len(p) > 2 and p[2] == "expand"}
  module = {"resnet": lambda m: _resnet_module(name, m),
            "densenet": _densenet_module,
            "mobilenet_v2": lambda m: _mobilenet_module(m, m[0] in expanding)}[family]
  head = _HEADS[family]
  out = {}
  for path in flat_vars:
    col, top = path[0], path[1]
    leaf = path[-1]
    if top == "head":
      out[path] = (f"{head}.weight", _transpose2) if leaf == "kernel" else (f"{head}.bias", None)
      continue
    mod = module(path[1:-1])
    if col == "params":
      if leaf == "kernel":
        out[path] = (f"{mod}.weight", _oihw_to_hwio)
      else:
        out[path] = (f"{mod}.{_BN_PARAM[leaf]}", None)
    elif col == "batch_stats":
      out[path] = (f"{mod}.{_BN_STAT[leaf]}", None)
    else:
      raise CheckpointError(f"unexpected variable collection {col!r} in the target variables")
  return out


def vit_key_map(flat_vars: dict[tuple[str, ...], Any]):
  """{ncjax flat path: vit_jax key} for every leaf of the target params."""
  out = {}
  for path in flat_vars:
    col, top, rest = path[0], path[1], list(path[2:])
    if col != "params":
      raise CheckpointError(f"unexpected variable collection {col!r} for a ViT")
    if top.startswith("layer"):
      key = ["Transformer", f"encoderblock_{int(top[5:]) - 1}"] + rest
    elif top == "pos_embedding":
      key = ["Transformer", "posembed_input", "pos_embedding"]
    elif top == "encoder_norm":
      key = ["Transformer", "encoder_norm"] + rest
    else:
      key = [top] + rest
    out[path] = "/".join(key)
  return out


# ----------------------------------------------------------------------------- timm, Hugging Face

# Where a state dict comes from, by keys only that layout has. "native": torchvision's names
# (torchvision and timm ResNets, DenseNets, MobileNetV2) or vit_jax's; the others are read by
# renaming them to those (`_canonical`).
_LAYOUTS = {"timm_vit": "a timm ViT state dict", "hf_vit": "a Hugging Face ViT state dict",
            "hf_resnet": "a Hugging Face ResNet state dict"}
_LN = {"weight": "scale", "bias": "bias"}
# The files of a Hugging Face / timm model directory, in the order they are looked for.
_HUB_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _layout(keys) -> str:
  """"timm_vit", "hf_vit", "hf_resnet" or "native" for a state dict with these keys."""
  keys = set(keys)
  for k in keys:
    if k.endswith("embeddings.patch_embeddings.projection.weight"):
      return "hf_vit"
    if k.endswith("embedder.embedder.convolution.weight"):
      return "hf_resnet"
  if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
    return "timm_vit"
  return "native"


def _heads_kernel(w: np.ndarray, heads: int) -> np.ndarray:
  """A torch Linear weight (H*hd, D) of query, key or value -> vit_jax's kernel (D, H, hd)."""
  return w.T.reshape(w.shape[1], heads, -1)


def _attention(put, block: str, which: str, leaf: str, v: np.ndarray, heads: int, src: str):
  """One torch attention leaf (`which`: query, key, value or out) in vit_jax's layout."""
  at = f"{block}MultiHeadDotProductAttention_1/{which}/"
  if leaf == "bias":
    put(at + "bias", v if which == "out" else v.reshape(heads, -1), src)
  elif which == "out":
    put(at + "kernel", v.T.reshape(heads, -1, v.shape[0]), src)
  else:
    put(at + "kernel", _heads_kernel(v, heads), src)


def _from_vit(flat: dict, heads: int, names: dict, block_re: str, block_names: dict) -> tuple:
  """A timm or Hugging Face ViT state dict in vit_jax's names and layouts: `names` maps the
  file's top-level keys to vit_jax keys (a torch Linear / conv weight is transposed to a
  kernel), `block_re` matches a block's keys (groups: index, module, leaf) and `block_names`
  maps its modules to vit_jax modules (`attention:q|k|v|out` for the attention). Keys of
  neither stay as they are (unexpected in strict mode). Returns ({key: array}, {new key:
  file key})."""
  out, origin = {}, {}

  def put(key, value, src):
    out[key], origin[key] = value, src

  for k, v in flat.items():
    if k in names:
      key = names[k]
      if key == "embedding/kernel":
        v = _oihw_to_hwio(v)
      elif key.endswith("/kernel"):
        v = v.T
      put(key, v, k)
      continue
    m = re.fullmatch(block_re, k)
    mod = block_names.get(m.group(2)) if m else None
    if mod is None:
      put(k, v, k)
      continue
    block, leaf = f"Transformer/encoderblock_{int(m.group(1))}/", m.group(3)
    if mod.startswith("attention:"):
      which = mod.split(":")[1]
      if which == "qkv":
        for part, w in zip(("query", "key", "value"), np.split(v, 3, axis=0)):
          _attention(put, block, part, leaf, w, heads, k)
      else:
        _attention(put, block, which, leaf, v, heads, k)
    elif mod.startswith("LayerNorm"):
      put(f"{block}{mod}/{_LN[leaf]}", v, k)
    else:
      put(f"{block}{mod}/" + ("kernel" if leaf == "weight" else "bias"),
          v.T if leaf == "weight" else v, k)
  return out, origin


def _vit_names(prefix: str, pairs: dict) -> dict:
  """{file key: vit_jax key} of a ViT's top-level leaves, `pairs` {module: vit_jax module}."""
  out = {}
  for mod, new in pairs.items():
    if new in ("cls", "Transformer/posembed_input/pos_embedding"):
      out[prefix + mod] = new
      continue
    for leaf in ("weight", "bias"):
      new_leaf = (_LN[leaf] if "norm" in new else ("kernel" if leaf == "weight" else "bias"))
      out[f"{prefix}{mod}.{leaf}"] = f"{new}/{new_leaf}"
  return out


_TIMM_VIT = _vit_names("", {"cls_token": "cls", "pos_embed": "Transformer/posembed_input/"
                            "pos_embedding", "patch_embed.proj": "embedding",
                            "norm": "Transformer/encoder_norm", "head": "head",
                            "pre_logits.fc": "pre_logits"})
_TIMM_BLOCK = {"norm1": "LayerNorm_0", "attn.qkv": "attention:qkv", "attn.proj": "attention:out",
               "norm2": "LayerNorm_2", "mlp.fc1": "MlpBlock_3/Dense_0",
               "mlp.fc2": "MlpBlock_3/Dense_1"}
_HF_VIT = {**_vit_names("embeddings.", {"cls_token": "cls",
                                       "position_embeddings": "Transformer/posembed_input/"
                                       "pos_embedding",
                                       "patch_embeddings.projection": "embedding"}),
           **_vit_names("", {"layernorm": "Transformer/encoder_norm", "classifier": "head",
                             "pooler.dense": "pre_logits"})}
_HF_BLOCK = {"layernorm_before": "LayerNorm_0", "attention.attention.query": "attention:query",
             "attention.attention.key": "attention:key",
             "attention.attention.value": "attention:value",
             "attention.output.dense": "attention:out", "layernorm_after": "LayerNorm_2",
             "intermediate.dense": "MlpBlock_3/Dense_0", "output.dense": "MlpBlock_3/Dense_1"}
# Keys a Hugging Face ViTModel may carry that no forward pass of a classifier reads.
_HF_UNUSED = ("embeddings.mask_token",)


def _from_hf_resnet(flat: dict) -> tuple:
  """A Hugging Face ResNet state dict (`ResNetModel` / `ResNetForImageClassification`) in
  torchvision's names: embedder -> conv1 / bn1, `encoder.stages.{s}.layers.{l}.layer.{i}` ->
  `layer{s+1}.{l}.conv{i+1}` / `bn{i+1}`, `shortcut` -> `downsample.{0,1}`, `classifier.1` ->
  `fc`. Returns ({key: array}, {new key: file key})."""
  out, origin = {}, {}
  for k, v in flat.items():
    key = k[len("resnet."):] if k.startswith("resnet.") else k
    key = re.sub(r"^embedder\.embedder\.convolution\.", "conv1.", key)
    key = re.sub(r"^embedder\.embedder\.normalization\.", "bn1.", key)
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", key):
      block, rest = f"layer{int(m.group(1)) + 1}.{m.group(2)}.", m.group(3)
      rest = re.sub(r"^shortcut\.convolution\.", "downsample.0.", rest)
      rest = re.sub(r"^shortcut\.normalization\.", "downsample.1.", rest)
      rest = re.sub(r"^layer\.(\d+)\.convolution\.",
                    lambda n: f"conv{int(n.group(1)) + 1}.", rest)
      rest = re.sub(r"^layer\.(\d+)\.normalization\.", lambda n: f"bn{int(n.group(1)) + 1}.",
                    rest)
      key = block + rest
    key = re.sub(r"^classifier\.1\.", "fc.", key)
    out[key], origin[key] = v, k
  return out, origin


def _canonical(flat: dict) -> tuple[dict, dict, str]:
  """(`flat` in torchvision's or vit_jax's names and layouts, {new key: file key} for the
  renamed keys, the layout it came in). A ViT's attention is split into heads of 64, as in
  every ViT of ncjax's (and timm's and Hugging Face's standard) sizes; a Hugging Face config
  of other heads is refused by `_check_config`."""
  layout = _layout(flat)
  if layout == "hf_resnet":
    return (*_from_hf_resnet(flat), layout)
  if layout == "native":
    return flat, {}, layout
  if layout == "hf_vit":
    flat = {(k[len("vit."):] if k.startswith("vit.") else k): v for k, v in flat.items()
            if k.removeprefix("vit.") not in _HF_UNUSED}
    names, block_re, block = _HF_VIT, r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", _HF_BLOCK
    width = flat["embeddings.patch_embeddings.projection.weight"].shape[0]
  else:
    names, block_re, block = _TIMM_VIT, r"blocks\.(\d+)\.(.+)\.(weight|bias)", _TIMM_BLOCK
    width = flat["patch_embed.proj.weight"].shape[0]
  heads = max(width // 64, 1)
  return (*_from_vit(flat, heads, names, block_re, block), layout)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is not a readable JSON file ({type(e).__name__}: {e})") from e
  if not isinstance(out, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(out).__name__}")
  return out


def _hub_files(where: str) -> tuple[str, str] | None:
  """(weights file, config.json) of a Hugging Face / timm model directory, or of a
  `model.safetensors` / `pytorch_model.bin` with the config.json beside it; None when `where`
  is neither (a bare state dict file, or an ncjax run directory)."""
  if os.path.isdir(where):
    config = os.path.join(where, "config.json")
    if not os.path.isfile(config):
      return None
    for name in _HUB_WEIGHTS:
      if os.path.isfile(os.path.join(where, name)):
        return os.path.join(where, name), config
    try:  # an ncjax workdir has a config.json too
      kind = _config_kind(_read_json(config))
    except CheckpointError:
      kind = "unknown"
    if kind == "unknown":
      return None
    raise CheckpointError(f"{where} has a config.json but no weights: expected one of "
                          f"{', '.join(_HUB_WEIGHTS)} beside it (download the model's "
                          "model.safetensors too)")
  config = os.path.join(os.path.dirname(where), "config.json")
  if os.path.basename(where) in _HUB_WEIGHTS and os.path.isfile(config):
    return where, config
  return None


def _read_hub_weights(path: str, family: str) -> dict[str, np.ndarray]:
  """The state dict of a hub weights file; a sharded `model.safetensors.index.json` is read
  shard by shard."""
  if not path.endswith(".index.json"):
    return read_checkpoint(path, family)
  shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
  if not shards:
    raise CheckpointError(f"{path}: no weight_map in the index")
  flat = {}
  for shard in shards:
    flat.update(read_checkpoint(os.path.join(os.path.dirname(path), shard), family))
  return flat


_HF_TYPES = {"vit": "ViTModel / ViTForImageClassification",
             "resnet": "ResNetModel / ResNetForImageClassification"}
_TIMM_ARCH = re.compile(r"(vit_(tiny|small|base|large|huge)_patch\d+_\d+|resnet(18|34|50))"
                        r"(\.\w+)?")


def _config_kind(config: dict) -> str:
  """"hf" (transformers: model_type), "timm" (architecture) or "unknown"."""
  if "model_type" in config:
    return "hf"
  return "timm" if "architecture" in config else "unknown"


def _check_config(config: dict, path: str, heads: int | None) -> list[str]:
  """Refuses, before the weights are read, a hub config of a model ncjax lacks or computes
  differently (a CheckpointError saying what it is); returns notes on the small numerical
  differences that remain (GELU, LayerNorm eps)."""
  kind = _config_kind(config)
  if kind == "hf":
    model_type = config["model_type"]
    arch = ", ".join(config.get("architectures") or []) or model_type
    if model_type not in _HF_TYPES:
      raise CheckpointError(
          f"{path} is a Hugging Face {model_type} model ({arch}); ncjax reads Hugging Face "
          f"{' and '.join(f'{t} ({a})' for t, a in _HF_TYPES.items())} checkpoints")
    if model_type == "resnet":
      why = [f"{k}={config.get(k)!r}" for k, ok in (
          ("downsample_in_bottleneck", False), ("downsample_in_first_stage", False),
          ("hidden_act", "relu")) if config.get(k, ok) != ok]
      if why:
        raise CheckpointError(
            f"{path} is a Hugging Face ResNet with {', '.join(why)}: ncjax's ResNets are "
            "torchvision's (ReLU, the stride on the 3x3 conv, none in the first stage)")
      return []
    want = config.get("num_attention_heads")
    if heads and want and want != heads:
      raise CheckpointError(f"{path}: a Hugging Face ViT of {want} heads, the model has {heads}")
    act, eps = config.get("hidden_act", "gelu"), config.get("layer_norm_eps", 1e-12)
    if act not in ("gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh"):
      raise CheckpointError(f"{path} is a Hugging Face ViT with hidden_act={act!r}: ncjax's "
                            "ViT uses GELU")
    return ((["the exact (erf) GELU"] if act in ("gelu", "gelu_python") else [])
            + ([f"LayerNorm eps {eps:g}"] if eps != 1e-6 else []))
  if kind == "timm":
    arch = str(config["architecture"])
    if not _TIMM_ARCH.fullmatch(arch):
      raise CheckpointError(
          f"{path} is a timm {arch} model; ncjax reads timm's ViTs (vit_tiny_patch16_*, "
          "vit_small_patch16_*, vit_base_patch16_*, vit_base_patch32_*) and ResNets "
          "(resnet18, resnet34, resnet50)")
    pool = config.get("global_pool", (config.get("model_args") or {}).get("global_pool"))
    if arch.startswith("vit_") and pool not in (None, "token"):
      raise CheckpointError(f"{path} is a timm {arch} pooled with global_pool={pool!r}: "
                            "ncjax's ViT classifies the class token (global_pool='token')")
  return []


def preprocessing(path) -> dict | None:
  """The preprocessing a checkpoint was trained with, where its files say:
  ``{"mean": (r, g, b), "std": (r, g, b), "image_size": (h, w), "crop_pct": float | None,
  "interpolation": str | None, "source": the file it was read from}`` (mean and std of
  images scaled to [0, 1]; `image_size` the model's input, after any crop). Read from a
  Hugging Face ``preprocessor_config.json`` (image_mean, image_std, size / crop_size,
  crop_pct, resample) or a timm ``config.json``'s ``pretrained_cfg`` (mean, std,
  input_size, crop_pct, interpolation), in the model directory or beside its weights file.
  None when there is none: a bare state dict (.pth / .safetensors / .bin), a vit_jax .npz,
  an ncjax run.

  Example::

    weights.preprocessing("vit-base-patch16-224")  # a Hugging Face model directory
    # {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "image_size": (224, 224), ...}
  """
  where = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(where) and os.path.basename(where) not in _HUB_WEIGHTS:
    return None  # a bare state dict: any json beside it may belong to another file
  folder = where if os.path.isdir(where) else os.path.dirname(where)
  hf = os.path.join(folder, "preprocessor_config.json")
  if os.path.isfile(hf):
    c = _read_json(hf)
    if not c.get("do_normalize", True):
      mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
      mean, std = c.get("image_mean"), c.get("image_std")
    size = (c.get("crop_size") if c.get("do_center_crop") else None) or c.get("size") or {}
    if isinstance(size, int):
      size = {"shortest_edge": size}
    side = size.get("shortest_edge")
    image_size = (size.get("height", side), size.get("width", side))
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box",
                5: "hamming"}.get(c.get("resample"))
    return _preprocessing(mean, std, image_size, c.get("crop_pct"), resample, hf)
  hub = _hub_files(where)
  config = _read_json(hub[1]) if hub else {}
  if _config_kind(config) == "timm":
    cfg = config.get("pretrained_cfg") or {}
    input_size = cfg.get("input_size") or [None, None, None]
    return _preprocessing(cfg.get("mean"), cfg.get("std"), tuple(input_size[1:]),
                          cfg.get("crop_pct"), cfg.get("interpolation"), hub[1])
  return None


def _preprocessing(mean, std, image_size, crop_pct, interpolation, source) -> dict | None:
  if mean is None or std is None or None in image_size:
    return None

  def rgb(x):
    x = [float(v) for v in (x if isinstance(x, (list, tuple)) else [x])]
    return tuple(x * 3 if len(x) == 1 else x)
  return {"mean": rgb(mean), "std": rgb(std), "image_size": tuple(int(s) for s in image_size),
          "crop_pct": None if crop_pct is None else float(crop_pct),
          "interpolation": interpolation, "source": source}


# ----------------------------------------------------------------------------- resize


def _linear_resize_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
  """Linear interpolation along `axis`, corners aligned (scipy.ndimage.zoom order=1)."""
  n_in = a.shape[axis]
  if n_in == n_out:
    return a
  if n_out == 1 or n_in == 1:
    idx = np.zeros(n_out, np.int64)
    return np.take(a, idx, axis=axis)
  pos = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
  lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
  frac = (pos - lo)
  shape = [1] * a.ndim
  shape[axis] = n_out
  frac = frac.reshape(shape)
  a64 = a.astype(np.float64)
  return (np.take(a64, lo, axis=axis) * (1 - frac) + np.take(a64, lo + 1, axis=axis) * frac)


def resize_pos_embedding(pe: np.ndarray, num_tokens: int) -> np.ndarray:
  """(1, 1 + g0*g0, D) -> (1, num_tokens, D): class slot kept, grid resized linearly."""
  pe = np.asarray(pe)
  if pe.shape[1] == num_tokens:
    return pe
  g0 = math.isqrt(pe.shape[1] - 1)
  g = math.isqrt(num_tokens - 1)
  if g0 * g0 != pe.shape[1] - 1 or g * g != num_tokens - 1:
    raise CheckpointError(
        f"cannot resize a position embedding of {pe.shape[1]} tokens to {num_tokens} tokens: "
        "both must be 1 + a square grid")
  cls, grid = pe[:, :1], pe[0, 1:].reshape(g0, g0, -1)
  grid = _linear_resize_axis(_linear_resize_axis(grid, g, 0), g, 1)
  return np.concatenate([cls, grid.reshape(1, g * g, -1).astype(pe.dtype)], axis=1)


# ----------------------------------------------------------------------------- load


def _read_any(path, family: str, heads: int | None = None) -> tuple[dict, dict, str, list]:
  """A checkpoint file or hub directory in torchvision's or vit_jax's names: (state dict,
  {its key: the file's key} where renamed, the layout it came in, notes on the numerical
  differences from ncjax's model). A hub config of a model ncjax lacks is refused before
  the weights are read."""
  where = os.path.expanduser(os.fspath(path))
  hub = _hub_files(where) if os.path.exists(where) else None
  notes = []
  if hub:
    notes = _check_config(_read_json(hub[1]), where, heads)
    raw = _read_hub_weights(hub[0], family)
  else:
    raw = read_checkpoint(path, family)
  raw = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}
  ckpt, origin, layout = _canonical(raw)
  if layout == "timm_vit":
    notes = ["the exact (erf) GELU"]
  return ckpt, origin, layout, notes


def head_classes(path, name: str) -> int | None:
  """The number of classes of a checkpoint file's own classifier head (e.g. 1000 for
  ImageNet, 21843 for ImageNet-21k), or None when it has none (an ncjax run directory, or a
  file without a head)."""
  where = os.path.expanduser(os.fspath(path))
  if os.path.isdir(where) and _hub_files(where) is None:
    return None
  family = _family(name)
  ckpt = _read_any(path, family)[0]
  key = f"{_HEADS[family]}.bias" if family in _TORCHVISION else "head/bias"
  for prefix in ("", "module.", "params/"):
    if prefix + key in ckpt:
      return int(np.shape(ckpt[prefix + key])[0])
  return None


def load(path, name: str, variables, *, keep_head: bool = False) -> dict:
  """Loads a checkpoint into (a copy of) `variables`, strictly: every tensor must fit.

  Args:
    path: a checkpoint file or directory: a torchvision or timm state dict (``.pth`` /
      ``.safetensors`` / ``.npz`` / ``.bin``; ResNet, DenseNet, MobileNetV2, timm ViT), a
      timm or Hugging Face model folder (``config.json`` + ``model.safetensors``), a
      vit_jax ``.npz``, or an ncjax run (``<workdir>/runs/<run id>``, its ``checkpoints/``
      or one ``checkpoints/<step>/``). ``~`` is expanded. docs/weights.md: one line per
      source; the module docstring: how each is read.
    name: the ncjax model `variables` belong to (`resnet18`, `vit_b16`, ...).
    variables: the model's freshly initialised ``{'params', 'batch_stats'}`` (arrays, or
      ShapeDtypeStructs to check a checkpoint without loading it onto a device); they fix
      the expected shapes, the new head and a ViT's position-embedding grid.
    keep_head: load the checkpoint's classifier too, when its shape fits.

  Returns:
    The new variables, same structure (`variables` is not changed): the checkpoint's
    values, with the fresh head unless `keep_head`.

  Raises:
    CheckpointError: the file is not a readable checkpoint, holds another architecture
      (the message says what it looks like), or has a missing, unexpected or misshapen key.
    FileNotFoundError: nothing at `path` (the message says where such weights come from).

  Example::

    model = models.get("resnet18", 10)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    variables = weights.load("resnet18-f37072fd.pth", "resnet18", variables)
  """
  return _load(path, name, variables, keep_head=keep_head, strict=True)[0]


def load_partial(path, name: str, variables, *, keep_head: bool = False
                 ) -> tuple[dict, list[str]]:
  """`load`, keeping the fresh values of whatever cannot be loaded: returns `(variables,
  skipped)`, `skipped` a list of `"<checkpoint key> (<reason>)"` strings (missing,
  unexpected, misshapen keys; a head that does not fit). Unreadable files still raise."""
  return _load(path, name, variables, keep_head=keep_head, strict=False)


def _load(path, name: str, variables, *, keep_head: bool, strict: bool):
  """(new variables, skipped): `load` (`strict`, raising on any problem) or `load_partial`."""
  where = os.path.expanduser(os.fspath(path))
  hub = _hub_files(where) if os.path.exists(where) else None
  if os.path.isdir(where) and hub is None:
    return _load_ncjax(path, name, variables, keep_head=keep_head, strict=strict)
  if not os.path.exists(where) and _family(name, strict=False) is None:
    raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}. {_NCJAX_SOURCE}")
  family = _family(name)
  variables = unfreeze(variables)
  flat_vars = _params_first(traverse_util.flatten_dict(
      {k: v for k, v in variables.items() if k in ("params", "batch_stats")}))
  heads = next((v.shape[1] for p, v in flat_vars.items() if p[-2:] == ("query", "kernel")), None)
  ckpt, origin, layout, notes = _read_any(path, family, heads)
  if notes and family == "vit":
    logging.info("%s computes with %s; ncjax's ViT uses the tanh GELU and LayerNorm eps 1e-6, "
                 "so its outputs differ slightly (logits by a few 1e-4 of their scale)",
                 os.fspath(path), " and ".join(notes))
  skipped: list[str] = []
  errors: list[str] = []
  unusable: list[str] = []
  new_flat = dict(flat_vars)
  used = set()

  def src(k):  # a key as the file names it
    return origin.get(k, k)

  def via(k):
    return f" (from {origin[k]!r})" if origin.get(k, k) != k else ""

  if family in _TORCHVISION:
    if family == "densenet":
      ckpt = {_DENSENET_LEGACY_KEY.sub(r"\1\2", k): v for k, v in ckpt.items()}
    for k in list(ckpt):
      if k.endswith("num_batches_tracked"):
        used.add(k)
    keymap = torchvision_key_map(name, flat_vars)
    head_keys = {f"{_HEADS[family]}.weight", f"{_HEADS[family]}.bias"}
  else:
    ckpt = {(k[len("params/"):] if k.startswith("params/") else k): v for k, v in ckpt.items()}
    keymap = {p: (k, None) for p, k in vit_key_map(flat_vars).items()}
    head_keys = {"head/kernel", "head/bias"}

  # The head: kept only on request and when every head leaf fits.
  head_paths = [p for p in flat_vars if p[1] == "head"]
  use_head = keep_head
  if keep_head:
    for p in head_paths:
      k, fn = keymap[p]
      arr = ckpt.get(k)
      want = flat_vars[p].shape
      got = None if arr is None else (fn(arr) if fn else arr).shape
      if got != tuple(want):
        use_head = False
        msg = (f"keep_head=True but the checkpoint head {k!r} has shape {got}, the model "
               f"expects {tuple(want)}; keeping the fresh head")
        logging.warning("%s", msg)
        skipped.append(f"{src(k)} (head shape {got} != {tuple(want)})")
  used.update(k for k in head_keys if k in ckpt)

  def mismatch(k, got, want_model, want_ckpt, p):
    if strict:
      extra = "" if want_ckpt == want_model else f" (= {want_model} in the ncjax layout)"
      errors.append(f"shape mismatch for {k!r}{via(k)}: checkpoint has {tuple(got)}, the model "
                    f"expects {want_ckpt}{extra} (target {'/'.join(p)})")
    skipped.append(f"{src(k)} (shape {tuple(got)} != {want_ckpt})")

  for p, (k, fn) in keymap.items():
    if p[1] == "head" and not use_head:
      continue
    want = tuple(flat_vars[p].shape)
    want_ckpt = _torch_shape(want, fn)
    if k not in ckpt:
      if strict:
        errors.append(f"missing key {k!r} (model expects shape {want_ckpt}, target "
                      f"{'/'.join(p)})")
      skipped.append(f"{k} (missing)")
      continue
    used.add(k)
    arr = ckpt[k]
    if family == "vit" and p[1] == "pos_embedding" and arr.shape != want:
      if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[2] == want[2]:
        try:
          arr = resize_pos_embedding(arr, want[1])
        except CheckpointError as e:
          if strict:
            errors.append(f"{k!r}: {e}")
          skipped.append(f"{src(k)} ({e})")
          continue
    if tuple(arr.shape) != want_ckpt:
      mismatch(k, arr.shape, want, want_ckpt, p)
      continue
    if fn is not None:
      arr = fn(arr)
    unusable += _unusable(src(k), arr, variance=k.endswith("running_var"))
    new_flat[p] = jnp.asarray(arr, dtype=flat_vars[p].dtype)

  for k in sorted(set(ckpt) - used):
    if family == "vit" and k.startswith("pre_logits/"):
      skipped.append(f"{src(k)} (the model has no pre_logits)")
      logging.info("dropping %s: the model has no pre_logits", src(k))
      continue
    if strict:
      errors.append(f"unexpected key {src(k)!r} (shape {tuple(ckpt[k].shape)}) in "
                    f"{os.fspath(path)}")
    skipped.append(f"{src(k)} (unexpected)")
  _refuse_unusable(path, unusable)
  if errors:
    note = ""
    if layout != "native":
      names = "vit_jax" if "embedding/kernel" in ckpt else "torchvision"
      note = f" (the file is {_LAYOUTS[layout]}; its keys are named here as {names} names them)"
    raise CheckpointError(_cannot_load(path, describe_variables(name, variables),
                                       describe_checkpoint(ckpt), errors, note=note))

  out = dict(variables)
  loaded = traverse_util.unflatten_dict(new_flat)
  for col in loaded:
    out[col] = loaded[col]
  return out, skipped
