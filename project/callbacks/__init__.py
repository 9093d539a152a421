"""Lightning callbacks: hooks, buffers, state_dict persistence and plots."""

from project.callbacks.export import ExportNet

__all__ = ["ExportNet"]
