"""Reading CIFAR-10 from disk: the official python archive (downloaded and verified) or a Keras-layout npz.

Both readers return uint8 arrays in NCHW layout plus int64 labels, and turn every way a file can be
wrong into one :class:`DatasetError` sentence that names the file and the fix.
"""

import hashlib
import pickle
import shutil
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from project.errors import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
IMAGE_SHAPE = (3, 32, 32)


class DatasetError(UserError):
    """The dataset is missing or malformed; the message says which file and what to do."""


@dataclass(frozen=True)
class Split:
    """Images as a uint8 tensor (N, 3, 32, 32) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def locate(data_dir: Path) -> Path | None:
    """The extracted batches folder if present, else the archive if present, else None."""
    folder, archive = data_dir / FOLDER_NAME, data_dir / ARCHIVE_NAME
    if folder.is_dir():
        return folder
    if archive.is_file():
        return archive
    return None


def download(data_dir: Path, url: str = OFFICIAL_URL, md5: str | None = OFFICIAL_MD5) -> Path:
    """Fetch the archive into ``data_dir`` and verify it; a failed or corrupt download leaves nothing behind."""
    from torchvision.datasets.utils import download_url

    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / ARCHIVE_NAME
    partial = data_dir / (ARCHIVE_NAME + ".part")
    try:
        download_url(url, str(data_dir), filename=partial.name, md5=None)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise DatasetError(
            f"Could not download CIFAR-10 from {url} ({err}); place {ARCHIVE_NAME} or its extracted "
            f"{FOLDER_NAME}/ folder in {data_dir}, or use --data.npz for an offline npz file."
        ) from err
    if md5 is not None and (actual := md5sum(partial)) != md5:
        partial.unlink()
        raise DatasetError(
            f"The file downloaded from {url} is corrupt (md5 {actual}, expected {md5}); "
            "it was deleted, so run again to retry the download."
        )
    partial.rename(archive)
    return archive


def extract(archive: Path, md5: str | None = OFFICIAL_MD5) -> Path:
    """Verify ``archive`` and unpack it beside itself; return the batches folder."""
    if md5 is not None and (actual := md5sum(archive)) != md5:
        raise DatasetError(
            f"{archive} is corrupt or not the official CIFAR-10 archive (md5 {actual}, expected {md5}); "
            "delete it and run again to download a fresh copy."
        )
    target = archive.parent
    tmp = target / (FOLDER_NAME + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"{archive} cannot be unpacked ({err}); delete it and run again to download it.") from err
    extracted = tmp / FOLDER_NAME
    if not extracted.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"{archive} does not contain a {FOLDER_NAME}/ folder; it is not the CIFAR-10 python archive.")
    extracted.rename(target / FOLDER_NAME)
    tmp.rmdir()
    return target / FOLDER_NAME


class _BatchUnpickler(pickle.Unpickler):
    """The official batches are pickles; allow only what a dict of numpy arrays needs, so a
    tampered file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = f"delete {path.parent} and run again to re-extract or download it"
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the extracted CIFAR-10 folder; {fix}.")
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()
        data = np.asarray(batch["data"])
        labels = np.asarray(batch.get("labels", batch.get("fine_labels")))
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise DatasetError(f"{path} is not a readable CIFAR-10 batch ({err}); {fix}.") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DatasetError(f"{path} does not hold CIFAR-10 images (data {data.dtype} {data.shape}); {fix}.")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _split(images: np.ndarray, labels: np.ndarray, source: Path, num_classes: int) -> Split:
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{source} has labels in [{labels.min()}, {labels.max()}], outside 0..{num_classes - 1}; "
            "use a CIFAR-10 file with class indices 0-9."
        )
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def read_official(folder: Path) -> tuple[Split, Split]:
    """Train and test splits from an extracted ``cifar-10-batches-py`` folder."""
    train = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    test = [_read_batch(folder / name) for name in TEST_BATCHES]
    return tuple(  # type: ignore[return-value]
        _split(np.concatenate([d for d, _ in part]), np.concatenate([l for _, l in part]), folder, len(CLASSES))
        for part in (train, test)
    )


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: Path) -> tuple[Split, Split]:
    """Train and test splits from a Keras-layout npz (x_* NHWC uint8, y_* integer labels)."""
    fix = "it needs x_train, y_train, x_test, y_test as saved from keras.datasets.cifar10.load_data()"
    if not path.is_file():
        raise DatasetError(f"The npz file {path} does not exist; check --data.npz (for example ../shared/data/cifar10_subset.npz).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DatasetError(f"{path} lacks the arrays {', '.join(missing)}; {fix}.")
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(f"{path} is not a readable npz file ({err}); {fix}.") from err
    splits = []
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"].reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DatasetError(
                f"{path}: x_{part} is {x.dtype} {x.shape}, expected uint8 (N, 32, 32, 3) images; {fix}."
            )
        if not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
            raise DatasetError(
                f"{path}: y_{part} is {y.dtype} with {len(y)} entries, expected integer labels, one per image "
                f"({len(x)}); {fix}."
            )
        splits.append(_split(x.transpose(0, 3, 1, 2), y, path, len(CLASSES)))
    return splits[0], splits[1]
