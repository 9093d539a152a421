"""Experiment tracking: run names and ids tied to run directories, the logged config, and a CSV log
that a resumed fit continues.

- ``metrics.csv`` survives a resumed fit (``--ckpt_path last``, a requeued SLURM job): the new rows
  are appended, and the training and validation rows that the interrupted run logged after its
  checkpoint are dropped (the resumed fit logs them again; test rows stay).

- A run's wandb name is ``<experiment>/<run dir name>``, so the web page and the folder match.
- A fit that continues in a run directory (a requeued SLURM job, ``--run_dir``) continues the
  wandb run found there instead of starting a new one.
- A trial started by ``wandb agent`` (which sets ``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID``) gets the
  run directory ``<root>/<experiment>/sweep-<sweep id>-<run id>``.
- The resolved LightningCLI config is what every logger records as hyperparameters (the wandb
  run's config, ``hparams.yaml``), with the dotted names of the command line and the sweep files
  (``model.optimizer.init_args.lr``, ``data.batch_size``, ...).
"""

import importlib
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import lightning.pytorch.loggers
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from project.classifier import keyword_arguments
from project.errors import UserError
from project.run import directory
from project.run.config_files import flatten

#: ``wandb/run-20250101_120000-<id>`` (online) or ``wandb/offline-run-...-<id>`` (offline).
_RUN_FOLDER = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-([a-z0-9]+)$")


# Not Lightning's writer as it is: its ExperimentWriter deletes an existing metrics.csv, so a resumed fit lost rows.
class ContinuingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted:
    by a resumed fit, and by every new writer of the same run (under ``ddp_spawn`` the test after
    fit logs through a fresh copy of the logger, whose writer once deleted the fit's rows).

    ``continue_at``: the step a resumed fit starts from; rows the interrupted run logged from that
    step on (after its checkpoint) are dropped, since the fit logs them again (test rows stay).
    """

    def __init__(self, log_dir: str, continue_at: int | None = None) -> None:
        path = Path(log_dir) / self.NAME_METRICS_FILE
        kept = path.with_name(path.name + ".continued")
        keys: list[str] = []
        if path.is_file():
            directory.own(path)  # the run's own metrics.csv, continued by every writer of the run
            keys = directory.keep_metrics_before(path, continue_at)
            os.replace(path, kept)  # out of the way of Lightning's writer, which deletes an existing file
        with warnings.catch_warnings():
            # "...exists and is not empty. Previous log files ... will be deleted": not here, see above.
            warnings.filterwarnings("ignore", message=".*exists and is not empty")
            super().__init__(log_dir)
        if kept.is_file():
            os.replace(kept, path)
            self.metrics_keys = keys  # new rows are appended under the same header


class CSVLogger(lightning.pytorch.loggers.CSVLogger):
    """Lightning's CSVLogger that writes ``metrics.csv`` and ``hparams.yaml`` straight into the run
    directory (``save_dir``, default ``.``, is relative to it and stays inside it), and whose
    ``metrics.csv`` a resumed fit continues (see ContinuingExperimentWriter). Local paths only."""

    def __init__(self, save_dir: str = ".", name: str = "", version: int | str | None = "", **kwargs) -> None:
        run = directory.current()
        super().__init__(
            directory.path_in_run(save_dir, "trainer.logger.save_dir") or ".", name=name, version=version, **kwargs
        )
        plan = run.resume if run is not None else None
        self.resume_step: int | None = plan.global_step if plan is not None else None
        self.writer: ContinuingExperimentWriter | None = None

    def continue_at(self, step: int) -> None:
        """The fit resumes at ``step``: earlier rows stay, later ones are replaced by the new ones."""
        if self.writer is not None:
            raise RuntimeError("continue_at must be called before the logger writes anything.")
        self.resume_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuingExperimentWriter:
        if self.writer is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self.writer = ContinuingExperimentWriter(self.log_dir, continue_at=self.resume_step)
        return self.writer


class WandbSetupError(UserError):
    """wandb cannot start a run (no API key, for example); the message says what to do."""


class WandbLogger(lightning.pytorch.loggers.WandbLogger):
    """Lightning's WandbLogger that keeps its files in the run directory (``save_dir``, relative to
    it), is named ``<experiment>/<run dir name>``, continues the wandb run found in the run
    directory, joins a sweep's project; when wandb cannot start a run, one sentence saying what to do."""

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | None = None,
        version: str | None = None,
        id: str | None = None,
        project: str | None = None,
        **kwargs,
    ) -> None:
        check_wandb_api_key(offline=bool(kwargs.get("offline")))
        run = directory.current()
        version = version or None  # "" when jsonargparse carries it over from a CSVLogger config: no id
        if run is not None:
            name, id, project = wandb_identity(run.directory, run.name, name, id or version, project)
        save_dir = directory.path_in_run(save_dir, "trainer.logger.save_dir")
        super().__init__(name=name, save_dir=str(save_dir or "."), version=version, id=id, project=project, **kwargs)

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


