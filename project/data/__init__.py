"""LightningDataModules and the data pipelines behind them. Any LightningDataModule can be named in
a YAML ``data:`` block (see the README's "Add your own dataset"); export yours here."""

from project.data.cifar import CIFARDataModule
from project.data.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from project.data.cifar100 import CIFAR100_CLASSES, CIFAR100DataModule
from project.data.cifar_files import DatasetError

__all__ = [
    "CIFARDataModule",
    "CIFAR10DataModule",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100DataModule",
    "CIFAR100_CLASSES",
    "DatasetError",
]
