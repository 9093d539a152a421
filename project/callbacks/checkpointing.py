"""The resume checkpoint: ``<run>/checkpoints/last.ckpt``, rewritten every epoch (and every N steps)."""

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Always keep an up-to-date ``last.ckpt`` to resume from.

    Lightning's ``ModelCheckpoint(save_last=True)`` only refreshes ``last.ckpt`` when its monitored
    checkpoint improves, so a plateaued run would resume from an old epoch. This callback
    monitors nothing and overwrites one file instead; the best-by-metric checkpoint is the
    separate ``checkpoint`` callback.

    Args:
        every_n_train_steps: also save every N optimiser steps (0: only at epoch ends), so a
            killed run loses at most N steps.
        every_n_epochs: save at the end of every N-th epoch.
    """

    def __init__(self, every_n_train_steps: int = 0, every_n_epochs: int = 1, dirpath: str | None = None) -> None:
        if every_n_train_steps < 0 or every_n_epochs < 0:
            raise ValueError("last_checkpoint.every_n_train_steps and every_n_epochs must be >= 0.")
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            enable_version_counter=False,
        )

    @property
    def state_key(self) -> str:
        # Distinct from the best-checkpoint callback's key, so both restore their own state.
        return "LastCheckpoint"
