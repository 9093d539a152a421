"""Datasets as plug-ins: ``data:`` names any LightningDataModule by class_path; CIFAR-100 and a data
module from a package of the user's own train through the CLI; anything else is refused in one sentence."""

import csv
import os
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from project.data import CIFAR100_CLASSES
from project.data.cifar100 import CIFAR100
from project.run.cli import main
from tests.conftest import REPO, official_archive, run_cli, run_dirs
from tests.test_data import md5

QUIET_TRAINER = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

#: The README's "Add your own dataset", step 1: a data module that declares what the template needs.
TINY_DATA_MODULE = '''
    """Three classes of grey 32x32 images, dark, mid and bright: a data module of the user's own."""

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset


    class TinyShades(L.LightningDataModule):
        num_classes = 3
        classes = ("dark", "mid", "bright")
        image_shape = (1, 32, 32)
        mean, std = (0.5,), (0.25,)

        def __init__(self, batch_size: int = 8, size: int = 48) -> None:
            super().__init__()
            self.batch_size, self.size = batch_size, size

        def setup(self, stage: str) -> None:
            labels = torch.arange(self.size) % 3
            noise = 0.05 * torch.randn(self.size, 1, 32, 32, generator=torch.Generator().manual_seed(0))
            images = (labels.view(-1, 1, 1, 1) / 2 + noise - 0.5) / 0.25
            self.train_set = TensorDataset(images[: self.size - 12], labels[: self.size - 12])
            self.val_set = TensorDataset(images[-12:], labels[-12:])

        def train_dataloader(self):
            return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

        def val_dataloader(self):
            return DataLoader(self.val_set, batch_size=self.batch_size)
'''

#: Step 3: the one YAML file that points at it.
TINY_EXPERIMENT = """
    seed_everything: 0
    trainer:
      max_epochs: 1
      accelerator: cpu
      devices: 1
    model:
      net:
        class_path: project.models.LeNet
        init_args:
          in_channels: 1
      optimizer:
        class_path: torch.optim.SGD
        init_args: {{lr: 0.05, momentum: 0.9}}
    data:
      class_path: {package}.TinyShades
      init_args:
        batch_size: 8
"""