sweep_run_name = directory.sweep_run_name


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest wandb run that logged into ``run_dir``, if any."""
    folders = [p for p in (Path(run_dir) / "wandb").glob("*run-*") if p.is_dir() and _RUN_FOLDER.match(p.name)]
    newest = max(folders, key=lambda p: p.name.split("run-", 1)[1], default=None)
    return _RUN_FOLDER.match(newest.name).group(1) if newest else None


#: A wandb API key: 40 or more letters, digits and underscores, optionally after an on-prem ``<prefix>-``;
#: or a JWT (three base64url parts). The format wandb itself checks (wandb.sdk.lib.wbauth.validation).
_API_KEY = re.compile(r"(?:\w*-)?[\w-]{40,}|[\w-]+\.[\w-]+\.[\w-]+", re.ASCII)


def check_wandb_api_key(offline: bool = False) -> None:
    """Refuse a malformed ``WANDB_API_KEY`` before any network call: an online run would otherwise try to
    log in with it for about 100 s and end in a traceback. The key itself is never printed."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    key = os.environ.get("WANDB_API_KEY")
    if offline or mode in ("offline", "dryrun", "disabled") or key is None:
        return
    if not _API_KEY.fullmatch(key):
        problem = (
            "surrounded by whitespace"
            if key != key.strip()
            else (f"{len(key)} characters long" if len(key) < 40 else "not made of letters, digits and underscores")
        )
        raise WandbSetupError(
            f"WANDB_API_KEY is not a wandb API key ({problem}; a key has 40 or more letters, digits and underscores): "
            "copy it again from https://wandb.ai/authorize, or set WANDB_MODE=offline to log without an account."
        )


def wandb_identity(run_dir: Path, experiment: str, name: str | None, id: str | None, project: str | None) -> tuple:
    """The wandb run's ``(name, id, project)`` for ``run_dir``: the name ``<experiment>/<run dir name>``,
    the id of the wandb run found there (to continue it), under ``wandb agent`` the sweep's project."""
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_PROJECT"):
        project = os.environ["WANDB_PROJECT"]  # a sweep's runs must log into the sweep's project
    if id is None and not os.environ.get("WANDB_RUN_ID"):
        id = wandb_run_id(run_dir)
    return name or f"{experiment}/{run_dir.name}", id, project


def log_config(trainer: L.Trainer, config: Mapping) -> None:
    """Log ``config`` (flattened) as every logger's hyperparameters. The CLI switches Lightning's
    own hyperparameter logging off (``Trainer(enable_autolog_hparams=False)``), which would log the
    model's and the data module's ``hparams`` (parts of the config, under other names) instead."""
    flat = flatten(config)
    for logger in trainer.loggers:
        logger.log_hyperparams(flat)


def check_folders_inside(trainer, run_dir: Path) -> None:
    """Refuse, before anything is written, a logger, callback or profiler whose folder (Lightning's names for it:
    ``save_dir``, ``dirpath``, ``output_dir``) lies outside the run directory; the files themselves meet the one
    rule of project.run.directory.check_write as they are written."""
    for part in [*trainer.loggers, *trainer.callbacks, trainer.profiler]:
        for name in ("save_dir", "dirpath", "output_dir"):
            folder = getattr(part, name, None)
            if isinstance(folder, str | Path) and not Path(folder).resolve().is_relative_to(run_dir):
                raise UserError(
                    f"{type(part).__name__}'s {name} {folder} lies outside the run directory {run_dir}; every file a "
                    "run writes stays inside its own directory: give a path relative to it (or leave it empty)."
                )


