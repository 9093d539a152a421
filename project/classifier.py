"""ImageClassifier: the LightningModule that trains any plain nn.Module mapping images to logits.

It owns what is about training, not about the network: the loss, the metrics, the optimiser and
its schedule. The network stays a plain ``torch.nn.Module`` under ``self.net``.
"""

import warnings
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

Optimizer = Literal["sgd", "adamw"]
Scheduler = Literal["none", "cosine", "onecycle", "step"]
EVAL_STAGES = ("val", "test")


class ImageClassifier(L.LightningModule):
    """Cross-entropy classification of images with any ``net``.

    Args:
        net: a plain module mapping (N, C, H, W) images to (N, num_classes) logits; from the CLI
            give ``class_path`` and ``init_args``, e.g. ``project.models.LeNet``.
        num_classes: number of classes; the CLI links it from the data module.
        optimizer: ``sgd`` (with ``momentum``, ``nesterov``) or ``adamw`` (with ``betas``).
        lr: peak learning rate. ``weight_decay``: applied to weights only, never to biases or
            normalisation parameters (any parameter with fewer than two dimensions).
        scheduler: ``none``, ``cosine`` (per step, to zero), ``onecycle`` (per step, peak ``lr``)
            or ``step`` (per epoch: multiply by ``gamma`` every ``step_size`` epochs).
        label_smoothing: passed to the cross-entropy loss during training (evaluation uses 0).
        channels_last: keep the net's 4-D weights and its input images in ``channels_last``
            memory format (NHWC), which tensor cores run fastest under mixed precision on GPU.
        tta_flip: at validation, test and predict time, average the logits of each image and its
            horizontal mirror (training is unchanged).
        compile: compile the net with ``torch.compile`` (in place, in ``configure_model``): after
            every callback's ``setup`` has registered its hooks, before DDP/FSDP wrap the model,
            and without adding ``_orig_mod.`` to the state_dict keys. ``true``, or a mapping of
            ``torch.compile`` keyword arguments, e.g. ``{mode: max-autotune}``.
        image_shape: (channels, height, width) the net is trained on; any other input is refused
            with a clear error. The CLI links it from the data module; ``None`` checks nothing.
        on_nonfinite_loss: what a NaN or infinite training loss does: ``stop`` the run with an
            error naming the step (checkpoints written before it stay as they are), or ``skip``
            the batch without an optimiser step, at most ``max_nonfinite_skips`` times per run.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: Optimizer = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 5e-4,
        scheduler: Scheduler = "cosine",
        step_size: int = 30,
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        tta_flip: bool = False,
        compile: bool | dict[str, Any] = False,
        on_nonfinite_loss: Literal["stop", "skip"] = "stop",
        max_nonfinite_skips: int = 10,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"model.weight_decay must be >= 0, got {weight_decay}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}.")
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be at least 2, got {num_classes}.")
        if max_nonfinite_skips < 0:
            raise ValueError(f"model.max_nonfinite_skips must be >= 0, got {max_nonfinite_skips}.")
        if not isinstance(net, nn.Module):
            raise TypeError(f"model.net must be a torch.nn.Module, got {type(net).__name__}.")
        with warnings.catch_warnings():
            # From the CLI the net arrives as its config (class_path + init_args), which is what
            # load_from_checkpoint needs; built in Python it is a module object, which we drop
            # from the hyperparameters (its weights are in the state_dict anyway).
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("net"), nn.Module):
            self.remove_ignored_hparams(["net"])
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.num_classes = num_classes
        self.nonfinite_skips = 0
        topk = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if num_classes > 5:
            topk["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        # Evaluation: one torchmetrics collection per stage (state must never mix stages). Training
        # keeps running sums on the device instead (see _accumulate_train): a torchmetrics update
        # and a self.log call every step cost more than a percent of a small net's step on CPU.
        self.metrics = nn.ModuleDict(
            {f"{stage}_metrics": MetricCollection({k: m.clone() for k, m in topk.items()}, prefix=f"{stage}/") for stage in EVAL_STAGES}
        )
        self.train_topk = 5 if num_classes > 5 else 1
        # [sum of loss x batch size, top-1 hits, top-k hits] of this epoch, on the training device;
        # a plain attribute, not a buffer, so DDP never broadcasts rank 0's sums over the others'.
        self._train_sums: torch.Tensor | None = None
        self._train_count = 0

    def configure_model(self) -> None:
        # Lightning calls this hook after the callbacks' setup and before the strategy wraps the
        # model; Module.compile() compiles in place, so state_dict keys stay those of the plain net.
        options = self.hparams.get("compile")
        if options and getattr(self.net, "_compiled_call_impl", None) is None:
            self.net.compile(**(options if isinstance(options, dict) else {}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = self.hparams.get("image_shape")
        if expected is not None and (images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected)):
            raise ValueError(
                f"The model takes images of shape (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}: "
                f"resize or crop the images to {expected[1]}x{expected[2]} with {expected[0]} channels, as in training."
            )
        if self.hparams.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation: with ``tta_flip``, the mean over the image and its mirror."""
        if self.hparams.get("tta_flip"):
            return (self(images) + self(images.flip(-1))) / 2
        return self(images)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, return_logits: bool = False) -> torch.Tensor:
        images, labels = batch
        logits = self(images) if stage == "train" else self.evaluate(images)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        if stage == "train":
            self._accumulate_train(loss.detach(), logits.detach(), labels)
        else:
            self.metrics[f"{stage}_metrics"].update(logits.detach(), labels)
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))
        return logits.detach() if return_logits else loss

    def _accumulate_train(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add this batch to the epoch's training loss and accuracy sums: a few tensor ops, no
        host-device synchronisation. (``train/loss_step`` is logged by ``_log_train_step`` only on
        the steps the loggers record, every ``trainer.log_every_n_steps``; the progress bar's loss
        refreshes then too.)"""
        hits = logits.topk(self.train_topk, dim=-1).indices == labels[:, None]
        batch = torch.stack([loss.float() * len(labels), hits[:, 0].sum().float(), hits.any(dim=-1).sum().float()])
        self._train_sums = batch if self._train_sums is None else self._train_sums.add_(batch)
        self._train_count += len(labels)

    def _log_train_step(self, loss: torch.Tensor, batch_size: int) -> None:
        every = self.trainer.log_every_n_steps
        # The index Lightning's loggers count in: optimiser steps, plus the batches skipped for a non-finite loss.
        if self.trainer.fast_dev_run or (every and (self.global_step + self.nonfinite_skips + 1) % every == 0):
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True, batch_size=batch_size)

    def on_train_epoch_start(self) -> None:
        self._train_sums, self._train_count = None, 0

    def on_train_epoch_end(self) -> None:
        # The epoch's training metrics, under the names Lightning gave them when they were logged
        # every step: train/loss_epoch (also as train/loss, for callbacks), train/acc, train/acc_top5;
        # summed over all processes first, so they cover the whole epoch's data.
        if self._train_sums is None:
            return
        totals = torch.cat([self._train_sums, self._train_sums.new_tensor([self._train_count])])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, top1, topk, count = totals.unbind()
        self.log("train/loss_epoch", loss_sum / count, prog_bar=True)
        self.log("train/loss", loss_sum / count, logger=False)
        self.log("train/acc", top1 / count)
        if self.train_topk > 1:
            self.log(f"train/acc_top{self.train_topk}", topk / count)
        self._train_sums, self._train_count = None, 0

    def _log_epoch_metrics(self, stage: str) -> None:
        # Logging the Metric objects lets torchmetrics aggregate over the epoch and across processes;
        # once per epoch, because logging them every step costs about a millisecond per step.
        self.log_dict(self.metrics[f"{stage}_metrics"], on_step=False, on_epoch=True, prog_bar=stage != "train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train")
        self._log_train_step(loss, len(batch[1]))
        finite = torch.isfinite(loss.detach())
        if self.trainer.world_size > 1:
            # Every rank must take the same branch, or DDP's gradient all-reduce would hang.
            finite = self.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        if finite:
            return loss
        step = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.hparams.get("on_nonfinite_loss") == "skip" and self.nonfinite_skips < self.hparams.get("max_nonfinite_skips", 10):
            self.nonfinite_skips += 1
            self.print(f"Skipping batch with non-finite loss at {step} ({self.nonfinite_skips} skipped so far).")
            return None  # Lightning skips backward and the optimiser step
        raise FloatingPointError(
            f"The training loss became {loss.item()} at {step}; the run stopped and the checkpoints written "
            "before it are intact: lower model.lr, or set model.on_nonfinite_loss=skip to skip such batches."
        )

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        # The logits reach callbacks as on_validation_batch_end's ``outputs`` (PredictionPlots uses them).
        return self._step(batch, "val", return_logits=True)

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test", return_logits=True)

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self.evaluate(images).float().softmax(dim=-1)
        return {"preds": probs.argmax(dim=-1), "probs": probs}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weights get weight decay; biases and normalisation parameters (ndim < 2) do not."""
        decay, no_decay = [], []
        for param in self.net.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.parameter_groups()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov and hp.momentum > 0)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total_steps)
        self._replan_resumed_schedule(scheduler, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before configure_optimizers and loads checkpoint["lr_schedulers"]
        # into the new schedulers after it: keep a reference so the schedule can be re-planned.
        self._resumed_schedulers = checkpoint.get("lr_schedulers")

    def _replan_resumed_schedule(self, scheduler, total_steps: int) -> None:
        """A resumed fit that runs a different number of steps (``--trainer.max_epochs`` changed)
        re-plans its per-step schedule for the new length instead of keeping the old one (whose
        cosine would climb back up after its end, and whose one-cycle would refuse to step on)."""
        resumed, self._resumed_schedulers = getattr(self, "_resumed_schedulers", None), None
        if not resumed:
            return
        stored = resumed[0]
        planned = stored.get("T_max", stored.get("total_steps"))
        if planned is None or planned == total_steps:
            return
        # The new schedule's state at the step reached: cosine continues from the current learning
        # rate (its update is relative) down to zero at the new end; one-cycle, which is computed
        # from the step alone, follows the curve planned for the new length from there on.
        replanned = scheduler.state_dict()
        replanned.update({key: stored[key] for key in ("last_epoch", "_step_count", "_last_lr") if key in stored})
        stored.clear()
        stored.update(replanned)
        rank_zero_info(
            f"Resumed {self.hparams.scheduler} schedule re-planned from {planned} to {total_steps} steps "
            f"(the fit now runs {total_steps} optimiser steps in all; {replanned['last_epoch']} are done)."
        )
