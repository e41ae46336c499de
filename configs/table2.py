"""Table 2: few-shot transfer and NC. ConvNet4, ResNet12 and SEResNet12 pre-trained with
cross-entropy on CIFAR-FS's 64 meta-train classes, frozen; 5-way 1-shot and 5-shot episodes
(15 queries, 600 episodes) on its 20 meta-test classes, a logistic regression on the
L2-normalised support embeddings (RFS); accuracy +- 95% CI, and NC1 of the embeddings on the
meta-test classes (and, as `source_nc1`, on the meta-train classes).

    python -m ncjax.main --config=configs/table2.py --workdir=runs/table2
    python -m ncjax.main --config=configs/table2.py:digits   # offline: digits 0-4 -> 5-way on 5-9

Data: TFDS `cifar100` under --config.data_dir (CIFAR-FS classes from `ncjax.fewshot`; its
meta-test episodes draw from the CIFAR-100 training images of the 20 classes, 500 per class,
where CIFAR-FS pools both splits' 600). The paper's recipe is SGD lr 0.05, weight decay 5e-4,
batch 64 with x0.1 step decays; ncjax's schedule is cosine from 0.05.
"""
import ml_collections

from configs import default



def _cifar_fs(split):
  from ncjax import fewshot
  return tuple(int(i) for i in fewshot.cifar_fs_class_ids(split))


def get_config(arg="cifar_fs"):
  c = default.get_config()
  c.job = "fewshot"
  c.models = ("convnet4", "resnet12", "seresnet12")
  c.methods = ("linear",)
  c.collapse = False
  c.backbone.default.unit = ()
  c.backbone.default.options = ml_collections.ConfigDict()
  c.backbone.default.image_size = 32
  c.backbone.default.channels = 3
  c.pretrain.loss = "ce"
  c.pretrain.optim = ml_collections.ConfigDict(dict(
      epochs=90, steps=0, lr=0.05, lr_end=5e-5, weight_decay=5e-4, batch_size=64, aug_level=3))
  c.fewshot.shots = (1, 5)
  if arg == "digits":
    c.pretrain.dataset, c.pretrain.classes = "digits", "0-4"
    c.datasets, c.downstream_classes = ("digits",), "5-9"
    c.pretrain.optim.update(dict(epochs=0, steps=150, aug_level=2))
    return c
  c.dataset_sources.cifar_fs = "cifar100"  # CIFAR-FS: CIFAR-100's images, its class split
  c.pretrain.dataset = "cifar_fs"
  c.datasets = ("cifar_fs",)
  with c.ignore_type():  # class ids as typed data, where default.py has a range string
    c.pretrain.classes = _cifar_fs("train")
    c.downstream_classes = _cifar_fs("test")
  c.backbone.default.normalization = "cifar10"
  return c
