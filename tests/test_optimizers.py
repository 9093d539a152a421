"""Optimisers and schedules by class_path (issue 14.1): any torch.optim class or a user's own from the CLI,
the warmup-cosine curve, the old string forms refused in one sentence, scheduler_interval, AdamW's groups.

(Per-group lr ratios under every scheduler, and per-step logging, are in tests/test_learning_rates.py.)
"""

import csv
import functools
import importlib
import math

import pytest
import torch
import yaml

from project.classifier import ImageClassifier
from project.models import LeNet, ResNet20
from project.run.cli import main
from project.schedules import warmup_cosine
from tests.conftest import lenet_fit_args, make_npz


class MyOptimizer(torch.optim.Optimizer):
    """A user's own optimiser with torch.optim's call signature: plain gradient descent that counts its steps."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"MyOptimizer needs lr > 0, got {lr}.")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad + group["weight_decay"] * param, alpha=-group["lr"])
        self.steps += 1
        return loss


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("optimizers") / "d.npz")


def fit_args(root, npz, *extra, batches: int = 2, epochs: int = 1):
    return lenet_fit_args(
        root,
        npz,
        "--test_after_fit=false",
        "--plots.enabled=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.limit_train_batches={batches}",
        "--trainer.limit_val_batches=1",
        *extra,
    )


def logged_lrs(cli, column: str) -> list[float]:
    """LearningRateMonitor's ``column`` in the run's metrics.csv, one value per optimiser step."""
    with open(cli.run_dir / "metrics.csv", newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


# --------------------------------------------------------------------------- any optimizer by class_path


def test_the_cli_trains_with_another_torch_optimizer(tmp_path, npz):
    cli = main(fit_args(tmp_path, npz, "--model.optimizer", "torch.optim.RMSprop", "--model.optimizer.lr", "1e-3"))
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.RMSprop and optimizer.defaults["lr"] == 1e-3
    assert cli.trainer.global_step == 2
    lrs = logged_lrs(cli, "lr-RMSprop/base")
    assert len(lrs) == 2 and lrs[0] == pytest.approx(1e-3), "the warmup-cosine default starts at the optimizer's lr"
    saved = yaml.safe_load((cli.run_dir / "config.yaml").read_text())["model"]["init_args"]["optimizer"]
    assert saved["class_path"] == "torch.optim.RMSprop" and saved["init_args"]["lr"] == 1e-3


def test_reduce_lr_on_plateau_steps_on_the_validation_loss(tmp_path, npz):
    """torch's ReduceLROnPlateau names no metric; Lightning needs one: the module gives val/loss."""
    cli = main(
        fit_args(
            tmp_path,
            npz,
            "--model.scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
            "--model.scheduler.patience=0",
            "--model.scheduler.factor=0.5",
            "--model.scheduler.threshold=10",  # no epoch counts as an improvement: the lr halves each epoch
            epochs=3,
        )
    )
    (config,) = cli.trainer.lr_scheduler_configs
    assert config.monitor == "val/loss" and config.interval == "epoch"
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)  # after each of 3 epochs


def test_a_users_own_optimizer_class_trains_through_the_cli(tmp_path, npz):
    cli = main(
        fit_args(
            tmp_path,
            npz,
            "--model.optimizer",
            "tests.test_optimizers.MyOptimizer",
            "--model.optimizer.lr",
            "0.01",
            "--model.scheduler=null",
        )
    )
    optimizer = cli.trainer.optimizers[0]
    # The CLI imports this file as tests.test_optimizers (pytest may hold it under another module name).
    assert isinstance(optimizer, importlib.import_module("tests.test_optimizers").MyOptimizer)
    assert optimizer.steps == 2 and cli.trainer.global_step == 2, "every optimiser step went through its step()"
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"base": 0.01, "base/no_decay": 0.01}
    assert logged_lrs(cli, "lr-MyOptimizer/base") == [0.01, 0.01]


# --------------------------------------------------------------------------- the warmup-cosine curve


