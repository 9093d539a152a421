"""Experiment tracking with wandb: run names and ids tied to run directories, and the logged config.

- A run's wandb name is ``<experiment>/<run dir name>``, so the web page and the folder match.
- A fit that continues in a run directory (a requeued SLURM job, ``--run_dir``) continues the
  wandb run found there instead of starting a new one.
- A trial started by ``wandb agent`` (which sets ``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID``) gets the
  run directory ``<root>/<experiment>/sweep-<sweep id>-<run id>``.
- The resolved LightningCLI config is what every logger records as hyperparameters (the wandb
  run's config, ``hparams.yaml``), with the dotted names of the command line and the sweep files
  (``model.lr``, ``data.batch_size``, ...).
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import lightning.pytorch.loggers

#: ``wandb/run-20250101_120000-<id>`` (online) or ``wandb/offline-run-...-<id>`` (offline).
_RUN_FOLDER = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-([a-z0-9]+)$")


class WandbSetupError(ValueError):
    """wandb cannot start a run (no API key, for example); the message says what to do."""


class WandbLogger(lightning.pytorch.loggers.WandbLogger):
    """Lightning's WandbLogger; when wandb cannot start a run, one sentence saying what to do instead."""

    @property
    def experiment(self):
        try:
            return super().experiment
        except Exception as err:
            if type(err).__name__ != "UsageError" or not type(err).__module__.startswith("wandb"):
                raise
            raise WandbSetupError(
                f"wandb could not start a run ({err}): log in with `wandb login`, or set WANDB_MODE=offline "
                "to keep the run in the run directory and upload it later with `wandb sync`."
            ) from None


def sweep_run_name() -> str | None:
    """``sweep-<sweep id>-<run id>`` inside a trial started by ``wandb agent``, else ``None``."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run and re.fullmatch(r"[\w-]+", sweep + run):
        return f"sweep-{sweep}-{run}"
    return None


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest wandb run that logged into ``run_dir``, if any."""
    folders = [p for p in (Path(run_dir) / "wandb").glob("*run-*") if p.is_dir() and _RUN_FOLDER.match(p.name)]
    newest = max(folders, key=lambda p: p.name.split("run-", 1)[1], default=None)
    return _RUN_FOLDER.match(newest.name).group(1) if newest else None


def configure_wandb_logger(init_args: Any, run_dir: Path, experiment: str) -> None:
    """Fill in a WandbLogger's name, id and (under ``wandb agent``) project; ``init_args`` is changed in place."""
    if init_args.get("name") is None:
        init_args.name = f"{experiment}/{run_dir.name}"
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_PROJECT"):
        init_args.project = os.environ["WANDB_PROJECT"]  # a sweep's runs must log into the sweep's project
    if init_args.get("id") is None and init_args.get("version") is None and not os.environ.get("WANDB_RUN_ID"):
        init_args.id = wandb_run_id(run_dir)


def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lr": 0.1}}`` -> ``{"model.lr": 0.1}``; lists and other values are kept whole."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def log_config(trainer: L.Trainer, pl_module: L.LightningModule, config: Mapping) -> None:
    """Log ``config`` (flattened) as every logger's hyperparameters, instead of Lightning's default.

    Lightning would log the model's and the data module's ``hparams`` (a part of the config, under
    other names) at the start of every fit, validate and test; the resolved config replaces them.
    """
    flat = flatten(config)
    for logger in trainer.loggers:
        logger.log_hyperparams(flat)
    for owner in (pl_module, trainer.datamodule):
        if owner is not None:
            owner._log_hyperparams = False
