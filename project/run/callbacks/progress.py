"""ProgressBar: Lightning's TQDM progress bar, redrawn at most twice a second in training; EpochLines for batch logs."""

import sys
import time

from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` that redraws the training bar at most ``max_per_second``
    times a second (and always at the epoch's end), instead of after every batch.

    Lightning's default redraws twice per batch (count, then metrics); a redraw cost 2-5 ms on a
    busy 2-core CPU, so about 4% of a LeNet step at batch 256, the largest per-step cost the CLI's
    trainer added over a plain loop. At two redraws a second it is about 1% of the time in all, for
    any step length. The CLI installs this bar in place of Lightning's default one; a bar given in
    ``trainer.callbacks`` with another ``refresh_rate`` is kept.

    Args:
        max_per_second: redraws per second at most during training (0: after every batch).
        refresh_rate, leave: as for ``TQDMProgressBar``.
    """

    def __init__(self, max_per_second: float = 2.0, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.min_interval = 1.0 / max_per_second if max_per_second > 0 else 0.0
        self._last_draw = float("-inf")
        self._batches_drawn = self._batches_done = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._last_draw, self._batches_drawn, self._batches_done = float("-inf"), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._batches_done = batch_idx + 1
        now = time.monotonic()
        if now - self._last_draw < self.min_interval and self._batches_done < self.total_train_batches:
            return
        self._last_draw, self._batches_drawn = now, self._batches_done
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if self._batches_drawn < self._batches_done and not bar.disable:
            bar.n = self._batches_done  # the count the skipped redraws would have shown (drawn by the call below)
        super().on_train_epoch_end(trainer, pl_module)


class EpochLines(LightningProgressBar):
    """One line per training epoch (its number, time and the progress bar's metrics) instead of a bar: what a
    batch job's log file wants (a bar's carriage-return redraws filled 207 KB for 80 LeNet epochs). The CLI
    puts it in place of the bar where stderr is not a terminal inside a SLURM job."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self._started = True, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.monotonic()  # a fit resumed mid-epoch starts no epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = " ".join(
            f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
            for name, value in self.get_metrics(trainer, pl_module).items()
            if name != "v_num"
        )
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        print(
            f"epoch {trainer.current_epoch + 1}{epochs} (step {trainer.global_step}, "
            f"{time.monotonic() - self._started:.1f} s): {metrics}",
            file=sys.stderr,
            flush=True,
        )
