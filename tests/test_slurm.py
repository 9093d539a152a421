"""SLURM without a SLURM controller: job-step detection, requeue on the signal, auto-resume, sbatch scripts.

No test here has a real ``slurmctld``: the environment variables a job step sets are set by hand,
and ``scontrol`` is either absent from PATH or a two-line shell script that records its arguments.
The signal itself is real (``os.kill``), and so are the checkpoints and the resumed training.
"""

import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only

from project.classifier import ImageClassifier
from project.data import CIFAR10DataModule
from project.errors import UserError
from project.models import LeNet
from project.run import directory
from project.run.callbacks import LastCheckpoint
from project.run.cli import ProjectCLI
from project.run.cluster import Requeue, SLURMRequeue, requeue_job, slurm_job_id
from tests.conftest import QUIET, REPO, kill_group, lenet_fit_args, run_cli

SLURM_SCRIPTS = sorted((REPO / "experiments" / "slurm").glob("*.sbatch"))


def job_step_env(job_id="4242", nodes=1, tasks_per_node=1, proc_id=0, name="train") -> dict[str, str]:
    """The variables ``srun`` sets in each task of a job step (those Lightning and this template read)."""
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": name,
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_PROCID": str(proc_id),
        "SLURM_LOCALID": str(proc_id % tasks_per_node),
        "SLURM_NODEID": str(proc_id // tasks_per_node),
        "SLURM_NODELIST": "node[001-002]" if nodes > 1 else "node001",
    }


def fake_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """An ``scontrol`` that appends its arguments to ``folder/scontrol.log`` and exits with ``exit_code``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{folder}/scontrol.log"\n'
        + (f'echo "scontrol: error: Invalid job id specified" >&2\nexit {exit_code}\n' if exit_code else "")
    )
    script.chmod(0o755)
    return folder / "scontrol.log"


def test_job_step_environment_gives_world_size_and_ranks(tmp_path, monkeypatch):
    """Task 5 of a 2-node x 4-task job step: rank 5 of 8, local rank 1 on node 1, run dir slurm-<job id>."""
    for key in (
        "PROJECT_RUN_DIR",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "WANDB_SWEEP_ID",
        "WANDB_RUN_ID",
    ):
        monkeypatch.delenv(
            key, raising=False
        )  # what Lightning adds (MASTER_ADDR=node001) conftest removes after the test
    for key, value in job_step_env(job_id="777", nodes=2, tasks_per_node=4, proc_id=5).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets it to 5; restored after
    monkeypatch.setattr(sys, "argv", ["project"])  # LightningCLI warns when pytest's own arguments are there
    cli = ProjectCLI(
        args=[
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=4",
            "--trainer.num_nodes=2",
            "--trainer.strategy=ddp",
            *QUIET,
        ],
        run=False,
    )
    trainer = cli.trainer
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)
    assert trainer.strategy.cluster_environment.main_address == "node001"
    assert cli.run_dir == (tmp_path / "lenet" / "slurm-777").resolve()


def test_interactive_allocation_is_not_a_job_step(monkeypatch):
    """``srun --job-name=interactive --pty bash``: Lightning's documented way to opt out of SLURM handling."""
    for key, value in job_step_env(name="interactive").items():
        monkeypatch.setenv(key, value)
    assert not SLURMEnvironment.detect()


def test_requeue_job_runs_scontrol_and_explains_every_failure(tmp_path, monkeypatch):
    log = fake_scontrol(tmp_path / "ok")
    monkeypatch.setenv("PATH", f"{tmp_path / 'ok'}{os.pathsep}{os.environ['PATH']}")
    assert requeue_job("4242") is None
    assert requeue_job("4242_3") is None
    assert log.read_text().splitlines() == ["requeue 4242", "requeue 4242_3"]

    fake_scontrol(tmp_path / "failing", exit_code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "failing"))
    assert (
        requeue_job("4242")
        == "`scontrol requeue 4242` failed with exit code 1: scontrol: error: Invalid job id specified"
    )

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "`scontrol` is not on PATH" in requeue_job("4242")
    assert requeue_job("42; rm -rf /") == "'42; rm -rf /' is not a SLURM job id"  # never reaches a shell anyway


