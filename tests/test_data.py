"""The CIFAR data modules (CIFAR-10, CIFAR-100): official archive (download, verify, extract), npz,
splits, transforms, errors."""

import functools
import hashlib
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from project.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_CLASSES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetError,
)
from project.data import cifar_files as files
from project.data.cifar10 import CIFAR10
from project.data.cifar100 import CIFAR100
from project.errors import UserError
from tests.conftest import make_npz, official_archive

PER_BATCH = 12


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over ``tmp_path/www``; yields (folder, base_url). Stands in for the CIFAR host."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


def test_download_verify_extract_and_read(tmp_path, served):
    www, base = served
    archive, contents = official_archive(www / CIFAR10.archive_name, CIFAR10)
    data_dir = tmp_path / "data"
    dm = CIFAR10DataModule(data_dir=data_dir, url=f"{base}/{CIFAR10.archive_name}", md5=md5(archive), val_size=10)
    dm.prepare_data()
    assert (data_dir / CIFAR10.archive_name).read_bytes() == archive.read_bytes()
    assert (data_dir / CIFAR10.folder_name / "test_batch").is_file()
    dm.setup("fit")
    assert len(dm.train_split) + len(dm.val_split) == 5 * PER_BATCH and len(dm.val_split) == 10
    assert len(dm.test_split) == PER_BATCH
    # Images keep the official layout: row-major 3x32x32, red plane first.
    first = contents["test_batch"]
    assert torch.equal(dm.test_split.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert dm.test_split.labels.tolist() == first["labels"]
    # Second prepare_data finds the extracted folder and neither downloads nor extracts again.
    (www / CIFAR10.archive_name).unlink()
    dm.prepare_data()


def test_corrupt_download_is_refused_and_removed(tmp_path, served):
    www, base = served
    archive, _ = official_archive(www / CIFAR10.archive_name, CIFAR10)
    good_md5 = md5(archive)
    archive.write_bytes(archive.read_bytes()[:-100])  # truncated on the server
    data_dir = tmp_path / "data"
    dm = CIFAR10DataModule(data_dir=data_dir, url=f"{base}/{CIFAR10.archive_name}", md5=good_md5)
    with pytest.raises(DatasetError, match=r"is corrupt \(md5 .*, expected " + good_md5 + r"\); it was deleted"):
        dm.prepare_data()
    assert list(data_dir.iterdir()) == []


def test_offline_download_failure_is_clear(tmp_path, served):
    _, base = served
    dm = CIFAR10DataModule(data_dir=tmp_path / "data", url=f"{base}/missing.tar.gz")
    with pytest.raises(DatasetError, match="Could not download CIFAR-10 from .*missing.tar.gz.*use --data.npz"):
        dm.prepare_data()
    assert list((tmp_path / "data").iterdir()) == []


def test_preplaced_archive_is_extracted_without_network(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive, _ = official_archive(data_dir / CIFAR10.archive_name, CIFAR10)
    dm = CIFAR10DataModule(data_dir=data_dir, url="http://127.0.0.1:9/never-contacted", md5=md5(archive), val_size=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_split) == 5 * PER_BATCH and dm.val_split is None and dm.val_dataloader() == []


def test_corrupt_preplaced_archive(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / CIFAR10.archive_name).write_bytes(b"not a tarball")
    dm = CIFAR10DataModule(data_dir=data_dir)
    with pytest.raises(DatasetError, match="is corrupt or not the official CIFAR-10 archive.*delete it"):
        dm.prepare_data()
    assert (data_dir / CIFAR10.archive_name).read_bytes() == b"not a tarball"  # the user's file is not touched
    assert not (data_dir / CIFAR10.folder_name).exists()


def test_missing_data_with_download_off(tmp_path):
    dm = CIFAR10DataModule(data_dir=tmp_path, download=False)
    with pytest.raises(DatasetError, match="CIFAR-10 is not in .* download is off"):
        dm.prepare_data()


def test_truncated_batch_file(tmp_path):
    data_dir = tmp_path
    archive, _ = official_archive(data_dir / CIFAR10.archive_name, CIFAR10)
    files.extract(archive, CIFAR10, md5(archive))
    batch = data_dir / CIFAR10.folder_name / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DatasetError, match="data_batch_3 is not a readable CIFAR-10 file"):
        CIFAR10DataModule(data_dir=data_dir).setup("fit")


def test_pickle_payload_in_batch_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    data_dir = tmp_path
    archive, _ = official_archive(data_dir / CIFAR10.archive_name, CIFAR10)
    folder = files.extract(archive, CIFAR10, md5(archive))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Payload(), "labels": []}))
    with pytest.raises(DatasetError, match="forbidden global"):
        CIFAR10DataModule(data_dir=data_dir).setup("test")
    assert not (tmp_path / "pwned").exists()


