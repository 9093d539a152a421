"""LeNet-5 for 3x32x32 images, layer for layer as in the classic PyTorch CIFAR-10 tutorial.

The attribute names (conv1, conv2, fc1, fc2, fc3) are part of the interface: a state_dict saved
from any textbook LeNet with these names loads into this class unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn

from project.models.init import InitScheme, initialize


class LeNet(nn.Module):
    """Two 5x5 convolutions with max-pooling, then three fully connected layers.

    Args:
        num_classes: number of output logits.
        in_channels: image channels (3 for CIFAR-10).
        init: weight-initialisation scheme (see :mod:`project.models.init`); ``default`` keeps
            PyTorch's own initialisation, as in the tutorial.
        init_scale: std for ``init="normal"``, bound for ``init="uniform"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        init: InitScheme = "default",
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LeNet needs num_classes >= 1, got {num_classes}.")
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        if init != "default":
            initialize(self, init, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
