"""Fine-tune torchvision's ImageNet ResNet-50 on CIFAR-10 with the seed's recipe.

    python -m jaxft.train --config configs/cifar10.py --workdir runs/cifar10

Online, the weights come from torchvision and the data from TFDS. Offline, convert a local file and use a
local copy of CIFAR-10 instead:

    python tools/convert_torch_weights.py resnet50-0676ba61.pth weights/resnet50 --arch resnet50
    python -m jaxft.train --config configs/cifar10.py \\
        --config.model.pretrained=weights/resnet50 --config.data.source=cifar:cifar-10-python.tar.gz

Every field, its default and its meaning: ``jaxft/config.py``. Any field can be overridden with
``--config.a.b=value``; unknown keys are errors.
"""

import ml_collections

from jaxft import config, optim


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config; variants import it and override a few fields."""
  c = config.default_config()
  c.model.arch = "resnet50"
  c.model.pretrained = "torchvision:resnet50"
  c.model.num_classes = 10
  c.data.source = "tfds:cifar10"
  c.optim = optim.seed_recipe()
  c.distill.temperature = 4.0
  return c
