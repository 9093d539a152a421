"""The README's "Add a model": a plain nn.Module in a package of the user's, named by class_path,
trains through the CLI; a net that cannot take what the CLI links into it is one sentence, before
anything is written."""

import textwrap

import pytest
import torch

from project.run.cli import main
from tests.conftest import QUIET, REPO, make_npz, run_dirs

MODELS = """
from torch import nn


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


class FixedClasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class FixedClassesWide(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))
"""


@pytest.fixture
def models_package(tmp_path, monkeypatch):
    package = tmp_path / "src" / "mymodels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(MODELS))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return package


def fit(tmp_path, *extra):
    npz = make_npz(tmp_path / "d.npz", n_train=48, n_test=16)
    return main(
        [
            "fit",
            "-c",
            str(REPO / "experiments" / "lenet.yaml"),
            f"--data.npz={npz}",
            *QUIET,
            "--data.val_size=16",
            "--data.batch_size=8",
            "--trainer.max_epochs=1",
            "--test_after_fit=false",
            "--plots.enabled=false",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            *extra,
        ]
    )


def test_a_users_net_by_class_path_trains_with_num_classes_linked(tmp_path, models_package):
    cli = fit(tmp_path, "--model.net=mymodels.MLP", "--model.net.init_args.hidden=32")
    net = cli.model.net
    assert type(net).__name__ == "MLP" and net.head.out_features == 10  # num_classes from the data module
    assert net.body[1].out_features == 32
    (run,) = run_dirs(tmp_path / "runs", "lenet")
    weights = torch.load(run / "net.pt", weights_only=True)
    assert set(weights) == set(net.state_dict())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.net=mymodels.FixedClasses"],
            "error: model.net mymodels.FixedClasses takes no num_classes argument, which the CLI fills in from the data "
            "module: give the net's __init__ a num_classes argument (README: Add a model).",
        ),
        (
            ["--model.net=mymodels.FixedClassesWide"],  # init_args of its own: jsonargparse drops the link silently
            "error: model.net mymodels.FixedClassesWide takes no num_classes argument, which the CLI fills in from the data "
            "module: give the net's __init__ a num_classes argument (README: Add a model).",
        ),
        (
            ["--model.net=mymodels.MLP", "--model.net.init_args.in_channels=1"],
            "error: model.net.init_args.in_channels is 1, but the data module's images have 3 channels (image_shape "
            "(3, 32, 32)): give --model.net.init_args.in_channels 3 (README: Add a model).",
        ),
    ],
)
def test_a_net_that_does_not_fit_the_data_is_one_sentence(tmp_path, models_package, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        fit(tmp_path, *args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert run_dirs(tmp_path / "runs", "lenet") == []  # nothing left behind
