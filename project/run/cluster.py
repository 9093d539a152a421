"""SLURM jobs that survive their time limit and pre-emption: checkpoint, requeue, resume.

``#SBATCH --signal=USR1@90`` makes SLURM send SIGUSR1 to every task about 90 seconds before the job
ends (90 to 120: the controller looks every 30 s). :class:`SLURMRequeue` notes it; at the next
training batch end, or at the epoch's end when it came during validation (where an epoch-end
checkpoint resumes exactly), every rank stops at the same step and ``<run dir>/checkpoints/last.ckpt``
is saved. Lightning then tears the fit down (DataLoader workers joined), and only then
:meth:`Requeue.finish` asks SLURM to put the job back in the queue (``scontrol requeue <job id>``,
which sends SIGTERM to the whole job at once) and the process exits. A requeued job keeps its job
id, so the CLI gives it the same run directory (``<root>/<name>/slurm-<job id>``) and, because that
directory holds checkpoints, resumes ``fit`` from the newest of them (see :mod:`project.run.cli`).

Lightning's own auto-requeue is switched off while this callback is active: it saves from inside
the signal handler, i.e. possibly in the middle of an optimiser step, and never stops training.
"""

import logging
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from project.errors import UserError
from project.run import directory
from project.run.callbacks import LastCheckpoint
from project.run.directory import slurm_job_id, stop_signals

log = logging.getLogger(__name__)


def requeue_job(job_id: str) -> str | None:
    """Ask SLURM to requeue ``job_id``; ``None`` when it did, else one sentence saying why not."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        return f"{job_id!r} is not a SLURM job id"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return "`scontrol` is not on PATH on this node (is this really a SLURM compute node?)"
    try:
        result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`scontrol requeue {job_id}` could not run ({type(err).__name__}: {err})"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        return f"`scontrol requeue {job_id}` failed with exit code {result.returncode}" + (
            f": {detail}" if detail else ""
        )
    return None


def ignore_sigterm() -> None:
    """For a process on its way out that requeues its job: ``scontrol requeue`` has SLURM send SIGTERM to the
    whole job at once, which would otherwise end this process (and fill the log) before it exits by itself."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Requeue(SystemExit):
    """Raised on every rank where :class:`SLURMRequeue` stops the fit: Lightning tears the fit down on its way
    out, then :meth:`finish` requeues the job (the CLI calls it; from Python,
    ``except Requeue as stop: sys.exit(stop.finish())`` around ``trainer.fit``)."""

    def __init__(self, message: str, rank: int, saved: Path | None) -> None:
        super().__init__(message)
        self.message, self.rank, self.saved = message, rank, saved

    def finish(self) -> int | str:
        """Once every rank is here (no DataLoader worker left for the requeue's SIGTERM to kill), global
        rank zero requeues the job; 0, or the sentence saying why not and how to resume."""
        ignore_sigterm()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        problem = [None]
        if self.rank == 0:
            job_id = slurm_job_id()
            problem[0] = requeue_job(job_id) if job_id else "SLURM_JOB_ID is not set"
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(problem, src=0)
        if problem[0] is None:
            rank_zero_info(
                f"{self.message} and requeued SLURM job {slurm_job_id()} at {time.strftime('%H:%M:%S')}; exiting."
            )
            return 0
        return (
            f"{self.message}, but the job was not requeued: {problem[0]}. "
            f"To resume, run the same command with --ckpt_path {self.saved or 'last'}."
        )