def test_pickle_payload_in_npz_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    good = np.load(make_npz(tmp_path / "good.npz"))
    arrays = {key: good[key] for key in good.files}
    labels = np.empty(len(arrays["y_train"]), dtype=object)
    labels[:] = [Payload()] * len(labels)
    np.savez(tmp_path / "evil.npz", **{**arrays, "y_train": labels})  # an object array: pickled inside the npz
    with pytest.raises(DatasetError, match="is not a readable npz file.*allow_pickle=False"):
        CIFAR10DataModule(npz=tmp_path / "evil.npz", val_size=0).setup("fit")
    assert not (tmp_path / "pwned").exists()


def test_npz_split_is_seeded_and_disjoint(tmp_path):
    npz = make_npz(tmp_path / "d.npz", n_train=100)
    a = CIFAR10DataModule(npz=npz, val_size=20, split_seed=3)
    b = CIFAR10DataModule(npz=npz, val_size=20, split_seed=3)
    c = CIFAR10DataModule(npz=npz, val_size=20, split_seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.val_split.images, b.val_split.images)
    assert not torch.equal(a.val_split.images, c.val_split.images)
    seen = torch.cat([a.train_split.images, a.val_split.images]).flatten(1)
    assert len(torch.unique(seen, dim=0)) == 100  # every image once, none in both


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"y_test": None}, "lacks the arrays y_test"),
        (
            {"x_train": np.zeros((4, 3, 32, 32), np.uint8)},
            r"x_train is uint8 \(4, 3, 32, 32\), expected uint8 \(N, 32, 32, 3\)",
        ),
        ({"x_test": np.zeros((32, 32, 32, 3), np.float32)}, "x_test is float32"),
        ({"y_train": np.zeros(5, np.uint8)}, "y_train is uint8 with 5 entries, expected integer labels, one per image"),
        ({"y_train": np.full(64, 0.5)}, "y_train is float64"),
        ({"y_test": np.full(32, 10, np.uint8)}, r"labels in \[10, 10\], outside 0..9"),
    ],
)
def test_malformed_npz(tmp_path, overrides, message):
    npz = make_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DatasetError, match=message) as err:
        CIFAR10DataModule(npz=npz).setup("fit")
    assert str(npz) in str(err.value)


