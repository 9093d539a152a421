"""The LightningCLI end to end: real fits on CPU, run directories, checkpoints, net.pt, configs."""

import csv
from pathlib import Path

import pytest
import torch

from project.classifier import ImageClassifier
from project.cli import main
from project.models import LeNet
from tests.conftest import QUIET, REPO, make_npz, run_cli, run_dirs

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def fit(tmp_path: Path, npz: Path, *extra: str, name: str = "lenet") -> "object":
    return main(["fit", "-c", str(REPO / "experiments/lenet.yaml"), f"--data.npz={npz}", f"--trainer.default_root_dir={tmp_path}", *QUIET, *extra])


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_lenet_learns_on_real_subset_and_reloads_exactly(tmp_path, subset_npz):
    # test_after_fit off: it would load the best checkpoint into cli.model; here we compare the final weights.
    cli = fit(tmp_path, subset_npz, "--trainer.max_epochs=8", "--data.batch_size=64", "--data.val_size=500", "--test_after_fit=false")
    run = cli.run_dir
    assert run.parent == tmp_path / "lenet"
    for name in ("config.yaml", "metrics.csv", "net.pt", "checkpoints/last.ckpt", "hparams.yaml"):
        assert (run / name).is_file(), name
    best = [p for p in (run / "checkpoints").glob("best-*.ckpt")]
    assert len(best) == 1

    trainer, dm = cli.trainer, cli.datamodule
    (live,) = trainer.test(cli.model, datamodule=dm, verbose=False)
    assert live["test/acc"] >= 0.35, f"LeNet reached only {live['test/acc']:.3f} on the 508 real test images"

    # The checkpoint alone rebuilds the same net (class and arguments come from the hyperparameters)...
    reloaded = ImageClassifier.load_from_checkpoint(run / "checkpoints/last.ckpt")
    assert isinstance(reloaded.net, LeNet)
    (again,) = trainer.test(reloaded, datamodule=dm, verbose=False)
    assert again == live

    # ...and net.pt loads into the plain class with torch alone and gives the same logits.
    state = torch.load(run / "net.pt", weights_only=True)
    plain = LeNet()
    plain.load_state_dict(state)
    images = dm.test_split.images[:64].float() / 255
    images = (images - torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)) / torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), cli.model(images), rtol=0, atol=0)
        torch.testing.assert_close(plain(images), reloaded.eval()(images), rtol=0, atol=0)


def test_same_seed_same_numbers(tmp_path, tiny_npz):
    args = ["--trainer.max_epochs=2", "--data.val_size=16", "--data.batch_size=16"]
    a, b = fit(tmp_path, tiny_npz, *args), fit(tmp_path, tiny_npz, *args)
    assert a.run_dir != b.run_dir
    assert read_metrics(a.run_dir) == read_metrics(b.run_dir)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    c = fit(tmp_path, tiny_npz, *args, "--seed_everything=7")
    assert not torch.equal(c.model.net.fc1.weight, a.model.net.fc1.weight)


def test_runs_never_share_a_directory(tmp_path, tiny_npz):
    dirs = {fit(tmp_path, tiny_npz, "--trainer.max_steps=1", "--data.val_size=0").run_dir for _ in range(3)}
    assert len(dirs) == 3 and all((d / "config.yaml").is_file() for d in dirs)
    assert run_dirs(tmp_path, "lenet") == sorted(dirs)


def test_cli_subprocess_fit_test_predict(tmp_path, tiny_npz):
    """The user-facing command in a real subprocess: exit codes, printed run directory, subcommands."""
    common = [f"--data.npz={tiny_npz}", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    out = run_cli(["fit", "-c", "experiments/lenet.yaml", *common, "--trainer.max_epochs=1", "--data.val_size=16"], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(tmp_path, "lenet")
    assert f"Run directory: {run}" in out.stderr + out.stdout
    assert (out.stderr + out.stdout).count("Run directory:") == 1, "printed once, by rank 0, at the end"
    ckpt = run / "checkpoints" / "last.ckpt"
    for sub in ("validate", "test", "predict"):
        res = run_cli([sub, "-c", str(run / "config.yaml"), f"--ckpt_path={ckpt}", *common], timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    runs = run_dirs(tmp_path, "lenet")
    assert len(runs) == 4  # each command wrote its own directory; the fit's config.yaml is untouched
    test_run = next(r for r in runs if r != run and any("test/acc" in row for row in read_metrics(r) if row.get("test/acc")))
    assert test_run.is_dir()


def test_default_root_dir_and_name(tmp_path, tiny_npz):
    cli = fit(tmp_path / "elsewhere", tiny_npz, "--trainer.max_steps=1", "--data.val_size=0", "--name=mine")
    assert cli.run_dir.parent == (tmp_path / "elsewhere" / "mine").resolve()


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_parses(config, tmp_path):
    out = run_cli(["fit", "-c", str(config), "--print_config"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "seed_everything:" in out.stdout
    assert "seed_everything: true" not in out.stdout, "every experiment sets an explicit seed"


def test_predict_step_returns_indices_and_probabilities():
    model = ImageClassifier(LeNet())
    out = model.predict_step((torch.randn(5, 3, 32, 32), torch.zeros(5)), 0)
    assert out["preds"].shape == (5,) and out["preds"].dtype == torch.int64
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(5))
    assert torch.equal(out["probs"].argmax(-1), out["preds"])


def test_bad_config_value_fails_fast(tmp_path, tiny_npz):
    out = run_cli(["fit", "-c", "experiments/lenet.yaml", f"--data.npz={tiny_npz}", "--model.optimizer=adam", f"--trainer.default_root_dir={tmp_path}"], timeout=120)
    assert out.returncode != 0 and "adam" in out.stderr
    assert not (tmp_path / "lenet").exists()


def test_the_cli_writes_checkpoints_atomically(tmp_path, tiny_npz):
    from project.callbacks.checkpointing import AtomicCheckpointIO
    from project.cli import ProjectCLI

    cli = ProjectCLI(args=["-c", str(REPO / "experiments/lenet.yaml"), f"--data.npz={tiny_npz}",
                           f"--trainer.default_root_dir={tmp_path}", *QUIET], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
