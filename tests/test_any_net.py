"""Any nn.Module class, or function that returns one, from torchvision, timm or the user's package as
``model.net`` in one line: num_classes from the data module, every subcommand from the run's config.yaml,
``fit -c config.yaml`` again, net.pt loading strictly into the same net built without Lightning, and
``python -m project summary -c config.yaml`` through the CLI's own parser."""

import importlib

import pytest
import torch

from project.run.cli import main
from project.tools import summary
from tests.conftest import QUIET, make_npz, run_dirs, subset_fit_args

timm = pytest.importorskip("timm")

#: (model.net on the command line, extra init_args, the same net built by hand with the data's 10 classes).
NETS = {
    "torchvision-function": (["--model.net=torchvision.models.resnet18"], "torchvision.models.resnet18", {}),
    "torchvision-function-kwargs-only": (
        ["--model.net=torchvision.models.mobilenet_v3_small"],
        "torchvision.models.mobilenet_v3_small",
        {},
    ),
    "torchvision-class": (
        [
            "--model.net=torchvision.models.ResNet",
            "--model.net.init_args.block=torchvision.models.resnet.BasicBlock",
            "--model.net.init_args.layers=[1, 1, 1, 1]",
        ],
        "torchvision.models.ResNet",
        {"block": "torchvision.models.resnet.BasicBlock", "layers": [1, 1, 1, 1]},
    ),
    "timm-function": (["--model.net=timm.models.resnet18"], "timm.models.resnet18", {}),
    "timm-create_model": (
        ["--model.net=timm.create_model", "--model.net.init_args.model_name=resnet18"],
        "timm.create_model",
        {"model_name": "resnet18"},
    ),
}


def resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def by_hand(path: str, init_args: dict) -> torch.nn.Module:
    kwargs = {key: resolve(value) if key == "block" else value for key, value in init_args.items()}
    return resolve(path)(num_classes=10, **kwargs)


def tiny(tmp_path, *extra):
    npz = make_npz(tmp_path / "d.npz", n_train=40, n_test=16)
    return [
        f"--data.npz={npz}",
        *QUIET,
        "--data.val_size=8",
        "--data.batch_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--plots.enabled=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        *extra,
    ]


@pytest.mark.parametrize("net", list(NETS))
def test_a_library_net_fits_evaluates_refits_exports_and_summarises(tmp_path, net, capsys):
    args, path, init_args = NETS[net]
    cli = main(["fit", *tiny(tmp_path, *args)])
    logits = cli.model.net(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10), "num_classes linked from the data module, not the library's 1000"
    (run,) = run_dirs(tmp_path / "runs", "run")
    plain = by_hand(path, init_args)
    plain.load_state_dict(torch.load(run / "net.pt", weights_only=True))  # strict: every key, every shape
    config = str(run / "config.yaml")
    for subcommand in ("validate", "test", "predict"):
        evaluated = main([subcommand, "-c", config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
        assert evaluated.model.net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    again = main(["fit", "-c", config])
    assert type(again.model.net) is type(cli.model.net)
    refit = again.run.directory  # not run_dirs()[-1]: runs started in the same second sort by their random suffix
    by_hand(path, init_args).load_state_dict(torch.load(refit / "net.pt", weights_only=True))
    capsys.readouterr()
    text = summary.main(["-c", config, "--depth", "1"])
    assert text.startswith(f"{path} on input [2, 3, 32, 32]") and "[2, 10]" in text, text[:400]


def test_a_net_function_without_num_classes_is_one_sentence(tmp_path, monkeypatch, capsys):
    package = tmp_path / "src" / "fixednets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from torch import nn\n\n\ndef fixed(hidden: int = 4) -> nn.Module:\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny(tmp_path, "--model.net=fixednets.fixed")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.net fixednets.fixed takes no num_classes argument"), err
    assert run_dirs(tmp_path / "runs", "run") == []


@pytest.mark.slow
@pytest.mark.parametrize("net", ["torchvision.models.resnet18", "timm.models.resnet18"])
def test_a_library_net_learns_on_the_real_subset(tmp_path, subset_npz, net):
    """The README's one-epoch command ("Use a torchvision or timm net"): the library's ResNet-18 with a 10-way
    head, trained and tested on the real images, beats chance (10%) clearly."""
    cli = main(subset_fit_args(tmp_path, subset_npz, "lenet", f"--model.net={net}", "--trainer.max_epochs=1"))
    accuracy = cli.trainer.callback_metrics["test/acc"].item()
    assert accuracy > 0.15, f"{net} reached {accuracy:.3f} on the 508 real test images after one epoch"
