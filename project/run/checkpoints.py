"""Portable state_dict I/O with torch alone: read a checkpoint, strip wrapper prefixes, export net.pt.

Nothing here imports Lightning, so a collaborator with only torch installed can turn a training
checkpoint into the plain model's weights and load them safely (``weights_only=True``):

    python -m project convert runs/lenet/<run>/checkpoints/last.ckpt net.pt

It reads every checkpoint this template writes: single device and DDP (one file), FSDP with
``state_dict_type="full"`` (one file) or ``"sharded"`` (a torch.distributed.checkpoint directory),
DeepSpeed ZeRO stage 1/2 directories, and state_dicts of ``torch.compile``'d or wrapped models.
"""

import io
import os
import pickle
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from project.run import directory
from project.state_dicts import WRAPPER_PREFIXES, clean_name, differences


class CheckpointError(RuntimeError):
    """A file is not a usable checkpoint for the requested model; the message says why."""


def load_file(path: str | Path, weights_only: bool = True, mmap: bool = False) -> dict:
    """``torch.load`` on CPU with pickle code execution refused, and one clear error per failure.

    It reads both of ``torch.save``'s formats: the zip archive (the default since torch 1.6) and
    the legacy one (``_use_new_zipfile_serialization=False``). ``mmap=True`` maps tensors from a
    zip archive instead of reading them (cheap for a quick look); a legacy file, which cannot be
    mapped, is read whole.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; pass a .ckpt or .pt file.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path.")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and not _is_legacy_torch_file(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (not a torch.save archive): it is truncated or another kind of file."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap and is_zip)
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"{path} contains Python objects beyond tensors and plain containers, so it was not loaded "
                "(it could run code); only load it with weights_only=False if you trust its source."
            ) from err
        if not is_zip:
            raise CheckpointError(
                f"{path} is a legacy-format torch.save file that cannot be read ({type(err).__name__}: {err}): "
                "it is truncated or corrupted; save or copy it again."
            ) from err
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state_dict.")
    return dict(obj)


#: The number a legacy (non-zip) ``torch.save`` file begins with, pickled (torch.serialization.MAGIC_NUMBER).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


# Not torch.load as the test: on a non-torch file it says 'Weights only load failed', which reads as unsafe content.
class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain number")


def _is_legacy_torch_file(path: Path) -> bool:
    """True when ``path`` starts like a legacy ``torch.save`` file: its first pickled object is the
    magic number (unpickled from the first bytes alone, without resolving any Python global)."""
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        return _NoGlobalsUnpickler(io.BytesIO(head)).load() == LEGACY_MAGIC_NUMBER
    except Exception:
        return False


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=WRAPPER_PREFIXES) -> dict[str, torch.Tensor]:
    """Remove wrapper parts (``project.state_dicts.WRAPPER_PARTS``, anywhere) and wrapper prefixes from every key.

    Outer wrappers (``_forward_module.``, ``module.``, ``model.``) are peeled repeatedly. When keys
    of the classifier's ``net.`` are among them, only those are kept (not the metric states, for
    example) and exactly one ``net.`` is removed, so a net whose own child is called ``model`` or
    ``net`` keeps that name. Without ``net.`` keys, wrapper prefixes are peeled in any order.
    """
    state = OrderedDict()
    for key, value in state_dict.items():
        name = clean_name(key)  # mid-key parts, which consume_prefix (leading prefixes only) cannot remove
        if name in state:
            raise _collision(name)
        state[name] = value
    _consume(state, tuple(p for p in prefixes if p != "net."))
    if any(key.startswith("net.") for key in state):
        state = OrderedDict((k, v) for k, v in state.items() if k.startswith("net."))
        _consume(state, ("net.",), once=True)
    else:
        _consume(state, prefixes)
    return dict(state)


def _consume(state: OrderedDict, prefixes: Sequence[str], once: bool = False) -> None:
    """Strip each of ``prefixes`` from the front of the keys with torch's ``consume_prefix_in_state_dict_if_present``,
    until no key starts with one (or once); two keys that would become one are refused first (torch keeps one)."""
    while prefix := next((p for p in prefixes if any(key.startswith(p) for key in state)), None):
        renamed = Counter(key.removeprefix(prefix) for key in state)
        if clash := next((key for key, count in renamed.items() if count > 1), None):
            raise _collision(clash)
        # torch renames in place, in order: 'module.module.x' would overwrite a later 'module.x' before moving it.
        position = {key: i for i, key in enumerate(state)}
        peeled = ((k, k[len(prefix) :]) for k in state if k.startswith(prefix))
        if clash := next((new for k, new in peeled if position.get(new, -1) > position[k]), None):
            raise _collision(clash)
        consume_prefix_in_state_dict_if_present(state, prefix)
        if once:
            return


def _collision(key: str) -> CheckpointError:
    return CheckpointError(f"Two entries of the checkpoint both become {key!r} once wrapper prefixes are removed.")


def plain_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The plain network's state_dict from a Lightning checkpoint (``state_dict``), a DeepSpeed
    (``module``) or torch.distributed.checkpoint/Fabric (``model``) one, or a plain state_dict."""
    state = next(
        (checkpoint[k] for k in ("state_dict", "module", "model") if isinstance(checkpoint.get(k), Mapping)), checkpoint
    )
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            "The file has no state_dict of tensors (expected a Lightning checkpoint or a state_dict)."
        )
    return strip_prefixes(state)


