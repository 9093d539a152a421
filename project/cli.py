"""The command line: LightningCLI with argument links and our defaults.

``python -m project fit -c experiments/lenet.yaml`` builds the configured data module
(CIFAR10DataModule unless ``data:`` names another by class_path), an ImageClassifier around the
configured plain net, and a Trainer whose every output (resolved
config, checkpoints, metrics.csv, net.pt, wandb files) lands in one run directory of its own.
The run itself (directory, lock, resume plan, stop signals) is project.runs' business; this
module hands it the parsed configuration and hands Lightning the directory.
"""

import errno
import os
import signal
import sys
from pathlib import Path

import torch
import yaml
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from project import checkpoints, runs, tracking
from project.callbacks.checkpointing import AtomicCheckpointIO
from project.callbacks import (
    ExportNet, LastCheckpoint, PredictionPlots, PredictionWriter, ProgressBar, RandomState, SyncBuffers,
)
from project.callbacks.learning_rates import LearningRates
from project.classifier import DEFAULT_OPTIMIZER, ImageClassifier
from project.cluster import SLURMRequeue
from project.data.plugins import DataPluginParser, declared
from project.errors import UserError

LOGGERS_WITH_SAVE_DIR = ("CSVLogger", "WandbLogger", "TensorBoardLogger")
#: Model settings that may differ from the checkpoint when a fit resumes, and then take effect:
#: they change how the model runs, not what it has learnt or how it is optimised. Every other
#: difference is refused (see ProjectCLI.check_resume_settings).
RESUME_HONOURED = ("compile", "channels_last", "tta_flip", "on_nonfinite_loss", "max_nonfinite_skips")
#: Filled in from the data module by argument links, so never compared.
LINKED_MODEL_KEYS = ("num_classes", "net.init_args.num_classes", "image_shape")


def model_differences(stored: dict, current: dict) -> list[str]:
    """``model.<key> (checkpoint X, now Y)`` for every setting both define differently, but those
    in RESUME_HONOURED and those linked from the data module."""
    old, new = _flatten(stored), _flatten(current)
    skip = {*RESUME_HONOURED, *LINKED_MODEL_KEYS}
    # A key that only one side has counts where the other has its parent (a scheduler given on one side, null on the other).
    old.update({key: None for key in new.keys() - old.keys() if key.rsplit(".", 1)[0] in old})
    new.update({key: None for key in old.keys() - new.keys() if key.rsplit(".", 1)[0] in new})
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
        raise UserError(
            f"trainer.devices={devices} asks for {devices} CPU processes, but this machine has {available} CPUs; "
            f"give --trainer.devices {available} or fewer (or run on GPUs)."
        )


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml``; a resumed run adds ``config-<time>.yaml`` beside it
    instead of failing or overwriting the original. The CLI hands it the portable config: the one
    the user gave, without this run's paths, so that re-running it starts a new run."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir
        if log_dir is not None and (Path(log_dir) / self.config_filename).exists():
            self.config_filename = f"config-{runs.new_run_name()}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        # Called once, on global rank zero only: the loggers record the resolved config.
        tracking.log_config(trainer, yaml.safe_load(self.parser.dump(self.config, skip_none=False)))


def name_experiment(config) -> str:
    """``--name``, else the stem of the last --config file (presets never name a run), else ``run``."""
    if config.get("name") is None:
        sources = config.get("config") or []
        # Presets (experiments/presets/*.yaml: strategy, precision, compile) never name a run.
        named = [s for s in sources if Path(str(s)).parent.name != "presets"] or sources
        config.name = Path(str(named[-1])).stem if named else "run"
    return config.name


def experiment_dir(config) -> Path:
    return Path(config.trainer.default_root_dir or "runs") / name_experiment(config)


def portable_config(config, subcommand: str | None = "fit"):
    """The config to save and log: as the user gave it, without this run's checkpoint and
    directory, so that ``fit -c <run>/config.yaml`` starts a new run that touches nothing of this one.
    validate/test/predict keep the checkpoint they evaluate (resolved from last/best): it is what
    they report on, not where they write, and re-running their config evaluates it again."""
    portable = config.clone()
    if subcommand == "fit":
        portable.ckpt_path = None
    portable.run_dir = None
    return portable


