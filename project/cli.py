"""The command line: LightningCLI with argument links, the run-directory policy and our defaults.

``python -m project fit -c experiments/lenet.yaml`` builds a CIFAR10DataModule, an
ImageClassifier around the configured plain net, and a Trainer whose every output (resolved
config, checkpoints, metrics.csv, net.pt, wandb files) lands in one run directory of its own.
"""

import os
import secrets
import sys
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from project import checkpoints, tracking
from project.callbacks.checkpointing import AtomicCheckpointIO
from project.callbacks import ExportNet, LastCheckpoint, PredictionPlots, ProgressBar, RandomState, SyncBuffers
from project.classifier import ImageClassifier
from project.cluster import SLURMRequeue, slurm_job_id
from project.data import CIFAR10DataModule, DatasetError

#: Set by the process that chose the run directory, so the processes Lightning launches for
#: DDP (which re-run this command line) write into the same one. Users may set it themselves.
RUN_DIR_ENV = "PROJECT_RUN_DIR"
LOGGERS_WITH_SAVE_DIR = ("CSVLogger", "WandbLogger", "TensorBoardLogger")
#: Model settings that may differ from the checkpoint when a fit resumes, and then take effect:
#: they change how the model runs, not what it has learnt or how it is optimised. Every other
#: difference is refused (see ProjectCLI.check_resume_settings).
RESUME_HONOURED = ("compile", "channels_last", "tta_flip", "on_nonfinite_loss", "max_nonfinite_skips")
#: Filled in from the data module by argument links, so never compared.
LINKED_MODEL_KEYS = ("num_classes", "net.init_args.num_classes", "image_shape")


def new_run_name() -> str:
    """A sortable, collision-free directory name: local time plus random hex."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def choose_run_dir(root: Path, name: str, explicit: str | None, resume_last: bool) -> Path:
    """Where this run writes; see the README's "Run directories" for the policy."""
    if explicit:
        return Path(explicit)
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    experiment = root / name
    sweep_run = tracking.sweep_run_name()
    if sweep_run:
        # One directory per trial, also when one SLURM job runs a `wandb agent` for many trials.
        return experiment / sweep_run
    job_id = slurm_job_id()
    if job_id and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        # Stable across requeues of the same job, so a requeued job finds its own checkpoints.
        return experiment / f"slurm-{job_id}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        if run_id == "none":
            raise ValueError(
                "Under torchrun every rank must agree on the run directory: pass torchrun --rdzv-id=<unique id> "
                f"or give --run_dir (or set {RUN_DIR_ENV})."
            )
        return experiment / f"torchrun-{run_id}"
    if resume_last:
        newest = newest_run_with_last_checkpoint(experiment)
        if newest is not None:
            return newest
    return experiment / new_run_name()