def _unwrapped_state(checkpoint: Mapping) -> dict[str, torch.Tensor] | None:
    """A plain state_dict's keys with only wrapper parts (``_orig_mod``, FSDP units) removed."""
    if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return None
    return {clean_name(k): v for k, v in checkpoint.items()}


def save_net(state_dict: Mapping[str, torch.Tensor], path: str | Path, writer: str = "net.pt export") -> Path:
    """Write a plain state_dict (tensors only, on CPU) so ``torch.load(path, weights_only=True)`` reads it.

    The write is atomic (see :func:`save_atomically`).
    """
    return save_atomically({k: v.detach().cpu().clone() for k, v in state_dict.items()}, path, writer)


def save_atomically(obj: object, path: str | Path, writer: str = "this command") -> Path:
    """``torch.save`` ``obj`` to ``path`` through :func:`write_atomically`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise fully before touching the disk
    return write_atomically(buffer.getbuffer(), path, writer)


# Not torch.save (no atomic mode) nor Lightning's _atomic_save (an fsspec rename without any fsync).
def write_atomically(data: bytes | memoryview, path: str | Path, writer: str = "this command") -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path`` and
    fsync the directory: a process killed at any moment leaves either the old file or the new
    one, complete, under ``path`` (at worst a stray ``.<name>.<pid>.tmp`` beside it). Every file the
    template writes comes through here, and meets the one rule of project.run.directory.check_write first."""
    path = Path(path)
    directory.check_write(path, writer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_into(
    model: nn.Module, source: str | Path | Mapping, strict: bool = True, dry_run: bool = False, name: str | None = None
) -> nn.Module:
    """Load a checkpoint, net.pt or state_dict into ``model``; mismatches raise one clear error.

    ``dry_run=True`` only checks that every key and shape fits, and leaves ``model`` untouched.
    """
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    state = plain_state_dict(checkpoint)
    expected = model.state_dict()
    if set(state) != set(expected):
        # A plain state_dict of a net whose own children are called ``model`` or ``module``: the
        # prefixes were the net's, not a wrapper's.
        as_saved = _unwrapped_state(checkpoint)
        if as_saved is not None and set(as_saved) == set(expected):
            state = as_saved
    parts = differences(state, expected, strict)
    if parts:
        name = name or (source if isinstance(source, (str, Path)) else "the state_dict")
        raise CheckpointError(
            f"{name} does not fit {type(model).__name__} ({'; '.join(parts)}); "
            "it was saved from a different architecture or configuration."
        )
    if not dry_run:
        model.load_state_dict(state, strict=strict)
    return model


def read_checkpoint(path: str | Path, weights_only: bool = True) -> dict:
    """Any checkpoint this template writes, as one dict: a file, or a sharded/DeepSpeed directory.

    A torch.distributed.checkpoint directory (FSDP ``state_dict_type="sharded"``: ``.metadata``,
    ``*.distcp`` and Lightning's ``meta.pt``) is gathered in this one process, without a process
    group; its model entries become ``state_dict``. A DeepSpeed directory is read from
    ``checkpoint/mp_rank_00_model_states.pt`` (ZeRO stages 1 and 2 keep the full weights there).
    """
    path = Path(path)
    if not path.is_dir():
        return load_file(path, weights_only=weights_only)
    if (path / ".metadata").is_file():
        return _read_distributed_checkpoint(path, weights_only)
    deepspeed = sorted(path.glob("*/mp_rank_00_model_states.pt")) + sorted(path.glob("mp_rank_00_model_states.pt"))
    if deepspeed:
        checkpoint = load_file(deepspeed[0], weights_only=weights_only)
        if not checkpoint.get("module") and list(path.rglob("zero_pp_rank_*")):
            raise CheckpointError(
                f"{path} is a DeepSpeed ZeRO stage 3 checkpoint (its weights are sharded across files); "
                "consolidate it first with the zero_to_fp32.py script DeepSpeed writes beside it."
            )
        return checkpoint
    raise CheckpointError(
        f"{path} is a directory but neither a torch.distributed.checkpoint (no .metadata) nor a DeepSpeed "
        "checkpoint (no mp_rank_00_model_states.pt); pass a .ckpt or .pt file."
    )


def _read_distributed_checkpoint(path: Path, weights_only: bool) -> dict:
    from torch.distributed.checkpoint import CheckpointException, FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = FileSystemReader(path)
    if weights_only:
        _check_metadata(path / ".metadata")  # FileSystemReader unpickles it without restrictions
    try:
        metadata = reader.read_metadata()
        top_level = {fqn_path[0] for fqn_path in metadata.planner_data.values() if fqn_path}
        # Only the model entries: the optimiser state of a large model can be twice its size.
        keys = {"model"} if "model" in top_level else None
        state: dict = {}
        planner = (
            _checked_planner(_EmptyStateDictLoadPlanner, path)(keys=keys)
            if weights_only
            else _EmptyStateDictLoadPlanner(keys=keys)
        )
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    except CheckpointError:
        raise
    except CheckpointException as err:
        raise _unwrapped(err, path) from None
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable torch.distributed.checkpoint directory ({type(err).__name__}: {err})."
        ) from err
    meta = path / "meta.pt"  # Lightning's FSDP strategy writes everything but the tensors here
    checkpoint = load_file(meta, weights_only=weights_only) if meta.is_file() else {}
    if "model" in state:
        checkpoint["state_dict"] = state["model"]
    else:
        checkpoint.update(state)
    return checkpoint