class ProjectCLI(LightningCLI):
    """LightningCLI for ImageClassifier + any LightningDataModule (CIFAR-10 by default), one directory per run (project.runs)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", DataPluginParser)  # one sentence for a bad data: class
        self.run: runs.Run | None = None
        self.portable_config = None
        #: validate/test/predict: the --ckpt_path file's contents (memory-mapped), read once.
        self.evaluated_checkpoint: dict | None = None
        failed = True
        try:
            # data: may name any LightningDataModule (class_path); without one it is CIFAR10DataModule.
            super().__init__(ImageClassifier, LightningDataModule, *args, subclass_mode_data=True, **kwargs)
            failed = False
        finally:
            # Also when a check or instantiation fails after the directory was chosen: the lock is
            # released, folders left empty are removed, the environment forgets the directory.
            self.close_run(failed)
        if self.subcommand and self.trainer.is_global_zero:
            print(f"Run directory: {self.run_dir}", file=sys.stderr)

    @property
    def run_dir(self) -> Path | None:
        return self.run.directory if self.run is not None else None

    def close_run(self, failed: bool) -> None:
        if self.run is None:
            return
        if runs.is_primary_process():
            self.run.close(failed)
            # The variable is for this command's own child processes only, never for a later run
            # started from the same Python process (tests, notebooks).
            if os.environ.get(runs.RUN_DIR_ENV) == str(self.run.directory):
                os.environ.pop(runs.RUN_DIR_ENV, None)

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
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(SLURMRequeue, "requeue")
        # Every parameter group's lr at every step: lr-SGD/base, lr-SGD/<param_groups name>, ...
        parser.add_lightning_class_args(LearningRates, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.set_defaults({"data": {"class_path": "project.data.CIFAR10DataModule"}})
        # The optimiser as --print_config and config.yaml show it (and --model.optimizer.lr=... can change it).
        parser.set_defaults({"model.optimizer": DEFAULT_OPTIMIZER})
        # The model is built from what the data module declares (project/data/plugins.py).
        parser.link_arguments("data", "model.num_classes", compute_fn=declared("num_classes"), apply_on="instantiate")
        parser.link_arguments("data", "model.net.init_args.num_classes", compute_fn=declared("num_classes"), apply_on="instantiate")
        parser.link_arguments("data", "model.image_shape", compute_fn=declared("image_shape"), apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # PRIVATE LIGHTNING METHOD (1 of 2; tests/test_lightning_api.py::test_lightning_private_hooks_still_exist
        # fails if it goes).
        # LightningCLI calls it before any public hook to merge the checkpoint's hyperparameters into
        # the config. Overridden to (1) resolve `--ckpt_path last|best` for validate/test/predict to
        # the experiment's newest such checkpoint (Lightning would evaluate random weights), (2) make
        # a missing, unreadable or unsafe file one clear error instead of a traceback, and (3) for fit,
        # skip the merge, which would silently drop the user's overrides: the resume plan is read once
        # in project.runs and check_resume_settings refuses differences instead.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if subcommand == "fit" or not ckpt_path:
            return
        if ckpt_path in runs.NAMED_CHECKPOINTS:
            config.ckpt_path = ckpt_path = str(runs.find_named_checkpoint(experiment_dir(config), ckpt_path))
        if runs.names_a_path(ckpt_path) and runs.check_checkpoint_path(ckpt_path).is_file():
            self.evaluated_checkpoint = checkpoints.load_file(ckpt_path, mmap=True)  # checked before instantiation
        given = {key: config.model.get(key) for key in RESUME_HONOURED}
        super()._parse_ckpt_path()
        for key, value in given.items():
            if value is not None:
                self.config[subcommand].model[key] = value

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        name_experiment(config)
        check_devices(config.trainer)
        self.portable_config = portable_config(config, self.subcommand)
        self.run = runs.Run.open(
            subcommand=self.subcommand or "", root=Path(config.trainer.default_root_dir or "runs"), name=config.name,
            run_dir=config.get("run_dir"), ckpt_path=config.get("ckpt_path"),
        )
        os.environ[runs.RUN_DIR_ENV] = str(self.run.directory)
        if self.subcommand == "fit":
            self.apply_resume_plan(config)
        # This run's paths go into the objects built now, never into the saved config (portable_config).
        config.trainer.default_root_dir = str(self.run.directory)  # where everything goes, also with logger false
        for group in ("checkpoint", "last_checkpoint"):
            if config[group].get("dirpath") is None:
                config[group].dirpath = str(self.run.directory / "checkpoints")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if hasattr(logger, "class_path") and logger.class_path.rsplit(".", 1)[-1] in LOGGERS_WITH_SAVE_DIR:
                if logger.class_path == "lightning.pytorch.loggers.CSVLogger":
                    logger.class_path = "project.tracking.CSVLogger"  # the same, but a resumed fit keeps metrics.csv
                logger.init_args.save_dir = str(self.run.directory)
                if logger.class_path.endswith("CSVLogger") or logger.class_path.endswith("TensorBoardLogger"):
                    # name="" and version="" make the logger write straight into the run directory.
                    logger.init_args.name = ""
                    logger.init_args.version = ""
                elif logger.class_path.endswith("WandbLogger"):
                    tracking.configure_wandb_logger(logger.init_args, self.run.directory, config.name)

    def apply_resume_plan(self, config) -> None:
        """Point the fit at the checkpoint the run resumes from (or none), refusing changed model settings."""
        plan, asked = self.run.resume, config.get("ckpt_path")
        lightnings_own = runs.lightnings_own(asked)
        config.ckpt_path = str(plan.checkpoint) if plan is not None else asked if lightnings_own else None
        if plan is None:
            if asked and not lightnings_own:
                rank_zero_info(f"--ckpt_path {asked}: no checkpoint to resume in {self.run.directory}; starting from scratch.")
            return
        rank_zero_info(f"Resuming from {plan.checkpoint}")
        differences = model_differences(plan.hyper_parameters, config.model.as_dict())
        if differences:
            raise UserError(
                f"Resuming from {plan.checkpoint} with model settings that differ from the checkpoint's: {'; '.join(differences)}. "
                "A resumed fit continues the checkpoint's model, optimiser state and schedule, so these would be ignored "
                "or break loading: give the checkpoint's values (or drop the overrides) to resume, or start a new run "
                "without --ckpt_path to change them."
            )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            if isinstance(err, UserError):
                raise
            # A configured class (a net, a logger, a callback) rejected the values it was given.
            raise UserError(str(err)) from err

    def instantiate_trainer(self, **kwargs):
        # The resolved config is what every logger records (RunConfigSaver.save_config); Lightning's
        # own hyperparameter logging would log parts of it again under other names.
        kwargs.setdefault("enable_autolog_hparams", False)
        plugins = self.cluster_plugins()
        if plugins is not None:
            kwargs["plugins"] = plugins
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic, fsynced writes and weights_only loads, unless a plugin chose its own I/O.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in trainer.callbacks:
            if isinstance(callback, RunConfigSaver) and self.portable_config is not None:
                callback.config = self.portable_config
            if isinstance(callback, SLURMRequeue):
                callback.keep_after_fit = True  # through the test after fit; the run restores the handler
        # Lightning's default progress bar redraws after every batch; ours at most twice a second.
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar and bar.refresh_rate == 1:
            trainer.callbacks[trainer.callbacks.index(bar)] = ProgressBar()
        return trainer

    def cluster_plugins(self) -> list | None:
        """In a SLURM job with ``requeue.enabled``, a SLURMEnvironment whose auto-requeue is off:
        SLURMRequeue requeues instead (see project.cluster). ``None``: leave the plugins as configured."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        requeue = config.get("requeue")
        if not (isinstance(requeue, SLURMRequeue) and requeue.enabled and SLURMEnvironment.detect()):
            return None
        plugins = config.trainer.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if any(isinstance(plugin, ClusterEnvironment) for plugin in plugins):
            return None
        return [*plugins, SLURMEnvironment(auto_requeue=False, requeue_signal=requeue.signum)]

    def check_checkpoint_fits(self, checkpoint: dict | None, name: str) -> None:
        """Refuse a checkpoint of another architecture before Lightning half-loads it."""
        if checkpoint is None:
            return
        if "state_dict" not in checkpoint:
            raise checkpoints.CheckpointError(
                f"{name} is not a Lightning checkpoint of this template (no state_dict entry); "
                "pass a .ckpt file from a run's checkpoints/ folder."
            )
        checkpoints.load_into(self.model.net, checkpoint, dry_run=True, name=name)

    def check_evaluated_checkpoint(self) -> None:
        rank_zero_info(f"Run directory: {self.run_dir}")
        # The file _parse_ckpt_path read (and validated) before the classes were built.
        self.check_checkpoint_fits(self.evaluated_checkpoint, str(self.config_init[self.subcommand].get("ckpt_path")))

    def before_fit(self) -> None:
        rank_zero_info(f"Run directory: {self.run_dir}")
        plan = self.run.resume
        if plan is not None and plan.checkpoint.is_file():
            self.check_checkpoint_fits(plan.contents, str(plan.checkpoint))
        if plan is not None and plan.global_step is not None:
            for logger in self.trainer.loggers:
                if isinstance(logger, tracking.CSVLogger):
                    logger.continue_at(plan.global_step)
        # Ctrl-C saves a resume checkpoint at the next batch boundary (LastCheckpoint), like SIGTERM;
        # the requeue signal of a SLURM job is noted from here to the end of test_after_fit.
        requeue = self.config_init.fit.get("requeue")
        signums = [signal.SIGINT]
        if isinstance(requeue, SLURMRequeue) and requeue.enabled and SLURMEnvironment.detect():
            signums.append(requeue.signum)
        runs.stop_signals.install(*signums)

    before_validate = before_test = before_predict = check_evaluated_checkpoint

    def after_fit(self) -> None:
        # The fit is over and saved: Ctrl-C during the test after it stops at once (exit status 130).
        runs.stop_signals.save_on_sigint = False
        if not self.config.fit.get("test_after_fit"):
            return
        best = [cb.best_model_path for cb in self.trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and not isinstance(cb, LastCheckpoint) and cb.best_model_path]
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best[0] if best else None)