@pytest.mark.parametrize(
    "job, restart, folder",
    [
        ({"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train"}, "SLURM_RESTART_COUNT", "slurm-77"),
        ({"TORCHELASTIC_RUN_ID": "exp-a", "WORLD_SIZE": "2"}, "TORCHELASTIC_RESTART_COUNT", "torchrun-exp-a"),
    ],
    ids=["slurm", "torchrun"],
)
def test_a_job_with_a_used_id_refuses_the_earlier_run_and_its_own_restart_resumes_it(
    tmp_path, monkeypatch, job, restart, folder
):
    """The run directory is named after the job's id, and ids come back (a controller's state reset, clusters
    sharing a file system, a reused --rdzv-id): the first start of a job never adopts a run it finds there."""
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "WANDB_SWEEP_ID", "PROJECT_RUN_DIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(restart, raising=False)
    run_dir = tmp_path / "lenet" / folder
    assert directory.choose_run_dir(tmp_path, "lenet", None, resume_last=False, fit=True) == run_dir  # none yet
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed_everything: 1\n")  # an earlier job's run
    with pytest.raises(UserError, match=f"{restart} is (unset|0)"):
        directory.choose_run_dir(tmp_path, "lenet", None, resume_last=False, fit=True)
    monkeypatch.setenv(restart, "0")
    with pytest.raises(UserError, match="holds the run of an earlier job"):
        directory.choose_run_dir(tmp_path, "lenet", None, resume_last=False, fit=True)
    # On purpose (--ckpt_path last), or evaluating it, or a restart of this job: that run.
    assert directory.choose_run_dir(tmp_path, "lenet", None, resume_last=True, fit=True) == run_dir
    assert directory.choose_run_dir(tmp_path, "lenet", None, resume_last=False, fit=False) == run_dir
    monkeypatch.setenv(restart, "1")
    assert directory.choose_run_dir(tmp_path, "lenet", None, resume_last=False, fit=True) == run_dir


