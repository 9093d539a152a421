"""What the run layer asks of the LightningModule that ``model:`` names, in one place (data_contract is the
same for data modules). ImageClassifier offers all of it; any other LightningModule offers what it has, and a
feature that needs more is skipped with one line (:func:`skip`), never a traceback.

- ``net``: the plain ``nn.Module`` it trains: ``net.pt``, the checkpoint's architecture check, and the
  ``num_classes`` / ``in_channels`` checks of ``model.net`` (by its class_path) need it.
- ``metric_names(stage)``: the names it logs; monitors are checked against them before training.
- ``RESUME_MAY_CHANGE``: the settings a resumed fit may change (how it runs, not what it learnt); every
  other difference from the checkpoint's hyperparameters is refused. None declared: none may change.
- ``validation_step``/``test_step`` returning the logits: the plots; ``predict_step`` returning
  ``{"preds", "probs"}``: ``predictions.csv``.
- Arguments ``num_classes`` and ``image_shape`` (and ``net``'s ``num_classes``) are filled in from the data
  module wherever its signature has them.
"""

import importlib

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

#: The LightningModule ``model:`` builds when the config names no class_path.
DEFAULT = "project.classifier.ImageClassifier"
#: Where the plain net's config sits in the CLI's namespace.
NET_KEY = "model.init_args.net"
#: Model arguments linked from the data module's attributes of the same (last) name.
LINKED = ("num_classes", "image_shape", "net.init_args.num_classes")


def model_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def resume_may_change(class_path: str) -> tuple[str, ...]:
    return tuple(getattr(model_class(class_path), "RESUME_MAY_CHANGE", ()))


def plain_net(model) -> nn.Module | None:
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else None


def net_config(config):
    """``model.init_args.net`` of a parsed config when it is a class_path block, else None."""
    net = config.get("model.init_args.net")
    return net if hasattr(net, "class_path") else None


def skip(feature: str, model, lacks: str) -> None:
    """The one line a feature prints when the model does not offer what it needs."""
    rank_zero_info(f"{feature}: skipped, {type(model).__name__} {lacks} (project/run/model_contract.py).")
