"""ImageClassifier: the LightningModule that trains any plain nn.Module mapping images to logits.

It owns what is about training, not about the network: the loss, the metrics, the optimiser and
its schedule. The network stays a plain ``torch.nn.Module`` under ``self.net``; which of its
parameters train, and how, is project.param_groups' business, where it starts from project.finetune's.
"""

import importlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from project import finetune
from project import param_groups as groups
from project.errors import UserError
from project.schedules import WarmupCosine

STAGES = ("train", "val", "test")

#: The default ``model.optimizer``, in the form the CLI shows and saves (project.run.cli, project.tools.summary).
DEFAULT_OPTIMIZER = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
}


def default_optimizer(params) -> torch.optim.Optimizer:
    """``DEFAULT_OPTIMIZER`` built: what ``ImageClassifier`` trains with unless ``optimizer`` names another."""
    module, _, name = DEFAULT_OPTIMIZER["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(params, **DEFAULT_OPTIMIZER["init_args"])


def keyword_arguments(factory: Callable) -> dict[str, Any] | None:
    """The keyword arguments ``factory`` takes (a class, a function, or a partial such as the CLI builds from
    ``class_path`` and ``init_args``), each with the value it would get: the partial's, else its default
    (``inspect.Parameter.empty`` when it has none); a ``**kwargs`` shows as the key ``"**"``. None when it
    has no signature to read. The one signature probe of the template (the CLI and the tools use it too)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    named = {p.name: p.default for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        named["**"] = inspect.Parameter.empty
    return {**named, **(getattr(factory, "keywords", None) or {})}


def build_metrics(num_classes: int) -> dict[str, Metric]:
    """The metrics every stage logs as ``<stage>/<name>`` (and that a checkpoint may monitor): add one here."""
    metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return metrics


class NonFiniteLoss(UserError, FloatingPointError):
    """The training loss became NaN or infinite (a learning rate too high, bad data): the run stops."""


class ImageClassifier(L.LightningModule):
    """Cross-entropy classification of images with any ``net``.

    Args:
        net: a plain module mapping (N, C, H, W) images to (N, num_classes) logits; from the CLI
            give ``class_path`` and ``init_args``, e.g. ``project.models.LeNet``.
        num_classes: number of classes; the CLI links it from the data module.
        optimizer: builds the optimiser from the parameter groups: any ``torch.optim`` class (or
            one with the same call signature) by ``class_path`` and ``init_args``, e.g.
            ``{class_path: torch.optim.AdamW, init_args: {lr: 3.0e-4, weight_decay: 0.05}}``.
            Default: SGD, lr 0.05, Nesterov momentum 0.9, weight_decay 5e-4 (``DEFAULT_OPTIMIZER``).
            Its ``weight_decay`` applies to weights only, never to biases or normalisation
            parameters (any parameter with fewer than two dimensions).
        param_groups: per-layer learning rates: a list of ``{match, lr_scale, weight_decay, name}``,
            e.g. ``[{match: "fc*", lr_scale: 10}]``. ``match`` is a glob over the net's parameter
            names; the first entry that matches a parameter takes it; the group trains at the
            optimizer's lr times ``lr_scale`` (every scheduler scales each group) with its own
            ``weight_decay`` (default: the optimizer's; never on biases or norms); unmatched
            parameters train at the optimizer's lr. See :func:`group_parameters`.
        scheduler: builds the learning-rate schedule from the optimiser, by ``class_path`` too:
            any ``torch.optim.lr_scheduler`` class, or ``null`` for a constant rate. Default:
            ``project.schedules.WarmupCosine`` (optional linear warmup, then cosine to zero). An
            unset ``total_steps`` argument (WarmupCosine, OneCycleLR) is filled in with the fit's
            plan length, and a single OneCycleLR ``max_lr`` is multiplied by each group's ``lr_scale``.
        scheduler_interval: when the scheduler steps: ``step`` (every optimiser step) or ``epoch``.
            Default: ``step`` for schedulers with a ``total_steps`` argument, else ``epoch`` (torch's convention).
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
        init_from: start the net from other weights: a run directory, its ``net.pt``, a Lightning
            checkpoint, ``torchvision:<Weights>`` or ``timm:<model name>``. Every entry whose name and
            shape fit is copied; the rest (e.g. a head for another number of classes) stays freshly
            initialised, and one line names it. See :mod:`project.finetune`.
        freeze: globs over the net's parameter names (as in ``param_groups``) that do not train: left
            out of the optimiser, and their normalisation layers keep their running statistics (they are
            put in ``eval()`` at every training epoch's start). See :func:`project.param_groups.freeze`.
        batch_transform: mixes each training batch, ``(images, labels) -> (images, targets)``, e.g.
            ``torchvision.transforms.v2.CutMix`` or ``MixUp`` (their ``num_classes`` is filled in), a
            ``RandomChoice`` of both, or your own callable. The targets (soft, for those) reach the loss;
            training accuracy is measured on the batch's own labels. Validation and test are unchanged.
    """

    #: Settings a resumed fit may change: how the model runs, not what it learnt (project/run/model_contract.py).
    RESUME_MAY_CHANGE = ("compile", "channels_last", "tta_flip", "on_nonfinite_loss", "max_nonfinite_skips")

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = WarmupCosine,
        scheduler_interval: Literal["step", "epoch"] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        tta_flip: bool = False,
        compile: bool | dict[str, Any] = False,
        on_nonfinite_loss: Literal["stop", "skip"] = "stop",
        max_nonfinite_skips: int = 10,
        image_shape: tuple[int, int, int] | None = None,
        init_from: str | None = None,
        freeze: list[str] | None = None,
        batch_transform: Callable | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}.")
        if num_classes < 2:
            raise UserError(f"model.num_classes must be at least 2, got {num_classes}.")
        if max_nonfinite_skips < 0:
            raise UserError(f"model.max_nonfinite_skips must be >= 0, got {max_nonfinite_skips}.")
        if not isinstance(net, nn.Module):
            raise UserError(f"model.net must be a torch.nn.Module, got {type(net).__name__}.")
        if init_from:
            rank_zero_info(finetune.init_from(net, init_from))
        #: The normalisation layers that model.freeze froze whole, kept in eval mode while training.
        self.frozen_norms = groups.freeze(net, freeze) if freeze else []
        # Mistakes in param_groups and in the optimiser's arguments (torch checks them: lr > 0, ...) fail now, not at fit.
        groups.check_optimizer(optimizer, groups.group_parameters(net, param_groups))
        with warnings.catch_warnings():
            # From the CLI the net, optimizer and scheduler arrive as their configs (class_path +
            # init_args), which is what load_from_checkpoint needs and what a resumed fit compares;
            # built in Python they are objects, which we drop from the hyperparameters (the weights
            # are in the state_dict; a checkpoint stores no code).
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.remove_ignored_hparams(
            [key for key in ("net", "optimizer", "scheduler", "batch_transform") if callable(self.hparams.get(key))]
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        #: The scheduler's plan length (steps or epochs) that configure_optimizers filled in, if any.
        self.planned_schedule_length: int | None = None
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.num_classes = num_classes
        #: Mixes each training batch: images, labels -> images, targets (soft targets reach the loss).
        self.batch_transform = batch_transform
        for transform in [batch_transform, *getattr(batch_transform, "transforms", [])]:
            if getattr(transform, "num_classes", 0) is None:  # torchvision's MixUp/CutMix: the data's classes
                transform.num_classes = num_classes
        self.nonfinite_skips = 0
        # One torchmetrics collection per stage (state must never mix stages), all from build_metrics;
        # each is updated every step and logged (computed over the epoch and all processes) at its end.
        metrics = build_metrics(num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": MetricCollection({k: m.clone() for k, m in metrics.items()}, prefix=f"{stage}/")
                for stage in STAGES
            }
        )
        # [sum of loss x batch size, images] of this training epoch, on the training device; a plain
        # attribute, not a buffer, so DDP never broadcasts rank 0's sums over the others'.
        self._train_loss: torch.Tensor | None = None
        self._train_count = 0

    def metric_names(self, stage: str) -> list[str]:
        """The names this module logs in ``stage`` (``train``, ``val`` or ``test``): what a checkpoint
        or an early-stopping callback may monitor."""
        losses = ["train/loss_step", "train/loss_epoch", "train/loss"] if stage == "train" else [f"{stage}/loss"]
        return [*losses, *self.metrics[f"{stage}_metrics"].keys()]

    def configure_model(self) -> None:
        # Lightning calls this hook after the callbacks' setup and before the strategy wraps the
        # model; Module.compile() compiles in place, so state_dict keys stay those of the plain net.
        options = self.hparams.get("compile")
        if options and getattr(self.net, "_compiled_call_impl", None) is None:
            self.net.compile(**(options if isinstance(options, dict) else {}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = self.hparams.get("image_shape")
        if expected is not None and (images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected)):
            raise UserError(
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
        targets = labels
        if stage == "train" and self.batch_transform is not None:
            images, targets = self.batch_transform(images, labels)
        logits = self(images) if stage == "train" else self.evaluate(images)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        self.metrics[f"{stage}_metrics"].update(logits.detach(), labels)  # accuracy on the hard labels
        if stage == "train":
            # A running sum on the device: self.log every step costs more than a percent of a small net's step.
            batch_loss = loss.detach().float() * len(labels)
            self._train_loss = batch_loss if self._train_loss is None else self._train_loss.add_(batch_loss)
            self._train_count += len(labels)
        else:
            self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))
        return logits.detach() if return_logits else loss

    def _log_train_step(self, loss: torch.Tensor, batch_size: int) -> None:
        every = self.trainer.log_every_n_steps
        # Only on the steps the loggers record: the index they count in is optimiser steps, plus the batches
        # skipped for a non-finite loss (the progress bar's loss refreshes then too).
        if self.trainer.fast_dev_run or (every and (self.global_step + self.nonfinite_skips + 1) % every == 0):
            self.log("train/loss_step", loss, on_step=True, prog_bar=True, sync_dist=True, batch_size=batch_size)

    def on_train_epoch_start(self) -> None:
        self._train_loss, self._train_count = None, 0
        groups.keep_frozen_norms_in_eval(self.net, self.frozen_norms)  # Lightning has just put every module in train()

    def on_train_epoch_end(self) -> None:
        # The epoch's training loss as train/loss_epoch (also as train/loss, for callbacks), summed over
        # all processes first, so it covers the whole epoch's data; then train/acc, ... (build_metrics).
        if self._train_loss is None:
            return
        totals = torch.stack([self._train_loss, self._train_loss.new_tensor(self._train_count)])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.log("train/loss_epoch", totals[0] / totals[1], prog_bar=True)
        self.log("train/loss", totals[0] / totals[1], logger=False)
        self.log_dict(self.metrics["train_metrics"])
        self._train_loss, self._train_count = None, 0

    def _log_epoch_metrics(self, stage: str) -> None:
        # Logging the Metric objects lets torchmetrics aggregate over the epoch and across processes;
        # once per epoch, because logging them every step costs about a millisecond per step.
        self.log_dict(self.metrics[f"{stage}_metrics"], on_step=False, on_epoch=True, prog_bar=True)

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
        if self.hparams.get("on_nonfinite_loss") == "skip" and self.nonfinite_skips < self.hparams.get(
            "max_nonfinite_skips", 10
        ):
            self.nonfinite_skips += 1
            self.print(f"Skipping batch with non-finite loss at {step} ({self.nonfinite_skips} skipped so far).")
            return None  # Lightning skips backward and the optimiser step
        raise NonFiniteLoss(
            f"The training loss became {loss.item()} at {step}; the run stopped and the checkpoints written "
            "before it are intact: lower model.optimizer.lr, or set model.on_nonfinite_loss=skip to skip such batches."
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

    @property
    def example_input_array(self) -> torch.Tensor | None:
        """One image of ``image_shape`` (zeros), so Lightning's model summary shows each layer's
        input and output shapes and the FLOPs of one image. Built on each use in the dtype of the
        net's weights, which a ``bf16-true`` or ``64-true`` run converts but Lightning does not
        convert this input to; ``None`` (no shapes, no FLOPs) without ``image_shape`` and under
        ``compile``, where the summary's extra forward pass would compile for a batch of one."""
        shape = self.hparams.get("image_shape")
        if shape is None or self.hparams.get("compile"):
            return None
        dtype = next((p.dtype for p in self.net.parameters() if p.is_floating_point()), torch.get_default_dtype())
        return torch.zeros(1, *shape, dtype=dtype)

    def configure_optimizers(self):
        # model.param_groups and the base group, each split into weights (decayed) and biases/norms (never decayed).
        optimizer = self.optimizer_factory(groups.group_parameters(self.net, self.hparams.get("param_groups")))
        groups.scale_learning_rates(optimizer)
        groups.name_added_groups(optimizer, self.net)
        if self.scheduler_factory is None:
            return optimizer
        factory, options = self.scheduler_factory, {}
        arguments = keyword_arguments(factory) or {}
        planned = "total_steps" in arguments and arguments["total_steps"] is None  # to be filled in with the plan
        interval = self.hparams.get("scheduler_interval") or ("step" if "total_steps" in arguments else "epoch")
        if planned:
            options["total_steps"] = self.planned_schedule_length = self.schedule_length(interval)
        max_lr = arguments.get("max_lr")
        if isinstance(max_lr, (int, float)) and not isinstance(max_lr, bool):
            # One peak per group: OneCycleLR's max_lr scaled by each group's lr_scale, as the optimizer's lr is.
            options["max_lr"] = [max_lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
        try:
            scheduler = factory(optimizer, **options)
        except ValueError as err:  # torch's schedulers check their arguments (step_size, max_lr, ...) so
            raise UserError(f"model.scheduler refused its arguments: {err}") from err
        step_size = getattr(scheduler, "step_size", None)  # StepLR: 0 would divide by zero at its first step
        if isinstance(step_size, int) and step_size < 1:
            raise UserError(f"model.scheduler.step_size must be at least 1, got {step_size}.")
        config = {"scheduler": scheduler, "interval": interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # It steps on a metric: Lightning's own ReduceLROnPlateau names one, torch's does not.
            config["monitor"] = getattr(scheduler, "monitor", "val/loss")
        return {"optimizer": optimizer, "lr_scheduler": config}

    def schedule_length(self, interval: str) -> int:
        """The number of scheduler steps the fit plans: optimiser steps (``interval`` ``step``) or epochs."""
        trainer = self.trainer
        length = trainer.estimated_stepping_batches if interval == "step" else trainer.max_epochs
        if length is None or length < 0 or length == float("inf"):
            raise UserError(
                "model.scheduler plans its curve over the whole fit, but the fit has no end "
                "(trainer.max_epochs -1 and no trainer.max_steps): set --trainer.max_epochs or --trainer.max_steps, "
                "or give the scheduler its own total_steps, or choose model.scheduler null."
            )
        return max(1, int(length))

    def on_train_start(self) -> None:
        # A scheduler that keeps its plan in its state (OneCycleLR) has just been loaded from the checkpoint
        # of a resumed fit; a different plan now would fail mid-run (or train at a wrong rate).
        scheduler = self.lr_schedulers()
        stored = getattr(scheduler, "total_steps", None)
        if self.planned_schedule_length is not None and stored is not None and stored != self.planned_schedule_length:
            raise UserError(
                f"The resumed {type(scheduler).__name__} schedule was planned for {stored} steps, but this fit plans "
                f"{self.planned_schedule_length}: resume with the checkpoint's trainer.max_epochs/max_steps, or start a "
                "new run to change the plan (project.schedules.WarmupCosine follows a changed plan)."
            )
