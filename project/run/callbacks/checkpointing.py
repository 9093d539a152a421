"""How checkpoints are written and kept: atomic, fsynced files, loads that refuse code, the best
checkpoint and an always-fresh ``last.ckpt`` inside the run directory, and a final save when the
process is asked to stop (SIGTERM, Ctrl-C)."""

import signal
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from project.errors import UserError
from project.run import directory
from project.run.checkpoints import CheckpointError, load_file, save_atomically
from project.run.directory import stop_signals

#: The file LastCheckpoint keeps (``--ckpt_path last`` finds ``last*.ckpt``).
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file, fsync it, then rename it over the target.

    A process killed mid-write leaves at worst a stray ``.tmp`` file; the previous checkpoint
    under the real name stays complete and loadable. Loading is ``weights_only=True`` unless
    asked otherwise, so a checkpoint carrying a pickled payload is refused instead of run, and a
    file that is not a Lightning checkpoint is one sentence (project.run.checkpoints.load_file). The
    checkpoint the run already read (``--ckpt_path``) is not read again. The CLI gives it to the
    Trainer as a plugin.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options.")
        save_atomically(checkpoint, path, "the checkpoint callbacks")

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        run = directory.current()
        if run is not None and run.contents is not None and run.checkpoint == Path(path):
            checkpoint = run.contents  # the run read this file already (for --ckpt_path's checks): not again
        else:
            checkpoint = load_file(path, weights_only=weights_only is not False)  # tensors on the CPU, as Lightning's
        if "state_dict" not in checkpoint and not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            # (A plain state_dict of tensors is what ddp_spawn's launcher hands from the workers back.)
            raise CheckpointError(
                f"{path} is not a Lightning checkpoint of this template (no state_dict entry); "
                "pass a .ckpt file from a run's checkpoints/ folder."
            )
        return checkpoint


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the best checkpoints by a metric) that writes inside the run:
    ``dirpath`` is relative to the run directory (default ``checkpoints``) and ``filename`` may not
    lead out of it, nor name LastCheckpoint's ``last*.ckpt`` (that would make best and last one file)."""

    def __init__(self, dirpath: str | None = None, filename: str | None = None, **kwargs) -> None:
        if filename is not None and Path(filename).name.startswith("last"):
            raise UserError(
                f"checkpoint.filename={filename} would be taken for last_checkpoint's {LAST} (what --ckpt_path last "
                "finds); give the best checkpoint a name that does not start with 'last', e.g. best-{epoch}."
            )
        if kwargs.get("save_last"):
            raise UserError(f"checkpoint.save_last would write a second {LAST}; last_checkpoint keeps it always fresh.")
        dirpath = directory.path_in_run(dirpath, "checkpoint.dirpath", default="checkpoints")
        if filename is not None:
            directory.path_in_run(Path(dirpath or ".") / filename, "checkpoint.filename", default="best-{epoch}")
        super().__init__(dirpath=dirpath, filename=filename, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # The folder is the run's own: new and empty for a new run, holding this run's checkpoints on a resume,
        # where Lightning's "exists and is not empty" warning would only alarm.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)


def stop_reason() -> str:
    return "SIGINT received" if stop_signals.pending(signal.SIGINT) else "SIGTERM received"


class LastCheckpoint(Checkpoint):
    """Always keep an up-to-date ``last.ckpt`` to resume from, in ``<run dir>/checkpoints/``.

    Lightning's ``ModelCheckpoint(save_last=True)`` only refreshes ``last.ckpt`` when its monitored
    checkpoint improves, so a plateaued run would resume from an old epoch. This callback
    monitors nothing and overwrites one file instead (through ``trainer.save_checkpoint``, so
    atomically with the CLI's AtomicCheckpointIO); the best-by-metric checkpoint is the separate
    ``checkpoint`` callback. A step that left the weights NaN or infinite never replaces the last
    good file. When the process receives SIGTERM (what schedulers send before killing a job) or
    SIGINT (Ctrl-C; both noted by project.run.directory.stop_signals under the CLI, every rank agreeing on
    the step) it saves at the next training batch boundary, or at the epoch's end when the signal came
    during validation, and stops the run (exit status 143 or 130).

    Args:
        every_n_train_steps: save every N optimiser steps instead of at epoch ends, so a killed
            run loses at most N steps (0: use ``every_n_epochs``).
        every_n_epochs: save at the end of every N-th epoch (when ``every_n_train_steps`` is 0).
        dirpath: the folder, relative to the run directory (default ``checkpoints``).
    """

    def __init__(self, every_n_train_steps: int = 0, every_n_epochs: int = 1, dirpath: str | None = None) -> None:
        if every_n_train_steps < 0 or every_n_epochs < 0:
            raise UserError("last_checkpoint.every_n_train_steps and every_n_epochs must be >= 0.")
        self.every_n_train_steps, self.every_n_epochs = every_n_train_steps, every_n_epochs
        self.dirpath = directory.path_in_run(dirpath, "last_checkpoint.dirpath", default="checkpoints")
        #: The global step of the newest checkpoint this callback wrote (None: none yet), and its path.
        self.saved_at_step: int | None = None
        self.last_model_path = ""
        self.stop_announced = False

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:  # a Trainer without the CLI: where Lightning's ModelCheckpoint would write
            self.dirpath = directory.run_directory(trainer) / "checkpoints"

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._note_sigterm()

    def on_train_start(self, trainer, pl_module) -> None:
        self._note_sigterm()

    def _note_sigterm(self) -> None:
        # Under the CLI SIGTERM is noted like Ctrl-C, in place of Lightning's handler (registered just before),
        # which broadcasts inside the signal handler: under srun, where every rank gets SIGTERM itself (scancel,
        # pre-emption, the time limit), those broadcasts met the wrong collectives and the job hung until SIGKILL.
        if stop_signals.listening(signal.SIGINT):
            stop_signals.install(signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._save_and_stop_if_requested(trainer)
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # After the epoch's validation (and the model's own epoch-end hook): what ModelCheckpoint does too.
        # A stop asked for during validation lands here, at the epoch-end checkpoint.
        self._save_and_stop_if_requested(trainer)
        if (
            not self.every_n_train_steps
            and self.every_n_epochs
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        ):
            self.save(trainer)

    def _save_and_stop_if_requested(self, trainer) -> None:
        if self.stop_requested(trainer):
            self.save_now(trainer, stop_reason())
            raise SIGTERMException

    def stop_requested(self, trainer) -> bool:
        """Whether to save and stop at this batch boundary: the same answer on every rank."""
        noted = any(stop_signals.listening(s) and stop_signals.pending(s) for s in (signal.SIGINT, signal.SIGTERM))
        if trainer.world_size == 1:
            # Lightning would stop only at the end of the epoch on SIGTERM; stop now.
            return noted or trainer.received_sigterm
        # Ctrl-C and a scheduler's SIGTERM reach every rank by themselves, possibly a step apart: the ranks
        # agree here, where every rank calls this collective at the same step (only where the CLI listens,
        # which it does on every rank). Without the CLI, Lightning stops every rank at the same step on
        # SIGTERM (rank 0 broadcasts it before each batch).
        if stop_signals.listening(signal.SIGINT):
            return trainer.strategy.reduce_boolean_decision(noted, all=False)
        return False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Under DDP every rank raises SIGTERMException at the same batch boundary (Lightning
        # broadcasts SIGTERM; stop_requested agrees on Ctrl-C), so all ranks take part in this save.
        # Lightning raises it itself when the signal lands after this callback's batch or epoch end.
        if isinstance(exception, SIGTERMException):
            self.save_now(trainer, stop_reason())

    def save(self, trainer, now: bool = False) -> bool:
        """Write ``last.ckpt`` (every rank calls this: a collective under DDP); False when skipped.
        Unless ``now``: not in the sanity check or a fast_dev_run, nor twice at one step."""
        if not now and (trainer.sanity_checking or trainer.fast_dev_run or self.saved_at_step == trainer.global_step):
            return False
        path = Path(self.dirpath) / LAST
        weights = [p.detach().float().sum() for p in trainer.lightning_module.parameters()]
        if weights and not torch.isfinite(torch.stack(weights).sum()):
            rank_zero_info(f"Not saving {path} at step {trainer.global_step}: the weights are not finite.")
            return False
        trainer.save_checkpoint(path, weights_only=False)  # a full resume checkpoint
        self.saved_at_step, self.last_model_path = trainer.global_step, str(path)
        return True

    def save_now(self, trainer, reason: str) -> None:
        """Save at this step before stopping, unless a periodic save just did, and say so once."""
        if self.stop_announced:
            return
        if self.saved_at_step == trainer.global_step or self.save(trainer, now=True):
            self.stop_announced = True
            rank_zero_info(
                f"{reason}: saved {self.last_model_path} at step {trainer.global_step}; resume with --ckpt_path last."
            )
