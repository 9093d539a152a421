"""project.tools.compare: runs grouped by what differs in their saved configs, metrics summarised per group.

The runs here are folders written the way a fit writes them (config.yaml as LightningCLI saves it,
metrics.csv as the CSVLogger writes it) with chosen values, so every number can be checked by hand;
tests/test_sweep.py compares real trials.
"""

import csv
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from project.run import directory
from project.tools import compare
from tests.conftest import REPO, run_bounded


def write_run(folder: Path, lr: float, seed: int, val_acc: list[float], batch_size: int = 64) -> Path:
    folder.mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "run_dir": str(folder),
        "model": {"lr": lr, "net": {"class_path": "project.models.LeNet", "init_args": {"num_classes": 10}}},
        "data": {"class_path": "project.data.CIFAR10DataModule", "init_args": {"batch_size": batch_size}},
        "trainer": {
            "logger": [{"class_path": "project.run.tracking.CSVLogger", "init_args": {"save_dir": str(folder)}}]
        },
        "checkpoint": {"dirpath": str(folder / "checkpoints")},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/acc", "val/loss"])
        for epoch, acc in enumerate(val_acc):
            writer.writerow([epoch, 10 * epoch + 9, 2.0 - epoch, "", ""])  # a training row: no val values
            writer.writerow([epoch, 10 * epoch + 9, "", acc, 1.0 - acc])
    return folder


@pytest.fixture
def runs_folder(tmp_path: Path) -> Path:
    """Two learning rates, three seeds at 0.1 and two at 0.01; each run in its own folder with its own paths."""
    root = tmp_path / "runs"
    for i, (lr, seed, accs) in enumerate(
        [
            (0.1, 1, [0.2, 0.5]),
            (0.1, 2, [0.3, 0.6]),
            (0.1, 3, [0.1, 0.7]),
            (0.01, 1, [0.2, 0.3]),
            (0.01, 2, [0.25, 0.35]),
        ]
    ):
        write_run(root / "lenet" / f"run{i}", lr, seed, accs)
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_runs_are_grouped_by_what_differs_and_seeds_and_paths_are_pooled(runs_folder, tmp_path):
    printed = compare.compare([runs_folder], out=tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "compare.csv")
    assert list(rows[0]) == ["model.lr", "n", "val/acc.mean", "val/acc.std", "val/loss.mean", "val/loss.std"]
    assert [(r["model.lr"], r["n"]) for r in rows] == [("0.1", "3"), ("0.01", "2")]  # best val/acc first
    assert float(rows[0]["val/acc.mean"]) == pytest.approx(statistics.fmean([0.5, 0.6, 0.7]))
    assert float(rows[0]["val/acc.std"]) == pytest.approx(0.1)  # sample std (n-1), not population
    assert float(rows[1]["val/acc.std"]) == pytest.approx(statistics.stdev([0.3, 0.35]))
    assert float(rows[1]["val/loss.mean"]) == pytest.approx(1 - 0.325)
    header, first, second = printed.splitlines()[:3]
    assert header.split() == list(rows[0]) and first.split()[:3] == ["0.1", "3", "0.6000"]
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(runs_folder.rglob("compare.*")), "a later command never writes into the runs it reads"
    directory.new_command()
    with pytest.raises(compare.UserError, match="which this command did not create"):
        compare.compare([runs_folder], out=tmp_path / "out")  # an earlier command's table stays as it is


def test_by_and_metric_choose_the_grouping_and_the_columns(runs_folder, tmp_path):
    compare.compare([runs_folder], metrics=["val/loss"], by=["seed_everything"], out=tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "compare.csv")
    assert list(rows[0]) == ["seed_everything", "n", "val/loss.mean", "val/loss.std"]
    assert [r["seed_everything"] for r in rows] == ["3", "2", "1"]  # lowest loss first
    assert float(rows[1]["val/loss.mean"]) == pytest.approx(statistics.fmean([1 - 0.6, 1 - 0.35]))
    assert rows[0]["n"] == "1" and rows[0]["val/loss.std"] == ""  # one run: no sample std
    assert not (runs_folder / "compare.csv").exists()


def test_a_single_run_directory_is_one_group(runs_folder, tmp_path):
    run = runs_folder / "lenet" / "run0"
    compare.compare([run], out=tmp_path)
    (row,) = read_csv(tmp_path / "compare.csv")
    assert row == {"n": "1", "val/acc.mean": "0.5", "val/acc.std": "", "val/loss.mean": "0.5", "val/loss.std": ""}