#: Errors a user can cause by configuration or files; printed as one sentence, exit status 2.
USER_ERRORS = (UserError, checkpoints.CheckpointError, MisconfigurationException)
#: OSErrors about a named path or the disk: the user's to fix (a full disk, a read-only folder,
#: a file where a folder should be), so one sentence too. Any other OSError keeps its traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                  errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}


def describe_os_error(err: OSError) -> str:
    if err.errno in DISK_FULL:
        # A failed write() names no file; only open() and the like do.
        writing = f"while writing {err.filename}" if err.filename else "while writing the run's files"
        return (f"No space left on the device {writing}; free some space (or choose another "
                "--trainer.default_root_dir) and run again: checkpoints written before are intact.")
    if err.errno == errno.EEXIST:
        return f"{err.filename} exists but is not a directory; remove it or choose another path."
    if err.errno == errno.ENOTDIR:
        return f"A part of {err.filename} is a file, not a directory; remove it or choose another path."
    if err.errno == errno.EISDIR:
        return f"{err.filename} is a directory where a file is needed; remove it or choose another path."
    return f"{err.strerror}: {err.filename}; check that path (and its permissions), or choose another one."


def main(args=None) -> ProjectCLI:
    """Run the CLI; user errors end with ``error: <one sentence>`` and exit status 2, SIGTERM with 143,
    SIGINT (after saving) with 130."""
    runs.stop_signals.received.clear()  # a signal an earlier command of this process received is not this one's
    try:
        return ProjectCLI(args=args)
    except SIGTERMException:
        sys.exit(130 if runs.stop_signals.pending(signal.SIGINT) else 143)
    except SystemExit as err:
        # Lightning ends a KeyboardInterrupt (a second Ctrl-C, or one outside training) with exit(1).
        if err.code == 1 and runs.stop_signals.pending(signal.SIGINT):
            sys.exit(130)
        raise
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in USER_OS_ERRORS or (err.filename is None and err.errno not in DISK_FULL):
            raise
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(2)