def _unwrapped(err, path: Path) -> CheckpointError:
    """The one-sentence error inside torch.distributed.checkpoint's CheckpointException, which wraps
    what a planner raised as (exception, traceback) per rank."""
    first = next(iter(err.failures.values()))[0]
    if isinstance(first, CheckpointError):
        return first
    return CheckpointError(
        f"{path} is not a readable torch.distributed.checkpoint directory ({type(first).__name__}: {first})."
    )


def check_distributed_checkpoint(path: str | Path) -> None:
    """Refuse a torch.distributed.checkpoint directory whose metadata or non-tensor entries hold
    Python objects beyond plain data, before anything else (Lightning's FSDP resume) unpickles them.

    Only the non-tensor entries are read (a few bytes each), not the weights or optimiser state.
    """
    from torch.distributed.checkpoint import CheckpointException, FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    _check_metadata(path / ".metadata")
    reader = FileSystemReader(path)
    try:
        metadata = reader.read_metadata()
        entries = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
        if entries:
            planner = _checked_planner(_EmptyStateDictLoadPlanner, path)(keys=entries)
            _load_state_dict({}, storage_reader=reader, planner=planner, no_dist=True)
    except CheckpointException as err:
        raise _unwrapped(err, path) from None
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable torch.distributed.checkpoint directory ({type(err).__name__}: {err})."
        ) from err