def test_user_mistakes_end_in_one_sentence(runs_folder, tmp_path):
    broken = tmp_path / "broken"
    write_run(broken / "r", 0.1, 1, [0.5])
    (broken / "r" / "metrics.csv").write_text("epoch,step,val/acc\n0,9,not-a-number\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        (str(empty),): "no runs (folders with config.yaml and metrics.csv)",
        (str(tmp_path / "missing"),): "does not exist",
        (str(runs_folder), "--metric", "val/acc5"): "no run logged the metric 'val/acc5'",
        (str(runs_folder), "--by", "model.lr2"): "--by model.lr2 is not a key",
        (str(broken),): "is not a metrics file written by the CSVLogger",
    }
    for args, expected in cases.items():
        done = run_bounded(
            [sys.executable, "-m", "project", "compare", *args],
            timeout=120,
            cwd=REPO,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
    assert not (empty / "compare.csv").exists() and not (broken / "compare.csv").exists()


def test_unreadable_runs_are_skipped_and_named_and_the_rest_compared(runs_folder, tmp_path):
    """Over many runs, one damaged metrics.csv (a run killed mid-write, a file cut by a full disk) once
    stopped the whole comparison; now each unreadable run is one stderr line and the table holds the rest."""
    cut = write_run(runs_folder / "lenet" / "cut", 0.1, 4, [0.9])
    (cut / "metrics.csv").write_text("epoch,step,val/acc\n0,9,0.9\n1,19,0.9x\n")
    binary = write_run(runs_folder / "lenet" / "binary", 0.01, 4, [0.9])
    (binary / "metrics.csv").write_bytes(b"\xff\xfe\x00binary")
    bad_config = write_run(runs_folder / "lenet" / "bad_config", 0.01, 5, [0.9])
    (bad_config / "config.yaml").write_text("model: [unclosed\n")
    done = run_bounded(
        [sys.executable, "-m", "project", "compare", str(runs_folder), "--out", str(tmp_path / "out")],
        timeout=120,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    skipped = done.stderr.splitlines()
    assert len(skipped) == 3 and all(line.startswith("skipped: ") for line in skipped), done.stderr
    assert any(f"{cut}/metrics.csv, line 3: step '19' or val/acc '0.9x' is not a number" in s for s in skipped)
    assert any(f"{binary}/metrics.csv is not a CSV text file" in s for s in skipped)
    assert any(f"{bad_config}/config.yaml is not valid YAML" in s for s in skipped)
    rows = read_csv(tmp_path / "out" / "compare.csv")
    assert [(r["model.lr"], r["n"]) for r in rows] == [("0.1", "3"), ("0.01", "2")], "the readable five, as before"
    assert "(5 runs, 3 unreadable left out;" in done.stdout


def test_nothing_readable_is_one_error_naming_the_first_and_counting_the_rest(tmp_path):
    for name in ("a", "b"):
        write_run(tmp_path / name, 0.1, 1, [0.5])
        (tmp_path / name / "metrics.csv").write_text("epoch,step,val/acc\n0,9,nan?\n")
    done = run_bounded(
        [sys.executable, "-m", "project", "compare", str(tmp_path)],
        timeout=120,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / 'a' / 'metrics.csv'} is not a metrics file"), done.stderr
    assert "(and 1 more runs could not be read)" in done.stderr
    assert not (tmp_path / "compare.csv").exists()


def test_lists_nulls_and_logger_settings_neither_break_nor_split_the_groups(runs_folder, tmp_path):
    """compare once ended in `TypeError: unhashable type: 'list'` for a run made with the wandb preset (its tags
    list) or `callbacks: []`, and split groups on logger settings; loggers, bars and tags are pooled now."""
    for i, run in enumerate(sorted((runs_folder / "lenet").iterdir())):
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["trainer"]["logger"] = [
            {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"tags": ["cifar10", f"r{i}"]}}
        ]
        config["trainer"]["callbacks"] = [] if i % 2 else None
        config["trainer"]["enable_progress_bar"] = bool(i % 2)
        config["model"]["param_groups"] = [0.1, 0.2] if i < 3 else [0.3]  # a list that does split the groups
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    compare.compare([runs_folder], out=tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "compare.csv")
    assert list(rows[0])[:3] == ["model.lr", "model.param_groups", "n"], "no logger, bar or empty-callbacks column"
    groups = {(r["model.lr"], r["model.param_groups"], r["n"]) for r in rows}
    assert groups == {("0.1", "[0.1, 0.2]", "3"), ("0.01", "[0.3]", "2")}, rows
