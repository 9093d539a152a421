"""CIFAR-10: the official python archive's layout, its class names and statistics, and its data module."""

from project.data.cifar import CIFARDataModule
from project.data.cifar_files import CIFARFormat

#: Per-channel mean and std of the 50,000 official CIFAR-10 training images, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR10 = CIFARFormat(
    name="CIFAR-10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    archive_name="cifar-10-python.tar.gz",
    default_dir="data/cifar10",
    folder_name="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key="labels",
    meta_file="batches.meta",
    meta_key="label_names",
    classes=CIFAR10_CLASSES,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    keras_loader="keras.datasets.cifar10.load_data()",
)


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (10 classes, 50,000 training and 10,000 test images of 3x32x32) from the official
    archive, downloaded into ``data_dir`` (default ``data/cifar10``) when missing, or from a
    Keras-layout npz. The arguments are CIFARDataModule's."""

    format = CIFAR10
