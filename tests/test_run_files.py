"""One writer for every file of a run (project.run.directory.check_claims, project.run.cli.run_file_claims):
every option in the registry (directory.FILE_OPTIONS), aimed at every file or folder another writer owns,
and every two options aimed at one file, are refused in one sentence before anything is written; and
Lightning's own loggers write into the run directory by default."""

import itertools
import json
import os
from pathlib import Path

import pytest
import yaml

from project.run import directory
from project.run.cli import main
from tests.conftest import REPO, lenet_fit_args, make_npz, run_cli
from tests.test_runs import copy_run, snapshot

#: How a test gives each option of the registry a value; an option added to FILE_OPTIONS without a row here fails
#: test_every_option_of_the_registry_is_tested.
GIVE = {
    "export.filename": lambda v: [f"--export.filename={v}"],
    "predictions.filename": lambda v: [f"--predictions.filename={v}"],
    "predictions.output_dir": lambda v: [f"--predictions.output_dir={v}"],
    "checkpoint.dirpath": lambda v: [f"--checkpoint.dirpath={v}"],
    "checkpoint.filename": lambda v: [f"--checkpoint.filename={v}"],
    "last_checkpoint.dirpath": lambda v: [f"--last_checkpoint.dirpath={v}"],
    "trainer.logger.save_dir": lambda v: [f"--trainer.logger.save_dir={v}"],
    "trainer.profiler.dirpath": lambda v: [
        "--trainer.profiler="
        + json.dumps({"class_path": "SimpleProfiler", "init_args": {"dirpath": v, "filename": "p"}})
    ],
    "BufferReport.filename": lambda v: [
        "--trainer.callbacks+="
        + json.dumps({"class_path": "project.callbacks.BufferReport", "init_args": {"filename": v}})
    ],
}
#: What the refusal of each option names it by.
NAMED = {"trainer.logger.save_dir": "trainer.logger", "trainer.profiler.dirpath": "trainer.profiler"}

#: The files and folders a default fit's writers own (beside the registry's FIXED_FILES), with the option that
#: moves each (its own writer may of course name it), and whether it is a folder.
DEFAULT_FILES = {
    "metrics.csv": ("trainer.logger.save_dir", False),
    "hparams.yaml": ("trainer.logger.save_dir", False),
    "checkpoints/last.ckpt": ("last_checkpoint.dirpath", False),
    "net.pt": ("export.filename", False),
    "predictions.csv": ("predictions.filename", False),
    "plots": (None, True),
}
TARGETS = {**{name: (None, False) for name in directory.FIXED_FILES}, **DEFAULT_FILES}


def aim(option: str, target: str, folder: bool) -> str | None:
    """The value that makes ``option`` write at ``target`` (a file, or inside a folder); None: it cannot."""
    target = target.replace("*", "20260101-000000")
    kind = directory.FILE_OPTIONS[option]
    if kind == "folder":
        return target
    if kind == "file":
        return f"{target}/x" if folder else target
    # A checkpoint name, relative to the checkpoint folder, .ckpt added.
    if folder:
        return os.path.relpath(f"{target}/x", "checkpoints")
    return os.path.relpath(target.removesuffix(".ckpt"), "checkpoints") if target.endswith(".ckpt") else None


#: Options of one writer (a callback's folder and its file name), and the checkpoint folder the best and last
#: checkpoints share by design.
SAME_WRITER = {
    ("checkpoint.dirpath", "checkpoint.filename"),
    ("predictions.filename", "predictions.output_dir"),
    ("checkpoint.dirpath", "last_checkpoint.dirpath"),
}
COLLISIONS = [
    (option, target)
    for option in directory.FILE_OPTIONS
    for target, (owner_option, folder) in TARGETS.items()
    if owner_option != option
    and tuple(sorted((option, owner_option or ""))) not in SAME_WRITER
    and aim(option, target, folder) is not None
]
#: Folders two writers share, each writing its own file names there (our CSVLogger's metrics.csv and
#: hparams.yaml, predictions.csv, BufferReport's file below the logger's folder): no file collides.
SHARED_FOLDER = {
    ("predictions.output_dir", "trainer.logger.save_dir"),
    ("BufferReport.filename", "trainer.logger.save_dir"),
}
PAIRS = [
    pair
    for pair in itertools.combinations(directory.FILE_OPTIONS, 2)
    if tuple(sorted(pair)) not in SAME_WRITER | SHARED_FOLDER
]