def newest_run_with_last_checkpoint(experiment: Path) -> Path | None:
    candidates = [p.parent.parent for p in experiment.glob("*/checkpoints/last*.ckpt")]
    return max(candidates, key=lambda p: (p / "checkpoints").stat().st_mtime, default=None)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written ``<run_dir>/checkpoints/*.ckpt`` (the latest training state), if any."""
    return max((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)


def resume_checkpoint_file(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """The checkpoint a fit with ``ckpt_path`` resumes from: the path itself, or for ``last`` the
    run's newest ``last*.ckpt`` (a file, or an FSDP sharded checkpoint directory)."""
    if ckpt_path == "last":
        return max(run_dir.glob("checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)
    if ckpt_path and Path(ckpt_path).exists():
        return Path(ckpt_path)
    return None


def stored_checkpoint(path: Path) -> dict:
    """A checkpoint file's contents (memory-mapped), or a sharded directory's ``meta.pt`` (its
    hyperparameters and loop state, without the tensors)."""
    if path.is_dir():
        path = path / "meta.pt"
        if not path.is_file():
            return {}
    return checkpoints.load_file(path, mmap=True)


def model_differences(stored: dict, current: dict) -> list[str]:
    """``model.<key> (checkpoint X, now Y)`` for every setting both define differently, but those
    in RESUME_HONOURED and those linked from the data module."""
    old, new = _flatten(stored), _flatten(current)
    skip = {*RESUME_HONOURED, *LINKED_MODEL_KEYS}
    return [
        f"model.{key} (checkpoint {old[key]!r}, now {new[key]!r})"
        for key in sorted(old.keys() & new.keys())
        if key not in skip and not key.startswith("_") and old[key] != new[key]
    ]


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(value) if isinstance(value, (tuple, list)) else value}


def check_devices(trainer_config) -> None:
    """Refuse more CPU processes than the machine has CPUs when Lightning would start them itself
    (each waiting for the slowest); processes started by srun or torchrun are the launcher's
    business, and Lightning itself checks GPU counts."""
    if "SLURM_NTASKS" in os.environ or "WORLD_SIZE" in os.environ:
        return
    accelerator, devices = trainer_config.get("accelerator"), trainer_config.get("devices")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    available = os.cpu_count() or 1
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices  # "4" parses as a str
    if on_cpu and isinstance(devices, int) and devices > available:
        raise ValueError(
            f"trainer.devices={devices} asks for {devices} CPU processes, but this machine has {available} CPUs; "
            f"give --trainer.devices {available} or fewer (or run on GPUs)."
        )


def run_dir_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """``<run>`` when ``ckpt_path`` is ``<run>/checkpoints/<file>.ckpt`` written by this template."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path)
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml``; a resumed run adds ``config-<time>.yaml`` beside it
    instead of failing or overwriting the original."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir
        if log_dir is not None and (Path(log_dir) / self.config_filename).exists():
            self.config_filename = f"config-{new_run_name()}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        # Called once, on global rank zero only: the loggers record the resolved config.
        tracking.log_config(trainer, pl_module, yaml.safe_load(self.parser.dump(self.config, skip_none=False)))


class ProjectCLI(LightningCLI):
    """LightningCLI for ImageClassifier + CIFAR10DataModule with one directory per run."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        kwargs.setdefault("auto_configure_optimizers", False)
        self.run_dir: Path | None = None
        #: The global step of the checkpoint a fit resumes from (read by check_resume_settings).
        self.resume_step: int | None = None
        try:
            super().__init__(ImageClassifier, CIFAR10DataModule, *args, **kwargs)
        except BaseException:
            self.remove_empty_run_dir()
            raise
        finally:
            self.forget_run_dir()  # also when a check or instantiation fails after the directory was chosen

    def remove_empty_run_dir(self) -> None:
        """A command that failed before writing anything leaves no empty run directory behind."""
        if self.run_dir is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            for directory in (self.run_dir / "checkpoints", self.run_dir):
                try:
                    directory.rmdir()  # only ever removes an empty directory
                except OSError:
                    pass

    def forget_run_dir(self) -> None:
        """Unset PROJECT_RUN_DIR if this command set it: the variable is for this command's own child
        processes only, never for a later run started from the same Python process (tests, notebooks)."""
        if os.environ.get(RUN_DIR_ENV) == str(self.run_dir) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            os.environ.pop(RUN_DIR_ENV, None)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=str | None, default=None,
                            help="Experiment name: runs go to <trainer.default_root_dir>/<name>/. "
                                 "Default: the stem of the last --config file.")
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Write into this directory instead of a new one (to resume a fit).")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": False,
            "checkpoint.filename": "best-epoch{epoch:03d}-step{step:06d}",
            "checkpoint.auto_insert_metric_name": False,
            "trainer.logger": {"class_path": "project.tracking.CSVLogger", "init_args": {"save_dir": "runs"}},
            "trainer.default_root_dir": "runs",
        })
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After fit, run test on the best checkpoint (the final weights without validation).")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(ExportNet, "export")
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_lightning_class_args(SyncBuffers, "sync_buffers")
        parser.add_lightning_class_args(PredictionPlots, "plots")
        parser.add_lightning_class_args(SLURMRequeue, "requeue")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("name") is None:
            sources = config.get("config") or []
            # Presets (experiments/presets/*.yaml: strategy, precision, compile) never name a run.
            named = [s for s in sources if Path(str(s)).parent.name != "presets"] or sources
            config.name = Path(str(named[-1])).stem if named else "run"
        explicit = config.get("run_dir")
        ckpt_path = config.get("ckpt_path")
        if self.subcommand == "fit" and explicit is None:
            explicit = run_dir_of_checkpoint(ckpt_path)
        elif self.subcommand != "fit":
            explicit = None
        check_devices(config.trainer)
        root = Path(config.trainer.default_root_dir or "runs")
        run_dir = choose_run_dir(root, config.name, explicit, resume_last=self.subcommand == "fit" and ckpt_path == "last")
        self.run_dir = run_dir.resolve()
        os.environ[RUN_DIR_ENV] = str(self.run_dir)
        if self.subcommand == "fit" and ckpt_path is None:
            # A fit into a directory that already has checkpoints (a requeued SLURM job, --run_dir)
            # continues from the latest of them.
            resume = newest_checkpoint(self.run_dir)
            if resume is not None:
                config.ckpt_path = str(resume)
                rank_zero_info(f"Resuming from {resume}")
        if self.subcommand == "fit":
            self.check_resume_settings(config)
        for group in ("checkpoint", "last_checkpoint"):
            if config[group].get("dirpath") is None:
                config[group].dirpath = str(self.run_dir / "checkpoints")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if hasattr(logger, "class_path") and logger.class_path.rsplit(".", 1)[-1] in LOGGERS_WITH_SAVE_DIR:
                if logger.class_path == "lightning.pytorch.loggers.CSVLogger":
                    logger.class_path = "project.tracking.CSVLogger"  # the same, but a resumed fit keeps metrics.csv
                logger.init_args.save_dir = str(self.run_dir)
                if logger.class_path.endswith("CSVLogger") or logger.class_path.endswith("TensorBoardLogger"):
                    # name="" and version="" make the logger write straight into the run directory.
                    logger.init_args.name = ""
                    logger.init_args.version = ""
                elif logger.class_path.endswith("WandbLogger"):
                    tracking.configure_wandb_logger(logger.init_args, self.run_dir, config.name)
        rank_zero_info(f"Run directory: {self.run_dir}")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic, fsynced writes and weights_only loads, unless a plugin chose its own I/O.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # Lightning's default progress bar redraws after every batch; ours at most twice a second.
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar and bar.refresh_rate == 1:
            trainer.callbacks[trainer.callbacks.index(bar)] = ProgressBar()
        return trainer

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, before any hook of ours; make an
        # unreadable or unsafe file a clear error instead of an unpickling traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            checkpoints.load_file(ckpt_path, mmap=True)
        if subcommand == "fit":
            # Lightning would now overwrite the model settings with the checkpoint's, silently
            # dropping overrides; check_resume_settings refuses differences instead, once the run
            # directory (for "last" and automatic resumption) is known.
            return
        given = {key: self.config.get(f"{subcommand}.model.{key}") for key in RESUME_HONOURED} if subcommand else {}
        super()._parse_ckpt_path()
        for key, value in given.items():
            if value is not None:
                self.config[f"{subcommand}.model.{key}"] = value

    def check_resume_settings(self, config) -> None:
        """Refuse a resumed fit whose model settings differ from the checkpoint's (except RESUME_HONOURED);
        note the step it resumes from, where metrics.csv continues (before_fit)."""
        path = resume_checkpoint_file(config.get("ckpt_path"), self.run_dir)
        if path is None:
            return
        checkpoint = stored_checkpoint(path)
        self.resume_step = checkpoint.get("global_step")
        stored = checkpoint.get("hyper_parameters") or {}
        differences = model_differences(stored, config.model.as_dict())
        if differences:
            raise ValueError(
                f"Resuming from {path} with model settings that differ from the checkpoint's: {'; '.join(differences)}. "
                "A resumed fit continues the checkpoint's model, optimiser state and schedule, so these would be ignored "
                "or break loading: give the checkpoint's values (or drop the overrides) to resume, or start a new run "
                "without --ckpt_path to change them."
            )

    def check_checkpoint_fits(self, ckpt_path) -> None:
        """Refuse a checkpoint of another architecture before Lightning half-loads it."""
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = checkpoints.load_file(ckpt_path, mmap=True)
        if "state_dict" not in checkpoint:
            raise checkpoints.CheckpointError(
                f"{ckpt_path} is not a Lightning checkpoint of this template (no state_dict entry); "
                "pass a .ckpt file from a run's checkpoints/ folder."
            )
        checkpoints.load_into(self.model.net, checkpoint, dry_run=True, name=str(ckpt_path))

    def before_fit(self) -> None:
        if self.resume_step is None:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, tracking.CSVLogger):
                logger.continue_at(self.resume_step)

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit"):
            return
        best = [cb.best_model_path for cb in self.trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and not isinstance(cb, LastCheckpoint) and cb.best_model_path]
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best[0] if best else None)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            self.check_checkpoint_fits(self.config_init[subcommand].get("ckpt_path"))
            super()._run_subcommand(subcommand)
        finally:
            self.forget_run_dir()
        if self.trainer.is_global_zero:
            print(f"Run directory: {self.run_dir}", file=sys.stderr)


#: Errors a user can cause by configuration or files; printed as one sentence, exit status 2.
USER_ERRORS = (DatasetError, checkpoints.CheckpointError, MisconfigurationException)


def _is_config_error(err: BaseException) -> bool:
    """True when the innermost frame validates configuration: this package's own checks, or
    Lightning's accelerator/strategy/devices checks. Those messages are written for the user."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    source = Path(tb.tb_frame.f_code.co_filename).resolve()
    return source.is_relative_to(Path(__file__).parent) or source.name == "accelerator_connector.py"


def main(args=None) -> ProjectCLI:
    """Run the CLI; user errors end with ``error: <one sentence>`` and exit status 2, SIGTERM with 143."""
    try:
        return ProjectCLI(args=args)
    except SIGTERMException:
        sys.exit(143)
    except (*USER_ERRORS, ValueError, TypeError, FloatingPointError) as err:
        if not isinstance(err, USER_ERRORS) and not _is_config_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