def test_array_task_is_requeued_by_its_own_id(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1000")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert slurm_job_id() == "1000_1"


class SignalAtStep(L.Callback):
    """Sends the requeue signal to this process after training step ``step`` (what SLURM does at --signal time)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _fit(root: Path, npz: Path, *callbacks, ckpt_path=None) -> ImageClassifier:
    L.seed_everything(3)
    model = ImageClassifier(LeNet(), optimizer=functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9))
    # The device pipeline orders and augments each epoch from (seed, epoch) alone, and resumes mid-epoch.
    data = CIFAR10DataModule(npz=str(npz), pipeline="device", val_size=16, batch_size=4)
    # From Python, Lightning's own auto-requeue is switched off as SLURMRequeue's docstring says.
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        plugins=[SLURMEnvironment(auto_requeue=False)],
        callbacks=[LastCheckpoint(dirpath=str(root / "checkpoints")), *callbacks],
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def test_requeue_signal_mid_epoch_saves_explains_and_resumes_exactly(tmp_path, tiny_npz, monkeypatch):
    """Signal after step 17 of 36 (epoch 1, batch 5 of 12) on a node without scontrol: the checkpoint is
    written at that step, the run exits with a message saying so and how to resume, and the resumed fit
    ends with exactly the weights of a run that was never interrupted."""
    reference = _fit(tmp_path / "reference", tiny_npz)

    for key, value in job_step_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", str(tmp_path / "no-scontrol-here"))
    with pytest.raises(Requeue) as stopped:
        _fit(tmp_path / "job", tiny_npz, SignalAtStep(17), SLURMRequeue())  # signal first: handled at the same step
    sigterm = signal.getsignal(signal.SIGTERM)
    message = stopped.value.finish()  # after Lightning's teardown, as the CLI calls it
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the requeue's SIGTERM finds it on its way out
    signal.signal(signal.SIGTERM, sigterm)  # pytest's process goes on
    ckpt = tmp_path / "job" / "checkpoints" / "last.ckpt"
    assert message == (
        f"Saved {ckpt} at step 17, but the job was not requeued: `scontrol` is not on PATH on this node "
        f"(is this really a SLURM compute node?). To resume, run the same command with --ckpt_path {ckpt}."
    )
    assert torch.load(ckpt, weights_only=True)["global_step"] == 17
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler does not outlive the fit

    resumed = _fit(tmp_path / "job", tiny_npz, SLURMRequeue(), ckpt_path=str(ckpt))
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_signal_is_ignored_outside_slurm(tmp_path, tiny_npz, monkeypatch):
    """Without a SLURM job the callback installs nothing: SIGUSR1 keeps its default meaning."""
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    callback = SLURMRequeue()
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(ImageClassifier(LeNet()), datamodule=CIFAR10DataModule(npz=tiny_npz, val_size=0, batch_size=8))
    assert not callback._active and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_requeued_job_resumes_in_its_own_run_directory_with_identical_weights(tmp_path, tiny_npz):
    """End to end through the CLI, as sbatch runs it: a fit in a SLURM job gets SIGUSR1 while training,
    saves, calls ``scontrol requeue <job id>`` and exits 0; the requeued job (same job id, same command)
    finds its run directory ``slurm-<job id>``, resumes from the newest checkpoint there without being
    told, and its net.pt equals that of a fit that was never interrupted."""
    args = [
        "fit",
        "-c",
        "experiments/lenet.yaml",
        f"--data.npz={tiny_npz}",
        "--data.pipeline=device",
        "--data.val_size=16",
        "--data.batch_size=4",
        "--trainer.max_epochs=5",
        "--trainer.accelerator=cpu",
        "--test_after_fit=false",
        "--plots.enabled=false",
        "--last_checkpoint.every_n_train_steps=1",
        *QUIET,
    ]
    uninterrupted = run_cli([*args, f"--trainer.default_root_dir={tmp_path / 'uninterrupted'}"])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    scontrol_log = fake_scontrol(tmp_path / "bin")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **job_step_env(job_id="4242"),
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("PROJECT_RUN_DIR", None)
    job = [sys.executable, "-m", "project", *args, f"--trainer.default_root_dir={tmp_path / 'job'}"]
    run_dir = tmp_path / "job" / "lenet" / "slurm-4242"
    proc = subprocess.Popen(
        job, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "last.ckpt").exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "the fit never wrote a checkpoint"
            time.sleep(0.01)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=240)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert scontrol_log.read_text() == "requeue 4242\n"
    stopped_at = int(re.search(r"at step (\d+) and requeued SLURM job 4242", err).group(1))
    assert stopped_at < 5 * 12 and not (run_dir / "net.pt").exists()  # it stopped early, and exported nothing

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    # A new job that got the same id (SLURM_RESTART_COUNT unset) refuses the earlier job's run, touching nothing.
    reused = subprocess.run(job, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert reused.returncode == 2 and "holds the run of an earlier job with the same id" in reused.stderr
    assert "Traceback" not in reused.stderr and "Run directory" not in reused.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"} == before

    # SLURM sets SLURM_RESTART_COUNT in a requeued job.
    requeued = subprocess.run(
        job, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=300
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"Resuming from {run_dir / 'checkpoints'}" in requeued.stderr
    (reference,) = (tmp_path / "uninterrupted" / "lenet").glob("*/net.pt")
    expected, got = torch.load(reference, weights_only=True), torch.load(run_dir / "net.pt", weights_only=True)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_carry_the_required_directives(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    text = script.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    for required in ("partition", "account", "time", "signal", "requeue", "output", "open-mode"):
        assert required in directives, f"{script.name} lacks #SBATCH --{required}"
    # Every expansion is inside double quotes, and no command is assembled from a string.
    for line in text.splitlines():
        assert not unquoted_expansions(line), f"{script.name}: unquoted expansion in: {line}"
        assert not re.search(r"\beval\b|\b(ba)?sh -c\b", line), f"{script.name}: {line}"
    if script.name == "sweep_local.sbatch":
        # The worker alone gets the signal (B:, it is exec'd by the batch shell) and stops its trials itself.
        assert directives["signal"] == "B:SIGUSR1@90" and re.search(r"^exec python -m project sweep ", text, re.M)
        return
    assert directives["signal"] in ("SIGUSR1@90", "SIGUSR2@90")
    # The run must listen for the signal SLURM is told to send; one edited without the other breaks requeue.
    listened = re.findall(r"--requeue\.signal[ =](\w+)", text) or ["SIGUSR1"]  # not given: SLURMRequeue's default
    assert listened == [directives["signal"].split("@")[0]], f"{script.name}: --requeue.signal {listened} vs --signal"
    assert re.search(r"^\s*srun ", text, re.M), f"{script.name} must start its tasks with srun"
    if script.name != "sweep_agent.sbatch":
        # One task per device, and the trainer told the same numbers SLURM gave the job.
        assert "ntasks-per-node" in directives and "gpus-per-node" in directives
        assert directives["ntasks-per-node"] == directives["gpus-per-node"]
        assert (
            '--trainer.devices "${SLURM_NTASKS_PER_NODE}"' in text and '--trainer.num_nodes "${SLURM_NNODES}"' in text
        )


def unquoted_expansions(line: str) -> list[str]:
    """The ``$...`` in a line of shell that stand outside double quotes (comments and single quotes excluded)."""
    found, quote = [], None
    for i, ch in enumerate(line):
        if quote is None and ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        if ch in "\"'" and quote in (None, ch) and (i == 0 or line[i - 1] != "\\"):
            quote = None if quote == ch else ch
        elif ch == "$" and quote is None:
            found.append(line[i : i + 20])
    return found


def test_a_batch_job_logs_one_line_an_epoch_instead_of_a_progress_bar(tmp_path, tiny_npz):
    """Inside a SLURM job with stderr not a terminal (a batch log), the fit prints one line per epoch, and no
    carriage-return redraws (a bar filled 207 KB of log for 80 LeNet epochs)."""
    args = lenet_fit_args(
        tmp_path, tiny_npz, "--trainer.max_epochs=2", "--test_after_fit=false", "--plots.enabled=false"
    )
    args.remove("--trainer.enable_progress_bar=false")
    out = run_cli(args, env=job_step_env(job_id="31"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = re.findall(r"^epoch (\d)/2 \(step (\d+), [\d.]+ s\): .*val/acc=", out.stderr, re.M)
    assert [epoch for epoch, _ in lines] == ["1", "2"] and "\r" not in out.stderr + out.stdout
