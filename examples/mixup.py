"""An ImageClassifier subclass with an argument of its own: mixup of each training batch (Zhang et al., 2018).

python -m project fit -c experiments/lenet.yaml --model examples.mixup.MixupClassifier --model.alpha 0.4
"""

import torch
import torch.nn.functional as F

from project.classifier import ImageClassifier


class MixupClassifier(ImageClassifier):
    """ImageClassifier that trains on convex mixtures of image pairs and of their labels.

    Args:
        alpha: the mixing weight is drawn from Beta(alpha, alpha) for every batch.
    """

    def __init__(self, alpha: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mixing = torch.distributions.Beta(alpha, alpha)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        lam = self.mixing.sample().item()  # a Python number drawn on the CPU: no device synchronisation
        order = torch.randperm(len(images), device=images.device)
        logits = self(lam * images + (1 - lam) * images[order])
        loss = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[order])
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss
