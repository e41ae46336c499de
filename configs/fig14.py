"""Fig. 14: layer-wise NC1 of ViT-B/32 (ImageNet-21k) on FGVC-Aircraft, DTD and Pets under
linear probing, Layer FT and SCL FT of layers 2, 5, 8 and 11, each layer's feature being its
class token (layerwise_nc1.png: a row per dataset, a panel per fine-tuned layer). The runs
are those of table7.py without full fine-tuning: with its --workdir nothing is trained
again. Weights and data as in table3.py."""
import ml_collections

from configs import table7


def get_config():
  c = table7.get_config()
  c.methods = ("linear", "layer", "scl")
  # The class token of every encoder layer is the feature whose NC1 is measured (Appendix
  # C.1), as in Table 7; set here so that the figure does not depend on table3's choice.
  c.backbone.vit_b32.options = ml_collections.ConfigDict(dict(pool="cls"))
  return c
