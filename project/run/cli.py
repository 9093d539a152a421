"""The command line: LightningCLI with our arguments, argument links and defaults.

``python -m project fit -c experiments/lenet.yaml`` builds the configured data module
(CIFAR10DataModule unless ``data:`` names another by class_path), an ImageClassifier around the
configured plain net, and a Trainer whose every output (resolved config, checkpoints,
metrics.csv, net.pt, wandb files) lands in one run directory of its own. The run itself
(directory, lock, the checkpoint it loads, stop signals, where each file goes) is project.run.directory's
business: this module opens it once the arguments are parsed, and the loggers, callbacks and
plugins it names by default ask it where to write.
"""

import errno
import importlib
import inspect
import json
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import lightning.pytorch.loggers
import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.callbacks import ProgressBar as AnyProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback, _InstantiatorFn
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import project.models  # noqa: F401  (imported, its nets are known subclasses: --model.net ResNet20 resolves without -c)
from project.callbacks import SyncBuffers
from project.classifier import DEFAULT_OPTIMIZER, keyword_arguments
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
from project.run.callbacks.learning_rates import LearningRates
from project.run.cluster import Requeue, SLURMRequeue
from project.run.data_contract import DataPluginParser, declared

# Lightning 2.6's CombinedLoader (every fit, validate and test) builds torch's LeafSpec, which torch 2.10+
# deprecates: a warning meant for Lightning's developers, printed twice on every run. Silenced there only.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    module=r"lightning\.pytorch\.utilities\._pytree",
)


def model_differences(stored: dict, model) -> list[str]:
    """``model.<key> (checkpoint X, now Y)`` for every setting both define differently, but those the model
    declares may change on resume and those linked from the data module (project.run.model_contract)."""
    if stored.get("_class_path", model.class_path) != model.class_path:
        return [f"model.class_path (checkpoint {stored['_class_path']!r}, now {model.class_path!r})"]
    old, new = tracking.flatten(stored), tracking.flatten(model.init_args.as_dict())
    skip = {
        *model_contract.resume_may_change(model.class_path),
        *(k.replace("init_args.", "") for k in model_contract.LINKED),
    }
    # A key that only one side has counts where the other has its parent (a scheduler given on one side, null on the other).
    old.update({key: None for key in new.keys() - old.keys() if key.rsplit(".", 1)[0] in old})
    new.update({key: None for key in old.keys() - new.keys() if key.rsplit(".", 1)[0] in new})
    return [
        f"model.{key} (checkpoint {old[key]!r}, now {new[key]!r})"
        for key in sorted(old.keys() & new.keys())
        if key not in skip and not key.startswith("_") and old[key] != new[key]
    ]


def check_net_arguments(config, model) -> None:
    """Refuse a ``model.net`` that cannot take what the CLI links into it: a ``num_classes`` argument (from the
    data module), and an ``in_channels`` that matches the channels of the data module's images.
    Either mistake would otherwise fail at the first batch, deep inside a layer, or train a head of
    the wrong size. A model without a configured net is not checked."""
    net = model_contract.net_config(config)
    if net is None or model_contract.plain_net(model) is None:
        return
    arguments = keyword_arguments(type(model.net))
    if arguments is not None and "num_classes" not in arguments and "**" not in arguments:
        raise UserError(no_num_classes(net.class_path))
    in_channels = (net.get("init_args") or {}).get("in_channels")
    shape = model.hparams.get("image_shape")
    if isinstance(in_channels, int) and shape and in_channels != shape[0]:
        raise UserError(
            f"model.net.init_args.in_channels is {in_channels}, but the data module's images have {shape[0]} channels "
            f"(image_shape {tuple(shape)}): give --model.net.init_args.in_channels {shape[0]} (README: Add a model)."
        )


def no_num_classes(class_path: str) -> str:
    return (
        f"model.net {class_path} takes no num_classes argument, which the CLI fills in from the data module: "
        "give the net's __init__ a num_classes argument (README: Add a model)."
    )