class SLURMRequeue(L.Callback):
    """On the requeue signal inside a SLURM job: checkpoint at the next batch end, requeue the job, exit.

    Active only when Lightning detects a SLURM job (``SLURMEnvironment.detect()``: ``SLURM_NTASKS``
    set and the job not named ``bash`` or ``interactive``); elsewhere it does nothing.

    Args:
        signal: the signal that sbatch's ``--signal`` sends: ``SIGUSR1``, or ``SIGUSR2`` where NCCL
            or another library already uses SIGUSR1 (change both together).
        enabled: ``false`` leaves signals to Lightning (``--requeue.enabled=false``).

    Used from Python rather than the CLI, give the Trainer
    ``plugins=[SLURMEnvironment(auto_requeue=False)]`` (the CLI does): with a single device,
    Lightning's own auto-requeue cannot be switched off later.

    The stop is :class:`Requeue`, raised on every rank at the same step. After a successful requeue
    the process exits with status 0 and the job starts again later in the same run directory; when
    the job cannot be requeued (no ``scontrol`` on the node, or it fails) the checkpoint is still
    written and the process exits with status 1 and a message saying how to resume by hand.
    """

    def __init__(self, signal: str = "SIGUSR1", enabled: bool = True) -> None:
        try:
            self.signum = _signal_from_name(signal)
        except ValueError as err:
            raise UserError(f"requeue.signal: {err}") from None
        self.enabled = enabled
        self.checkpoint_path: Path | None = None
        #: Under the CLI (a run is open): note the signal from setup to the end of the command (the
        #: test after fit included); the run restores the handler when it closes. Otherwise the
        #: handler is installed when the sanity check or training starts and restored when fit ends.
        self.keep_after_fit = directory.current() is not None
        self._active = False

    @property
    def requested(self) -> bool:
        return stop_signals.pending(self.signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not (self.enabled and stage == "fit" and SLURMEnvironment.detect()):
            return
        # Without a run, log_dir is broadcast from rank zero: every rank asks for it here.
        self.checkpoint_path = directory.run_directory(trainer) / "checkpoints" / "last.ckpt"
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False  # this callback requeues (see the module docstring)
        self._active = True
        if self.keep_after_fit:
            # Under the CLI: from here (before the sanity check) to the end of the command (after
            # test_after_fit, when the CLI's run closes and restores the handler): a signal during
            # validation or testing is noted like one in training, instead of killing the job
            # (SIGUSR1's default action).
            stop_signals.install(self.signum)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._listen()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._listen()

    def _listen(self) -> None:
        # Without the CLI, installed only now: after Lightning recorded the signal handlers it puts
        # back when the run ends (installed before, ours would be put back after we restored it).
        if self._active:
            stop_signals.install(self.signum)  # does nothing when already installed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._save_and_stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        # After the epoch's validation: a signal that came during it stops here, at the epoch-end
        # checkpoint a resume continues from exactly, not one batch into the next epoch.
        self._save_and_stop_if_signalled(trainer)

    def _save_and_stop_if_signalled(self, trainer: L.Trainer) -> None:
        if self._active and self._stop_decided(trainer):
            self._save(trainer)
            self._stop(trainer, saved=self.checkpoint_path)

    def _stop_decided(self, trainer: L.Trainer) -> bool:
        # Every rank must stop at the same step, also when the signal reached them at different times.
        return (
            trainer.strategy.reduce_boolean_decision(self.requested, all=False)
            if trainer.world_size > 1
            else self.requested
        )

    def _stop(self, trainer: L.Trainer, saved: Path | None) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger) and hasattr(logger.experiment, "mark_preempting"):
                    logger.experiment.mark_preempting()  # a wandb sweep then hands this run out again
        done = (
            f"Saved {saved} at step {trainer.global_step}"
            if saved
            else f"Training was complete (step {trainer.global_step})"
        )
        raise Requeue(done, trainer.global_rank, saved)

    def _save(self, trainer: L.Trainer) -> None:
        """Write the resume checkpoint through LastCheckpoint when the trainer has one (as the CLI's does)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, LastCheckpoint):
                callback.save_now(trainer, "SLURM requeue signal")
                self.checkpoint_path = Path(callback.last_model_path)
                return
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # The test after fit (--test_after_fit): training is over and its checkpoints are written;
        # requeue, and the requeued job resumes the finished fit and tests again.
        if self._active and self._stop_decided(trainer):
            self._stop(trainer, saved=None)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.keep_after_fit:
            # Stay active for the test that may follow the fit; the signal handler stays until the
            # command ends (project.run.directory.Run.close restores it).
            return
        self._stop_listening()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self.keep_after_fit:
            self._stop_listening()  # Lightning calls no teardown hook after an exception

    def _stop_listening(self) -> None:
        if self._active:
            # At the end of a run Lightning has already put back the handlers it recorded before ours.
            stop_signals.restore(self.signum, if_current=True)
        self._active = False


def _signal_from_name(name: str) -> signal.Signals:
    normalized = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if normalized not in ("SIGUSR1", "SIGUSR2"):
        raise ValueError(f"{name!r} is not supported; use SIGUSR1 or SIGUSR2 (the same as sbatch --signal).")
    return signal.Signals[normalized]
