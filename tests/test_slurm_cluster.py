"""The template's own sbatch scripts on a real single-node SLURM (experiments/slurm/local_cluster.sh).

No simulation here: slurmctld and slurmd schedule the jobs, send the time-limit signal, requeue and restart
them; the scripts run ``srun python -m project ...`` with the CPU recipe of docs/slurm.md (sbatch options
override the scripts' GPU lines). The tests need a running controller (CI's ``.ci/run`` starts one as root on
Debian/Ubuntu, with a requeue hold of 10 s instead of SLURM's 120 s) and the repository's ``.venv``, which the
scripts activate; elsewhere they skip with the reason. Every job is cancelled when its test ends.
"""

import csv
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import QUIET, REPO, make_npz, run_cli

SCRIPTS = REPO / "experiments" / "slurm"
#: The CPU recipe: one node of the local cluster, two tasks (DDP ranks), no GPU.
CPU = ["--partition=local", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
ARGS = ["--trainer.accelerator", "cpu", "--data.val_size", "64", "--data.batch_size", "16", "--plots.enabled", "false"]
#: Job states after which SLURM does nothing more with a job (a requeued one goes back to PENDING).
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _cluster_problem() -> str | None:
    if shutil.which("scontrol") is None:
        return "SLURM is not installed: start a local cluster with `sudo bash experiments/slurm/local_cluster.sh`"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return "no SLURM controller answers: start one with `sudo bash experiments/slurm/local_cluster.sh`"
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        return "the sbatch scripts activate .venv in the repository: build it with `bash .ci/setup`"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem())),
]


