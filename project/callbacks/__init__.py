"""Lightning callbacks: hooks, buffers, state_dict persistence and plots."""

from project.callbacks.checkpointing import LastCheckpoint
from project.callbacks.export import ExportNet
from project.callbacks.plots import PredictionPlots

__all__ = ["ExportNet", "LastCheckpoint", "PredictionPlots"]
