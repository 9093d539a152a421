"""Lightning callbacks: hooks, buffers, state_dict persistence and plots."""

from project.callbacks.checkpointing import LastCheckpoint
from project.callbacks.export import ExportNet

__all__ = ["ExportNet", "LastCheckpoint"]
