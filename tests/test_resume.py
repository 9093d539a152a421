"""Resuming a fit: exactly the same weights as an uninterrupted run, and command-line settings at
resume time either honoured or refused with one clear error (never silently replaced)."""

import json
import os
import shutil

import pytest
import torch

from project.callbacks.random_state import capture_random_state, restore_random_state
from project.cli import main
from project.models import LeNet
from tests.conftest import QUIET, REPO, run_dirs
from tests.probes import Interrupted

INTERRUPT = json.dumps([{"class_path": "tests.probes.RaiseAtEpoch", "init_args": {"epoch": 1}}])


def fit_args(root, npz, *extra):
    return ["fit", "-c", str(REPO / "experiments/lenet.yaml"), f"--data.npz={npz}", *QUIET, "--data.val_size=16",
            "--data.batch_size=8", "--trainer.max_epochs=2", "--test_after_fit=false", "--plots.enabled=false",
            f"--trainer.default_root_dir={root}", *extra]


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
    cli = main(fit_args(root, runs["npz"], "--ckpt_path=last"))
    assert cli.run_dir == run and run_dirs(root, "lenet") == [run], "resumes into the same run directory"
    expected, got = weights(runs["reference"]), weights(run)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


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


@pytest.mark.parametrize("checkpoint", ["last", "file"])
def test_changed_model_settings_are_refused(runs, capsys, checkpoint):
    root, run = copy_of_interrupted(runs, f"refused_{checkpoint}")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    ckpt = "last" if checkpoint == "last" else str(run / "checkpoints/last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(root, runs["npz"], f"--ckpt_path={ckpt}", "--model.lr=0.1", "--model.net.init_args.init=xavier_uniform"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "model.lr (checkpoint 0.05, now 0.1)" in err and "model.net.init_args.init (checkpoint 'default', now 'xavier_uniform')" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, "nothing written"
    assert "PROJECT_RUN_DIR" not in os.environ, "a refused run must not hand its directory to the next one"


def test_run_settings_given_at_resume_are_honoured(runs):
    root, run = copy_of_interrupted(runs, "honoured")
    cli = main(fit_args(root, runs["npz"], "--ckpt_path=last", "--model.tta_flip=true", "--trainer.max_epochs=3"))
    assert cli.model.hparams.tta_flip is True and cli.model.hparams.lr == 0.05
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step == 3 * 6


def test_evaluation_takes_the_model_from_the_checkpoint_but_keeps_run_settings(runs, tmp_path):
    """validate/test/predict: Lightning builds the checkpoint's architecture (here LeNet, although
    the config says ResNet-20); settings about how to run it (tta_flip) come from the command line."""
    cli = main(["test", "-c", str(REPO / "experiments/resnet20.yaml"), f"--data.npz={runs['npz']}", *QUIET,
                "--data.val_size=16", f"--trainer.default_root_dir={tmp_path}", "--plots.enabled=false",
                f"--ckpt_path={runs['interrupted'] / 'checkpoints/last.ckpt'}", "--model.tta_flip=true"])
    assert isinstance(cli.model.net, LeNet) and cli.model.hparams.tta_flip is True
