"""LearningRates: every optimiser parameter group's learning rate, logged each step (metrics.csv, wandb)."""

from lightning.pytorch.callbacks import LearningRateMonitor


class LearningRates(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, which logs ``lr-<Optimizer>/<group name>`` for every
    parameter group (``ImageClassifier`` names them ``base``, ``base/no_decay`` and one pair per
    ``model.param_groups`` entry), except that a run without a logger (``--trainer.logger false``)
    trains on without it instead of failing at the start."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