def place_loggers(trainer_config, run_dir: Path) -> None:
    """Lightning's own loggers (TensorBoardLogger, CSVLogger, WandbLogger, MLFlowLogger, ...) write into the
    run directory: a save_dir left empty or relative is taken relative to it (ours do that themselves);
    the ``""`` name and version carried over from our CSVLogger's defaults give way to the class's own."""
    for logger in as_list(trainer_config.get("logger")):
        class_path = str(getattr(logger, "class_path", "") or "")
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if not class_path or class_path.startswith("project.run.tracking.") or init is None:
            continue
        module, _, name = class_path.rpartition(".")
        try:
            parameters = keyword_arguments(getattr(importlib.import_module(module), name)) or {}
        except (ImportError, AttributeError):
            continue  # instantiation says what is wrong with it
        for key in ("name", "version"):
            if init.get(key) == "" and key in parameters and parameters[key] is not inspect.Parameter.empty:
                init[key] = parameters[key]
        if "save_dir" in parameters:
            given = init.get("save_dir")
            default = parameters["save_dir"]
            value = given if given is not None else (default if isinstance(default, str) else ".")
            init["save_dir"] = str(run_dir / value)  # an absolute path stays as it is
        uri = init.get("tracking_uri")
        if isinstance(uri, str) and uri.startswith("file:") and not uri.startswith("file:/"):
            init["tracking_uri"] = f"file:{run_dir / uri[len('file:') :]}"


def place_profiler(trainer_config, run_dir: Path) -> None:
    """A profiler's relative ``dirpath`` is relative to the run directory, as every other path of a run."""
    profiler = trainer_config.get("profiler")
    init = profiler.get("init_args") if hasattr(profiler, "get") else None
    dirpath = init.get("dirpath") if init is not None else None
    if isinstance(dirpath, str) and not Path(dirpath).is_absolute():
        init["dirpath"] = str(run_dir / dirpath)


def portable_logger_paths(config, run_dir: Path) -> None:
    """The loggers' save_dir and the profiler's dirpath in a saved config as the user gave them, relative to
    the run directory (the run filled its own directory in), so that re-running the config writes into a new run."""
    trainer = config.get("trainer") if hasattr(config, "get") else None
    if not hasattr(trainer, "get"):
        return
    for place, key in [
        *((logger, "save_dir") for logger in as_list(trainer.get("logger"))),
        (trainer.get("profiler"), "dirpath"),
    ]:
        init = place.get("init_args") if hasattr(place, "get") else None
        path = init.get(key) if init is not None else None
        if isinstance(path, str) and Path(path).is_absolute() and Path(path).is_relative_to(run_dir):
            init[key] = os.path.relpath(path, run_dir)


#: Short logger names that Lightning and project.run.tracking both define (jsonargparse refuses an ambiguous
#: short name, and says nothing of why): ours, Lightning's class that keeps the run's files in the run.
SHORT_LOGGER_NAMES = {name: f"project.run.tracking.{name}" for name in ("CSVLogger", "WandbLogger")}


def logger_argument(value: str) -> str:
    """``CSVLogger`` as ours; a Lightning logger by name alone with its own ``save_dir`` default spelled out,
    ``.`` (the run directory, see place_loggers) where it has none: else jsonargparse would keep the ``.`` of
    the CSVLogger it replaces (MLflow's ``./mlruns`` lost), or refuse a required save_dir as missing."""
    if value in SHORT_LOGGER_NAMES:
        return SHORT_LOGGER_NAMES[value]
    name = value.rpartition(".")[2]
    parameters = keyword_arguments(getattr(lightning.pytorch.loggers, name, None)) or {}
    if value in (name, f"lightning.pytorch.loggers.{name}") and "save_dir" in parameters:
        default = parameters["save_dir"]
        save_dir = "." if default is inspect.Parameter.empty else default
        return json.dumps({"class_path": f"lightning.pytorch.loggers.{name}", "init_args": {"save_dir": save_dir}})
    return value


def short_logger_names(args):
    """``--trainer.logger[+]=NAME`` (or ``--trainer.logger NAME``) through :func:`logger_argument`; the
    arguments as given when none changes (LightningCLI warns about args given beside sys.argv)."""
    given = sys.argv[1:] if args is None else args
    if not isinstance(given, list):
        return args
    out, previous = [], None
    for arg in given:
        if isinstance(arg, str):
            option, eq, value = arg.partition("=")
            if eq and option.rstrip("+") == "--trainer.logger":
                arg = f"{option}={logger_argument(value)}"
            elif previous in ("--trainer.logger", "--trainer.logger+"):
                arg = logger_argument(arg)
        out.append(arg)
        previous = arg
    return args if out == given else out


def as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def check_wandb_loggers(trainer_config) -> None:
    """The API key of every WandbLogger configured online, before anything is written (see check_wandb_api_key)."""
    for logger in as_list(trainer_config.get("logger")):
        if str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
            check_wandb_api_key(offline=bool((logger.get("init_args") or {}).get("offline")))