def job_state(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_until_done(job_id: str, timeout: float) -> dict[str, str]:
    """Poll the controller until the job reached a final state (a requeued job passes through PENDING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state.get("JobState") in FINAL:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job_state(job_id)}")


@pytest.fixture
def sbatch(tmp_path):
    """``sbatch(script, *sbatch options, args=[...])`` from the repository root, as a user submits; the job's
    log goes to ``tmp_path``. Returns the job id; every job submitted is cancelled at the end of the test."""
    jobs = []

    def submit(script: str, *options: str, args=()) -> str:
        command = ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", *options, str(SCRIPTS / script)]
        out = subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        jobs.append(out.stdout.strip().split(";")[0])
        return jobs[-1]

    yield submit
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)


def log_of(tmp_path: Path, job_id: str) -> str:
    return (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")


def epochs_in(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/acc")]


def val_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("val/acc")]


def test_a_ddp_job_requeued_on_its_time_limit_completes_with_every_epoch_once(tmp_path, sbatch):
    """single_node.sbatch, 2 ranks, ``--time=3`` with the warning 60 s ahead: SLURM signals the job 60 to 90 s
    before its limit, the fit saves and requeues it, the restart resumes in the same run directory and completes,
    every epoch once in metrics.csv, no traceback in its log. The fit is 150 s of training (``max_time``, which a
    resume continues): more than a first start can do before its signal on any machine, less than a second can."""
    npz = make_npz(tmp_path / "data.npz", n_train=1600)
    job = sbatch(
        "single_node.sbatch",
        *CPU,
        "--time=00:03:00",
        "--signal=SIGUSR1@60",
        args=["experiments/lenet.yaml", *ARGS, "--data.npz", str(npz), "--trainer.max_epochs", "10000"]
        + ["--trainer.max_time", "00:00:02:30", "--trainer.default_root_dir", str(tmp_path / "runs")]
        # No DataLoader workers here: a worker that stays inside fork() (seen a few times: docs/slurm.md) would
        # hang this long job; the validation and scancel tests below keep them.
        + ["--data.num_workers", "0"],
    )
    state = wait_until_done(job, timeout=900)
    log = log_of(tmp_path, job)
    assert state["JobState"] == "COMPLETED", log[-4000:]
    starts = re.findall(rf"job {job}, start (\d+)", log)
    assert int(state["Restarts"]) >= 1 and starts == [str(i + 1) for i in range(int(state["Restarts"]) + 1)]
    assert len(re.findall(rf"requeued SLURM job {job} at [\d:]+; exiting\.", log)) == int(state["Restarts"])
    assert "Traceback" not in log and "Error" not in log, log[-4000:]
    run_dir = tmp_path / "runs" / "lenet" / f"slurm-{job}"
    epochs = epochs_in(run_dir)
    assert len(epochs) >= 10 and epochs == list(range(len(epochs)))
    assert (run_dir / "net.pt").is_file()
    assert "\r" not in log  # no progress bar in a batch log: one line an epoch
    assert len(re.findall(r"^epoch \d+/10000 ", log, re.M)) >= len(epochs)


def test_a_signal_during_validation_stops_at_that_epoch_s_end_and_the_requeued_job_completes(tmp_path, sbatch):
    """SIGUSR1 (``scancel --signal=USR1``, what the time-limit warning sends to every process of the job step,
    DataLoader workers included) while both ranks validate epoch 1: the job saves at the end of epoch 1 (an
    exact resume point, not one batch into epoch 2), requeues without a traceback, and the restart completes.
    (Its hang until the time limit came from ranks whose collectives were out of step since start-up.)"""
    npz = make_npz(tmp_path / "data.npz", n_train=512)
    marker = tmp_path / "validating"
    job = sbatch(
        "single_node.sbatch",
        *CPU,
        "--time=00:05:00",
        args=["experiments/lenet.yaml", *ARGS, "--data.npz", str(npz), "--trainer.max_epochs", "4"]
        + ["--data.num_workers", "2", "--trainer.default_root_dir", str(tmp_path / "runs")]
        + ["--trainer.callbacks+=tests.probes.WaitInValidation", "--trainer.callbacks.marker", str(marker)],
    )
    deadline = time.monotonic() + 300
    while not all(Path(f"{marker}.{rank}").exists() for rank in (0, 1)):
        assert time.monotonic() < deadline and job_state(job).get("JobState") not in FINAL, log_of(tmp_path, job)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=60)
    state = wait_until_done(job, timeout=600)
    log = log_of(tmp_path, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-4000:]
    assert "Traceback" not in log and "Error" not in log, log[-4000:]
    run_dir = tmp_path / "runs" / "lenet" / f"slurm-{job}"
    assert epochs_in(run_dir) == [0, 1, 2, 3]
    saved = int(re.search(r"saved \S+last\.ckpt at step (\d+)", log).group(1))
    assert saved == val_steps(run_dir)[1] + 1  # epoch 1's end (metrics.csv gives its last step's index)
    assert f"Resuming from {run_dir / 'checkpoints'}" in log


def test_a_new_job_that_gets_a_used_id_leaves_the_earlier_run_alone(tmp_path, sbatch):
    """A job held at submission gets its id; a finished run is put where a run of that id lives (what a
    controller whose state was reset, or a cluster sharing the file system, leaves behind). Released, the job
    stops on every rank with one sentence and exit status 2; the earlier run's files are unchanged."""
    npz = make_npz(tmp_path / "data.npz")
    job = sbatch(
        "single_node.sbatch",
        *CPU,
        "--hold",
        "--time=00:05:00",
        args=["experiments/lenet.yaml", *ARGS, "--data.npz", str(npz), "--trainer.default_root_dir", str(tmp_path)],
    )
    earlier = tmp_path / "lenet" / f"slurm-{job}"
    fit = run_cli(
        ["fit", "-c", "experiments/lenet.yaml", f"--data.npz={npz}", "--data.val_size=16", "--trainer.max_epochs=1"]
        + ["--trainer.accelerator=cpu", "--plots.enabled=false", f"--run_dir={earlier}", *QUIET]
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in earlier.rglob("*") if p.is_file()}
    subprocess.run(["scontrol", "release", job], check=True, timeout=60)
    state = wait_until_done(job, timeout=300)
    log = log_of(tmp_path, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", log[-4000:]
    assert len(re.findall(r"^error: .* holds the run of an earlier job with the same id", log, re.M)) == 2  # each rank
    assert "Traceback" not in log
    assert {p: p.stat().st_mtime_ns for p in earlier.rglob("*") if p.is_file()} == before


def test_a_local_sweep_runs_as_an_array_job_on_one_sweep_directory(tmp_path, sbatch):
    """sweep_local.sbatch as a 2-task array: two workers on one sweep directory run the grid's two trials,
    each once, and compare's table has them both."""
    npz = make_npz(tmp_path / "data.npz")
    sweep = tmp_path / "lr.yaml"
    command = ["${env}", "${interpreter}", "-m", "${program}", "fit", "-c", "experiments/lenet.yaml", *QUIET]
    command += [f"--data.npz={npz}", "--data.val_size=16", "--trainer.max_epochs=1", "--trainer.accelerator=cpu"]
    command += ["--plots.enabled=false", "--test_after_fit=false", "${args}"]
    config = {
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"model.optimizer.init_args.lr": {"values": [0.01, 0.02]}},
        "program": "project",
        "command": command,
    }
    sweep.write_text(yaml.safe_dump(config, sort_keys=False))
    directory = tmp_path / "sweep"
    job = sbatch(
        "sweep_local.sbatch",
        "--partition=local",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--array=0-1",
        "--time=00:05:00",
        f"--output={tmp_path}/slurm-%A_%a.out",
        f"--export=ALL,SWEEP_DIR={directory}",
        args=[str(sweep)],
    )
    for task in (0, 1):
        state = wait_until_done(f"{job}_{task}", timeout=300)
        assert state["JobState"] == "COMPLETED", (tmp_path / f"slurm-{job}_{task}.out").read_text()[-3000:]
    trials = yaml.safe_load((directory / "trials.json").read_text())["trials"]
    assert sorted(t["config"]["model.optimizer.init_args.lr"] for t in trials) == [0.01, 0.02]
    assert all(t["state"] == "finished" and t["starts"] == 1 for t in trials)
    with open(directory / "sweep.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_scancel_of_a_ddp_job_saves_on_every_rank_at_one_batch_boundary(tmp_path, sbatch):
    """``scancel`` (as a pre-emption or the time limit itself) sends SIGTERM to every process of the job, each
    rank and its DataLoader workers: the ranks agree on one batch boundary, save there and exit within SLURM's
    kill wait. (Lightning's own SIGTERM handler broadcasts inside the handler; under srun those broadcasts met
    the wrong collectives and the job hung until SLURM killed it, unsaved.)"""
    npz = make_npz(tmp_path / "data.npz", n_train=1600)
    job = sbatch(
        "single_node.sbatch",
        *CPU,
        "--time=00:05:00",
        # Persistent workers: SIGTERM reaching a worker that is being forked, before its worker_init_fn ignores
        # the signal, kills it (an open defect, docs/slurm.md); with workers forked anew every epoch, a scancel
        # just after an epoch's end met that window in 1 of 2 runs.
        args=["experiments/lenet.yaml", *ARGS, "--data.npz", str(npz), "--trainer.max_epochs", "40"]
        + ["--data.persistent_workers", "true", "--trainer.default_root_dir", str(tmp_path / "runs")],
    )
    deadline = time.monotonic() + 300
    while not re.search(
        r"^epoch 2/40 ", log_of(tmp_path, job) if (tmp_path / f"slurm-{job}.out").exists() else "", re.M
    ):
        assert time.monotonic() < deadline and job_state(job).get("JobState") not in FINAL
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True, timeout=60)
    state = wait_until_done(job, timeout=300)
    log = log_of(tmp_path, job)
    assert state["JobState"] == "CANCELLED", log[-4000:]
    assert "Killed" not in log and "Traceback" not in log and "killed by signal" not in log, log[-4000:]
    saved = int(re.search(r"SIGTERM received: saved \S+last\.ckpt at step (\d+)", log).group(1))
    run_dir = tmp_path / "runs" / "lenet" / f"slurm-{job}"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved > 0
