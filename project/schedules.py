"""The template's learning-rate schedule: linear warmup, then cosine decay to zero, as a pure function of the step.

``warmup_cosine(step, total_steps, warmup_steps)`` is the whole schedule (as nanoGPT's ``get_lr``);
``WarmupCosine`` is the torch LRScheduler that follows it. Its plan (``total_steps``) comes from the
configuration, never from a checkpoint: a resumed fit continues from the step count alone on the
curve of the plan it runs now.
"""

import math

import torch

from project.errors import UserError


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The fraction of the peak learning rate at optimiser step ``step`` (0-based) of a ``total_steps`` plan.

    The first ``warmup_steps`` steps rise linearly to the peak (step ``i`` at ``(i + 1) / (warmup_steps + 1)``);
    then a half cosine falls from the peak at step ``warmup_steps`` towards zero, which it reaches at
    ``total_steps`` (the step after the last one). Steps beyond the plan stay at zero.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# Not SequentialLR(LinearLR, CosineAnnealingLR): loading their state_dicts brings back the checkpoint's T_max.
class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Each parameter group's learning rate times ``warmup_cosine(step, total_steps, warmup_steps)``, stepped once
    per optimiser step (ImageClassifier fills in ``total_steps`` from the Trainer's plan when it is not given).

    Its ``state_dict`` holds only the step count: loading it (resuming) puts every group's learning rate on
    this plan's curve at that step at once, and refuses a plan that ends before the steps already done.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None, warmup_steps: int = 0) -> None:
        if total_steps is None or total_steps < 1:
            raise ValueError(f"WarmupCosine needs total_steps >= 1 (the length of the plan), got {total_steps}.")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"WarmupCosine needs 0 <= warmup_steps < total_steps ({total_steps}), got {warmup_steps}.")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)

    def lrs_at(self, step: int) -> list[float]:
        """Every group's learning rate at ``step``: its initial (peak) learning rate times the schedule."""
        factor = warmup_cosine(step, self.total_steps, self.warmup_steps)
        return [base_lr * factor for base_lr in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self.lrs_at(self.last_epoch)

    def state_dict(self) -> dict:
        # The plan (total_steps, warmup_steps) and the peak rates come from the configuration.
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        done = state_dict["last_epoch"]
        if done > self.total_steps:
            raise UserError(
                f"The schedule now plans {self.total_steps} optimiser steps, but the checkpoint has done {done} "
                "already; give a longer plan (a larger --trainer.max_epochs or --trainer.max_steps) to continue it."
            )
        self.last_epoch = done
        # The optimiser's own state (loaded just before) holds the old plan's rate: the next step trains at this one.
        for group, lr in zip(self.optimizer.param_groups, self.lrs_at(done)):
            group["lr"] = lr
