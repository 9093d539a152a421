"""RunConfigSaver: the run's config.yaml, portable (re-running it starts a new run), and the loggers' copy."""

import yaml
from lightning.pytorch.cli import SaveConfigCallback

from project.run import checkpoints, directory, tracking


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
            tracking.portable_logger_paths(self.config, run_dir)
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
