"""CIFAR-100 with its 100 fine labels: the official python archive's layout, class names and
statistics, and its data module."""

from project.data.cifar import CIFARDataModule
from project.data.cifar_files import CIFARFormat

#: The fine label names in the official archive's order (meta: fine_label_names), alphabetical.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

CIFAR100 = CIFARFormat(
    name="CIFAR-100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    archive_name="cifar-100-python.tar.gz",
    default_dir="data/cifar100",
    folder_name="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key="fine_labels",
    meta_file="meta",
    meta_key="fine_label_names",
    classes=CIFAR100_CLASSES,
    # Per-channel mean and std of the 50,000 official training images, in [0, 1] units.
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    keras_loader='keras.datasets.cifar100.load_data(label_mode="fine")',
)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 (100 fine classes, 50,000 training and 10,000 test images of 3x32x32) from the
    official archive, downloaded into ``data_dir`` (default ``data/cifar100``) when missing, or from
    a Keras-layout npz with the fine labels. The arguments are CIFARDataModule's."""

    format = CIFAR100
