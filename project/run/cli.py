"""The command line: LightningCLI with our arguments, argument links and defaults.

``python -m project fit -c experiments/lenet.yaml`` builds the configured data module
(CIFAR10DataModule unless ``data:`` names another by class_path), an ImageClassifier around the
configured plain net, and a Trainer whose every output (resolved config, checkpoints,
metrics.csv, net.pt, wandb files) lands in one run directory of its own. The run itself
(directory, lock, the checkpoint it loads, stop signals, where each file goes) is project.run.directory's
business: this module opens it once the arguments are parsed, and the loggers, callbacks and
plugins it names by default ask it where to write.
"""

import os
import signal
import sys
import warnings
from pathlib import Path

from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.callbacks import ProgressBar as AnyProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import project.models  # noqa: F401  (imported, its nets are known subclasses: --model.net ResNet20 resolves without -c)
from project.callbacks import SyncBuffers
from project.classifier import DEFAULT_OPTIMIZER
from project.errors import UserError
from project.run import checkpoints, directory, model_contract, option_checks, tracking
from project.run.callbacks import (
    EpochLines,
    ExportNet,
    LastCheckpoint,
    LeaveProcessGroup,
    PredictionPlots,
    PredictionWriter,
    ProgressBar,
    RandomState,
)
from project.run.callbacks.checkpointing import AtomicCheckpointIO, BestCheckpoint
from project.run.callbacks.config import RunConfigSaver
from project.run.callbacks.learning_rates import LearningRates
from project.run.cluster import Requeue, SLURMRequeue
from project.run.data_contract import declared
from project.run.parser import ProjectParser

# Lightning 2.6's CombinedLoader (every fit, validate and test) builds torch's LeafSpec, which torch 2.10+
# deprecates: a warning meant for Lightning's developers, printed twice on every run. Silenced there only.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    module=r"lightning\.pytorch\.utilities\._pytree",
)