def write_package(root: Path, name: str, source: str) -> Path:
    """``root/name/__init__.py`` holding ``source``: a package importable once ``root`` is on PYTHONPATH."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(source))
    return root


def read_csv_header(path: Path) -> list[str]:
    with open(path) as f:
        return next(csv.reader(f))


def test_the_add_a_dataset_recipe_trains_one_epoch(tmp_path):
    """The README recipe, followed as a user would: a data module in a package of their own, one YAML
    pointing at it by class_path, and ``python -m project fit -c`` with that package on PYTHONPATH."""
    packages = write_package(tmp_path / "src", "mydata", TINY_DATA_MODULE)
    experiment = tmp_path / "tiny_shades.yaml"
    experiment.write_text(textwrap.dedent(TINY_EXPERIMENT.format(package="mydata")))
    out = run_cli(
        ["fit", "-c", str(experiment), f"--trainer.default_root_dir={tmp_path / 'runs'}", *QUIET_TRAINER],
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{packages}"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "runs", "tiny_shades")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["class_path"] == "mydata.TinyShades"
    # The model was built from what the data module declares: 3 classes, grey 32x32 inputs.
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["num_classes"] == 3
    assert list(checkpoint["hyper_parameters"]["image_shape"]) == [1, 32, 32]
    net = torch.load(run / "net.pt", weights_only=True)
    assert net["fc3.weight"].shape == (3, 84) and net["conv1.weight"].shape[1] == 1
    # Plots use its class names.
    assert read_csv_header(run / "plots" / "val-epoch000-confusion.csv") == ["dark", "mid", "bright"]
    assert (run / "plots" / "val-epoch000-predictions.png").is_file()
    assert "val/acc" in read_csv_header(run / "metrics.csv")


def test_cifar100_trains_through_the_cli(tmp_path):
    """experiments/resnet18_cifar100.yaml on a generated archive in the official layout, placed in
    data_dir (its md5 given, since it is not the official file), with a tiny ResNet and one epoch."""
    data_dir = tmp_path / "data"
    archive, contents = official_archive(data_dir / CIFAR100.archive_name, CIFAR100, per_file=64)
    cli = main(
        [
            "fit",
            "-c",
            str(REPO / "experiments/resnet18_cifar100.yaml"),
            f"--data.data_dir={data_dir}",
            f"--data.md5={md5(archive)}",
            "--data.val_size=16",
            "--data.batch_size=16",
            "--data.eval_batch_size=32",
            "--data.num_workers=0",
            "--data.pin_memory=false",
            "--model.net=project.models.ResNet",
            "--model.net.init_args.blocks_per_stage=[1]",
            "--model.net.init_args.widths=[8]",
            "--trainer.max_epochs=1",
            "--trainer.precision=32-true",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            *QUIET_TRAINER,
        ]
    )
    assert type(cli.datamodule).__name__ == "CIFAR100DataModule"
    assert cli.model.num_classes == 100 and cli.model.net.fc.out_features == 100
    assert cli.datamodule.test_split.labels.tolist() == contents["test"]["fine_labels"]
    run = cli.run_dir
    assert run.parent == tmp_path / "runs" / "resnet18_cifar100"
    assert read_csv_header(run / "plots" / "val-epoch000-confusion.csv") == list(CIFAR100_CLASSES)
    assert read_csv_header(run / "plots" / "test-confusion.csv") == list(CIFAR100_CLASSES)  # test_after_fit
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("test/acc") for row in rows) and any(row.get("val/acc_top5") for row in rows)
    # Logged under the names the command line uses (--data.batch_size), as for CIFAR-10.
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["data"] == "project.data.CIFAR100DataModule" and hparams["data.batch_size"] == 16


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        # jsonargparse's own report, let through: it names the key, the class path and the cause.
        ("os.system", "does not correspond to a subclass of LightningDataModule"),
        ("project.models.LeNet", "does not correspond to a subclass of LightningDataModule"),
        ("nosuchpackage.Data", "No module named 'nosuchpackage'"),
        ("project.data.CIFAR1000DataModule", "module 'project.data' has no attribute 'CIFAR1000DataModule'"),
    ],
)
def test_a_class_path_that_is_no_data_module_is_refused(tmp_path, capsys, class_path, message):
    marker = tmp_path / "ran"
    experiment = tmp_path / "bad.yaml"
    experiment.write_text(
        yaml.safe_dump({"data": {"class_path": class_path, "init_args": {"command": f"touch {marker}"}}})
    )
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "-c",
                str(REPO / "experiments/lenet.yaml"),
                "-c",
                str(experiment),
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    # jsonargparse's report (no usage screen, no traceback), naming the key and the class path; nothing ran.
    assert 'error: Parser key "data"' in err and class_path in err and message in err, err
    assert "usage:" not in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "bad").exists()


def test_a_wrong_data_argument_keeps_the_parsers_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(REPO / "experiments/resnet18_cifar100.yaml"), "--data.batch_size=many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "cannot be imported" not in err and "not a LightningDataModule" not in err
    assert 'Parser key "batch_size"' in err and "Got value: many" in err  # jsonargparse's report, let through


def test_a_value_the_data_module_refuses_keeps_its_own_sentence(tmp_path, capsys):
    """In subclass mode jsonargparse wraps what the data module's __init__ raises; the CLI shows the original."""
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "-c",
                str(REPO / "experiments/resnet18_cifar100.yaml"),
                "--data.batch_size=0",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: data.batch_size must be at least 1, got 0."
    assert run_dirs(tmp_path, "resnet18_cifar100") == []


def test_a_data_module_without_num_classes_gets_one_sentence(tmp_path, capsys, monkeypatch):
    source = TINY_DATA_MODULE.replace("        num_classes = 3\n", "")
    monkeypatch.syspath_prepend(str(write_package(tmp_path / "src", "no_classes_data", source)))
    experiment = tmp_path / "no_classes.yaml"
    experiment.write_text(textwrap.dedent(TINY_EXPERIMENT.format(package="no_classes_data")))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(experiment), f"--trainer.default_root_dir={tmp_path / 'runs'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: The data module no_classes_data.TinyShades has no num_classes; give it the attributes num_classes "
        'and image_shape (the model is built from them), see the README\'s "Add your own dataset".'
    )
    assert run_dirs(tmp_path / "runs", "no_classes") == []  # nothing written


def test_existing_configs_without_class_path_still_mean_cifar10(tmp_path):
    """``data: {batch_size: ...}`` (no class_path) and --data.* overrides keep configuring CIFAR10DataModule."""
    from project.run.cli import ProjectCLI

    cli = ProjectCLI(
        args=[
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            "--data.batch_size=7",
            "--data.npz=x.npz",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert type(cli.datamodule).__name__ == "CIFAR10DataModule"
    assert (cli.datamodule.batch_size, cli.datamodule.num_workers, str(cli.datamodule.npz)) == (7, 2, "x.npz")
    assert cli.model.num_classes == 10 and cli.model.net.fc3.out_features == 10
