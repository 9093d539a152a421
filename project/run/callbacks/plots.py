"""Confusion matrix and sample predictions, drawn at the end of validation and test.

Saved as PNG under ``<run dir>/plots/`` (for everyone) and logged as images to every logger that takes
images (WandbLogger, TensorBoardLogger).
"""

import io
from pathlib import Path

import lightning as L
import matplotlib.image
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from project.errors import UserError
from project.run import directory, figures, model_contract
from project.run.checkpoints import write_atomically


def read_num_classes(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    return getattr(pl_module, "num_classes", None) or trainer.datamodule.num_classes


class PredictionPlots(L.Callback):
    """Draw ``<stage>[-epochE]-confusion.png`` (with its counts in ``.csv``) and ``...-predictions.png``
    into ``<run dir>/plots/``, and log the two images to every WandbLogger and TensorBoardLogger.

    The confusion matrix counts every validation (or test) image of every process (torchmetrics
    syncs it across DDP ranks); the prediction grid shows the first ``num_samples`` images that
    global rank zero saw, captioned ``true -> predicted`` with the data module's class names
    (its ``classes``; ``0, 1, ...`` without them), its normalisation undone (its ``mean`` and ``std``).

    Args:
        every_n_epochs: during ``fit``, draw the validation plots every N epochs; with 0 (the default),
            only once, after the last validation, when fitting ends. Test plots are drawn after
            every ``test``.
        num_samples: images in the prediction grid.
        enabled: ``false`` turns the callback off (``--plots.enabled=false``).

    The model's ``validation_step``/``test_step`` must return the batch's logits (ImageClassifier's do).
    """

    def __init__(self, every_n_epochs: int = 0, num_samples: int = 32, enabled: bool = True) -> None:
        if every_n_epochs < 0 or num_samples < 0:
            raise UserError("plots.every_n_epochs and plots.num_samples must be >= 0.")
        self.every_n_epochs, self.num_samples, self.enabled = every_n_epochs, num_samples, enabled
        self.paths: list[Path] = []  # every PNG written, in order
        self._confusion: MulticlassConfusionMatrix | None = None
        self._samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._last_val: tuple[int, np.ndarray, list] | None = None  # (epoch, matrix, samples) of the latest validation
        self._drawn_epoch: int | None = None
        self._warned = False

    # ---- collecting -------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        # Without a run, log_dir broadcasts from rank zero, so every rank must ask; only here, never on rank zero alone.
        self._dir = directory.run_directory(trainer) / "plots"
        self._classes = [
            str(c) for c in getattr(trainer.datamodule, "classes", None) or range(read_num_classes(trainer, pl_module))
        ]
        self._confusion = MulticlassConfusionMatrix(len(self._classes))

    def _start(self, pl_module: L.LightningModule) -> None:
        if self._confusion is not None:
            self._confusion = self._confusion.to(pl_module.device)
            self._confusion.reset()
        self._samples = []

    def _collect(self, trainer: L.Trainer, outputs, batch) -> None:
        if self._confusion is None or trainer.sanity_checking:
            return
        images, labels = batch[0], batch[1]
        if not (isinstance(outputs, torch.Tensor) and outputs.ndim == 2 and len(outputs) == len(labels)):
            if not self._warned:
                model_contract.skip(
                    "plots", trainer.lightning_module, "returns no logits from validation_step/test_step"
                )
                self._warned = True
            return
        preds = outputs.argmax(dim=-1)
        self._confusion.update(preds, labels)
        have = sum(len(s[0]) for s in self._samples)
        if trainer.is_global_zero and have < self.num_samples:
            take = self.num_samples - have
            self._samples.append((images[:take].detach().float().cpu(), labels[:take].cpu(), preds[:take].cpu()))

    def _finish(self, trainer: L.Trainer) -> tuple[np.ndarray, list] | None:
        """The synced confusion matrix (a collective: every rank calls it) and rank zero's samples."""
        if self._confusion is None or trainer.sanity_checking or not self._confusion.update_called:
            return None
        matrix = self._confusion.compute().cpu().numpy()
        self._confusion.reset()
        return matrix, self._samples

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    # ---- drawing ----------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        result = self._finish(trainer)
        if result is None:
            return
        epoch = trainer.current_epoch
        self._last_val = (epoch, *result)
        fitting = trainer.state.fn == "fit"
        if not fitting or (self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0):
            self._draw(trainer, "val", *result, epoch=epoch if fitting else None)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._last_val is not None and self._drawn_epoch != self._last_val[0]:
            epoch, matrix, samples = self._last_val
            self._draw(trainer, "val", matrix, samples, epoch=epoch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        result = self._finish(trainer)
        if result is not None:
            self._draw(trainer, "test", *result)

    def _draw(
        self, trainer: L.Trainer, stage: str, matrix: np.ndarray, samples: list, epoch: int | None = None
    ) -> None:
        if epoch is not None:
            self._drawn_epoch = epoch
        if not trainer.is_global_zero:
            return
        stem = f"{stage}-epoch{epoch:03d}" if epoch is not None else stage
        title = f"{stage}, epoch {epoch}" if epoch is not None else stage
        written = {
            "confusion_matrix": figures.save(
                figures.confusion_matrix_figure(matrix, self._classes, title), self._dir / f"{stem}-confusion.png"
            )
        }
        # The counts as numbers too: rows are true classes, columns predicted ones.
        counts = io.StringIO()
        np.savetxt(counts, matrix, fmt="%d", delimiter=",", header=",".join(self._classes), comments="")
        write_atomically(counts.getvalue().encode(), self._dir / f"{stem}-confusion.csv", "plots")
        if samples:
            images, labels, preds = (torch.cat(parts) for parts in zip(*samples))
            written["predictions"] = figures.save(
                figures.prediction_grid_figure(
                    self._displayable(trainer, images), labels.tolist(), preds.tolist(), self._classes, title
                ),
                self._dir / f"{stem}-predictions.png",
            )
        self.paths.extend(written.values())
        for logger in trainer.loggers:
            for key, path in written.items():
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"{stage}/{key}", images=[str(path)], step=trainer.global_step)
                elif isinstance(logger, TensorBoardLogger):
                    image = matplotlib.image.imread(path)  # (H, W, RGBA) floats in [0, 1], as drawn
                    logger.experiment.add_image(f"{stage}/{key}", image, trainer.global_step, dataformats="HWC")

    @staticmethod
    def _displayable(trainer: L.Trainer, images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) model inputs -> (N, H, W, C) in [0, 1], undoing the data module's normalisation
        (its ``mean`` and ``std``, when it has them and they are not None)."""
        mean, std = getattr(trainer.datamodule, "mean", None), getattr(trainer.datamodule, "std", None)
        if mean is not None and std is not None:
            images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grey images, drawn as RGB
        return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()