def command_name() -> str:
    """What the usage line calls this command: ``imgcls`` (the console script) or ``python -m project``,
    never ``__main__.py``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name == "imgcls" else "python -m project"


class ProjectCLI(LightningCLI):
    """LightningCLI for ImageClassifier + any LightningDataModule (CIFAR-10 by default), one directory per run (project.run.directory)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("parser_kwargs", {"default_env": False, "prog": command_name()})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", ProjectParser)  # one sentence for a bad data: class
        self.run: directory.Run | None = None
        #: --ckpt_path as given (a path, `last` or `best`): the run resolves it and Lightning loads it.
        self.requested_checkpoint: str | None = None
        failed = True
        try:
            # data: may name any LightningDataModule (class_path); without one it is CIFAR10DataModule.
            super().__init__(
                LightningModule, LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs
            )
            failed = False
        finally:
            # Also when a check or instantiation fails after the directory was chosen: the lock is
            # released, folders left empty are removed, the environment forgets the directory.
            self.close_run(failed)

    def _add_instantiators(self) -> None:  # private Lightning API: see tests/test_lightning_api.py ALLOWED
        super()._add_instantiators()
        self.parser.add_instantiator(
            model_contract.ModelInstantiator(cli=self, key="model"), LightningModule, prepend=True
        )

    @property
    def run_dir(self) -> Path | None:
        return self.run.directory if self.run is not None else None

    def close_run(self, failed: bool) -> None:
        if self.run is None:
            return
        if directory.is_primary_process():
            self.run.close(failed)
            # The variable is for this command's own child processes only, never for a later run
            # started from the same Python process (tests, notebooks).
            if os.environ.get(directory.RUN_DIR_ENV) == str(self.run.directory):
                os.environ.pop(directory.RUN_DIR_ENV, None)
        else:
            self.run.close(failed=False)  # forget it; the primary process owns the directory

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="Experiment name (one folder name): runs go to <trainer.default_root_dir>/<name>/. "
            "Default: the stem of the last --config file.",
        )
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Write into this directory instead of a new one (to resume a fit).",
        )
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:03d}-step{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
                # Our loggers write into the run directory (project.run.tracking).
                "trainer.logger": {"class_path": "project.run.tracking.CSVLogger"},
                "trainer.default_root_dir": "runs",
                # The resolved config is what every logger records (RunConfigSaver.save_config); Lightning's
                # own hyperparameter logging would log parts of it again under other names. `true` adds them.
                "trainer.enable_autolog_hparams": False,
            }
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run test on the best checkpoint (the final weights without validation).",
        )
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
        # model: any LightningModule by class_path; ImageClassifier with its optimiser as --print_config and
        # config.yaml show it (and --model.optimizer.lr=... can change it) when the config names none.
        parser.set_defaults(
            {"model": {"class_path": model_contract.DEFAULT, "init_args": {"optimizer": DEFAULT_OPTIMIZER}}}
        )
        # The model is built from what the data module declares (project/run/data_contract.py), where it takes
        # these arguments (jsonargparse skips a link whose target the model's config lacks).
        for key in model_contract.LINKED:
            name = key.rpartition(".")[2]
            parser.link_arguments("data", f"model.init_args.{key}", compute_fn=declared(name), apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, tracking.short_logger_names(args))
        # Before LightningCLI seeds (numpy refuses a seed out of its range with a traceback) and
        # before anything is read or written.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        option_checks.check_seed(config.get("seed_everything"))
        option_checks.check_trainer_numbers(config.trainer)
        option_checks.check_devices(config.trainer)
        if config.get("checkpoint") is not None and config.checkpoint.get("save_last"):
            # Lightning's spelling for what last_checkpoint always does (a fresh last.ckpt): accepted, a no-op.
            config.checkpoint.save_last = None
        # --ckpt_path is the run's to resolve and check (project.run.directory) and Lightning's to load, once
        # (handed over as trainer.ckpt_path before the subcommand runs). Left in the config,
        # LightningCLI would read the file now as well, to merge its hyperparameters over the
        # user's settings (which a resumed fit would then silently ignore).
        if subcommand and config.get("ckpt_path") and not directory.lightnings_own(config.ckpt_path):
            self.requested_checkpoint, config.ckpt_path = config.ckpt_path, None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        tracking.check_wandb_loggers(config.trainer)  # before the run directory exists
        self.run = directory.Run.open(
            subcommand=self.subcommand or "",
            root=Path(config.trainer.default_root_dir or "runs"),
            name=directory.experiment_name(config),
            run_dir=config.get("run_dir"),
            ckpt_path=self.requested_checkpoint or config.get("ckpt_path"),
            scratch=bool(config.trainer.get("fast_dev_run")),
        )
        os.environ[directory.RUN_DIR_ENV] = str(self.run.directory)
        tracking.place_loggers(config.trainer, self.run.directory)
        tracking.place_profiler(config.trainer, self.run.directory)
        if self.subcommand == "fit":
            self.apply_resume_plan(config)
        elif self.run.contents is not None:
            self.evaluate_the_checkpoints_model()

    def evaluate_the_checkpoints_model(self) -> None:
        """validate/test/predict evaluate the checkpoint's model: its hyperparameters are the model
        settings, but for those it declares may change (how to run it) that the command line gives.
        (What LightningCLI does with a --ckpt_path it reads itself, from the contents the run read.)"""
        hparams = dict(self.run.contents.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        net = hparams.get("net")
        if isinstance(net, dict) and "num_classes" in (net.get("init_args") or {}):  # the link put it there
            hparams["net"] = model_contract.with_num_classes(net, net["init_args"]["num_classes"])
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        model = self.config[self.subcommand].model
        may_change = model_contract.resume_may_change(model.class_path)
        given = {key: model.init_args.get(key) for key in may_change if model.init_args.get(key) is not None}
        self.config = self.parser.parse_object({self.subcommand: {"model": hparams}}, self.config)
        for key, value in given.items():
            self.config[self.subcommand].model.init_args[key] = value

    def apply_resume_plan(self, config) -> None:
        """Say what the fit resumes from (or that it starts afresh), refusing changed model settings."""
        plan, asked = self.run.resume, self.requested_checkpoint
        if plan is None:
            if asked:
                rank_zero_info(
                    f"--ckpt_path {asked}: no checkpoint to resume in {self.run.directory}; starting from scratch."
                )
            return
        rank_zero_info(f"Resuming from {plan.checkpoint}")
        model_contract.check_resume(plan.checkpoint, plan.hyper_parameters, config.model)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            model_contract.check_net_arguments(
                self.config[self.subcommand] if self.subcommand else self.config, self.model
            )
        except ValueError as err:
            if isinstance(err, UserError):
                raise
            # A configured class (a net, a logger, a callback) rejected the values it was given.
            raise UserError(str(err)) from err
        except ModuleNotFoundError as err:
            # A configured class (a logger, a profiler) needs a package this environment lacks.
            raise UserError(f"A configured class needs a package that is not installed: {err}") from None
        except AssertionError as err:
            if "net.init_args.num_classes" not in str(err):
                raise
            # jsonargparse could not apply the data module -> model.net.init_args.num_classes link.
            net = model_contract.net_config(self.config[self.subcommand] if self.subcommand else self.config)
            raise UserError(model_contract.no_num_classes(net.class_path)) from None

    def instantiate_trainer(self, **kwargs):
        """The configured Trainer, with our defaults where the configuration leaves them open."""
        config = self.config_init[self.subcommand].trainer if self.subcommand else self.config_init.trainer
        if self.run is not None:
            # What Lightning writes by itself (profiles, hpc checkpoints) goes into the run too.
            kwargs.setdefault("default_root_dir", str(self.run.directory))
        kwargs.setdefault("plugins", self.default_plugins(config.get("plugins")))
        callbacks = tracking.as_list(config.get("callbacks"))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, AnyProgressBar) for c in callbacks):
            # Lightning's default bar redraws after every batch; ours at most twice a second; a batch job's log gets lines.
            batch_log = SLURMEnvironment.detect() and not sys.stderr.isatty()
            kwargs.setdefault("callbacks", [*callbacks, EpochLines() if batch_log else ProgressBar()])
        checkpointing = config.get("enable_checkpointing")
        if checkpointing is False:
            # Lightning refuses checkpoint callbacks with enable_checkpointing=False, and the CLI always
            # configures two (checkpoint, last_checkpoint): build the trainer with them, then drop them.
            kwargs["enable_checkpointing"] = True
        trainer = super().instantiate_trainer(**kwargs)
        if checkpointing is False:
            trainer.callbacks = [callback for callback in trainer.callbacks if not isinstance(callback, Checkpoint)]
        trainer.callbacks.append(LeaveProcessGroup())
        if self.run is not None:
            tracking.check_folders_inside(trainer, self.run.directory)
        return trainer

    def default_plugins(self, configured) -> list:
        """The configured plugins, plus atomic checkpoint writes and code-free loads unless one of
        them chose its own checkpoint I/O, plus, in a SLURM job with ``requeue.enabled``, a
        SLURMEnvironment whose auto-requeue is off (SLURMRequeue requeues instead; see project.run.cluster)."""
        plugins = tracking.as_list(configured)
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        requeue = config.get("requeue")
        if (
            isinstance(requeue, SLURMRequeue)
            and requeue.enabled
            and SLURMEnvironment.detect()
            and not any(isinstance(plugin, ClusterEnvironment) for plugin in plugins)
        ):
            plugins.append(SLURMEnvironment(auto_requeue=False, requeue_signal=requeue.signum))
        return plugins

    def load_run_checkpoint(self) -> None:
        """Say where the run writes (once); hand Lightning the checkpoint the run resolved and read, once a checkpoint of another
        architecture is refused (before Lightning half-loads it); Lightning loads the run's contents."""
        rank_zero_info(f"Run directory: {self.run_dir}")
        net = model_contract.plain_net(self.model)
        if self.run.contents is not None and net is not None:
            checkpoints.load_into(net, self.run.contents, dry_run=True, name=str(self.run.checkpoint))
        if self.run.checkpoint is not None:
            self.trainer.ckpt_path = str(self.run.checkpoint)

    before_validate = before_test = before_predict = load_run_checkpoint

    def before_fit(self) -> None:
        model_contract.check_monitor(self.trainer, self.model)
        self.load_run_checkpoint()
        # Ctrl-C saves a resume checkpoint at the next batch boundary (LastCheckpoint), like SIGTERM;
        # the requeue signal of a SLURM job is noted from here to the end of test_after_fit.
        requeue = self.config_init.fit.get("requeue")
        signums = [signal.SIGINT]
        if isinstance(requeue, SLURMRequeue) and requeue.enabled and SLURMEnvironment.detect():
            signums.append(requeue.signum)
        directory.stop_signals.install(*signums)

    def after_fit(self) -> None:
        # The fit is over and saved: Ctrl-C during the test after it stops at once (exit status 130).
        directory.stop_signals.save_on_sigint = False
        if not self.config.fit.get("test_after_fit"):
            return
        best = [
            cb.best_model_path
            for cb in self.trainer.checkpoint_callbacks
            if isinstance(cb, BestCheckpoint) and cb.best_model_path
        ]
        self.trainer.ckpt_path = best[0] if best else None  # None: the final weights
        self.trainer.test(self.model, datamodule=self.datamodule)


