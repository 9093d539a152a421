"""The LightningCLI end to end: real fits on CPU, run directories, checkpoints, net.pt, configs."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from project.classifier import ImageClassifier
from project.models import LeNet
from project.run.cli import main
from tests.conftest import QUIET, REPO, make_npz, run_cli, run_dirs, subset_fit_args

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def fit(tmp_path: Path, npz: Path, *extra: str, name: str = "lenet") -> "object":
    return main(
        [
            "fit",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--data.npz={npz}",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
            *extra,
        ]
    )


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_lenet_learns_on_real_subset_and_reloads_exactly(tmp_path, subset_npz):
    # test_after_fit off: it would load the best checkpoint into cli.model; here we compare the final weights.
    cli = fit(
        tmp_path,
        subset_npz,
        "--trainer.max_epochs=8",
        "--data.batch_size=64",
        "--data.val_size=500",
        "--test_after_fit=false",
    )
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
    images = (images - torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)) / torch.tensor(
        [0.2470, 0.2435, 0.2616]
    ).view(3, 1, 1)
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
    out = run_cli(
        ["fit", "-c", "experiments/lenet.yaml", *common, "--trainer.max_epochs=1", "--data.val_size=16"], timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(tmp_path, "lenet")
    assert f"Run directory: {run}" in out.stderr + out.stdout
    assert (out.stderr + out.stdout).count("Run directory:") == 1, "printed once, by rank 0, at the end"
    ckpt = run / "checkpoints" / "last.ckpt"
    for sub in ("validate", "test", "predict"):
        res = run_cli([sub, "-c", str(run / "config.yaml"), f"--ckpt_path={ckpt}", *common], timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    assert run_dirs(tmp_path, "lenet") == [run], "an evaluation of a run's checkpoint creates no sibling run"
    evaluations = {e.name.rsplit("-", 1)[1]: e for e in (run / "eval").iterdir()}  # each in a folder of its own
    assert sorted(evaluations) == ["predict", "test", "validate"]
    assert any(row.get("test/acc") for row in read_metrics(evaluations["test"]))


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
    out = run_cli(
        [
            "fit",
            "-c",
            "experiments/lenet.yaml",
            f"--data.npz={tiny_npz}",
            "--model.optimizer=adam",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        timeout=120,
    )
    assert out.returncode != 0 and "adam" in out.stderr
    assert not (tmp_path / "lenet").exists()


def test_the_cli_writes_checkpoints_atomically(tmp_path, tiny_npz):
    from project.run.callbacks.checkpointing import AtomicCheckpointIO
    from project.run.cli import ProjectCLI

    cli = ProjectCLI(
        args=[
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--data.npz={tiny_npz}",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ],
        run=False,
    )
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


# ---- Lightning's own switches mean what they mean in Lightning ----------------------------------------


def tiny_fit(root: Path, npz: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "-c",
        "experiments/lenet.yaml",
        f"--data.npz={npz}",
        f"--trainer.default_root_dir={root}",
        *QUIET,
        "--data.val_size=16",
        "--data.batch_size=16",
        "--trainer.max_epochs=1",
        *extra,
    ]


def test_enable_checkpointing_false_trains_and_writes_no_checkpoint(tmp_path, tiny_npz):
    """It once failed: the CLI always adds its checkpoint callbacks, which Lightning then refuses.
    A normal fit otherwise: no third-party deprecation warning (Lightning's LeafSpec one was printed twice)."""
    out = run_cli(tiny_fit(tmp_path, tiny_npz, "--trainer.enable_checkpointing=false"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(tmp_path, "lenet")
    assert (run / "net.pt").is_file() and not list(tmp_path.rglob("*.ckpt"))
    assert any(row.get("test/acc") for row in read_metrics(run)), "the test after fit ran on the final weights"
    assert "deprecated" not in out.stderr.lower(), out.stderr[-3000:]
    assert out.stderr.count("Run directory:") == 1


def test_fast_dev_run_writes_nothing_under_the_runs_folder(tmp_path, tiny_npz):
    """It once wrote net.pt and plots into a new run directory."""
    out = run_cli(tiny_fit(tmp_path / "runs", tiny_npz, "--trainer.fast_dev_run=true"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*")), list(
        (tmp_path / "runs").rglob("*")
    )
    scratch = Path(out.stderr.split("fast_dev_run: writing into ", 1)[1].split(", removed", 1)[0])
    assert scratch.name.startswith("lenet-fast_dev_run-") and not scratch.exists()


@pytest.mark.parametrize("autolog", [False, True])
def test_enable_autolog_hparams_is_honoured(tmp_path, tiny_npz, autolog):
    """`true` was once silently ignored: Lightning then logs the model's hyperparameters too."""
    cli = main(
        tiny_fit(
            tmp_path,
            tiny_npz,
            f"--trainer.enable_autolog_hparams={autolog}",
            "--test_after_fit=false",
            "--trainer.max_steps=1",
            "--plots.enabled=false",
        )
    )
    hparams = (cli.run_dir / "hparams.yaml").read_text()
    assert "model.optimizer.lr: 0.05" in hparams  # the resolved config, always, as the command line names it
    assert ("\noptimizer:\n  class_path: torch.optim.SGD\n" in hparams) == autolog  # the model's own hparams


def test_an_unknown_checkpoint_monitor_fails_before_training(tmp_path, tiny_npz, capsys):
    """It was once noticed only after the first epoch, leaving a run directory behind."""
    with pytest.raises(SystemExit) as exited:
        main(tiny_fit(tmp_path, tiny_npz, "--checkpoint.monitor=val/accuracy"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2
    assert err.startswith("error: checkpoint.monitor 'val/accuracy' is not a metric this model logs; give one of ")
    assert "val/acc," in err and "train/loss_epoch" in err
    assert run_dirs(tmp_path, "lenet") == []


def test_print_config_says_where_the_run_writes(tmp_path, capsys):
    """It once showed save_dir: runs and dirpath: null, which the run then rewrites."""
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "-c",
                str(REPO / "experiments/lenet.yaml"),
                f"--trainer.default_root_dir={tmp_path}",
                "--print_config",
            ]
        )
    first = capsys.readouterr().out.splitlines()[0]
    assert (
        first == f"# This run writes every file into a new directory {tmp_path}/lenet/<date>-<time>-<hex>/ "
        "(with fit --ckpt_path last: the newest run there);"
    )


def test_the_usage_line_names_the_command(tmp_path):
    """`python -m project --help` once said `usage: __main__.py`."""
    out = run_cli(["--help"], timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m project "), out.stdout[:200]


# ---- debug presets (experiments/presets/debug.yaml, overfit.yaml, profile.yaml) -------------------------


def preset_fit(root: Path, npz: Path, preset: str, *extra: str):
    return main(
        [
            "fit",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            "-c",
            str(REPO / f"experiments/presets/{preset}.yaml"),
            f"--data.npz={npz}",
            f"--trainer.default_root_dir={root}",
            *QUIET,
            *extra,
        ]
    )


def test_debug_preset_runs_a_few_batches_with_every_callback(tmp_path):
    npz = make_npz(tmp_path / "d.npz", n_train=256)
    cli = preset_fit(tmp_path / "runs", npz, "debug", "--data.val_size=64", "--data.batch_size=16")
    run = cli.run_dir
    assert run.parent == (tmp_path / "runs" / "debug").resolve()
    assert cli.trainer.global_step == 8, "2 epochs of 4 batches"
    header = read_metrics(run)[0].keys()
    assert any(k.startswith("act/") for k in header) and any(k.startswith("grad/") for k in header), sorted(header)
    assert (run / "buffers.json").is_file() and (run / "checkpoints/last.ckpt").is_file()
    assert (run / "plots" / "val-epoch000-confusion.png").is_file() and (run / "plots" / "test-confusion.png").is_file()


@pytest.mark.slow
def test_overfit_preset_drives_lenets_training_loss_near_zero(tmp_path, subset_npz):
    """One fixed batch of real images, no augmentation: the loss must fall below 0.05 (about 45 steps;
    the README gives the time)."""
    cli = preset_fit(tmp_path, subset_npz, "overfit", "--data.val_size=500")
    losses = [float(row["train/loss_epoch"]) for row in read_metrics(cli.run_dir) if row.get("train/loss_epoch")]
    assert cli.trainer.global_step == 100 and len(losses) == 100, "one batch an epoch"
    assert losses[-1] < 0.05 and losses[0] > 1.5, losses[::10]
    assert not cli.datamodule.augment and not list(cli.run_dir.rglob("*.ckpt"))


def test_profile_preset_writes_its_report_into_the_run(tmp_path, tiny_npz):
    cli = preset_fit(tmp_path, tiny_npz, "profile", "--data.val_size=16", "--data.batch_size=8")
    report = (cli.run_dir / "fit-profile.txt").read_text()
    assert "FIT Profiler Report" in report and "run_training_batch" in report
    assert cli.run_dir.parent.name == "profile"


def test_the_console_command_runs_the_cli():
    """setup.cfg's `imgcls` entry point is the function `python -m project` runs (without reinstalling:
    the metadata as pip reads it)."""
    import configparser

    from project.__main__ import run

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    (line,) = [entry for entry in cfg["options.entry_points"]["console_scripts"].splitlines() if entry.strip()]
    name, target = (part.strip() for part in line.split("="))
    module, function = target.split(":")
    assert name == "imgcls" and getattr(__import__(module, fromlist=[function]), function) is run
    out = run_bounded_script(name)
    assert out.startswith("usage: imgcls "), out[:200]


def run_bounded_script(name: str) -> str:
    """``--help`` of a script named ``name`` that calls project.__main__.run, as pip's generated one does."""
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / name
        script.write_text("import sys\nfrom project.__main__ import run\nsys.exit(run())\n")
        out = run_bounded_cmd([sys.executable, str(script), "--help"])
    return out


def run_bounded_cmd(cmd: list[str]) -> str:
    import os

    from tests.conftest import run_bounded

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = run_bounded(cmd, timeout=120, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


# CLI frictions (issue 22.4): each spelling a Lightning user tries either works or is one sentence naming the right one.


def test_fit_help_names_the_model_option_and_each_class_shows_its_arguments(capsys):
    """``fit --help`` is LightningCLI's own page; the model's arguments are one ``--model.help CLASS`` away."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: python -m project [options] fit")
    assert "--model.help" in out and "--data.help" in out
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "ImageClassifier"])
    assert "--model.label_smoothing" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--model.net.help", "project.models.ResNet20"])
    # A class's own arguments stay there (jsonargparse 4.53 prints them relative to the net).
    assert "--net.num_classes NUM_CLASSES" in capsys.readouterr().out


def test_a_short_model_name_resolves_without_a_config(tmp_path):
    """``--model.net ResNet20`` once worked only after a -c file had imported project.models."""
    out = run_cli(["fit", "--model.net", "ResNet20", "--print_config"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: project.models.ResNet20" in out.stdout


@pytest.mark.parametrize("args", [["--optimizer", "Adam"], ["--lr_scheduler=StepLR"]])
def test_lightnings_top_level_optimizer_spelling_is_refused_by_name(capsys, args):
    """Here the optimiser and schedule are the model's arguments (--model.optimizer): jsonargparse names the option."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model.net=LeNet", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"unrecognized arguments: {args[0]}" in err, err


def test_an_inline_config_names_the_run_like_no_config(tmp_path, capsys):
    """An inline --config '{...}' once named the run folder ``None``."""
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                "{model: {net: project.models.LeNet}}",
                f"--trainer.default_root_dir={tmp_path}",
                "--print_config",
            ]
        )
    first = capsys.readouterr().out.splitlines()[0]
    assert f"{tmp_path}/run/<date>" in first and "None" not in first, first


def test_checkpoint_save_last_true_is_accepted_quietly(tmp_path, tiny_npz, capsys):
    """Lightning users pass --checkpoint.save_last true; the run always keeps last.ckpt, so it is a no-op."""
    cli = fit(
        tmp_path,
        tiny_npz,
        "--checkpoint.save_last=true",
        "--data.val_size=16",
        "--data.batch_size=16",
        "--trainer.max_epochs=1",
        "--test_after_fit=false",
    )
    (run,) = run_dirs(tmp_path, "lenet")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not any(p.name.startswith("last-v") for p in (run / "checkpoints").iterdir())
    assert "save_last" not in capsys.readouterr().err
    assert cli.trainer.checkpoint_callback.save_last in (None, False)


def test_a_class_refused_for_its_own_reason_keeps_that_reason(tmp_path, monkeypatch, capsys):
    """``--trainer.logger TensorBoardLogger`` once said ``does not accept "Namespace(...)"``; the cause was a
    required save_dir, which jsonargparse's message names."""
    package = tmp_path / "src" / "mylogs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from lightning.pytorch.loggers import CSVLogger\n\n\nclass NeedsDir(CSVLogger):\n"
        "    def __init__(self, where: str) -> None:\n        super().__init__(save_dir=where)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model.net=LeNet", "--trainer.logger=mylogs.NeedsDir", f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert "mylogs.NeedsDir" in err and "the following arguments are required: where" in err, err


def test_the_cutmix_preset_trains_on_the_subset_and_its_saved_config_re_runs(tmp_path, subset_npz):
    """model.batch_transform from one preset: torchvision's CutMix, num_classes the data's, soft targets."""
    preset = str(REPO / "experiments/presets/cutmix.yaml")
    cli = main(subset_fit_args(tmp_path, subset_npz, "lenet", "-c", preset, "--trainer.max_epochs=1"))
    assert type(cli.model.batch_transform).__name__ == "CutMix" and cli.model.batch_transform.num_classes == 10
    (run,) = run_dirs(tmp_path, "lenet")
    rows = read_metrics(run)
    assert any(row.get("train/acc") for row in rows) and any(row.get("val/acc") for row in rows)
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["batch_transform"]
    assert saved["class_path"] == "torchvision.transforms.v2.CutMix"
    again = main(["fit", "-c", str(run / "config.yaml"), f"--data.npz={subset_npz}", *QUIET, "--trainer.max_steps=2"])
    assert type(again.model.batch_transform).__name__ == "CutMix" and again.trainer.global_step == 2
