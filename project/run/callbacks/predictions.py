"""Write what ``predict`` computes to ``<run dir>/predictions.csv``: one row per image, in dataset order."""

import csv
import io
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from project.errors import UserError
from project.run import directory, model_contract
from project.run.checkpoints import write_atomically


class PredictionWriter(BasePredictionWriter):
    """Save ``predict_step``'s ``preds`` and ``probs`` (see ImageClassifier), or the softmax of the logits it
    returns, as a CSV file; skipped with one line for a model whose predict_step returns neither.

    Columns: ``index`` (the image's position in the predict dataset), ``pred`` (the class index),
    ``pred_name``, and one ``prob_<class>`` per class; rows are sorted by ``index``. Class names
    come from the data module's ``classes`` (the class indices when it declares none).

    Under DDP every process predicts its own share; the shares are gathered to global rank 0,
    which drops the images a sampler repeated to even out the shares and writes the one file.
    The write is atomic (a temporary file renamed over the target), so a killed run never leaves
    half a file under the real name.

    Args:
        enabled: write the file (``false``: predict as before and write nothing).
        filename: the file's name; with several predict dataloaders, ``-<i>`` is added to its stem.
        output_dir: where to write it, inside the run directory (relative to it); default: the run directory.
    """

    def __init__(self, enabled: bool = True, filename: str = "predictions.csv", output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.enabled = enabled
        self.filename = filename
        self.output_dir = directory.path_in_run(output_dir, "predictions.output_dir")  # inside the run, or refused now
        directory.path_in_run(Path(output_dir or ".") / filename, "predictions.filename")
        self.paths: list[Path] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Lightning records batch indices for DataLoaders only and warns for the device pipeline's
        # DeviceLoader, whose indices this callback reads from its sampler instead (see _local_rows).
        warnings.filterwarnings(
            "ignore", message="Couldn't infer the batch indices fetched from your dataloader: `DeviceLoader`"
        )

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        if not self.enabled:
            return
        # Without a run, trainer.log_dir broadcasts from rank 0, so every rank asks for it.
        folder = Path(self.output_dir or directory.run_directory(trainer))
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        per_loader = predictions if len(loaders) > 1 else [predictions]
        self.paths = []
        if not all(as_probabilities(out) is not None for batches in per_loader for out in batches):
            lacks = "has a predict_step that returns neither (N, classes) logits nor a dict with 'probs'"
            return model_contract.skip("predictions.csv", pl_module, lacks)
        for i, (loader, batches) in enumerate(zip(loaders, per_loader)):
            seen = batch_indices[i] if i < len(batch_indices) else []
            index, preds, probs = _local_rows(batches, seen, loader)
            index, preds, probs = _gather_to_rank_zero(trainer, index, preds, probs)
            if trainer.is_global_zero:
                name = (
                    self.filename
                    if len(loaders) == 1
                    else f"{Path(self.filename).stem}-{i}{Path(self.filename).suffix}"
                )
                path = folder / name
                write_csv(
                    path,
                    *_unique_sorted(index, preds, probs),
                    class_names(trainer, probs.shape[-1] if len(index) else None),
                )
                self.paths.append(path)
                rank_zero_info(f"Wrote {path}: {len(torch.unique(index))} predictions")
        trainer.strategy.barrier("PredictionWriter")


def as_probabilities(out) -> dict | None:
    """``predict_step``'s output as ``{"probs", "preds"?}``: ImageClassifier's dict, or a module's (N, classes) logits."""
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.is_floating_point():
        return {"probs": out.float().softmax(-1)}
    return out if isinstance(out, dict) and "probs" in out else None


def class_names(trainer: L.Trainer, num_classes: int | None) -> list[str]:
    """The data module's ``classes``; without them the class indices ``0``, ``1``, ..."""
    names = getattr(trainer.datamodule, "classes", None) if trainer.datamodule is not None else None
    names = [str(n) for n in names] if names is not None else [str(i) for i in range(num_classes)]
    if num_classes is not None and len(names) != num_classes:
        raise UserError(
            f"The data module names {len(names)} classes but the model predicts {num_classes}; make them agree."
        )
    return names


def _local_rows(batches, seen: list, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's dataset indices, predicted classes and probabilities, one row per image it predicted.

    Lightning records each batch's dataset indices for DataLoaders; for other loaders (the device
    pipeline) they are the loader's sampler order, cut into batches of the sizes predicted.
    """
    probs, preds = [], []
    for out in map(as_probabilities, batches):
        probs.append(out["probs"].float().cpu())
        preds.append(out["preds"].cpu() if "preds" in out else out["probs"].argmax(-1).cpu())
    sizes = [len(p) for p in probs]
    if len(seen) == len(batches) and all(len(s) == n for s, n in zip(seen, sizes)):
        index = [i for batch in seen for i in batch]
    else:
        order = list(getattr(loader, "sampler", None) or [])
        if len(order) < sum(sizes):
            raise RuntimeError(
                f"Cannot tell which images the {sum(sizes)} predictions belong to: the loader has no sampler that lists them."
            )
        index = order[: sum(sizes)]
    num_classes = probs[0].shape[-1] if probs else 0
    return (
        torch.as_tensor(index, dtype=torch.long),
        torch.cat(preds).long() if preds else torch.zeros(0, dtype=torch.long),
        torch.cat(probs) if probs else torch.zeros(0, num_classes),
    )


def _gather_to_rank_zero(trainer: L.Trainer, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every process's rows, concatenated (on every rank; only rank 0 uses them). The shares may differ
    in length (Lightning's predict sampler does not pad), so they travel as objects, not one tensor."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return tensors
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, tensors)
    shares = [share for share in shares if len(share[0])] or [tensors]
    return tuple(torch.cat([share[k] for share in shares]) for k in range(len(tensors)))


def _unique_sorted(index: torch.Tensor, preds: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows sorted by index, each index once (a padding sampler predicts a few images twice)."""
    order = torch.argsort(index, stable=True)
    index, preds, probs = index[order], preds[order], probs[order]
    first = torch.ones(len(index), dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return index[first], preds[first], probs[first]


def write_csv(path: Path, index: torch.Tensor, preds: torch.Tensor, probs: torch.Tensor, names: list[str]) -> Path:
    """``index,pred,pred_name,prob_<class>...`` to ``path``, atomically (temporary file, fsync, rename)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "pred", "pred_name", *(f"prob_{n}" for n in names)])
    for i, p, row in zip(index.tolist(), preds.tolist(), probs.tolist()):
        writer.writerow([i, p, names[p], *(f"{v:.6g}" for v in row)])
    return write_atomically(buffer.getvalue().encode(), path, "predictions")
