"""Plain ``torch.nn.Module`` models. Nothing here imports Lightning: copy a file anywhere."""

from project.models.init import INIT_SCHEMES, initialize
from project.models.input_stats import InputStatistics
from project.models.lenet import LeNet
from project.models.resnet import ResidualBlock, ResNet, ResNet18, ResNet20, ResNet32, ResNet34, ResNet56

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
