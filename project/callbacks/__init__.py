"""Lightning callbacks that teach: forward/backward hooks, activations, gradients, buffers and layers.
Name them in a YAML ``trainer.callbacks`` block; the run's own plumbing callbacks live in ``project.run.callbacks``."""

from project.callbacks.activations import ActivationStatistics
from project.callbacks.buffers import BufferReport, SyncBuffers
from project.callbacks.gradients import GradientStatistics

__all__ = ["ActivationStatistics", "BufferReport", "GradientStatistics", "SyncBuffers"]
