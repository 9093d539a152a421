"""Plain ``torch.nn.Module`` models. Nothing here imports Lightning; each file imports torch and at
most one sibling (``lenet.py`` and ``resnet.py`` use ``init.py``), so copy a file (and that one) anywhere."""

from project.models.init import INIT_SCHEMES, initialize
from project.models.lenet import LeNet
from project.models.resnet import (
    InputStatistics,
    ResidualBlock,
    ResNet,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet34,
    ResNet56,
)

__all__ = [
    "INIT_SCHEMES",
    "InputStatistics",
    "LeNet",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "ResNet32",
    "ResNet34",
    "ResNet56",
    "ResidualBlock",
    "initialize",
]