def _checked_planner(planner_class: type, path: Path) -> type:
    """``planner_class`` whose non-tensor entries are read with ``weights_only=True``.

    torch.distributed.checkpoint stores every entry that is not a tensor (an int, a dict of
    settings, or any object) as a ``torch.save`` blob in the ``.distcp`` data, and its planners
    read those blobs back with ``weights_only=False``: a crafted entry would run code. Each blob is
    first read with the restricted unpickler; only one that holds plain data is then handed on.
    """

    class CheckedPlanner(planner_class):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                torch.load(value, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise CheckpointError(
                    f"{path} holds an entry ({read_item.dest_index.fqn}) with Python objects beyond tensors and plain "
                    "containers, so it was not loaded (it could run code); only read it with weights_only=False "
                    "(--unsafe) if you trust its source."
                ) from err
            value.seek(0)
            super().load_bytes(read_item, value)

    return CheckedPlanner


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint ``.metadata`` file, refusing anything but its own classes."""

    ALLOWED = {
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    }

    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in self.ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            if module.startswith("torch.distributed.checkpoint."):
                found = super().find_class(module, name)
                if isinstance(found, type):
                    return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


def _check_metadata(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects that checkpoint metadata never contains ({err}), so it was not loaded "
            "(it could run code); only read it with weights_only=False if you trust its source."
        ) from err
    except Exception as err:
        raise CheckpointError(f"{path} is not readable checkpoint metadata ({type(err).__name__}: {err}).") from err


def convert(source: str | Path, out: str | Path, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Write the plain network's state_dict from any checkpoint ``source`` to ``out`` (``net.pt``).

    ``out`` is checked before anything is read (see :func:`check_output`) and written atomically,
    so a refused or failed conversion leaves every file as it was.
    """
    check_output(source, out)
    state = plain_state_dict(read_checkpoint(source, weights_only=weights_only))
    if not state:
        raise CheckpointError(f"{source} holds no tensors to export.")
    try:
        save_net(state, out, "convert")
    except OSError as err:
        raise CheckpointError(f"Cannot write {out} ({err.strerror or err}); choose another output path.") from err
    return state


def check_output(source: str | Path, out: str | Path) -> None:
    """Refuse an output path that would overwrite the checkpoint being converted (also through a
    symlink or hard link, or inside a checkpoint directory), is a directory, or lies in a directory
    that is missing or not writable."""
    # os.path's tests answer False instead of raising (e.g. for a name too long), like a write would fail.
    source, out = Path(source), Path(out)
    if not os.path.exists(source):
        raise CheckpointError(f"Checkpoint {source} does not exist; check the path.")
    if os.path.exists(out) and os.path.samefile(source, out):
        raise CheckpointError(
            f"The output {out} is the checkpoint being converted, which would be replaced by its plain weights; "
            "give another output path, e.g. net.pt."
        )
    if os.path.isdir(source) and out.resolve().is_relative_to(source.resolve()):
        raise CheckpointError(
            f"The output {out} lies inside the checkpoint directory {source}; give a path outside it, e.g. net.pt."
        )
    if os.path.isdir(out):
        raise CheckpointError(f"The output {out} is a directory; give a file path, e.g. {out / 'net.pt'}.")
    parent = out.parent
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise CheckpointError(f"The output's directory {parent} {what}; create it first or give another output path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"The output's directory {parent} is not writable; give an output path in a directory you can write."
        )
