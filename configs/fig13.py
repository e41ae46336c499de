"""Fig. 13: the Fig. 5 models (augmentation levels 1-5 and adversarial pre-training on
CIFAR-100, linear probes on CIFAR-10, FGVC-Aircraft, DTD and Pets), with transfer accuracy
plotted against the NC1 measured on each downstream training set itself rather than on
CIFAR-10 (nc1_vs_accuracy.png; results.md gives Pearson's r for both). The runs are those
of fig5.py: with its --workdir nothing is trained again and only the report is rewritten.
Data as in table3.py / table1.py."""
from configs import fig5


def get_config():
  return fig5.get_config()
