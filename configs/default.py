"""Default: a real transfer experiment on embedded data, offline, a few minutes on a laptop CPU.

Pre-train a small ResNet-18 (CIFAR stem, base width 16) on digits 0-4 (scikit-learn's 8x8
digits, shipped inside the scikit-learn wheel), then transfer it to digits 5-9 with linear
probing, Layer FT (block5), SCL FT (block5) and full fine-tuning; print the Table-3-style table
and write results.{json,csv,md} and the plots to --workdir.

Every other config imports this one and overrides a few fields; every field is documented here.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.job = "transfer"        # transfer | pretrain | layer_probe | fewshot | metrics | rank
  c.seed = 0
  # A sweep over seeds: () = the one run of `seed`; else the whole job (pre-training included)
  # once per seed, in runs/s<seed>/ (runs/<tag>-s<seed>/ with variants, each variant crossed
  # with every seed). Records carry the seed; tables give the mean over seeds, results.md's
  # method comparison the mean ± 95% CI. On the command line: --config.seeds=0,1,2
  c.seeds = ()

  # --- the grid: models x datasets x train_sizes x methods x units ---------------------------
  # Name lists are tuples; on the command line a comma list: --config.methods=linear,full
  c.models = ("resnet18",)   # registry names (ncjax.models.names())
  c.datasets = ("digits",)   # downstream datasets (ncjax.data.load names)
  c.downstream_classes = "5-9"  # class ids and ranges, e.g. "5-9" or "0,2,4" ('' = all classes)
  c.methods = ("linear", "layer", "scl", "full")  # + bitfit, lora, lp_ft, vpt (below)
  c.train_sizes = ()         # () = the whole training split; else class-balanced subset sizes
  c.test_split = "test"
  c.data_dir = ""            # TFDS data_dir ('' = TFDS default)
  # Dataset name -> ncjax.data.load source, for data TFDS lacks (e.g. FGVC-Aircraft).
  c.dataset_sources = ml_collections.ConfigDict({"aircraft": "folder:~/data/fgvc-aircraft"})

  # --- backbones: per-model settings, falling back to `default` -------------------------------
  c.backbone = ml_collections.ConfigDict()
  c.backbone.default = ml_collections.ConfigDict(dict(
      weights="",            # path to a checkpoint | 'pretrain' | '' (pretrain if enabled, else scratch)
      unit=("block5",),      # the unit(s) Layer FT / SCL FT tune; several = a sweep (Tables 5-7);
                             # "auto" = the unit chosen by NC (see unit_budget below)
      image_size=0,          # model input resolution (0 = the data's own)
      channels=0,            # model input channels (0 = the data's; 3 tiles grayscale to RGB)
      normalization="dataset",  # 'dataset' (train-split stats) | 'imagenet' | 'inception' | 'cifar10' ...
                             # | 'checkpoint' (the mean / std of the weights' preprocessing config)
      datasets=(),           # () = config.datasets; else this backbone's own datasets
      options=ml_collections.ConfigDict(dict(stem="cifar", width=16)),
  ))

  # --- pre-training on the source data (from scratch, every parameter trains) ----------------
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.enabled = True
  c.pretrain.dataset = "digits"
  c.pretrain.classes = "0-4"
  c.pretrain.train_size = 0           # > 0: a class-balanced subset of the source training split
  c.pretrain.loss = "ce"              # ce | mse | supcon (Table 1)
  c.pretrain.projection_layers = 0    # projection head, dropped after pre-training (Fig. 3)
  c.pretrain.projection_width = 0     # 0 = the penultimate width
  c.pretrain.projection_dim = 128     # SupCon embedding size
  c.pretrain.temperature = 0.1        # SupCon
  c.pretrain.adversarial_eps = 0.0    # l_inf PGD radius in [0, 1] pixel units, e.g. 8/255 (Fig. 4)
  c.pretrain.adversarial_steps = 7
  # Overrides of c.optim for pre-training (any field of c.optim may be added).
  c.pretrain.optim = ml_collections.ConfigDict(dict(epochs=30, steps=0, aug_level=1, lr=0.1))

  # --- variants: the whole job once per variant, one combined report ---------------------------
  # A tuple of dict(tag=<path-safe name>, overrides={<dotted field>: <typed value>}), e.g.
  # Table 1's dict(tag="mse", overrides={"pretrain.loss": "mse"}). Each value must have its
  # field's type. Records carry the tag as `pretrain`; runs go to runs/<tag>/.
  c.variants = ()

  # --- few-shot evaluation (job 'fewshot', Table 2; RFS) ---------------------------------------
  # The pre-trained backbone, frozen, embeds the downstream classes' training images; each
  # episode fits a logistic regression on the L2-normalised support embeddings.
  c.fewshot = ml_collections.ConfigDict(dict(
      ways=5, shots=(1, 5), queries=15, episodes=600,
      solver="jax",          # jax (batched Newton, same optimum) | sklearn (RFS's loop)
      split="train",         # the downstream split episodes draw from; cifar_fs / mini_imagenet:
                             # meta_test (all images of the meta-test classes, ncjax.data)
  ))

  # --- unit = "auto": choose the unit to fine-tune by NC (stages.autounit, paper §3.3) --------
  # Each unit holding at most `unit_budget` of the backbone's parameters is fine-tuned for
  # `unit_probe_fraction` of the schedule; the one whose penultimate NC1 on the training data
  # is lowest is then fine-tuned fully.
  c.unit_budget = 1.0           # (0, 1]: a fraction of the backbone's parameters
  c.unit_probe_fraction = 0.1   # (0, 1]: a fraction of the cell's optimizer steps
  # nc: the probes above | rgn: Auto-RGN (Lee et al.), the unit whose tensors' mean relative
  # gradient norm |g|/|theta| over the run's first 5 batches is largest | both: one auto run each
  c.unit_selector = "nc"

  # --- parameter-efficient methods (issue 19): methods bitfit, lora, lp_ft, vpt ---------------
  # lora: W + (alpha / rank) * A @ B beside the kernels `targets` select in the units:
  # query, key, value, out (attention = all four) and mlp on a ViT; conv (every convolution,
  # the kernel as (k*k*C_in, C_out)) and dense (other 2-D kernels) elsewhere; "<unit>/<kind>"
  # restricts a kind to one unit (e.g. "layer12/query"). B starts at zero. rank: a tuple,
  # one lora run per rank (--config.lora.rank=4,16); alpha is fixed across ranks.
  c.lora = ml_collections.ConfigDict(dict(rank=(8,), alpha=8.0,
                                          targets=("attention", "mlp", "conv")))
  # lp_ft: a linear probe for `probe_fraction` of the steps, then full FT from that head
  c.lp_ft = ml_collections.ConfigDict(dict(probe_fraction=0.5))
  # vpt (ViT only): `tokens` learnt prompt tokens after the class token, fresh at every layer
  # (deep) or inserted once before the first (shallow)
  c.vpt = ml_collections.ConfigDict(dict(tokens=10, deep=True))

  # --- job 'rank': score every candidate (variant x model) on each downstream dataset from
  # its frozen penultimate features, fine-tune it with `methods` as the ground truth, and
  # report each estimator's Kendall tau (stages.score; estimators: ncjax.transferability).
  c.rank = ml_collections.ConfigDict(dict(
      estimators=("nc1", "logme", "hscore", "leep", "ncti"),
  ))

  # --- optimisation (paper, Appendix B: SGD 0.9, wd 1e-4, cosine 0.1 -> 1e-4, 200 epochs) -----
  c.optim = ml_collections.ConfigDict(dict(
      lr=0.1, lr_end=1e-4, momentum=0.9, weight_decay=1e-4, warmup_steps=0,
      epochs=20,             # the paper uses 200
      steps=0,               # > 0 overrides epochs
      batch_size=128,
      aug_level=1,           # 1..5 (REFERENCE §4); 1 = normalisation only
      schedule="cosine",     # cosine: lr -> lr_end | step: lr x decay_factor after each of
      decay_epochs=(),       #   these epochs (increasing, < epochs; RFS: 60,80 of 100), in
      decay_factor=0.1,      #   epochs of the run's own data, also when `steps` sets its length
      layer_decay=1.0,       # (0, 1]: unit i of L trains at lr x layer_decay^(L - i), the stem
                             # at layer_decay^L, the head at lr; for full, lp_ft, bitfit, lora
  ))
  c.eval_batch_size = 512
  c.cache_linear_features = True  # linear probe without augmentation: features computed once

  # --- compute and memory ----------------------------------------------------------------------
  c.dtype = "float32"        # float32 | bfloat16: compute dtype; parameters, optimizer state,
                             # BatchNorm statistics, the loss and NC metrics stay float32
  c.data_budget_mb = 4096    # a split's decoded uint8 images up to this size are held in host
                             # memory (at native resolution); larger splits stream from disk
  c.compile_cache_dir = "~/.cache/ncjax/jax"  # JAX persistent compilation cache ('' = off)

  # --- evaluation / bookkeeping ---------------------------------------------------------------
  c.collapse = True          # NC1 / CDNV / numerical rank + layer-wise NC1 on downstream train data
  c.checkpoint_every = 0     # orbax checkpoint every N steps (0: only at the end of each run)
  # A rerun into the same --workdir resumes each run from its last readable checkpoint (and
  # skips finished runs); --fresh starts them over.
  c.plots = True
  # Runs that cannot learn: fewer than 20 optimizer steps, or a batch larger than the
  # training data (capped at it), print one WARNING line before any work; True: an error.
  c.strict = False
  return c
