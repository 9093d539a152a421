"""Names in state_dicts, torch-free: the prefixes and name parts that wrappers add to a plain net's
keys, and how a state_dict differs from the one a model expects.

The one list of wrapper names, shared by the core (classifier, callbacks) and checkpoints.py.
"""

from collections.abc import Mapping

#: Prefixes that wrappers add in front of the plain model's keys: ImageClassifier (``net.``),
#: DistributedDataParallel (``module.``), torch.compile (``_orig_mod.``), Lightning's
#: DeepSpeed/FSDP forward wrappers (``_forward_module.``) and generic ``model.`` holders.
WRAPPER_PREFIXES = ("_forward_module.", "module.", "model.", "net.", "_orig_mod.")
#: Name parts that wrappers insert anywhere in a key: torch.compile'd submodules, FSDP units and
#: activation-checkpointing wrappers. They are removed wherever they occur.
WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


# Not torch's consume_prefix_in_state_dict_if_present: these parts sit mid-name, in module names too; it strips a lead.
def clean_name(name: str) -> str:
    """A parameter, buffer or module name without the wrapper parts, so it is the same under every strategy."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def differences(state: Mapping, expected: Mapping, strict: bool = True) -> list[str]:
    """What keeps ``state`` from loading where ``expected`` (a model's state_dict) is: missing and
    unexpected keys (with ``strict``) and shape mismatches; empty when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    parts = []
    if strict and missing:
        parts.append(f"missing keys {_short(missing)}")
    if strict and unexpected:
        parts.append(f"unexpected keys {_short(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches {_short(shapes)}")
    return parts


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
