"""Reading a dataset in the CIFAR python format from disk: the official archive (downloaded and
verified) or a Keras-layout npz. A :class:`CIFARFormat` says where one such dataset comes from and
how its files are laid out (CIFAR-10 and CIFAR-100 are two of them).

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

#: Every image of the CIFAR python format: (channels, height, width).
IMAGE_SHAPE = (3, 32, 32)


class DatasetError(UserError):
    """The dataset is missing or malformed; the message says which file and what to do."""


@dataclass(frozen=True)
class CIFARFormat:
    """One dataset in the CIFAR python format: its official archive and the files inside it.

    ``default_dir`` is where the archive goes when no ``data_dir`` is given; ``label_key`` names
    the labels in each batch file (``labels``; CIFAR-100: ``fine_labels``),
    ``meta_file`` and ``meta_key`` the class names; ``mean`` and ``std`` are the per-channel
    statistics of the training images in [0, 1] units, used to normalise them.
    """

    name: str
    url: str
    md5: str
    archive_name: str
    default_dir: str
    folder_name: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    meta_key: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    keras_loader: str  # where a matching npz comes from, for error messages

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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


def locate(data_dir: Path, fmt: CIFARFormat) -> Path | None:
    """The extracted batches folder if present, else the archive if present, else None."""
    folder, archive = data_dir / fmt.folder_name, data_dir / fmt.archive_name
    if folder.is_dir():
        return folder
    if archive.is_file():
        return archive
    return None


def download(data_dir: Path, fmt: CIFARFormat, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch the archive (from ``url``, by default the official one) into ``data_dir`` and check its md5
    (``md5``; ``None`` skips the check); a failed or corrupt download leaves nothing behind."""
    from torchvision.datasets.utils import download_url

    url = url or fmt.url
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / fmt.archive_name
    partial = data_dir / (fmt.archive_name + ".part")
    try:
        download_url(url, str(data_dir), filename=partial.name, md5=None)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise DatasetError(
            f"Could not download {fmt.name} from {url} ({err}); place {fmt.archive_name} or its extracted "
            f"{fmt.folder_name}/ folder in {data_dir}, or use --data.npz for an offline npz file."
        ) from err
    if md5 is not None and (actual := md5sum(partial)) != md5:
        partial.unlink()
        raise DatasetError(
            f"The file downloaded from {url} is corrupt (md5 {actual}, expected {md5}); "
            "it was deleted, so run again to retry the download."
        )
    partial.rename(archive)
    return archive


def extract(archive: Path, fmt: CIFARFormat, md5: str | None) -> Path:
    """Check ``archive``'s md5 (``None`` skips the check) and unpack it beside itself; return the batches folder."""
    if md5 is not None and (actual := md5sum(archive)) != md5:
        raise DatasetError(
            f"{archive} is corrupt or not the official {fmt.name} archive (md5 {actual}, expected {md5}); "
            "delete it and run again to download a fresh copy."
        )
    target = archive.parent
    tmp = target / (fmt.folder_name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"{archive} cannot be unpacked ({err}); delete it and run again to download it.") from err
    extracted = tmp / fmt.folder_name
    if not extracted.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(
            f"{archive} does not contain a {fmt.folder_name}/ folder; it is not the {fmt.name} python archive."
        )
    extracted.rename(target / fmt.folder_name)
    tmp.rmdir()
    return target / fmt.folder_name


# Not torchvision's CIFAR10: it reads these pickles with plain pickle.load, which runs the code a tampered file holds.
class _BatchUnpickler(pickle.Unpickler):
    """The official batch and meta files are pickles; allow only what a dict of numpy arrays needs, so a
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


def _unpickle(path: Path, fmt: CIFARFormat) -> dict:
    fix = f"delete {path.parent} and run again to re-extract or download it"
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the extracted {fmt.name} folder; {fix}.")
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="latin1").load()
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise DatasetError(f"{path} is not a readable {fmt.name} file ({err}); {fix}.") from err


def _read_batch(path: Path, fmt: CIFARFormat) -> tuple[np.ndarray, np.ndarray]:
    fix = f"delete {path.parent} and run again to re-extract or download it"
    batch = _unpickle(path, fmt)
    if not isinstance(batch, dict) or "data" not in batch or fmt.label_key not in batch:
        raise DatasetError(f"{path} is not a {fmt.name} batch (it needs the entries data and {fmt.label_key}); {fix}.")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[fmt.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DatasetError(f"{path} does not hold {fmt.name} images (data {data.dtype} {data.shape}); {fix}.")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def read_class_names(folder: Path, fmt: CIFARFormat) -> tuple[str, ...]:
    """The class names in the extracted folder's meta file; they must be ``fmt.classes``."""
    path = folder / fmt.meta_file
    meta = _unpickle(path, fmt)
    names = tuple(str(name) for name in meta.get(fmt.meta_key, ())) if isinstance(meta, dict) else ()
    if names != fmt.classes:
        raise DatasetError(
            f"{path} names the classes {list(names[:3])}... ({len(names)} in all) where {fmt.name} has "
            f"{list(fmt.classes[:3])}... ({fmt.num_classes}); it is not the {fmt.name} archive, so delete "
            f"{folder} and run again to download it."
        )
    return names


def _split(images: np.ndarray, labels: np.ndarray, source: Path, fmt: CIFARFormat) -> Split:
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= fmt.num_classes):
        raise DatasetError(
            f"{source} has labels in [{labels.min()}, {labels.max()}], outside 0..{fmt.num_classes - 1}; "
            f"use a {fmt.name} file with class indices 0-{fmt.num_classes - 1}."
        )
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def read_official(folder: Path, fmt: CIFARFormat) -> tuple[Split, Split]:
    """Train and test splits from an extracted folder (``fmt.folder_name``) of the official archive."""
    read_class_names(folder, fmt)
    train = [_read_batch(folder / name, fmt) for name in fmt.train_files]
    test = [_read_batch(folder / name, fmt) for name in fmt.test_files]
    return tuple(  # type: ignore[return-value]
        _split(np.concatenate([d for d, _ in part]), np.concatenate([labels for _, labels in part]), folder, fmt)
        for part in (train, test)
    )


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: Path, fmt: CIFARFormat) -> tuple[Split, Split]:
    """Train and test splits from a Keras-layout npz (x_* NHWC uint8, y_* integer labels)."""
    fix = f"it needs x_train, y_train, x_test, y_test as saved from {fmt.keras_loader}"
    if path.is_dir():
        raise DatasetError(
            f"--data.npz {path} is a directory, not an npz file; give the .npz file itself (for example ../shared/data/cifar10_subset.npz)."
        )
    if not path.is_file():
        raise DatasetError(
            f"The npz file {path} does not exist; check --data.npz (for example ../shared/data/cifar10_subset.npz)."
        )
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
            raise DatasetError(f"{path}: x_{part} is {x.dtype} {x.shape}, expected uint8 (N, 32, 32, 3) images; {fix}.")
        if not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
            raise DatasetError(
                f"{path}: y_{part} is {y.dtype} with {len(y)} entries, expected integer labels, one per image "
                f"({len(x)}); {fix}."
            )
        splits.append(_split(x.transpose(0, 3, 1, 2), y, path, fmt))
    return splits[0], splits[1]
