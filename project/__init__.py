"""An image-classification research template: plain nn.Module models trained with Lightning."""

__version__ = "0.1.0"
