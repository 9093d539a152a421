"""What the run layer asks of the LightningModule that ``model:`` names, in one place (data_contract is the
same for data modules). ImageClassifier offers all of it; any other LightningModule offers what it has, and a
feature that needs more is skipped with one line (:func:`skip`), never a traceback.

- ``net``: the plain ``nn.Module`` it trains: ``net.pt``, the checkpoint's architecture check, and the
  ``num_classes`` / ``in_channels`` checks of ``model.net`` (by its class_path) need it.
- ``metric_names(stage)``: the names it logs; monitors are checked against them before training.
- ``RESUME_MAY_CHANGE``: the settings a resumed fit may change (how it runs, not what it learnt); every
  other difference from the checkpoint's hyperparameters is refused. None declared: none may change.
- ``validation_step``/``test_step`` returning the logits: the plots; ``predict_step`` returning
  ``(N, classes)`` logits or ``{"probs", "preds"?}``: ``predictions.csv``.
- Arguments ``num_classes`` and ``image_shape`` (and ``net``'s ``num_classes``) are filled in from the data
  module wherever its signature has them.
"""

import importlib

from lightning.pytorch.cli import _InstantiatorFn  # private: see tests/test_lightning_api.py ALLOWED
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from project.classifier import keyword_arguments
from project.errors import UserError
from project.run.config_files import flatten

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


def model_differences(stored: dict, model) -> list[str]:
    """``model.<key> (checkpoint X, now Y)`` for every setting both define differently, but those the model
    declares may change on resume and those linked from the data module (project.run.model_contract)."""
    if stored.get("_class_path", model.class_path) != model.class_path:
        return [f"model.class_path (checkpoint {stored['_class_path']!r}, now {model.class_path!r})"]
    old, new = flatten(stored), flatten(model.init_args.as_dict())
    skip = {
        *resume_may_change(model.class_path),
        *(k.replace("init_args.", "") for k in LINKED),
    }
    # A key that only one side has counts where the other has its parent (a scheduler given on one side, null on the other).
    old.update({key: None for key in new.keys() - old.keys() if key.rsplit(".", 1)[0] in old})
    new.update({key: None for key in old.keys() - new.keys() if key.rsplit(".", 1)[0] in new})
    return [
        f"model.{key} (checkpoint {old[key]!r}, now {new[key]!r})"
        for key in sorted(old.keys() & new.keys())
        if key not in skip and not key.startswith("_") and old[key] != new[key]
    ]


def check_net_arguments(config, model) -> None:
    """Refuse a ``model.net`` that cannot take what the CLI links into it: a ``num_classes`` argument (from the
    data module), and an ``in_channels`` that matches the channels of the data module's images.
    Either mistake would otherwise fail at the first batch, deep inside a layer, or train a head of
    the wrong size. A model without a configured net is not checked."""
    net = net_config(config)
    if net is None or plain_net(model) is None:
        return
    arguments = keyword_arguments(type(model.net))
    if arguments is not None and "num_classes" not in arguments and "**" not in arguments:
        raise UserError(no_num_classes(net.class_path))
    in_channels = (net.get("init_args") or {}).get("in_channels")
    shape = model.hparams.get("image_shape")
    if isinstance(in_channels, int) and shape and in_channels != shape[0]:
        raise UserError(
            f"model.net.init_args.in_channels is {in_channels}, but the data module's images have {shape[0]} channels "
            f"(image_shape {tuple(shape)}): give --model.net.init_args.in_channels {shape[0]} (README: Add a model)."
        )


def no_num_classes(class_path: str) -> str:
    return (
        f"model.net {class_path} takes no num_classes argument, which the CLI fills in from the data module: "
        "give the net's __init__ a num_classes argument (README: Add a model)."
    )


def takes_num_classes(class_path: str) -> bool:
    """Whether what ``model.net``'s class_path names takes a ``num_classes`` argument, by name or through
    ``**kwargs`` (torchvision's and timm's model functions hand those to the model class)."""
    try:
        module, _, name = class_path.rpartition(".")
        arguments = keyword_arguments(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return False  # jsonargparse reports a class_path it cannot import
    return arguments is None or "num_classes" in arguments or "**" in arguments  # None: nothing to check against


def with_num_classes(net: dict, num_classes: int) -> dict:
    """``model.net`` (a class_path/init_args dict) building ``num_classes`` classes, ready for jsonargparse to
    parse: given as dict_kwargs, which jsonargparse moves into init_args where the net's signature names it and
    passes on otherwise (a timm function's ``**kwargs``; in init_args, "Option 'num_classes' is not accepted")."""
    init_args = {key: value for key, value in (net.get("init_args") or {}).items() if key != "num_classes"}
    return {
        **net,
        "init_args": init_args,
        "dict_kwargs": {**(net.get("dict_kwargs") or {}), "num_classes": num_classes},
    }


def check_monitor(trainer, model) -> None:
    """Refuse a checkpoint ``monitor`` the model never logs before training starts (Lightning notices
    it only after the first validation)."""
    names = getattr(model, "metric_names", None)
    if names is None:
        return
    valid = [*names("train"), *names("val")]
    for callback in trainer.checkpoint_callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor is None or monitor in valid or monitor in ("epoch", "step") or monitor.startswith("lr-"):
            continue
        raise UserError(
            f"checkpoint.monitor {monitor!r} is not a metric this model logs; give one of "
            f"{', '.join(valid)} (or null to keep the newest checkpoint)."
        )


class ModelInstantiator(_InstantiatorFn):  # private Lightning API: see tests/test_lightning_api.py ALLOWED
    """Lightning's instantiator of the model, without the data links jsonargparse skipped (a model whose
    signature has no ``num_classes``, ``image_shape`` or ``net``): jsonargparse 4.53 reports them applied all
    the same, and Lightning would write them into the model's hparams (or assert on a missing ``net``)."""

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        self.cli._dump_config()
        links = {k: v for k, v in applied_instantiation_links.items() if in_config(self.cli.config_dump, k)}
        return super().__call__(class_type, *args, applied_instantiation_links=links, **kwargs)


def in_config(config: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


def check_resume(checkpoint, stored: dict, model) -> None:
    """Refuse a resume whose model settings differ from the checkpoint's (see :func:`model_differences`)."""
    differences = model_differences(stored, model)
    if differences:
        raise UserError(
            f"Resuming from {checkpoint} with model settings that differ from the checkpoint's: {'; '.join(differences)}. "
            "A resumed fit continues the checkpoint's model, optimiser state and schedule, so these would be ignored "
            "or break loading: give the checkpoint's values (or drop the overrides) to resume, or start a new run "
            "without --ckpt_path to change them."
        )
