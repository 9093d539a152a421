"""Trainer and seed values that Lightning or numpy would refuse late, or not at all (a ZeroDivisionError
in the middle of a fit, a ValueError after the run directory exists, a negative clipping threshold
accepted silently): checked once the command is parsed, before anything is written, one sentence each."""

import math
import os
from collections.abc import Mapping

from project.errors import UserError

#: numpy's (and so seed_everything's) seed range.
MAX_SEED = 2**32 - 1


def check_seed(seed) -> None:
    if isinstance(seed, bool) or seed is None:
        return
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed_everything must be true, false or a whole number from 0 to {MAX_SEED}, got {seed}.")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer_numbers(trainer: Mapping) -> None:
    """Refuse the trainer values below, naming the option and what it accepts."""
    accumulate = trainer.get("accumulate_grad_batches")
    if _whole(accumulate) and accumulate < 1:
        raise UserError(
            f"trainer.accumulate_grad_batches must be at least 1 (batches per optimiser step), got {accumulate}."
        )
    every = trainer.get("check_val_every_n_epoch")
    if _whole(every) and every < 1:
        raise UserError(
            f"trainer.check_val_every_n_epoch must be at least 1 (or null to validate by steps only), got {every}."
        )
    interval = trainer.get("val_check_interval")
    if interval is not None and not isinstance(interval, bool) and isinstance(interval, (int, float)):
        if (_whole(interval) and interval < 1) or (isinstance(interval, float) and not 0 < interval <= 1):
            raise UserError(
                "trainer.val_check_interval must be a whole number of batches (at least 1) or a fraction of the epoch "
                f"in (0, 1], got {interval}."
            )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not isinstance(clip, bool) and (not math.isfinite(clip) or clip < 0):
        raise UserError(f"trainer.gradient_clip_val must be a finite number >= 0 (0 or null: no clipping), got {clip}.")
    devices = trainer.get("devices")
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if _whole(devices) and devices < 1 and devices != -1:
        raise UserError(
            f"trainer.devices must be at least 1, -1 (all), auto or a list of device indices, got {devices}."
        )


def check_devices(trainer: Mapping) -> None:
    """Refuse more CPU processes than the machine has CPUs when Lightning would start them itself: Lightning
    starts any number (``--trainer.devices 4096`` forks 4096 trainers); srun's and torchrun's processes are
    the launcher's business, and Lightning itself checks GPU counts."""
    if "SLURM_NTASKS" in os.environ or "WORLD_SIZE" in os.environ:
        return
    import torch  # only here: this module is read before anything heavy is needed

    accelerator, devices = trainer.get("accelerator"), trainer.get("devices")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    available = os.cpu_count() or 1
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices  # "4" parses as a str
    if on_cpu and _whole(devices) and devices > available:
        raise UserError(
            f"trainer.devices={devices} asks for {devices} CPU processes, but this machine has {available} CPUs; "
            f"give --trainer.devices {available} or fewer (or run on GPUs)."
        )
