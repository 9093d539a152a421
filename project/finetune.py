"""Start a net from other weights (``model.init_from``): a run directory, its net.pt, a Lightning checkpoint,
or pretrained weights through torchvision's or timm's own loaders; every parameter whose name and shape fit is copied.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""

import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from project.errors import UserError
from project.state_dicts import clean_name

#: ``model.init_from`` prefixes that name pretrained weights instead of a path.
TORCHVISION, TIMM = "torchvision:", "timm:"


def read_weights(source: str) -> dict[str, torch.Tensor]:
    """The plain net's state_dict that ``source`` names: ``torchvision:<Weights enum>`` (e.g.
    ``torchvision:ResNet18_Weights.IMAGENET1K_V1``, from torch.hub's cache under ``$TORCH_HOME``, downloaded
    there if absent), ``timm:<model name>`` (timm's pretrained weights, from the Hugging Face cache), a run
    directory (its ``net.pt``, else ``checkpoints/last.ckpt``), a ``net.pt``-style state_dict, or a Lightning
    checkpoint (the ``net.`` entries of its ``state_dict``)."""
    if source.startswith(TORCHVISION):
        return _torchvision_weights(source.removeprefix(TORCHVISION))
    if source.startswith(TIMM):
        return _timm_weights(source.removeprefix(TIMM))
    path = Path(source).expanduser()
    if path.is_dir():
        found = [p for p in (path / "net.pt", path / "checkpoints" / "last.ckpt") if p.is_file()]
        if not found:
            raise UserError(
                f"model.init_from {source} is a directory without net.pt or checkpoints/last.ckpt: "
                "give a run directory whose fit has ended, or the .ckpt or .pt file itself."
            )
        path = found[0]
    if not path.is_file():
        raise UserError(
            f"model.init_from {source} does not exist: give a run directory, its net.pt, a .ckpt file, "
            "torchvision:<Weights> or timm:<model name>."
        )
    with open(path, "rb") as f:  # a zip archive (torch.save's format), or a legacy file: a pickle
        if not zipfile.is_zipfile(f) and f.seek(0) == 0 and f.read(1) != b"\x80":
            raise UserError(f"model.init_from {path} is not a torch.save file: give a net.pt or a .ckpt file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise UserError(
                f"model.init_from {path} holds Python objects beyond tensors, so it was not loaded (unpickling it "
                "could run code): save the net's state_dict with torch.save(net.state_dict(), path) and give that."
            ) from None
        raise UserError(
            f"model.init_from {path} is not a readable torch.save file ({type(err).__name__}: {err})."
        ) from None
    return _plain(obj, str(path))


def _plain(obj, where: str) -> dict[str, torch.Tensor]:
    """The net's tensors in a state_dict or Lightning checkpoint ``obj``, without the classifier's ``net.``
    and the wrappers' ``module.``, ``_orig_mod`` parts."""
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.init_from {where} holds no state_dict of tensors: give a net.pt or a .ckpt file.")
    state = {clean_name(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("net.") for k in state):  # ImageClassifier's own: the net's entries, not the metrics'
        state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, "module.")
    return dict(state)


def _torchvision_weights(name: str) -> dict[str, torch.Tensor]:
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"model.init_from torchvision:{name} names no torchvision weights: give <Model>_Weights.<NAME>, "
            "e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1 (torchvision.models.list_models() and get_model_weights list them)."
        ) from None
    return dict(weights.get_state_dict(progress=False, weights_only=True))


def _timm_weights(name: str) -> dict[str, torch.Tensor]:
    try:
        import timm
    except ModuleNotFoundError:
        raise UserError(f"model.init_from timm:{name} needs timm: pip install timm.") from None
    if not timm.is_model(name.split(".")[0]):
        raise UserError(f"model.init_from timm:{name} is not a timm model: timm.list_models() lists them.")
    # timm's own loader: it finds the file in the Hugging Face cache (or downloads it) and adapts it to the model.
    return timm.create_model(name, pretrained=True).state_dict()


def copy_matching(net: nn.Module, source: Mapping[str, torch.Tensor], where: str) -> tuple[list[str], list[str]]:
    """Copy into ``net`` every entry of ``source`` whose name and shape match one of ``net``'s state_dict;
    returns the names copied and the names of ``net`` left as they were (freshly initialised). A source
    that fits nothing is refused."""
    own = net.state_dict()
    fits = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        shown = ", ".join(list(source)[:3]) or "none"
        raise UserError(
            f"model.init_from {where} fits no parameter of {type(net).__name__} (its names look like {shown}; "
            f"the net's like {', '.join(list(own)[:3])}): give weights of the same architecture."
        )
    net.load_state_dict(fits, strict=False)
    return list(fits), [k for k in own if k not in fits]


def init_from(net: nn.Module, source: str) -> str:
    """Load what fits of ``source`` (see :func:`read_weights`) into ``net``; returns the one line to print:
    how many entries were copied and which were left freshly initialised (e.g. a head for another number
    of classes)."""
    copied, fresh = copy_matching(net, read_weights(source), source)
    shown = ", ".join(fresh[:8]) + (", ..." if len(fresh) > 8 else "")
    left = f"; left freshly initialised: {shown} ({len(fresh)} entries)" if fresh else ""
    return f"model.init_from {source}: copied {len(copied)} of {len(copied) + len(fresh)} state_dict entries{left}."
