"""project.tools.sweep: wandb sweep files run by local workers that share a sweep directory (no wandb server).

Real trials (``python -m project fit`` on a tiny npz, a few steps) started by real worker processes;
every subprocess is bounded by a timeout and its process group killed afterwards (tests/conftest.py).
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from project.tools import compare
from tests.conftest import QUIET, REPO, kill_group, run_bounded

TIMEOUT = 300


def sweep_file(tmp_path: Path, npz: Path, parameters: dict, *extra: str, epochs: int = 1) -> Path:
    """A grid sweep over ``parameters`` whose trials are tiny fits of LeNet on ``npz``."""
    config = {
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": parameters,
        "program": "project",
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "${program}",
            "fit",
            "--config",
            "experiments/lenet.yaml",
            f"--data.npz={npz}",
            "--data.val_size=16",
            f"--trainer.max_epochs={epochs}",
            "--trainer.limit_train_batches=2",
            "--trainer.accelerator=cpu",
            "--plots.enabled=false",
            "--test_after_fit=false",
            *QUIET,
            *extra,
            "${args}",
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def worker_command(sweep: Path, directory: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "project", "sweep", str(sweep), "--dir", str(directory), *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_worker(sweep: Path, directory: Path, *args: str) -> subprocess.CompletedProcess:
    return run_bounded(worker_command(sweep, directory, *args), timeout=TIMEOUT, cwd=REPO, env=env())


def trials(directory: Path) -> list[dict]:
    return json.loads((directory / "trials.json").read_text())["trials"]


def val_acc(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]


def test_two_workers_started_together_run_every_trial_once_and_compare_recomputes_their_table(tmp_path, tiny_npz):
    """A 2 x 2 grid, one worker running two trials at once and another running one: every grid point
    runs exactly once, in its own run directory under the sweep directory, with its parameters in its
    config.yaml; sweep.csv holds each trial's final val/acc from its metrics.csv, and compare's means and
    sample standard deviations over the pooled seeds are those of the metrics.csv files."""
    sweep = sweep_file(
        tmp_path, tiny_npz, {"seed_everything": {"values": [1, 2]}, "model.label_smoothing": {"values": [0.0, 0.2]}}
    )
    directory = tmp_path / "sweep"
    workers = [
        subprocess.Popen(
            worker_command(sweep, directory, *args),
            cwd=REPO,
            env=env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for args in (["--workers", "2"], ["--workers", "1"])
    ]
    try:
        outputs = [w.communicate(timeout=TIMEOUT) for w in workers]
    finally:
        for w in workers:
            kill_group(w)
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]

    rows = trials(directory)
    assert sorted((r["config"]["seed_everything"], r["config"]["model.label_smoothing"]) for r in rows) == [
        (1, 0.0),
        (1, 0.2),
        (2, 0.0),
        (2, 0.2),
    ]
    assert {r["state"] for r in rows} == {"finished"} and all(r["starts"] == 1 for r in rows)
    assert len({r["worker"] for r in rows}) == 2, "both workers took trials"
    with open(directory / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["trial"] for t in table] == [r["id"] for r in rows]
    for row in table:
        run_dir = directory / row["run_dir"]
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["seed_everything"] == int(row["seed_everything"])
        assert saved["model"]["init_args"]["label_smoothing"] == float(row["model.label_smoothing"])
        assert float(row["val/acc"]) == val_acc(run_dir)[-1]

    printed = compare.compare([directory], out=tmp_path / "table")
    assert "model.label_smoothing" in printed.splitlines()[0]
    with open(tmp_path / "table" / "compare.csv", newline="") as f:
        groups = {float(g["model.label_smoothing"]): g for g in csv.DictReader(f)}
    for smoothing, group in groups.items():
        finals = [
            val_acc(directory / t["run_dir"])[-1] for t in table if float(t["model.label_smoothing"]) == smoothing
        ]
        assert int(group["n"]) == 2
        assert float(group["val/acc.mean"]) == pytest.approx(sum(finals) / 2)
        assert float(group["val/acc.std"]) == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
        assert float(group["val/acc.best"]) == max(finals)
    assert (tmp_path / "table" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("signal", ["SIGKILL", "SIGTERM"])
def test_a_stopped_worker_s_trial_is_resumed_by_the_next_worker_in_its_run_directory(tmp_path, tiny_npz, signal):
    """SIGKILL: the worker and its trial die at the start of epoch 1 (a node failure); the trial stays
    marked running but nobody holds its lock, so the next worker resumes it. SIGTERM: the worker forwards
    it, the trial saves last.ckpt and stops, and is marked interrupted. Either way the next worker continues
    it from checkpoints/last.ckpt in the same run directory: one val/acc row per epoch, none twice."""
    marker = tmp_path / "signalled"
    sweep = sweep_file(
        tmp_path,
        tiny_npz,
        {"seed_everything": {"value": 3}},
        "--trainer.callbacks+=tests.probes.SignalSweepWorker",
        f"--trainer.callbacks.marker={marker}",
        f"--trainer.callbacks.signal={signal}",
        "--data.batch_size=16",
        "--trainer.limit_train_batches=3",
        epochs=3,
    )  # SIGTERM: saved mid-epoch
    directory = tmp_path / "sweep"
    first = run_worker(sweep, directory)
    assert marker.exists()
    (trial,) = trials(directory)
    if signal == "SIGKILL":
        assert first.returncode == -9 and trial["state"] == "running"
    else:
        assert first.returncode == 143, first.stderr[-3000:]
        assert trial["state"] == "interrupted"
    run_dir = directory / "trials" / trial["id"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    second = run_worker(sweep, directory)
    assert second.returncode == 0, second.stderr[-3000:]
    (trial,) = trials(directory)
    assert trial["state"] == "finished" and trial["starts"] == 2
    starts = [
        line
        for line in (directory / "logs" / f"{trial['id']}.log").read_text().splitlines()
        if line.startswith(f"{trial['id']} start ")
    ]
    assert len(starts) == 2 and "--ckpt_path=last" not in starts[0] and starts[1].endswith("--ckpt_path=last")
    with open(run_dir / "metrics.csv", newline="") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/acc")]
    assert epochs == [0, 1, 2]
    assert sorted(p.name for p in (directory / "trials").iterdir()) == [trial["id"]]


def test_a_worker_stopped_mid_epoch_stops_its_trial_with_dataloader_workers_at_a_batch_boundary(tmp_path, tiny_npz):
    """A worker stopped (SIGTERM: a time limit, scancel, pre-emption) while its trial's DataLoader workers
    are alive: the trial saves last.ckpt at that batch boundary and exits 143, no "DataLoader worker ...
    killed by signal" crash, and is marked interrupted; the next worker resumes it to the end, every epoch
    once. (Sent to the trial's whole process group, the stop killed the DataLoader workers first.)"""
    marker = tmp_path / "signalled"
    sweep = sweep_file(
        tmp_path,
        tiny_npz,
        {"seed_everything": {"value": 3}},
        "--data.pipeline=dataloader",
        "--data.num_workers=2",
        "--data.batch_size=8",
        "--trainer.limit_train_batches=4",
        "--trainer.callbacks+=tests.probes.SignalSweepWorker",
        f"--trainer.callbacks.marker={marker}",
        "--trainer.callbacks.signal=SIGTERM",
        "--trainer.callbacks.batch=1",
        epochs=2,
    )
    directory = tmp_path / "sweep"
    first = run_worker(sweep, directory)
    assert marker.exists() and first.returncode == 143, first.stderr[-3000:]
    (trial,) = trials(directory)
    log = (directory / "logs" / f"{trial['id']}.log").read_text()
    assert trial["state"] == "interrupted", log[-3000:]
    assert "killed by signal" not in log and "Traceback" not in log, log[-3000:]
    assert "SIGTERM received: saved" in log and "at step 6" in log  # epoch 1, batch 1 (4 batches an epoch)

    second = run_worker(sweep, directory)
    assert second.returncode == 0, second.stderr[-3000:]
    (trial,) = trials(directory)
    assert trial["state"] == "finished" and trial["starts"] == 2
    with open(directory / "trials" / trial["id"] / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/acc")] == [0, 1]


def test_failed_trials_are_recorded_and_three_in_a_row_stop_the_sweep(tmp_path, tiny_npz):
    """A trial the CLI refuses (exit 2) is recorded failed and the next one runs; after three failures
    in a row the worker stops with one sentence naming the last reason, and exit status 2."""
    sweep = sweep_file(
        tmp_path,
        tiny_npz,
        {"seed_everything": {"value": 0}, "model.label_smoothing": {"values": [1.5, 0.1, 2.0, 3.0, 4.0, 5.0]}},
    )
    directory = tmp_path / "sweep"
    done = run_worker(sweep, directory)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 trials failed in a row, the last with: error: model.label_smoothing must be in")
    assert [(t["config"]["model.label_smoothing"], t["state"]) for t in trials(directory)] == [
        (1.5, "failed"),
        (0.1, "finished"),
        (2.0, "failed"),
        (3.0, "failed"),
        (4.0, "failed"),
    ]


def test_user_mistakes_end_in_one_sentence(tmp_path, tiny_npz):
    """A missing or invalid sweep file, a --dir holding something else, another sweep's directory: exit 2,
    one line, nothing written."""
    sweep = sweep_file(tmp_path, tiny_npz, {"seed_everything": {"value": 0}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters: {a: {values: 3}}\ncommand: [x]\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cases = {
        (str(tmp_path / "missing.yaml"), str(tmp_path / "d1")): "cannot read the sweep file",
        (str(bad), str(tmp_path / "d2")): "is not a valid wandb sweep file",
        (str(sweep), str(other)): "is not empty and holds no sweep.yaml",
    }
    for (file, directory), expected in cases.items():
        done = run_bounded(
            [sys.executable, "-m", "project", "sweep", file, "--dir", directory], timeout=TIMEOUT, cwd=REPO, env=env()
        )
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
        assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def _limit_memory() -> None:  # in the worker's process: a regression that enumerates the grid fails, not the machine
    import resource  # noqa: PLC0415

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_a_grid_too_large_to_list_is_refused_before_anything_is_enumerated(tmp_path, tiny_npz):
    """5 parameters x 100 values (10**10 points) once grew one worker until the kernel killed it, even with --count 1."""
    sweep = sweep_file(tmp_path, tiny_npz, {f"p{i}": {"values": list(range(100))} for i in range(5)})
    done = subprocess.run(
        worker_command(sweep, tmp_path / "d", "--count", "1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        env=env(),
        preexec_fn=_limit_memory,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "describes a grid of 10,000,000,000 points" in done.stderr and "use method: random or bayes" in done.stderr
    assert not (tmp_path / "d").exists()