def takes_num_classes(class_path: str) -> bool:
    """Whether what ``model.net``'s class_path names takes a ``num_classes`` argument, by name or through
    ``**kwargs`` (torchvision's and timm's model functions hand those to the model class)."""
    try:
        module, _, name = class_path.rpartition(".")
        arguments = keyword_arguments(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return False  # jsonargparse reports a class_path it cannot import
    return arguments is None or "num_classes" in arguments or "**" in arguments  # None: nothing to check against


def with_num_classes(net: dict, num_classes: int) -> dict:
    """``model.net`` (a class_path/init_args dict) building ``num_classes`` classes, ready for jsonargparse to
    parse: given as dict_kwargs, which jsonargparse moves into init_args where the net's signature names it and
    passes on otherwise (a timm function's ``**kwargs``; in init_args, "Option 'num_classes' is not accepted")."""
    init_args = {key: value for key, value in (net.get("init_args") or {}).items() if key != "num_classes"}
    return {
        **net,
        "init_args": init_args,
        "dict_kwargs": {**(net.get("dict_kwargs") or {}), "num_classes": num_classes},
    }


def _accepts(cls, name: str) -> bool:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return True  # nothing to check against
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


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


def check_monitor(trainer, model) -> None:
    """Refuse a checkpoint ``monitor`` the model never logs before training starts (Lightning notices
    it only after the first validation)."""
    names = getattr(model, "metric_names", None)
    if names is None:
        return
    valid = [*names("train"), *names("val")]
    for callback in trainer.checkpoint_callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor is None or monitor in valid or monitor in ("epoch", "step") or monitor.startswith("lr-"):
            continue
        raise UserError(
            f"checkpoint.monitor {monitor!r} is not a metric this model logs; give one of "
            f"{', '.join(valid)} (or null to keep the newest checkpoint)."
        )


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml``; a resumed run adds ``config-<time>.yaml`` beside it
    instead of failing or overwriting the original. It saves the portable config: the one the user
    gave, with the experiment's name and without this run's directory or resume checkpoint, so that
    re-running it starts a new run of the same experiment that touches nothing of this one.
    validate/test/predict keep the checkpoint they evaluate (``last``/``best`` resolved): it is what
    they report on, not where they write, and re-running their config evaluates it again."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The run's directory and name, kept here: ddp_spawn's processes get a copy of this callback,
        # not the process-wide run.
        run = directory.current()
        self.run = (run.directory, run.name) if run is not None else None
        #: Whether the fit continues a run that has its config already. Looked at here, as the CLI builds the
        #: callback: before any rank can have saved it, so every rank agrees (a rank that looked in setup, after
        #: rank zero saved, skipped save()'s collective and left the ranks out of step: a hang, seen under SLURM).
        self.resuming = run is not None and (run.directory / self.config_filename).exists()
        #: A resume's config-<time>.yaml waits for training to start (see setup).
        self.save_at_train_start = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:  # by the fit before the test after it
            return
        if self.run is not None:
            run_dir, name = self.run
            self.config = self.config.clone()
            self.config.name, self.config.run_dir = name, None
            portable_logger_paths(self.config, run_dir)
            if stage != "fit" and (run_dir / self.config_filename).exists():
                # The test after fit, in the fit's run and with its config (under ddp_spawn through a
                # fresh copy of this callback, which does not know that the fit saved it already).
                return
            if stage == "fit" and self.resuming:
                self.config_filename = f"config-{directory.new_run_name()}.yaml"
                # A resume: saved once training starts, so that a resume refused while Lightning
                # loads the checkpoint (a plan shorter than the steps done) leaves no file behind.
                self.save_at_train_start = True
        if "ckpt_path" in self.config:  # not with ProjectCLI(run=False): no subcommand
            if stage == "fit":
                self.config.ckpt_path = None
            elif trainer.ckpt_path:
                self.config.ckpt_path = str(trainer.ckpt_path)
        if not self.save_at_train_start:
            self.save(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.save_at_train_start:
            self.save_at_train_start = False
            self.save(trainer, pl_module, "fit")

    def save(self, trainer, pl_module, stage: str) -> None:
        """Write the config into the run directory itself (Lightning's writes into ``trainer.log_dir``, a
        TensorBoardLogger's version folder), atomically, on global rank zero; then log it."""
        if self.run is None:
            return super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            if self.save_to_log_dir:
                text = self.parser.dump(self.config, skip_none=False)
                checkpoints.write_atomically(text.encode(), self.run[0] / self.config_filename, "the saved config")
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        # So that every rank agrees on later calls to setup (the test after fit).
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        # Called once, on global rank zero only: the loggers record the resolved config.
        tracking.log_config(trainer, yaml.safe_load(self.parser.dump(self.config, skip_none=False)))


class ProjectParser(DataPluginParser):
    """The CLI's parser, whose YAML (``--print_config``, a run's ``config.yaml``) starts by saying where
    the run writes: the paths in it are the user's, and the run fills in its own directory when it starts.
    It builds any net that takes ``num_classes`` with the data module's (see ``instantiate``)."""

    def instantiate(self, namespace, *args, **kwargs):
        # jsonargparse applies the data -> model.net.init_args.num_classes link only where that key is in
        # the config, and it is only where the net's signature spells it out: a function that passes **kwargs
        # on (torchvision.models.mobilenet_v3_small, timm.models.resnet18) would keep its 1000 classes. A
        # placeholder, in a copy (config.yaml keeps what the user gave), lets the link fill it in.
        for prefix in ("", f"{namespace.get('subcommand')}."):
            net = namespace.get(f"{prefix}{model_contract.NET_KEY}")
            if (
                net is not None
                and hasattr(net, "class_path")
                and (net.get("init_args") or {}).get("num_classes") is None
            ):
                if takes_num_classes(net.class_path):
                    namespace = namespace.clone()
                    namespace[f"{prefix}{model_contract.NET_KEY}.init_args.num_classes"] = None
        return super().instantiate(namespace, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        # jsonargparse refuses a logger whose required save_dir is missing without saying so (its report on
        # the Union lists no cause): the cause, in one sentence.
        missing = re.search(r"class_path='([\w.]+Logger)', init_args=Namespace\(save_dir=None", message)
        if missing and self.exit_on_error and not os.environ.get("JSONARGPARSE_DEBUG"):
            sys.stderr.write(
                f"error: trainer.logger {missing[1]} needs a save_dir: give init_args: {{save_dir: .}} (a path relative "
                "to the run directory), or name it on the command line alone (--trainer.logger+=TensorBoardLogger).\n"
            )
            sys.exit(2)
        super().error(message, ex)

    def dump(self, cfg=None, *args, **kwargs) -> str:
        text = super().dump(cfg, *args, **kwargs)
        trainer = cfg.get("trainer") if cfg is not None and hasattr(cfg, "get") else None
        if trainer is None or kwargs.get("format", "parser_mode") not in ("parser_mode", "yaml"):
            return text
        where = cfg.get("run_dir") or (
            f"a new directory {Path(trainer.get('default_root_dir') or 'runs') / experiment_name(cfg)}/<date>-<time>-<hex>/ "
            "(with fit --ckpt_path last: the newest run there)"
        )
        return (
            f"# This run writes every file into {where};\n# it fills that directory into the loggers' save_dir and "
            "the checkpoints' dirpath when it starts (README: Run directories).\n" + text
        )


class ProjectHelpFormatter(DefaultHelpFormatter):
    """``--help`` as a page to read: a one-line usage instead of every option twice, and no list of
    every class a type could take (``--model.net.help``, ``--data.help`` and the like show those)."""

    def _format_usage(self, usage, actions, groups, prefix) -> str:
        full = super()._format_usage(usage, actions, groups, prefix)
        if full.count("\n") <= 6:
            return full
        return super()._format_usage("%(prog)s [-h] [-c CONFIG] [--print_config] [--KEY VALUE ...]", [], [], prefix)

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action)
        if action.help and not getattr(action, "_jsonargparse_preexpanded_help", False):
            # Lightning's docstrings run to a paragraph per option: the first sentence, then the type and default.
            first = _FIRST_SENTENCE.match(action.help)
            if first and text.startswith(action.help):
                text = first[1] + text[len(action.help) :]
        return _KNOWN_SUBCLASSES.sub(lambda found: _short_class_list(found, action.dest), text)


#: What jsonargparse appends to a class-typed option's help (732 lines for model.net: every torch.nn class).
_KNOWN_SUBCLASSES = re.compile(r", known subclasses: ([^)]*)")
_FIRST_SENTENCE = re.compile(r"(.+?(?<!e\.g)(?<!i\.e)[.:])\s+(?=[A-Z`(])", re.S)


def _short_class_list(found: re.Match, dest: str) -> str:
    names = found[1].split(", ")
    if len(names) <= 4:
        return found[0]
    ours = [name for name in names if name.startswith("project.models.")]
    shown = ", ".join((ours or names)[:2])
    return f", {len(names)} known classes, e.g. {shown}; --{dest}.help CLASS shows one's arguments"


def experiment_name(config) -> str:
    """``--name``, else the stem of the last --config file (presets never name a run), else ``run``."""
    if config.get("name") is not None:
        return config.name
    # An inline --config '{...}' is recorded as None: it names no run.
    sources = [source for source in config.get("config") or [] if source is not None]
    # Presets (experiments/presets/*.yaml: strategy, precision, compile) never name a run.
    named = [s for s in sources if Path(str(s)).parent.name != "presets"] or sources
    return Path(str(named[-1])).stem if named else "run"


def command_name() -> str:
    """What the usage line calls this command: ``imgcls`` (the console script) or ``python -m project``,
    never ``__main__.py``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name == "imgcls" else "python -m project"


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


class ModelInstantiator(_InstantiatorFn):
    """Lightning's instantiator of the model, without the data links jsonargparse skipped (a model whose
    signature has no ``num_classes``, ``image_shape`` or ``net``): jsonargparse 4.53 reports them applied all
    the same, and Lightning would write them into the model's hparams (or assert on a missing ``net``)."""

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        self.cli._dump_config()
        links = {k: v for k, v in applied_instantiation_links.items() if in_config(self.cli.config_dump, k)}
        return super().__call__(class_type, *args, applied_instantiation_links=links, **kwargs)


def in_config(config: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


class ProjectCLI(LightningCLI):
    """LightningCLI for ImageClassifier + any LightningDataModule (CIFAR-10 by default), one directory per run (project.run.directory)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault(
            "parser_kwargs", {"default_env": False, "prog": command_name(), "formatter_class": ProjectHelpFormatter}
        )
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

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        self.parser.add_instantiator(ModelInstantiator(cli=self, key="model"), LightningModule, prepend=True)

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
        # The optimiser as --print_config and config.yaml show it (and --model.optimizer.lr=... can change it).
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
        super().parse_arguments(parser, short_logger_names(args))
        # Before LightningCLI seeds (numpy refuses a seed out of its range with a traceback) and
        # before anything is read or written.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        option_checks.check_seed(config.get("seed_everything"))
        option_checks.check_trainer_numbers(config.trainer)
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
        check_devices(config.trainer)
        for logger in as_list(config.trainer.get("logger")):
            if str(getattr(logger, "class_path", "")).endswith("WandbLogger"):  # before the run directory exists
                tracking.check_wandb_api_key(offline=bool((logger.get("init_args") or {}).get("offline")))
        self.run = directory.Run.open(
            subcommand=self.subcommand or "",
            root=Path(config.trainer.default_root_dir or "runs"),
            name=experiment_name(config),
            run_dir=config.get("run_dir"),
            ckpt_path=self.requested_checkpoint or config.get("ckpt_path"),
            scratch=bool(config.trainer.get("fast_dev_run")),
        )
        os.environ[directory.RUN_DIR_ENV] = str(self.run.directory)
        place_loggers(config.trainer, self.run.directory)
        place_profiler(config.trainer, self.run.directory)
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
            hparams["net"] = with_num_classes(net, net["init_args"]["num_classes"])
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
        differences = model_differences(plan.hyper_parameters, config.model)
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
            check_net_arguments(self.config[self.subcommand] if self.subcommand else self.config, self.model)
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
            raise UserError(no_num_classes(net.class_path)) from None

    def instantiate_trainer(self, **kwargs):
        """The configured Trainer, with our defaults where the configuration leaves them open."""
        config = self.config_init[self.subcommand].trainer if self.subcommand else self.config_init.trainer
        if self.run is not None:
            # What Lightning writes by itself (profiles, hpc checkpoints) goes into the run too.
            kwargs.setdefault("default_root_dir", str(self.run.directory))
        kwargs.setdefault("plugins", self.default_plugins(config.get("plugins")))
        callbacks = as_list(config.get("callbacks"))
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
            check_folders_inside(trainer, self.run.directory)
        return trainer

    def default_plugins(self, configured) -> list:
        """The configured plugins, plus atomic checkpoint writes and code-free loads unless one of
        them chose its own checkpoint I/O, plus, in a SLURM job with ``requeue.enabled``, a
        SLURMEnvironment whose auto-requeue is off (SLURMRequeue requeues instead; see project.run.cluster)."""
        plugins = as_list(configured)
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
        check_monitor(self.trainer, self.model)
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


def as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


#: Errors a user can cause by configuration or files; printed as one sentence, exit status 2.
USER_ERRORS = (UserError, checkpoints.CheckpointError, MisconfigurationException)
#: OSErrors about a named path or the disk: the user's to fix (a full disk, a read-only folder,
#: a file where a folder should be), so one sentence too. Any other OSError keeps its traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
USER_OS_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def describe_os_error(err: OSError) -> str:
    if err.errno in DISK_FULL:
        # A failed write() names no file; only open() and the like do.
        writing = f"while writing {err.filename}" if err.filename else "while writing the run's files"
        return (
            f"No space left on the device {writing}; free some space (or choose another "
            "--trainer.default_root_dir) and run again: checkpoints written before are intact."
        )
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
        if err.errno not in USER_OS_ERRORS or (err.filename is None and err.errno not in DISK_FULL):
            raise
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(2)
