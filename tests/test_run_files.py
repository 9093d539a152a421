"""The one rule of every file a command writes (project.run.directory.check_write, called by the one place the
template writes, project.run.checkpoints.write_atomically): inside the run; never a file the command did not
create, but in a run it continues; one writer per file. And Lightning's own loggers write into the run directory
by default."""

import json
from pathlib import Path

import pytest
import yaml

from project.errors import UserError
from project.run import directory
from project.run.checkpoints import write_atomically
from project.run.cli import main
from tests.conftest import REPO, lenet_fit_args, make_npz, run_cli
from tests.test_runs import copy_run, snapshot


def fit_args(root: Path, npz: Path, *extra: str) -> list[str]:
    return lenet_fit_args(root, npz, "--trainer.max_epochs=1", "--plots.num_samples=4", *extra)


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


@pytest.fixture
def fresh_command():
    """A command of its own: what earlier writes of this test process created is not its business."""
    directory.new_command()
    yield
    directory.new_command()


def test_the_rule_a_file_the_command_did_not_create_is_never_replaced(tmp_path, fresh_command):
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("a file of an earlier command\n")
    with pytest.raises(UserError, match="which this command did not create"):
        write_atomically(b"x", theirs, "compare")
    assert theirs.read_text() == "a file of an earlier command\n"
    write_atomically(b"1", tmp_path / "mine.csv", "compare")
    write_atomically(b"2", tmp_path / "mine.csv", "compare")  # its own file, again: fine
    assert (tmp_path / "mine.csv").read_bytes() == b"2"


def test_the_rule_one_writer_a_file(tmp_path, fresh_command):
    write_atomically(b"config", tmp_path / "config.yaml", "the saved config")
    with pytest.raises(UserError, match="net.pt export would replace .*config.yaml, which the saved config wrote"):
        write_atomically(b"weights", tmp_path / "config.yaml", "net.pt export")
    assert (tmp_path / "config.yaml").read_bytes() == b"config"


def test_the_rule_a_continued_folder_is_the_commands_own(tmp_path, fresh_command):
    (tmp_path / "metrics.csv").write_text("step\n0\n")
    directory.own(tmp_path)  # a resumed fit's run, a joined sweep
    write_atomically(b"step\n", tmp_path / "metrics.csv", "metrics.csv")
    assert (tmp_path / "metrics.csv").read_bytes() == b"step\n"


@pytest.mark.parametrize(
    "option",
    [
        "--export.filename=config.yaml",  # a file this fit wrote itself, by another writer
        "--export.filename=metrics.csv",  # written by the logger, not through the template's one place
        "--export.filename=checkpoints/last.ckpt",
        "--checkpoint.dirpath=.",  # the best checkpoint beside config.yaml: its own name, no collision, allowed
    ],
)
def test_a_fit_never_changes_a_file_another_writer_wrote(tmp_path, npz, capsys, option):
    """`--export.filename config.yaml` once replaced the run's config; now the export is refused in one sentence
    and config.yaml is as the saver wrote it."""
    root = tmp_path / "runs"
    if option.startswith("--checkpoint.dirpath"):
        run = main(fit_args(root, npz, option)).run_dir
        assert list(run.glob("best-*.ckpt")) and (run / "config.yaml").is_file()
        return
    line = refused(capsys, fit_args(root, npz, option, "--test_after_fit=false"))
    assert "would replace" in line and option.split("=")[1] in line, line
    (run,) = (root / "lenet").iterdir()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"], "config.yaml is the saved config still"


@pytest.mark.parametrize(
    "option",
    ["--checkpoint.dirpath", "--last_checkpoint.dirpath", "--trainer.logger.save_dir", "--predictions.output_dir"],
)
def test_a_folder_outside_the_run_is_refused_before_anything_is_written(tmp_path, npz, capsys, option):
    root = tmp_path / "runs"
    line = refused(capsys, fit_args(root, npz, f"{option}={tmp_path / 'elsewhere'}"))
    assert "outside the run directory" in line, line
    assert not (tmp_path / "elsewhere").exists() and not any(root.rglob("*.*"))


def test_a_finished_run_is_never_changed_by_an_evaluation_or_a_tool(tmp_path, npz, finished, capsys):
    from project.tools import compare, curves

    run = copy_run(finished, tmp_path / "runs")
    before = snapshot(run)
    for command in ("validate", "test", "predict"):
        main([command, "-c", str(run / "config.yaml"), f"--data.npz={npz}", f"--ckpt_path={run}/checkpoints/last.ckpt"])
    compare.main([str(run)])
    curves.main([str(run), "--out", str(tmp_path / "curves.png")])
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("eval")} == before, "the fit's files are as they were"
    folders = {f.name.rsplit("-", 1)[1]: f for f in (run / "eval").iterdir()}  # each in a folder of its own
    assert sorted(folders) == ["predict", "test", "validate"]
    assert all((f / "config.yaml").is_file() for f in folders.values())
    assert (folders["predict"] / "predictions.csv").is_file()
    assert [p.name for p in (tmp_path / "runs" / "lenet").iterdir()] == [run.name], "no sibling run"


def evaluate_checkpoint(run: Path, npz: Path, checkpoint: Path, *options: str):
    return main(["test", "-c", str(run / "config.yaml"), f"--data.npz={npz}", f"--ckpt_path={checkpoint}", *options])


def test_an_evaluation_takes_run_dir_and_a_checkpoint_from_elsewhere_gets_a_run_of_its_own(tmp_path, npz, finished):
    elsewhere = tmp_path / "ckpt" / "model.ckpt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((finished / "checkpoints/last.ckpt").read_bytes())
    cli = evaluate_checkpoint(finished, npz, elsewhere, f"--trainer.default_root_dir={tmp_path / 'runs'}")
    assert cli.run_dir.parent == tmp_path / "runs" / "lenet" and (cli.run_dir / "metrics.csv").is_file()
    chosen = tmp_path / "my-eval"
    cli = evaluate_checkpoint(finished, npz, elsewhere, f"--run_dir={chosen}")
    assert cli.run_dir == chosen.resolve() and (chosen / "metrics.csv").is_file()


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
    assert "TensorBoardLogger's save_dir" in line and "outside the run directory" in line, line
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