def test_npz_not_a_zip_and_missing(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="is not a readable npz file"):
        CIFAR10DataModule(npz=bad).setup("fit")
    with pytest.raises(DatasetError, match="does not exist; check --data.npz"):
        CIFAR10DataModule(npz=tmp_path / "nope.npz").setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"val_size": -1}, "val_size must be >= 0"),
        ({"eval_batch_size": 0}, "eval_batch_size must be at least 1"),
        ({"num_workers": -2}, "num_workers must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(**kwargs)


def test_val_size_too_large(tiny_npz):
    with pytest.raises(ValueError, match="val_size=64 leaves no training images"):
        CIFAR10DataModule(npz=tiny_npz, val_size=64).setup("fit")


def test_transforms_normalise_and_augment(tiny_npz):
    dm = CIFAR10DataModule(npz=tiny_npz, val_size=0, augment=False, batch_size=64)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    raw = dm.train_split.images.float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    # Without augmentation the batch is exactly the normalised images (in shuffled order).
    order = [
        int(torch.nonzero((raw - mean).div(std).flatten(1).sub(img.flatten()).abs().sum(1) < 1e-3)[0]) for img in x
    ]
    assert sorted(order) == list(range(64))
    assert x.dtype == torch.float32 and y.dtype == torch.int64

    aug = CIFAR10DataModule(npz=tiny_npz, val_size=0, augment=True, normalize=False, batch_size=64)
    aug.setup("fit")
    torch.manual_seed(0)
    xa, _ = next(iter(aug.train_dataloader()))
    assert xa.shape == (64, 3, 32, 32) and 0 <= xa.min() and xa.max() <= 1
    # Eval loaders never augment.
    xt, _ = next(iter(aug.test_dataloader()))
    torch.testing.assert_close(xt, aug.test_split.images.float() / 255)


def test_declared_attributes(tiny_npz):
    """What the CLI links into the model and the plots read, without loading any data."""
    dm = CIFAR10DataModule(npz=tiny_npz)
    assert dm.num_classes == 10 and dm.classes[3] == "cat" and dm.classes == CIFAR10_CLASSES
    assert dm.image_shape == (3, 32, 32) and (dm.mean, dm.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert CIFAR10DataModule(normalize=False).mean is None and CIFAR10DataModule(normalize=False).std is None
    assert (dm.data_dir, dm.url, dm.md5) == (Path("data/cifar10"), CIFAR10.url, "c58f30108f718f92721af3b95e74349a")
    c100 = CIFAR100DataModule()
    assert (
        c100.num_classes == 100
        and c100.classes == CIFAR100_CLASSES
        and len(set(c100.classes)) == 100
        and c100.classes == tuple(sorted(c100.classes))
    )
    assert c100.classes[:3] == ("apple", "aquarium_fish", "baby") and c100.classes[-1] == "worm"
    assert c100.mean == (0.5071, 0.4865, 0.4409) and c100.std == (0.2673, 0.2564, 0.2762)
    # The official archive, as torchvision.datasets.CIFAR100 names it.
    assert c100.data_dir == Path("data/cifar100")
    assert (c100.url, c100.md5) == (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    )


def test_cifar100_download_md5_fine_labels(tmp_path, served):
    """The official CIFAR-100 layout (cifar-100-python/train, test, meta): downloaded, md5-checked,
    extracted; the fine labels are read, never the coarse ones."""
    www, base = served
    archive, contents = official_archive(www / CIFAR100.archive_name, CIFAR100, per_file=40)
    data_dir = tmp_path / "data"
    dm = CIFAR100DataModule(data_dir=data_dir, url=f"{base}/{CIFAR100.archive_name}", md5=md5(archive), val_size=8)
    dm.prepare_data()
    assert (data_dir / CIFAR100.archive_name).read_bytes() == archive.read_bytes()
    assert sorted(p.name for p in (data_dir / "cifar-100-python").iterdir()) == ["meta", "test", "train"]
    dm.setup("fit")
    assert len(dm.train_split) == 32 and len(dm.val_split) == 8 and len(dm.test_split) == 40
    test = contents["test"]
    assert dm.test_split.labels.tolist() == test["fine_labels"] != test["coarse_labels"]
    assert torch.equal(dm.test_split.images[0], torch.from_numpy(test["data"][0].reshape(3, 32, 32)))
    assert max(test["fine_labels"]) >= 20  # labels beyond the 20 coarse classes are kept
    x, y = next(iter(dm.test_dataloader()))
    mean, std = torch.tensor(CIFAR100.mean).view(3, 1, 1), torch.tensor(CIFAR100.std).view(3, 1, 1)
    torch.testing.assert_close(x, (dm.test_split.images.float() / 255 - mean) / std)

    # A download whose md5 is not the expected one is deleted.
    corrupt = CIFAR100DataModule(data_dir=tmp_path / "other", url=f"{base}/{CIFAR100.archive_name}", md5="0" * 32)
    with pytest.raises(DatasetError, match="corrupt .*expected 0{32}.*it was deleted"):
        corrupt.prepare_data()
    assert list((tmp_path / "other").iterdir()) == []


def test_cifar100_archive_errors_name_cifar100(tmp_path):
    # The default md5 is the official archive's, so a generated one is refused untouched.
    archive, _ = official_archive(tmp_path / CIFAR100.archive_name, CIFAR100)
    with pytest.raises(
        DatasetError, match="not the official CIFAR-100 archive .*expected eb9058c3a382ffc7106e4002c42a8d85"
    ):
        CIFAR100DataModule(data_dir=tmp_path).prepare_data()
    # A CIFAR-10 archive renamed to CIFAR-100's name is refused for its folder.
    other = tmp_path / "other"
    cifar10, _ = official_archive(other / CIFAR100.archive_name, CIFAR10)
    with pytest.raises(DatasetError, match="does not contain a cifar-100-python/ folder"):
        CIFAR100DataModule(data_dir=other, md5=md5(cifar10)).prepare_data()
    # Meta naming other classes (here the 20 coarse ones) means another archive.
    folder = files.extract(archive, CIFAR100, md5(archive))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"coarse{i}" for i in range(20)]}))
    with pytest.raises(DatasetError, match=r"meta names the classes \['coarse0'.*\(20 in all\) where CIFAR-100 has"):
        CIFAR100DataModule(data_dir=tmp_path).setup("fit")
    with pytest.raises(DatasetError, match="CIFAR-100 is not in .* download is off"):
        CIFAR100DataModule(data_dir=tmp_path / "empty", download=False).prepare_data()


