"""LightningDataModules and the data pipelines behind them."""

from project.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from project.data.cifar10_files import CLASSES, DatasetError

__all__ = ["CIFAR10DataModule", "CIFAR10_MEAN", "CIFAR10_STD", "CLASSES", "DatasetError"]