#: Errors a user can cause by configuration or files; printed as one sentence, exit status 2.
USER_ERRORS = (UserError, checkpoints.CheckpointError, MisconfigurationException)


def main(args=None) -> ProjectCLI:
    """Run the CLI; user errors end with ``error: <one sentence>`` and exit status 2, SIGTERM with 143,
    SIGINT (after saving) with 130."""
    directory.stop_signals.received.clear()  # a signal an earlier command of this process received is not this one's
    try:
        return ProjectCLI(args=args)
    except SIGTERMException:
        sys.exit(130 if directory.stop_signals.pending(signal.SIGINT) else 143)
    except Requeue as stop:  # the fit is torn down: now SLURM may stop the job
        sys.exit(stop.finish())
    except SystemExit as err:
        # Lightning ends a KeyboardInterrupt (a second Ctrl-C, or one outside training) with exit(1).
        if err.code == 1 and directory.stop_signals.pending(signal.SIGINT):
            sys.exit(130)
        raise
    except KeyboardInterrupt:
        # Ctrl-C outside Lightning's loops (start-up, parsing, building the classes): the run
        # directory is closed already (ProjectCLI.__init__); status 130 as a shell reports SIGINT.
        print("Interrupted (Ctrl-C).", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        sentence = directory.describe_os_error(err)
        if sentence is None:
            raise
        print(f"error: {sentence}", file=sys.stderr)
        sys.exit(2)