def test_cifar100_npz(tmp_path):
    npz = make_npz(tmp_path / "c100.npz", n_train=300, num_classes=100, seed=1)
    dm = CIFAR100DataModule(npz=npz, val_size=10)
    dm.setup("fit")
    assert int(torch.cat([dm.train_split.labels, dm.val_split.labels]).max()) > 90
    bad = make_npz(tmp_path / "bad.npz", y_test=np.full(32, 100, np.uint8))
    with pytest.raises(DatasetError, match=r"outside 0..99; use a CIFAR-100 file with class indices 0-99"):
        CIFAR100DataModule(npz=bad).setup("fit")
    with pytest.raises(DatasetError, match=r"outside 0..9; use a CIFAR-10 file"):
        CIFAR10DataModule(npz=npz).setup("fit")


def test_real_subset_loads(subset_npz):
    dm = CIFAR10DataModule(npz=subset_npz, val_size=500)
    dm.setup("fit")
    assert len(dm.train_split) == 4670 and len(dm.val_split) == 500 and len(dm.test_split) == 508
    assert dm.test_split.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_val_size_is_a_count_or_a_fraction(tiny_npz, recwarn):
    """An int keeps meaning a count; a float in (0, 1) is a share of the 64 training images."""
    by_count = CIFAR10DataModule(npz=tiny_npz, val_size=16)
    by_count.setup("fit")
    by_fraction = CIFAR10DataModule(npz=tiny_npz, val_size=0.25)
    by_fraction.setup("fit")
    assert len(by_count.val_split) == len(by_fraction.val_split) == 16 and len(by_fraction.train_split) == 48
    assert torch.equal(by_count.val_split.labels, by_fraction.val_split.labels), "the same seeded split"
    assert not [w for w in recwarn if "val_size" in str(w.message)]


def test_a_split_leaving_fewer_training_than_validation_images_warns(tiny_npz):
    """experiments/lenet.yaml's offline command once left the default 5000 of the subset's 5170 images
    out, training on 170 without a word."""
    data = CIFAR10DataModule(npz=tiny_npz, val_size=40)
    with pytest.warns(UserWarning, match=r"holds out 40 of 64 training images, so the model trains on only 24"):
        data.setup("fit")


@pytest.mark.parametrize(
    "val_size, words",
    [
        (1.5, "fraction between 0 and 1"),
        (0.0, "fraction between 0 and 1"),
        (0.001, "is no image"),
        (1.0, "fraction between 0 and 1"),
    ],
)
def test_a_val_size_fraction_out_of_range_is_refused(tiny_npz, val_size, words):
    with pytest.raises(UserError, match=words):
        CIFAR10DataModule(npz=tiny_npz, val_size=val_size).setup("fit")