def fit_args(root: Path, npz: Path, *extra: str) -> list[str]:
    return lenet_fit_args(
        root,
        npz,
        "--trainer.max_epochs=1",
        "--plots.num_samples=4",
        *extra,
    )


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return make_npz(tmp_path_factory.mktemp("data") / "d.npz", n_train=40, n_test=16)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, npz) -> Path:
    """One finished fit with every default writer."""
    return main(fit_args(tmp_path_factory.mktemp("finished"), npz)).run_dir


def refused(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err[-5:]
    assert err and err[-1].startswith("error: "), err[-5:]
    return err[-1]


def test_every_option_of_the_registry_is_tested():
    assert set(GIVE) == set(directory.FILE_OPTIONS)


@pytest.mark.parametrize(("option", "target"), COLLISIONS, ids=[f"{o}={t}" for o, t in COLLISIONS])
def test_an_option_naming_a_file_another_writer_owns_is_refused_and_the_run_is_untouched(
    tmp_path, npz, finished, capsys, option, target
):
    """`--export.filename config.yaml` (or metrics.csv, run.lock, ...) once replaced that file of the run it
    resumed; each option of the registry aimed at each file another writer owns is now one sentence naming
    the option and the file, exit status 2, and every byte of the run is as it was."""
    run = copy_run(finished, tmp_path / "runs")
    before = snapshot(run)
    value = aim(option, target, TARGETS[target][1])
    line = refused(capsys, fit_args(tmp_path / "runs", npz, f"--run_dir={run}", *GIVE[option](value)))
    assert NAMED.get(option, option) in line, line
    assert Path(target).name in line or "last.ckpt" in line, line
    assert snapshot(run) == before


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_two_options_naming_one_file_are_refused_before_anything_is_written(tmp_path, npz, capsys, first, second):
    root = tmp_path / "runs"
    target = "shared/f.ckpt"
    args = [*GIVE[first](aim(first, target, False)), *GIVE[second](aim(second, target, False))]
    line = refused(capsys, fit_args(root, npz, *args))
    assert NAMED.get(first, first) in line and NAMED.get(second, second) in line, line
    assert not root.exists() or not any(root.rglob("*.*")), sorted(root.rglob("*"))


# ---- Lightning's own loggers, by their usual names ---------------------------------------------------------

#: (logger as given, the file it must write, relative to the run directory).
LOGGERS = [
    ("TensorBoardLogger", "lightning_logs/version_0/events.out.tfevents.*"),
    ("lightning.pytorch.loggers.TensorBoardLogger", "lightning_logs/version_0/events.out.tfevents.*"),
    ("lightning.pytorch.loggers.CSVLogger", "lightning_logs/version_0/metrics.csv"),
    ("CSVLogger", "metrics.csv"),  # the short name is ours: Lightning's CSVLogger whose metrics.csv a resume continues
]


@pytest.mark.parametrize(("logger", "written"), LOGGERS, ids=[row[0] for row in LOGGERS])
def test_lightnings_loggers_write_into_the_run_with_nothing_else_given(tmp_path, npz, logger, written):
    """`--trainer.logger TensorBoardLogger` once failed with `does not accept "Namespace(...)"` (its save_dir
    was required), Lightning's CSVLogger wrote into the working directory or was refused; now each writes
    its files into the run directory, config.yaml stays in the run's root, and the saved config is portable."""
    pytest.importorskip("tensorboard")
    before = sorted(p.name for p in REPO.iterdir())
    run = main(fit_args(tmp_path / "runs", npz, f"--trainer.logger={logger}", "--plots.enabled=false")).run_dir
    assert list(run.glob(written)), sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert (run / "config.yaml").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == "."  # relative to the next run, not this one
    assert [p for p in (tmp_path / "runs" / "lenet").iterdir()] == [run]
    assert sorted(p.name for p in REPO.iterdir()) == before, "nothing written into the working directory"


def test_plots_reach_tensorboard(tmp_path, npz):
    """PredictionPlots once logged its images to wandb only: TensorBoard's event file now holds them too."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = main(fit_args(tmp_path / "runs", npz, "--trainer.logger=TensorBoardLogger")).run_dir
    # The folder: the event files of the fit and of the test after it.
    accumulator = event_accumulator.EventAccumulator(str(run / "lightning_logs" / "version_0"))
    accumulator.Reload()
    assert {"val/confusion_matrix", "val/predictions"} <= set(accumulator.Tags()["images"])
    image = accumulator.Images("val/confusion_matrix")[-1]
    assert image.width > 100 and image.height > 100 and image.encoded_image_string[:4] == b"\x89PNG"


def test_a_loggers_save_dir_inside_the_run_is_kept_and_outside_it_refused(tmp_path, npz, capsys):
    pytest.importorskip("tensorboard")
    tensorboard = ["--trainer.logger=TensorBoardLogger", "--plots.enabled=false"]
    run = main(fit_args(tmp_path / "runs", npz, *tensorboard, "--trainer.logger.save_dir=tb")).run_dir
    assert list(run.glob("tb/lightning_logs/version_0/events.out.tfevents.*"))
    root = tmp_path / "other"
    line = refused(capsys, fit_args(root, npz, *tensorboard, f"--trainer.logger.save_dir={tmp_path / 'elsewhere'}"))
    assert "trainer.logger (TensorBoardLogger) save_dir" in line and "outside the run directory" in line, line
    assert not (tmp_path / "elsewhere").exists() and not any(root.rglob("*.*"))


@pytest.mark.parametrize("logger", ["WandbLogger", "lightning.pytorch.loggers.WandbLogger"])
def test_wandb_logger_by_either_name_keeps_its_offline_run_in_the_run_directory(tmp_path, npz, logger):
    """Lightning's own WandbLogger was refused (`save_dir=. leads outside the run directory`)."""
    from tests.test_wandb import wandb_env

    root = tmp_path / "runs"
    out = run_cli(fit_args(root, npz, f"--trainer.logger={logger}", "--plots.enabled=false"), env=wandb_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (root / "lenet").iterdir()
    assert list(run.glob("wandb/offline-run-*/run-*.wandb")), sorted(run.rglob("*"))


def test_mlflow_logger_with_a_local_store_writes_into_the_run(tmp_path, npz, monkeypatch):
    """MLFlowLogger by name alone once wrote its experiments into the run's root (the ``.`` of the CSVLogger
    it replaced); its own ``./mlruns`` is now inside the run. MLflow 3 keeps its file store only on request."""
    pytest.importorskip("mlflow", reason="mlflow is not a dependency; MLFlowLogger is tested where it is installed")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = main(fit_args(tmp_path / "runs", npz, "--trainer.logger=MLFlowLogger", "--plots.enabled=false")).run_dir
    assert any(run.glob("mlruns/*/*/metrics/*")), sorted(run.rglob("*"))
    assert {p.name for p in run.iterdir()} <= {"mlruns", "config.yaml", "checkpoints", "net.pt", "run.lock"}


def test_a_logger_added_by_name_alone_and_a_missing_save_dir_said_in_one_sentence(tmp_path, npz, capsys):
    """`--trainer.logger+=TensorBoardLogger` once failed with `does not accept "[Namespace(...)]"`, the missing
    save_dir dropped: now it logs beside our CSVLogger, and a save_dir given as null is named as the cause."""
    pytest.importorskip("tensorboard")
    run = main(fit_args(tmp_path / "runs", npz, "--trainer.logger+=TensorBoardLogger", "--plots.enabled=false")).run_dir
    assert (run / "metrics.csv").is_file() and list(run.glob("lightning_logs/version_0/events.out.tfevents.*"))
    null = json.dumps({"class_path": "TensorBoardLogger", "init_args": {"save_dir": None}})
    line = refused(capsys, fit_args(tmp_path / "other", npz, f"--trainer.logger+={null}"))
    assert line.startswith("error: trainer.logger lightning.pytorch.loggers.TensorBoardLogger needs a save_dir"), line
    assert not (tmp_path / "other").exists()


def test_a_run_directory_whose_name_looks_like_a_pattern_is_still_checked(tmp_path):
    """Claims match with `*` as their only wildcard: under `runs[1]/` two writers of one file still collide."""
    run = tmp_path / "runs[1]" / "run"
    same = [directory.Claim(run / "net.pt", "ExportNet", "export.filename")]
    same.append(directory.Claim(run / "net.pt", "PredictionWriter", "predictions.filename"))
    with pytest.raises(directory.UserError, match="predictions.filename .* export.filename"):
        directory.check_claims(same, run)
    directory.check_claims([same[0], directory.Claim(run / "n.pt", "PredictionWriter", "predictions.filename")], run)
