"""Test-only callbacks and a strategy that CLI subprocesses load by class path (``tests.probes.<Name>``).

They observe or disturb real runs from the inside: write what each DDP rank saw, kill a run
mid-fit, run FSDP on CPU processes. None of them is part of the template.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from project.callbacks import ActivationStatistics, GradientStatistics

signal_module = signal  # SendSignal's argument is named `signal`, as in sbatch --signal


class RankDump(L.Callback):
    """At the end of fit every rank writes ``rank<r>.pt`` into the run directory: the hook callbacks'
    last logged values, the net's buffers, the sum of its weights, the labels of its first
    batch and the training metrics of the last epoch, as that rank holds them."""

    def __init__(self) -> None:
        self.first_labels: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == 0:
            self.first_labels = batch[1].tolist()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = Path(trainer.log_dir)  # a collective: every rank asks
        found = {
            type(cb).__name__: dict(cb.last)
            for cb in trainer.callbacks
            if isinstance(cb, (ActivationStatistics, GradientStatistics))
        }
        net = pl_module.net
        torch.save(
            {
                "stats": found,
                "buffers": {k: v.detach().cpu().clone() for k, v in net.named_buffers()},
                "weights_sum": sum(float(p.detach().double().sum()) for p in net.parameters()),
                "world_size": trainer.world_size,
                "first_labels": self.first_labels,
                "train_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")},
            },
            log_dir / f"rank{trainer.global_rank}.pt",
        )
        trainer.strategy.barrier("RankDump")


class KillAtEpoch(L.Callback):
    """SIGKILL this process when training epoch ``epoch`` starts: a job killed without warning."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class Interrupted(Exception):
    """Raised by RaiseAtEpoch."""


class RaiseAtEpoch(L.Callback):
    """Raise :class:`Interrupted` when training epoch ``epoch`` starts: an in-process interruption."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"interrupted at the start of epoch {self.epoch}")


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP on CPU processes (gloo), standing in for the GPUs that Lightning's FSDPStrategy requires.

    Lightning refuses ``strategy="fsdp"`` without CUDA and passes no device to FSDP on CPU; this
    subclass wraps the model itself with ``device_id=cpu`` and leaves the rest (sharded and full
    checkpoints, state_dict gathering) to the real strategy.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)  # already wrapped (fit, then test in one run)
        kwargs = {k: v for k, v in self.kwargs.items() if k != "auto_wrap_policy"}
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            auto_wrap_policy=self.kwargs.get("auto_wrap_policy"),
            **kwargs,
        )
        return super()._setup_model(model)


class SendSignal(L.Callback):
    """Send ``signal`` to this process once, at a chosen moment of the run: after training step
    ``step`` (``when="train"``, what Ctrl-C or a scheduler does mid-epoch), when the first batch of
    the sanity check starts (``when="sanity"``) or when the first test batch starts (``when="test"``)."""

    def __init__(self, signal: str = "SIGINT", when: str = "train", step: int = 3) -> None:
        self.signum, self.when, self.step, self.sent = getattr(signal_module, signal), when, step, False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.when == "train" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.when == "sanity" and trainer.sanity_checking:
            self._send()

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.when == "test":
            self._send()


class SignalSweepWorker(L.Callback):
    """In a trial started by ``python -m project.tools.sweep``: when training epoch ``epoch`` starts, send
    ``signal`` to the worker (this process's parent), once per ``marker`` file. SIGTERM is a worker
    asked to stop; SIGKILL kills the worker's process group and then this trial, as a node failure does."""

    def __init__(self, marker: str, signal: str = "SIGKILL", epoch: int = 1, batch: int | None = None) -> None:
        self.marker, self.signum, self.epoch, self.batch = Path(marker), getattr(signal_module, signal), epoch, batch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch is None:
            self._signal(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # ``batch``: mid-epoch, while this epoch's DataLoader workers are alive; then wait here until the
        # worker's SIGTERM has reached this process, so that it is handled at this very batch boundary.
        if batch_idx == self.batch and self._signal(trainer):
            deadline = time.monotonic() + 60
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.01)

    def _signal(self, trainer: L.Trainer) -> bool:
        if trainer.current_epoch != self.epoch or self.marker.exists():
            return False
        self.marker.touch()
        if self.signum == signal.SIGKILL:
            os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getppid(), self.signum)
        return True


class Announce(L.Callback):
    """Print ``training at step <step>`` (flushed) once training reached ``step``, for a test that
    waits for it before it signals the whole process group, as a terminal's Ctrl-C does."""

    def __init__(self, step: int = 3) -> None:
        self.step, self.said = step, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.said and trainer.global_step >= self.step and trainer.is_global_zero:
            self.said = True
            print(f"training at step {trainer.global_step}", flush=True)


class CtrlCWhileBuilding(L.Callback):
    """Send SIGINT to the whole process group while the CLI builds its classes (Ctrl-C during start-up)."""

    def __init__(self) -> None:
        os.killpg(os.getpgid(0), signal.SIGINT)


class LateRank(L.Callback):
    """On every rank but zero, ``setup`` waits (60 s at most) until rank zero has saved the run's config.yaml:
    a rank that reaches setup late, as one of several srun tasks may."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = Path(trainer.default_root_dir) / "config.yaml"  # the CLI's run directory
        deadline = time.monotonic() + 60
        while trainer.global_rank != 0 and not config.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


class WaitInValidation(L.Callback):
    """In the first start of a job only (``SLURM_RESTART_COUNT`` unset), when validation batch ``batch`` of
    epoch ``epoch`` starts: write ``<marker>.<global rank>`` and wait there (60 s at most) until this process has
    noted SIGUSR1, so that a test's ``scancel --signal=USR1`` lands while every rank is validating."""

    def __init__(self, marker: str, epoch: int = 1, batch: int = 0) -> None:
        self.marker, self.epoch, self.batch = marker, epoch, batch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return
        from project.run.directory import stop_signals  # noqa: PLC0415 (the probe observes the run layer)

        Path(f"{self.marker}.{trainer.global_rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not stop_signals.pending(signal.SIGUSR1) and time.monotonic() < deadline:
            time.sleep(0.01)


class SignalJob(L.Callback):
    """At training batch ``batch`` of epoch ``epoch`` (this epoch's DataLoader workers alive), send ``signal`` to this
    process's whole process group, as a scheduler signals every process of a job (``scancel``, pre-emption); then
    wait (60 s at most) until Lightning has noted it, so it is handled at this batch boundary."""

    def __init__(self, signal: str = "SIGTERM", epoch: int = 1, batch: int = 1) -> None:
        self.signum, self.epoch, self.batch, self.sent = getattr(signal_module, signal), epoch, batch, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.sent or (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        self.sent = True
        # From another process, as slurmstepd sends it (a worker takes a SIGTERM from its parent for a shutdown).
        subprocess.run(["kill", "-s", str(self.signum.name[3:]), "--", f"-{os.getpgrp()}"], start_new_session=True)
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.01)
