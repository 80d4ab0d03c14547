"""A small search space over configs/tiny.py (the sweep tests use it):

    python -m jaxft.sweep --config configs/tiny.py --space configs/tiny_space.py --study tiny \
        --trials 6 --workers 2 --config.data.source=folder:PATH
"""

from optuna.distributions import CategoricalDistribution, FloatDistribution


def get_space():
  return {
      "optim.lr": FloatDistribution(1e-3, 0.3, log=True),
      "optim.weight_decay": FloatDistribution(0.0, 1e-3),
      "train.label_smoothing": CategoricalDistribution([0.0, 0.1]),
  }
