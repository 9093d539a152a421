"""The run's plumbing callbacks, which the CLI installs: checkpoints, plain-weight export, random state,
predictions, plots, progress, learning-rate columns and a spawned worker's clean exit from its process group.
A researcher rarely names these in YAML."""

from project.run.callbacks.checkpointing import AtomicCheckpointIO, BestCheckpoint, LastCheckpoint
from project.run.callbacks.export import ExportNet
from project.run.callbacks.learning_rates import LearningRates
from project.run.callbacks.plots import PredictionPlots
from project.run.callbacks.predictions import PredictionWriter
from project.run.callbacks.process_group import LeaveProcessGroup
from project.run.callbacks.progress import EpochLines, ProgressBar
from project.run.callbacks.random_state import RandomState

__all__ = [
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "EpochLines",
    "ExportNet",
    "LastCheckpoint",
    "LearningRates",
    "LeaveProcessGroup",
    "PredictionPlots",
    "PredictionWriter",
    "ProgressBar",
    "RandomState",
]
