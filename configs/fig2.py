"""Fig. 2: progressive collapse, layer-wise NC1 of the 9-layer MLP trained with CE, MSE, SupCon.

The width-784 MLP is trained on a class-balanced subset of Fashion-MNIST into the terminal
phase (training loss ~ 0), once per loss; results.md and layerwise_nc1.png give the NC1 of
every layer on those training images.

    python -m ncjax.main --config=configs/fig2.py --workdir=runs/fig2
    python -m ncjax.main --config=configs/fig2.py:quick   # 2,000 images, <= 10 min on a CPU
    python -m ncjax.main --config=configs/fig2.py:digits  # offline: embedded 8x8 digits, width 64
    python -m ncjax.main --config=configs/fig2.py:mnist --config.data_dir=<MNIST IDX files>

Data: Fashion-MNIST IDX files (Debian's `dataset-fashion-mnist`, /usr/share/datasets/
fashion-mnist). Numbers and timings: benchmarks/RESULTS.md, "Fig. 2".

Why a subset: trained on all 60,000 images for 50 epochs (lr 0.01, wd 1e-4) the MLP's NC1
flattens over layers 5-8 (0.31 0.29 0.28 0.26). He & Su (2023, "A law of data
separation in deep learning") report a constant per-layer rate for MLPs trained on a subset of
Fashion-MNIST well into the terminal phase. On 1,000 images per class the CE loss reaches
~5e-4 and NC1 falls at every layer, by a factor 0.62-0.90 per layer (MSE 0.44-0.59; SupCon
0.58-0.83 up to layer 6, then flat at 0.12). Training 3x longer moves NC1 by <= 10%
(benchmarks/RESULTS.md, "Fig. 2").
"""
from configs import default

# arg -> (source dataset, class-balanced training subset (0 = all), epochs); any other arg
# names the dataset (fashion_mnist, mnist, idx:<dir>) and trains on 10,000 of its images.
FULL = (10000, 100)
SCHEDULES = {
    "quick": ("fashion_mnist", 2000, 60),
    "digits": ("digits", 0, 100),
}

VARIANTS = (
    dict(tag="ce", overrides={"pretrain.loss": "ce"}),
    dict(tag="mse", overrides={"pretrain.loss": "mse"}),
    # SupCon on two views of each image through a linear projection of layer 9 (as CE's and
    # MSE's logits are), dropped after pre-training. The views are the image itself: an MLP
    # has no translation equivariance, and with 3-pixel shifts (aug_level 2) it stays far from
    # fitting them (loss 3.8 vs 3.2) and NC1 rises with depth; the positives SupCon needs are
    # the other images of the class in the batch.
    dict(tag="supcon", overrides={"pretrain.loss": "supcon", "pretrain.projection_layers": 1}),
)


def get_config(arg="fashion_mnist"):
  dataset, train_size, epochs = SCHEDULES.get(arg, (arg, *FULL))
  c = default.get_config()
  c.job = "pretrain"
  c.models = ("mlp",)
  c.variants = VARIANTS
  c.backbone.default.options = {"depth": 9, "width": 64 if arg == "digits" else 784}
  c.backbone.default.normalization = "dataset"
  c.backbone.default.unit = ("layer5",)
  c.pretrain.dataset = dataset
  c.pretrain.classes = ""
  c.pretrain.train_size = train_size
  # One lr for all three losses. At 0.1 CE stalls (300 steps on :quick: loss 0.43, test 74%,
  # NC1 not monotone; NaN on all 60,000 images) while MSE trains (loss 0.017), unlike on
  # Table 1's ResNet-18; 0.01 trains all three stably.
  # Weight decay 5e-4 (the neural-collapse literature's usual value) bounds the weights once
  # the training loss is ~0; the loss then settles near 5e-4 (CE).
  c.pretrain.optim = {"epochs": epochs, "steps": 0, "lr": 0.01, "weight_decay": 5e-4,
                      "aug_level": 1}
  c.optim.batch_size = 128
  return c