def test_warmup_cosine_follows_the_formula():
    total, warmup = 10, 4
    # Warmup: linear, step i at (i + 1) / (warmup + 1); then half a cosine over the remaining 6 steps.
    assert warmup_cosine(0, total, warmup) == pytest.approx(1 / 5)
    assert warmup_cosine(warmup - 1, total, warmup) == pytest.approx(4 / 5)
    assert warmup_cosine(warmup, total, warmup) == pytest.approx(1.0), "the peak at the end of the warmup"
    assert warmup_cosine(warmup + 3, total, warmup) == pytest.approx(0.5), "half way down at the midpoint"
    assert warmup_cosine(warmup + 1, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    assert warmup_cosine(total, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert [warmup_cosine(step, total, warmup) for step in (11, 50)] == pytest.approx([0.0, 0.0], abs=1e-12), (
        "zero after the plan"
    )
    # Without warmup the curve starts at the peak.
    assert warmup_cosine(0, 8) == pytest.approx(1.0) and warmup_cosine(4, 8) == pytest.approx(0.5)
    rising = [warmup_cosine(step, total, warmup) for step in range(warmup + 1)]
    falling = [warmup_cosine(step, total, warmup) for step in range(warmup, total + 1)]
    assert all(a < b for a, b in zip(rising, rising[1:]))
    assert all(a > b for a, b in zip(falling, falling[1:])), "strictly decreasing after the warmup"


# --------------------------------------------------------------------------- the old string forms


def parser_error(stderr: str) -> str:
    """jsonargparse's report, let through as it is: one ``error:`` line first, no traceback, no usage screen."""
    assert "Traceback" not in stderr and "usage:" not in stderr
    lines = stderr.strip().splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(first) == 1, lines[-5:]
    return "\n".join(lines[first[0] :])


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model.optimizer=torch.optim.Adamm"], ("optimizer", "torch.optim.Adamm", "has no attribute 'Adamm'")),
        (["--model.optimizer=torch.nn.Linear"], ("optimizer", "torch.nn.Linear")),
        (["--model.optimizer=os.system"], ("optimizer", "os.system")),  # never called
        (["--model.scheduler=torch.optim.SGD"], ("scheduler", "torch.optim.SGD", "LRScheduler")),
        (["--model.optimizer", "sgd"], ("optimizer", "sgd")),  # the template's old string form
        (["--model.lr", "0.1"], ("'lr' is not accepted",)),  # the old form: now --model.optimizer.lr
    ],
    ids=["misspelt", "a-module", "a-function", "optimiser-as-scheduler", "old-string", "old-lr"],
)
def test_a_refused_optimizer_or_scheduler_is_jsonargparses_report_naming_it(tmp_path, npz, capsys, args, named):
    """jsonargparse's own report goes through (it names the key, the value and the cause); nothing is written."""
    with pytest.raises(SystemExit) as exited:
        main(fit_args(tmp_path, npz, *args))
    assert exited.value.code == 2
    report = parser_error(capsys.readouterr().err)
    assert all(fragment in report for fragment in named), report
    assert not (tmp_path / "lenet").exists()


# --------------------------------------------------------------------------- scheduler_interval


STEP_LR = [
    "--model.optimizer.lr=0.1",
    "--model.scheduler",
    "torch.optim.lr_scheduler.StepLR",
    "--model.scheduler.step_size=2",
    "--model.scheduler.gamma=0.5",
]


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        (["--model.scheduler_interval=step"], ("step", [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])),  # halves every 2 steps
        ([], ("epoch", [0.1] * 6)),  # torch's convention for StepLR: 2 epochs, step_size 2 never reached
    ],
    ids=["step", "default-epoch"],
)
def test_scheduler_interval_steps_the_schedule_per_optimizer_step(tmp_path, npz, interval, expected):
    cli = main(fit_args(tmp_path, npz, *STEP_LR, *interval, batches=3, epochs=2))
    config = cli.model.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == expected[0]
    assert cli.trainer.lr_scheduler_configs[0].interval == expected[0]
    assert logged_lrs(cli, "lr-SGD/base") == pytest.approx(expected[1])


# --------------------------------------------------------------------------- AdamW's parameter groups


def test_adamw_groups_decay_weights_only_with_each_groups_own_decay():
    groups = [
        {"match": "fc.*", "lr_scale": 10},
        {"match": "stages.0.*", "lr_scale": 0.5, "weight_decay": 0.2, "name": "early"},
    ]
    model = ImageClassifier(
        ResNet20(), optimizer=functools.partial(torch.optim.AdamW, lr=3e-4), scheduler=None, param_groups=groups
    )
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    by_name = {g["name"]: g for g in optimizer.param_groups}
    net_params = dict(model.net.named_parameters())
    for name, group in by_name.items():
        if name.endswith("/no_decay"):  # biases and BatchNorm weights and biases: never decayed
            assert group["weight_decay"] == 0.0 and all(net_params[n].ndim < 2 for n in group["param_names"]), name
        else:
            assert all(net_params[n].ndim >= 2 for n in group["param_names"]), name
    assert (
        "stem.1.weight" in by_name["base/no_decay"]["param_names"]
        and "fc.bias" in by_name["fc.*/no_decay"]["param_names"]
    )
    assert by_name["early"]["weight_decay"] == 0.2, "the group's own weight_decay"
    assert by_name["fc.*"]["weight_decay"] == by_name["base"]["weight_decay"] == 0.01, "else AdamW's own default"
    lrs = {name: group["lr"] for name, group in by_name.items()}
    assert lrs == pytest.approx(
        {
            "fc.*": 3e-3,
            "fc.*/no_decay": 3e-3,
            "early": 1.5e-4,
            "early/no_decay": 1.5e-4,
            "base": 3e-4,
            "base/no_decay": 3e-4,
        }
    ), "AdamW's lr times each group's lr_scale"
    explicit = ImageClassifier(
        LeNet(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
        scheduler=None,
        param_groups=[{"match": "fc*", "weight_decay": 0.0}],
    ).configure_optimizers()
    assert {g["name"]: g["weight_decay"] for g in explicit.param_groups} == {
        "fc*": 0.0,
        "fc*/no_decay": 0.0,
        "base": 0.05,
        "base/no_decay": 0.0,
    }
