"""Lightning callbacks: hooks, buffers, state_dict persistence and plots."""

from project.callbacks.activations import ActivationStatistics
from project.callbacks.buffers import BufferReport, SyncBuffers
from project.callbacks.checkpointing import LastCheckpoint
from project.callbacks.export import ExportNet
from project.callbacks.gradients import GradientStatistics
from project.callbacks.learning_rates import LearningRates
from project.callbacks.plots import PredictionPlots
from project.callbacks.predictions import PredictionWriter
from project.callbacks.progress import ProgressBar
from project.callbacks.random_state import RandomState

__all__ = [
    "ActivationStatistics",
    "BufferReport",
    "ExportNet",
    "GradientStatistics",
    "LastCheckpoint",
    "LearningRates",
    "PredictionPlots",
    "PredictionWriter",
    "ProgressBar",
    "RandomState",
    "SyncBuffers",
]
