"""Resuming a fit: exactly the same weights as an uninterrupted run, and command-line settings at
resume time either honoured or refused with one clear error (never silently replaced)."""

import json
import os
import shutil
import warnings

import pytest
import torch

from project.models import LeNet
from project.run.callbacks.random_state import capture_random_state, restore_random_state
from project.run.cli import main
from project.run.metrics_file import read_series as read_metrics
from tests.conftest import QUIET, REPO, lenet_fit_args, run_dirs
from tests.probes import Interrupted

INTERRUPT = json.dumps([{"class_path": "tests.probes.RaiseAtEpoch", "init_args": {"epoch": 1}}])
ONE_CYCLE = ["--model.scheduler", "torch.optim.lr_scheduler.OneCycleLR", "--model.scheduler.max_lr", "0.1"]


def fit_args(root, npz, *extra):
    return lenet_fit_args(
        root,
        npz,
        "--trainer.max_epochs=2",
        "--test_after_fit=false",
        "--plots.enabled=false",
        *extra,
    )


def weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "net.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2-epoch run, and the same run interrupted when its second epoch starts."""
    from tests.conftest import make_npz

    tmp = tmp_path_factory.mktemp("resume")
    npz = make_npz(tmp / "d.npz")
    reference = main(fit_args(tmp / "ref", npz)).run_dir
    with pytest.raises(Interrupted):
        main(fit_args(tmp / "interrupted", npz, f"--trainer.callbacks={INTERRUPT}"))
    (interrupted,) = run_dirs(tmp / "interrupted", "lenet")
    assert torch.load(interrupted / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 0
    assert not (interrupted / "net.pt").exists()
    return {"npz": npz, "reference": reference, "interrupted": interrupted, "tmp": tmp}


def copy_of_interrupted(runs, name):
    root = runs["tmp"] / name
    shutil.copytree(runs["interrupted"], root / "lenet" / runs["interrupted"].name)
    return root, root / "lenet" / runs["interrupted"].name


def test_resume_last_ends_with_the_uninterrupted_weights(runs):
    root, run = copy_of_interrupted(runs, "resumed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(fit_args(root, runs["npz"], "--ckpt_path=last"))
    assert cli.run_dir == run and run_dirs(root, "lenet") == [run], "resumes into the same run directory"
    # Lightning's alarm about a non-empty checkpoint folder: here the folder is the run's own, resumed.
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    expected, got = weights(runs["reference"]), weights(run)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # metrics.csv is continued, not restarted: every series is the uninterrupted run's, step for step.
    reference_metrics, resumed_metrics = (
        read_metrics(runs["reference"] / "metrics.csv"),
        read_metrics(run / "metrics.csv"),
    )
    assert resumed_metrics.keys() == reference_metrics.keys()
    for column, (steps, values) in reference_metrics.items():
        assert resumed_metrics[column][0].tolist() == steps.tolist(), column
        assert resumed_metrics[column][1].tolist() == pytest.approx(values.tolist(), rel=1e-6), column


def test_rows_logged_after_the_checkpoint_are_replaced_not_repeated(runs):
    """A run killed after its checkpoint logged steps that the resumed fit runs again."""
    root, run = copy_of_interrupted(runs, "replayed")
    metrics = run / "metrics.csv"
    header, *rows = metrics.read_text().splitlines()
    columns = header.split(",")
    stale = dict.fromkeys(columns, "")
    stale.update({"epoch": "1", "step": "7", "train/loss_epoch": "99.0"})  # logged after the checkpoint (step 6)
    metrics.write_text("\n".join([header, *rows, ",".join(stale[c] for c in columns)]) + "\n")
    main(fit_args(root, runs["npz"], "--ckpt_path=last"))
    steps, values = read_metrics(metrics)["train/loss_epoch"]
    assert steps.tolist() == [5, 11] and 99.0 not in values.tolist()


def test_without_the_random_state_the_resumed_run_differs(runs):
    """The control: Lightning restores weights, optimiser and schedule, but with the generators
    left at the fresh seed the second epoch shuffles and augments differently."""
    root, run = copy_of_interrupted(runs, "no_rng")
    main(fit_args(root, runs["npz"], "--ckpt_path=last", "--random_state.restore=false"))
    expected, got = weights(runs["reference"]), weights(run)
    assert not all(torch.equal(expected[k], got[k]) for k in expected)


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state = capture_random_state()
    torch.save({"callbacks": {"RandomState": state}}, tmp_path / "c.ckpt")
    expected = torch.rand(5)
    torch.rand(100)
    restore_random_state(torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["RandomState"])
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.rand(1, device="cuda")  # CUDA's generators exist once CUDA is initialised
    state = capture_random_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    torch.save({"callbacks": {"RandomState": state}}, tmp_path / "c.ckpt")
    expected = torch.rand(5, device="cuda")
    torch.rand(100, device="cuda")
    restore_random_state(torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["RandomState"])
    assert torch.equal(torch.rand(5, device="cuda"), expected)


@pytest.mark.parametrize("checkpoint", ["last", "file"])
def test_changed_model_settings_are_refused(runs, capsys, checkpoint):
    root, run = copy_of_interrupted(runs, f"refused_{checkpoint}")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    ckpt = "last" if checkpoint == "last" else str(run / "checkpoints/last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(
            fit_args(
                root,
                runs["npz"],
                f"--ckpt_path={ckpt}",
                "--model.optimizer.lr=0.1",
                "--model.net.init_args.init=xavier_uniform",
            )
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert (
        "model.optimizer.lr (checkpoint 0.05, now 0.1)" in err
        and "model.net.init (checkpoint 'default', now 'xavier_uniform')" in err
    )
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, "nothing written"
    assert "PROJECT_RUN_DIR" not in os.environ, "a refused run must not hand its directory to the next one"


def test_run_settings_given_at_resume_are_honoured(runs):
    root, run = copy_of_interrupted(runs, "honoured")
    cli = main(fit_args(root, runs["npz"], "--ckpt_path=last", "--model.tta_flip=true", "--trainer.max_epochs=3"))
    assert cli.model.hparams.tta_flip is True and cli.model.hparams.optimizer["init_args"]["lr"] == 0.05
    assert cli.trainer.optimizers[0].defaults["lr"] == 0.05
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step == 3 * 6
    # The cosine schedule was planned for 2 epochs; re-planned for 3 it still ends at zero.
    assert cli.trainer.lr_scheduler_configs[0].scheduler.total_steps == 3 * 6
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_an_interrupted_one_cycle_schedule_resumes_on_its_plan(runs):
    """OneCycleLR keeps its plan (total_steps) in its state: an interrupted fit resumed with the same plan
    follows the cycle to its end. (A resumed fit of another length is refused: test_learning_rates.)"""
    root = runs["tmp"] / "onecycle"
    with pytest.raises(Interrupted):
        main(fit_args(root, runs["npz"], *ONE_CYCLE, f"--trainer.callbacks={INTERRUPT}"))
    (run,) = run_dirs(root, "lenet")
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 0
    cli = main(fit_args(root, runs["npz"], *ONE_CYCLE, "--ckpt_path=last"))
    assert cli.run_dir == run and cli.trainer.global_step == 12
    assert cli.trainer.lr_scheduler_configs[0].scheduler.total_steps == 12
    # Where a 12-step cycle planned from the start ends up after 12 steps.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    planned = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=12)
    for _ in range(12):
        optimizer.step()
        planned.step()
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(planned.get_last_lr()[0])


def test_evaluation_takes_the_model_from_the_checkpoint_but_keeps_run_settings(runs, tmp_path):
    """validate/test/predict: Lightning builds the checkpoint's architecture (here LeNet, although
    the config says ResNet-20); settings about how to run it (tta_flip) come from the command line."""
    cli = main(
        [
            "test",
            "-c",
            str(REPO / "experiments/resnet20.yaml"),
            f"--data.npz={runs['npz']}",
            *QUIET,
            "--data.val_size=16",
            f"--trainer.default_root_dir={tmp_path}",
            "--plots.enabled=false",
            f"--ckpt_path={runs['interrupted'] / 'checkpoints/last.ckpt'}",
            "--model.tta_flip=true",
        ]
    )
    assert isinstance(cli.model.net, LeNet) and cli.model.hparams.tta_flip is True


def test_a_resumed_fit_keeps_the_test_rows_it_does_not_log_again(runs):
    """A resumed fit without --test_after_fit once deleted the test row that the original run had
    logged at (or after) the step it resumes from."""
    root, run = copy_of_interrupted(runs, "tested")
    metrics = run / "metrics.csv"
    header, *rows = metrics.read_text().splitlines()
    columns = [*header.split(","), "test/acc"]
    tested = dict.fromkeys(columns, "")
    tested.update({"step": "6", "test/acc": "0.25"})  # at the checkpoint's step: the resumed fit starts there
    metrics.write_text(
        "\n".join([",".join(columns), *(row + "," for row in rows), ",".join(tested[c] for c in columns)]) + "\n"
    )
    main(fit_args(root, runs["npz"], "--ckpt_path=last"))
    steps, values = read_metrics(metrics)["test/acc"]
    assert steps.tolist() == [6] and values.tolist() == [0.25]
    assert read_metrics(metrics)["train/loss_epoch"][0].tolist() == [5, 11]
