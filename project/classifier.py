"""ImageClassifier: the LightningModule that trains any plain nn.Module mapping images to logits.

It owns what is about training, not about the network: the loss, the metrics, the optimiser and
its schedule. The network stays a plain ``torch.nn.Module`` under ``self.net``.
"""

import fnmatch
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from project.errors import UserError
from project.schedules import WarmupCosine
from project.state_dicts import clean_name

EVAL_STAGES = ("val", "test")
#: The keys of one ``model.param_groups`` entry.
PARAM_GROUP_KEYS = ("match", "lr_scale", "weight_decay", "name")
#: The name of the group of parameters that no ``param_groups`` entry matches (they train at the optimizer's lr).
BASE_GROUP = "base"


def _check_param_group_specs(specs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``model.param_groups`` entries with their defaults filled in; a mistake raises a one-sentence UserError."""
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise UserError(f"model.param_groups must be a list such as [{{match: 'fc*', lr_scale: 10}}], got {specs!r}.")
    checked, names = [], {BASE_GROUP}
    for i, spec in enumerate(specs):
        where = f"model.param_groups[{i}]"
        if not isinstance(spec, Mapping):
            raise UserError(f"{where} must be a mapping such as {{match: 'fc*', lr_scale: 10}}, got {spec!r}.")
        unknown = sorted(set(spec) - set(PARAM_GROUP_KEYS))
        if unknown:
            raise UserError(f"{where} has the unknown key {unknown[0]!r}; the keys are {', '.join(PARAM_GROUP_KEYS)}.")
        match = spec.get("match")
        if not isinstance(match, str) or not match:
            raise UserError(
                f"{where} needs match: a glob over parameter names such as 'fc*' or 'stages.0.*', got {match!r}."
            )
        lr_scale = spec.get("lr_scale", 1.0)
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise UserError(
                f"{where} (match {match!r}) needs lr_scale > 0 (the group's lr is the optimizer's lr times it), got {lr_scale!r}."
            )
        decay = spec.get("weight_decay")
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0):
            raise UserError(f"{where} (match {match!r}) needs weight_decay >= 0, got {decay!r}.")
        name = str(spec.get("name", match))
        if name in names:
            raise UserError(
                f"{where} is named {name!r} like another group ({BASE_GROUP!r} is taken too); set its name key to a unique one."
            )
        names.add(name)
        checked.append({"match": match, "lr_scale": float(lr_scale), "weight_decay": decay, "name": name})
    return checked


def group_parameters(net: nn.Module, param_groups: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The optimiser's parameter groups for ``net``: what ``ImageClassifier`` hands ``model.optimizer``.

    Each trainable parameter goes to the first ``param_groups`` entry whose ``match`` (a glob over
    ``net.named_parameters()`` names, e.g. ``fc*``) it matches, or else to the ``base`` group.
    Every entry makes up to two groups: ``<name>`` with its weights, with its ``weight_decay`` if it
    gives one (else the optimiser's), and ``<name>/no_decay`` with its biases and normalisation
    parameters (fewer than two dimensions), never decayed (``weight_decay`` 0). Empty groups are left
    out. Each group carries ``name`` (LearningRateMonitor's column: ``lr-<Optimizer>/<name>``),
    ``lr_scale`` (its lr is the optimiser's times it: see :func:`scale_learning_rates`), ``params``
    and ``param_names``.
    """
    specs = _check_param_group_specs(param_groups or [])
    base = {"match": None, "lr_scale": 1.0, "weight_decay": None, "name": BASE_GROUP}
    buckets: list[tuple[list, list]] = [([], []) for _ in range(len(specs) + 1)]
    for raw_name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        name = clean_name(raw_name)  # without the names wrappers insert (FSDP units, activation checkpointing)
        index = next((i for i, spec in enumerate(specs) if fnmatch.fnmatchcase(name, spec["match"])), len(specs))
        buckets[index][0 if param.ndim >= 2 else 1].append((name, param))
    for spec, (decay, no_decay) in zip(specs, buckets):
        if not decay and not no_decay:
            names = [n for n, p in net.named_parameters() if p.requires_grad]
            example = f"{names[0]}, {names[-1]}" if names else "none: no trainable parameters"
            raise UserError(
                f"model.param_groups entry {spec['name']!r} (match {spec['match']!r}) matches no trainable parameter of "
                f"{type(net).__name__} that an earlier entry has not taken (the names look like {example}; "
                "python -m project summary --internals lists them all): fix the pattern or drop the entry."
            )
    groups = []
    for spec, (decay, no_decay) in zip([*specs, base], buckets):
        for members, decay_value, suffix in ((decay, spec["weight_decay"], ""), (no_decay, 0.0, "/no_decay")):
            if members:
                group = {
                    "name": spec["name"] + suffix,
                    "params": [p for _, p in members],
                    "param_names": [n for n, _ in members],
                    "lr_scale": spec["lr_scale"],
                }
                if decay_value is not None:
                    group["weight_decay"] = float(decay_value)
                groups.append(group)
    return groups


def scale_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Set each group's lr to the optimiser's configured lr times the group's ``lr_scale``, once, right after
    the optimiser is built (before a scheduler records the groups' initial rates)."""
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    if all(scale == 1.0 for scale in scales):
        return
    if "lr" not in optimizer.defaults:
        raise UserError(
            f"model.param_groups sets lr_scale, but the optimizer {type(optimizer).__name__} has no lr argument to scale; "
            "drop lr_scale or use an optimizer with one."
        )
    for group, scale in zip(optimizer.param_groups, scales):
        group["lr"] = optimizer.defaults["lr"] * scale


def _unset_argument(factory: Callable, name: str) -> bool:
    """Whether ``factory`` (a class, or a partial such as the CLI builds from ``class_path`` and ``init_args``)
    takes the keyword ``name`` and has been given no value for it (``None``)."""
    keywords = getattr(factory, "keywords", None) or {}
    if name in keywords:
        return keywords[name] is None
    try:
        parameter = inspect.signature(factory).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is None


def default_optimizer(params) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum: the recipe ``ImageClassifier`` trains with unless ``optimizer`` names another."""
    return torch.optim.SGD(params, **DEFAULT_OPTIMIZER["init_args"])


#: The default ``model.optimizer``: the CLI shows and saves it in this form (project.run.cli).
DEFAULT_OPTIMIZER = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
}


def check_optimizer(optimizer: Callable, groups: list[dict[str, Any]]) -> None:
    """Build the optimiser once, so that a mistake in its arguments (torch checks them) or a learning rate
    that cannot train stops the command with one sentence naming the option, before anything runs."""
    try:
        built = optimizer(groups)
    except (ValueError, TypeError) as err:
        raise UserError(f"model.optimizer refused its arguments: {err}") from None
    lr = built.defaults.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
        raise UserError(f"model.optimizer.lr must be > 0, got {lr}.")
    # torch refuses only negative ones; 1 or more makes the step grow instead of average.
    for key in ("momentum", "betas"):
        values = built.defaults.get(key)
        values = values if isinstance(values, (tuple, list)) else [values]
        if any(isinstance(v, (int, float)) and not 0 <= v < 1 for v in values):
            raise UserError(f"model.optimizer.{key} must be in [0, 1), got {built.defaults[key]}.")
    scale_learning_rates(built)


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
    """

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
        # Mistakes in param_groups and in the optimiser's arguments (torch checks them: lr > 0, ...) fail now, not at fit.
        check_optimizer(optimizer, group_parameters(net, param_groups))
        with warnings.catch_warnings():
            # From the CLI the net, optimizer and scheduler arrive as their configs (class_path +
            # init_args), which is what load_from_checkpoint needs and what a resumed fit compares;
            # built in Python they are objects, which we drop from the hyperparameters (the weights
            # are in the state_dict; a checkpoint stores no code).
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.remove_ignored_hparams(
            [key for key in ("net", "optimizer", "scheduler") if callable(self.hparams.get(key))]
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        #: The scheduler's plan length (steps or epochs) that configure_optimizers filled in, if any.
        self.planned_schedule_length: int | None = None
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
            {
                f"{stage}_metrics": MetricCollection({k: m.clone() for k, m in topk.items()}, prefix=f"{stage}/")
                for stage in EVAL_STAGES
            }
        )
        self.train_topk = 5 if num_classes > 5 else 1
        # [sum of loss x batch size, top-1 hits, top-k hits] of this epoch, on the training device;
        # a plain attribute, not a buffer, so DDP never broadcasts rank 0's sums over the others'.
        self._train_sums: torch.Tensor | None = None
        self._train_count = 0

    def metric_names(self, stage: str) -> list[str]:
        """The names this module logs in ``stage`` (``train``, ``val`` or ``test``): what a checkpoint
        or an early-stopping callback may monitor."""
        if stage == "train":
            topk = [f"train/acc_top{self.train_topk}"] if self.train_topk > 1 else []
            return ["train/loss_step", "train/loss_epoch", "train/loss", "train/acc", *topk]
        return [f"{stage}/loss", *self.metrics[f"{stage}_metrics"].keys()]

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
        logits = self(images) if stage == "train" else self.evaluate(images)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        if stage == "train":
            self._accumulate_train(loss.detach(), logits.detach(), labels)
        else:
            self.metrics[f"{stage}_metrics"].update(logits.detach(), labels)
            self.log(
                f"{stage}/loss",
                loss,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                sync_dist=True,
                batch_size=len(labels),
            )
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
            self.log(
                "train/loss_step",
                loss,
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                sync_dist=True,
                batch_size=batch_size,
            )

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

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The groups handed to ``optimizer``: ``model.param_groups`` and the base group, each split into weights
        (decayed) and biases/normalisation parameters (ndim < 2, never decayed); see :func:`group_parameters`."""
        return group_parameters(self.net, self.hparams.get("param_groups"))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        scale_learning_rates(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        factory, options = self.scheduler_factory, {}
        planned = _unset_argument(factory, "total_steps")
        interval = self.hparams.get("scheduler_interval") or (
            "step" if planned or _takes(factory, "total_steps") else "epoch"
        )
        if planned:
            options["total_steps"] = self.planned_schedule_length = self.schedule_length(interval)
        max_lr = getattr(factory, "keywords", {}).get("max_lr")
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


def _takes(factory: Callable, name: str) -> bool:
    """Whether ``factory`` has been given, or accepts, the keyword ``name``."""
    if name in (getattr(factory, "keywords", None) or {}):
        return True
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
