"""Confusion matrix, sample predictions and learning curves: the figures, the callback, the command."""

import csv
import functools
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torchmetrics.functional.classification import multiclass_confusion_matrix

from project.classifier import ImageClassifier
from project.data import CIFAR10_CLASSES, CIFAR10DataModule
from project.models import LeNet
from project.run import figures, metrics_file
from project.run.callbacks import PredictionPlots
from project.tools import curves
from tests.conftest import QUIET, REPO, run_cli, run_dirs


def read_counts(path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, np.array(rows, dtype=int)


def test_confusion_matrix_figure_counts_and_names():
    matrix = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 4]])
    fig = figures.confusion_matrix_figure(matrix, ["cat", "dog", "ship"], title="val")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "ship"]
    assert [t.get_text() for t in ax.texts] == ["5", "1", "0", "2", "3", "0", "0", "0", "4"]
    assert ax.get_title() == "val  (accuracy 80.0% of 15)"
    with pytest.raises(ValueError, match="3 classes must be 3x3"):
        figures.confusion_matrix_figure(np.zeros((2, 2)), ["a", "b", "c"])


def test_confusion_matrix_of_many_classes_stays_drawable():
    """CIFAR-100's 100 classes: names on both axes, shading only (the counts are in the .csv), 17x16 inches at most."""
    names = [f"class{i}" for i in range(100)]
    fig = figures.confusion_matrix_figure(np.eye(100, dtype=int) * 3, names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names and len(ax.texts) == 0
    assert tuple(fig.get_size_inches()) == (17.0, 16.0)
    assert ax.get_title() == "(accuracy 100.0% of 300)"


def test_the_figures_leave_no_pyplot_figure_behind(tmp_path):
    """Plain Figure objects: a long run draws hundreds without pyplot holding any of them
    (torchmetrics' plot() makes pyplot figures, kept until closed: the reason figures.py keeps its own)."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figures.save(
        figures.confusion_matrix_figure(np.eye(100, dtype=int), [str(i) for i in range(100)]), tmp_path / "c.png"
    )
    figures.save(figures.prediction_grid_figure(np.zeros((2, 4, 4, 3)), [0, 1], [1, 1], ["a", "b"]), tmp_path / "p.png")
    assert plt.get_fignums() == before == []
    assert imread(tmp_path / "c.png").shape[:2] == (1600, 1700)


def test_prediction_grid_names_the_true_and_predicted_class():
    images = np.random.default_rng(0).random((3, 32, 32, 3))
    fig = figures.prediction_grid_figure(images, [3, 8, 0], [3, 1, 0], list(CIFAR10_CLASSES))
    titles = [(ax.get_title(), ax.title.get_color()) for ax in fig.axes[:3]]
    assert titles == [("cat\n-> cat", "green"), ("ship\n-> automobile", "red"), ("airplane\n-> airplane", "green")]


def test_learning_curves_from_metrics_csv_by_command(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,step,train/loss_step,train/loss_epoch,val/acc,val/loss\n"
        "0,9,2.1,,,\n0,19,1.9,,,\n0,19,,2.0,0.31,1.8\n1,29,1.6,,,\n1,39,1.4,,,\n1,39,,1.5,0.42,1.5\n"
    )
    series = metrics_file.read_series(run / "metrics.csv")
    assert series["train/loss_step"][0].tolist() == [9, 19, 29, 39]
    assert series["val/acc"][1].tolist() == [0.31, 0.42]
    fig = figures.learning_curves_figure(series)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "acc"]  # loss first, then the rest by name
    assert sorted(line.get_label() for line in fig.axes[0].lines) == ["train/loss_epoch", "train/loss_step", "val/loss"]
    series["lr-SGD/base"] = (np.array([9.0, 19.0]), np.array([0.05, 0.01]))
    series["lr-SGD/fc*"] = (np.array([9.0, 19.0]), np.array([0.5, 0.1]))
    fig = figures.learning_curves_figure(series)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "acc", "lr"], "every parameter group's lr in one panel"
    assert (
        sorted(line.get_label() for line in fig.axes[2].lines) == ["lr-SGD/base", "lr-SGD/fc*"]
        and fig.axes[2].get_yscale() == "log"
    )

    here = tmp_path / "here"
    here.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "project", "curves", str(run)], cwd=here, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"learning_curves-{run.name}.png", "in the current directory, never into the run"
    assert imread(here / f"learning_curves-{run.name}.png").shape[2] in (3, 4)
    again = subprocess.run(
        [sys.executable, "-m", "project", "curves", str(run)], cwd=here, capture_output=True, text=True, env=env
    )
    assert again.returncode == 2 and "which this command did not create" in again.stderr, again.stderr

    missing = subprocess.run(
        [sys.executable, "-m", "project", "curves", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == f"error: {tmp_path / 'metrics.csv'} does not exist; give a run directory written by the CSVLogger."
    )


def test_callback_draws_every_n_epochs_last_epoch_and_test_with_synced_counts(tmp_path, tiny_npz):
    """Every validation image is counted once; the matrix's accuracy is the logged val/acc; the files
    appear on the epochs asked for, after the last validation, and after test."""
    L.seed_everything(0)
    callback = PredictionPlots(every_n_epochs=2, num_samples=5)
    model = ImageClassifier(LeNet(), optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))
    data = CIFAR10DataModule(npz=str(tiny_npz), val_size=16, batch_size=8, eval_batch_size=6)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(model, datamodule=data)
    folder = tmp_path / "plots"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"val-epoch{e:03d}-{kind}" for e in (1, 2) for kind in ("confusion.csv", "confusion.png", "predictions.png")
    ]

    header, counts = read_counts(folder / "val-epoch002-confusion.csv")
    assert header == list(CIFAR10_CLASSES) and counts.sum() == 16  # the sanity check is not counted
    assert counts.trace() / counts.sum() == pytest.approx(trainer.callback_metrics["val/acc"].item())
    # The same matrix as computing it directly from the trained model on the validation images.
    images, labels = zip(*(batch for batch in data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        preds = model(torch.cat(images)).argmax(-1)
    expected = multiclass_confusion_matrix(preds, torch.cat(labels), num_classes=10)
    np.testing.assert_array_equal(counts, expected.numpy())

    trainer.test(model, datamodule=data, verbose=False)
    header, test_counts = read_counts(folder / "test-confusion.csv")
    assert test_counts.sum() == 32
    grid = imread(folder / "test-predictions.png")
    assert grid.ndim == 3 and grid.shape[0] > 100
    assert [p.name for p in callback.paths[-2:]] == ["test-confusion.png", "test-predictions.png"]


def test_cli_draws_the_final_plots_by_default_and_can_be_turned_off(tmp_path, tiny_npz):
    base = [
        "fit",
        "-c",
        "experiments/lenet.yaml",
        f"--data.npz={tiny_npz}",
        "--data.val_size=16",
        "--data.batch_size=16",
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    ]
    done = run_cli([*base, "--test_after_fit=true"])
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = run_dirs(tmp_path, "lenet")
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == [
        "test-confusion.png",
        "test-predictions.png",
        "val-epoch001-confusion.png",
        "val-epoch001-predictions.png",
    ]

    off = run_cli([*base, "--test_after_fit=false", "--plots.enabled=false", "--name=off"])
    assert off.returncode == 0, off.stderr[-3000:]
    (run,) = run_dirs(tmp_path, "off")
    assert not (run / "plots").exists()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\xff\xfe\x00binary", "is not a CSV text file"),
        (b"epoch,loss\n0,1.5\n", "has no step column"),
        (b"step,train/loss\n0,1.5\n1,oops\n", "line 3: step '1' or train/loss 'oops' is not a number"),
        (b"step,train/loss\n0,1.5,7\n", "line 2: more values than the header has columns"),
        (b"step,epoch\n0,0\n", "no metric columns to plot"),
    ],
    ids=["binary", "no-step", "not-a-number", "extra-cell", "no-metrics"],
)
def test_a_malformed_metrics_csv_is_one_sentence_and_exit_2(tmp_path, capsys, content, words):
    """Each once ended in a traceback (or, with a message, exit status 1); nothing is written."""
    (tmp_path / "metrics.csv").write_bytes(content)
    with pytest.raises(SystemExit) as exited:
        curves.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_an_unwritable_plot_output_is_one_sentence(tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,1.5\n1,1.2\n")
    with pytest.raises(SystemExit) as exited:
        curves.main([str(tmp_path), "--out", str(tmp_path / "metrics.csv" / "curves.png")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
