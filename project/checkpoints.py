"""Portable state_dict I/O with torch alone: read a checkpoint, strip wrapper prefixes, export net.pt.

Nothing here imports Lightning, so a collaborator with only torch installed can turn a training
checkpoint into the plain model's weights and load them safely (``weights_only=True``).
"""

import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

#: Prefixes that wrappers add in front of the plain model's keys: ImageClassifier (``net.``),
#: DistributedDataParallel (``module.``), torch.compile (``_orig_mod.``), Lightning's
#: DeepSpeed/FSDP forward wrappers (``_forward_module.``) and generic ``model.`` holders.
WRAPPER_PREFIXES = ("_forward_module.", "module.", "model.", "net.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A file is not a usable checkpoint for the requested model; the message says why."""


def load_file(path: str | Path, weights_only: bool = True, mmap: bool = False) -> dict:
    """``torch.load`` on CPU with pickle code execution refused, and one clear error per failure.

    ``mmap=True`` maps tensors from the file instead of reading them (cheap for a quick look).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path.")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (not a torch.save archive): it is truncated or another kind of file."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"{path} contains Python objects beyond tensors and plain containers, so it was not loaded "
                "(it could run code); only load it with weights_only=False if you trust its source."
            ) from err
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state_dict.")
    return dict(obj)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=WRAPPER_PREFIXES) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (repeatedly, in any order) from every key.

    Keys that do not start with ``net.`` when others do (the classifier's metric states, for
    example) are dropped: only the plain network's entries are kept.
    """
    keys = list(state_dict)
    if any(k.startswith("net.") for k in keys) or any(k.startswith("_forward_module.net.") for k in keys):
        keys = [k for k in keys if k.startswith(("net.", "_forward_module.net."))]
    out = {}
    for key in keys:
        new = key
        while True:
            for prefix in prefixes:
                if new.startswith(prefix):
                    new = new[len(prefix) :]
                    break
            else:
                break
        # torch.compile'd submodules carry _orig_mod. in the middle of the key, too.
        new = new.replace("._orig_mod.", ".")
        out[new] = state_dict[key]
    return out


def plain_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The plain network's state_dict from a Lightning checkpoint or an already plain state_dict."""
    state = checkpoint.get("state_dict", checkpoint.get("module", checkpoint))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("The file has no state_dict of tensors (expected a Lightning checkpoint or a state_dict).")
    return strip_prefixes(state)


def save_net(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a plain state_dict (tensors only, on CPU) so ``torch.load(path, weights_only=True)`` reads it.

    The file is written to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, tmp)
    tmp.replace(path)
    return path


def load_into(model: nn.Module, source: str | Path | Mapping, strict: bool = True, dry_run: bool = False) -> nn.Module:
    """Load a checkpoint, net.pt or state_dict into ``model``; mismatches raise one clear error.

    ``dry_run=True`` only checks that every key and shape fits, and leaves ``model`` untouched.
    """
    checkpoint = load_file(source) if isinstance(source, (str, Path)) else source
    state = plain_state_dict(checkpoint)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_short(shapes)}")
        name = source if isinstance(source, (str, Path)) else "the state_dict"
        raise CheckpointError(
            f"{name} does not fit {type(model).__name__} ({'; '.join(parts)}); "
            "it was saved from a different architecture or configuration."
        )
    if not dry_run:
        model.load_state_dict(state, strict=strict)
    return model


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
