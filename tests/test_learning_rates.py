"""Per-layer learning rates (model.param_groups) under every scheduler, and every group's lr logged per step."""

import csv
import functools
import json

import lightning as L
import pytest
import torch

from project.classifier import ImageClassifier
from project.models import LeNet
from project.run.callbacks import LearningRates
from project.run.cli import main
from project.run.tracking import CSVLogger
from project.schedules import WarmupCosine, warmup_cosine
from tests.conftest import lenet_fit_args, make_npz

GROUPS = [{"match": "fc*", "lr_scale": 10}, {"match": "conv1.*", "lr_scale": 0.1, "name": "slow_conv"}]
#: LearningRateMonitor's columns: lr-<optimizer>/<group name>, weights and (no weight decay) biases apart.
COLUMNS = {
    f"lr-SGD/{name}{suffix}": scale
    for name, scale in (("fc*", 10), ("slow_conv", 0.1), ("base", 1))
    for suffix in ("", "/no_decay")
}


def lr_rows(path, optimizer: str = "SGD") -> list[dict[str, float]]:
    """The metrics.csv rows that hold learning rates, as floats."""
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get(f"lr-{optimizer}/base")]
    return [{key: float(value) for key, value in row.items() if key.startswith("lr-") or key == "step"} for row in rows]


def assert_ratios(rows: list[dict[str, float]], optimizer: str = "SGD") -> None:
    for row in rows:
        base = row[f"lr-{optimizer}/base"]
        for column, scale in COLUMNS.items():
            column = column.replace("lr-SGD/", f"lr-{optimizer}/")
            assert row[column] == pytest.approx(base * scale, rel=1e-6), (row["step"], column)


def fit_args(root, npz, *extra):
    return lenet_fit_args(
        root,
        npz,
        "--test_after_fit=false",
        "--plots.enabled=false",
        "--trainer.log_every_n_steps=1",
        f"--model.param_groups={json.dumps(GROUPS)}",
        *extra,
    )


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("lr") / "d.npz")


def test_cli_fit_logs_every_groups_lr_per_step(tmp_path, npz):
    cli = main(fit_args(tmp_path, npz, "--trainer.max_epochs=2"))
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    assert set(groups) == {name.removeprefix("lr-SGD/") for name in COLUMNS}
    assert groups["fc*"]["param_names"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert (
        groups["slow_conv/no_decay"]["param_names"] == ["conv1.bias"]
        and groups["slow_conv/no_decay"]["weight_decay"] == 0
    )
    assert groups["base"]["param_names"] == ["conv2.weight"] and groups["base"]["weight_decay"] == 5e-4
    rows = lr_rows(cli.run_dir / "metrics.csv")
    assert [row["step"] for row in rows] == list(range(12)), "one row per optimiser step (2 epochs x 6 batches)"
    assert rows[0]["lr-SGD/base"] == pytest.approx(0.05) and rows[0]["lr-SGD/fc*"] == pytest.approx(0.5)
    assert rows[-1]["lr-SGD/base"] < rows[0]["lr-SGD/base"] / 10, "the cosine anneals every group"
    assert_ratios(rows)


def test_a_run_without_a_logger_trains_without_the_lr_monitor(tmp_path, npz):
    """Lightning's LearningRateMonitor alone stops such a run: 'Cannot use LearningRateMonitor ... no logger'."""
    cli = main(fit_args(tmp_path, npz, "--trainer.max_epochs=1", "--trainer.logger=false"))
    assert cli.trainer.global_step == 6 and not (cli.run_dir / "metrics.csv").exists()


class _Tiny(L.LightningDataModule):
    def train_dataloader(self):
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


SCHEDULERS = {
    "warmup_cosine": WarmupCosine,
    "onecycle": functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.02),
    "step": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    "none": None,
}


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_scales_each_group(tmp_path, optimizer, scheduler):
    model = ImageClassifier(
        LeNet(),
        optimizer=functools.partial(optimizer, lr=0.02, weight_decay=1e-3),
        scheduler=SCHEDULERS[scheduler],
        param_groups=GROUPS,
    )
    trainer = L.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[LearningRates(logging_interval="step")],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=_Tiny())
    name = optimizer.__name__
    rows = lr_rows(tmp_path / "metrics.csv", name)
    assert len(rows) == 8
    assert_ratios(rows, name)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["base"]["weight_decay"] == 1e-3 and groups["fc*/no_decay"]["weight_decay"] == 0.0
    base = [row[f"lr-{name}/base"] for row in rows]
    if scheduler == "onecycle":
        assert [g["max_lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx(
            [0.2, 0.2, 0.002, 0.002, 0.02, 0.02]
        )
        assert max(base) > base[0] * 10 and base[-1] < base[0], "warms up, then anneals"
    elif scheduler == "step":
        assert base[:4] == pytest.approx([0.02] * 4) and base[4:] == pytest.approx([0.01] * 4), "per epoch"
    elif scheduler == "none":
        assert base == pytest.approx([0.02] * 8)
    else:
        assert base == pytest.approx([0.02 * warmup_cosine(step, 8) for step in range(8)]), (
            "per step over the 8-step plan"
        )


def test_resumed_one_cycle_refuses_another_plan_length(tmp_path, npz, capsys):
    """OneCycleLR keeps its plan (total_steps) in its state: a resumed fit of another length is one sentence."""
    one_cycle = ["--model.scheduler=torch.optim.lr_scheduler.OneCycleLR", "--model.scheduler.max_lr=0.05"]
    first = main(fit_args(tmp_path, npz, *one_cycle, "--trainer.max_epochs=1"))
    assert first.trainer.lr_scheduler_configs[0].interval == "step"
    assert first.trainer.lr_scheduler_configs[0].scheduler.total_steps == 6, "filled in from the fit's plan"
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, npz, *one_cycle, "--trainer.max_epochs=2", "--ckpt_path=last"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert err.startswith("error: The resumed OneCycleLR schedule was planned for 6 steps, but this fit plans 12")
    # Other groups at resume time would not fit the checkpoint's optimiser state: refused.
    with pytest.raises(SystemExit) as exit_info:
        main(
            fit_args(
                tmp_path,
                npz,
                *one_cycle,
                "--trainer.max_epochs=1",
                "--ckpt_path=last",
                '--model.param_groups=[{"match": "fc*", "lr_scale": 3}]',
            )
        )
    assert exit_info.value.code == 2 and "model.param_groups.0.lr_scale (checkpoint" in capsys.readouterr().err
