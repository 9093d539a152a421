"""What the hook callbacks share: the network inside the LightningModule, its layers by name or type, logging."""

import re
from collections.abc import Sequence

import lightning as L
from torch import nn
from torch.utils.hooks import RemovableHandle

from project.errors import UserError
from project.state_dicts import clean_name  # so a layer has one name under every strategy


def network(pl_module: L.LightningModule) -> nn.Module:
    """The plain network a LightningModule trains (``pl_module.net``), or the module itself."""
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, nn.Module) else pl_module


def is_compiled(module: nn.Module) -> bool:
    """True for ``torch.compile(module)`` wrappers and modules compiled in place with ``module.compile()``."""
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")


def select_layers(
    net: nn.Module,
    layers: Sequence[str] | None,
    types: Sequence[str] | None,
    default_types: Sequence[str],
    owner: str,
) -> dict[str, nn.Module]:
    """Submodules of ``net`` whose name matches a glob in ``layers`` or whose class name is in ``types``.

    With neither given, every submodule whose class name is in ``default_types``. ``owner`` names
    the callback in the error raised when nothing matches.
    """
    if layers is None and types is None:
        types = default_types
    patterns, type_names = list(layers or []), set(types or [])
    chosen = {
        clean_name(name): module
        for name, module in net.named_modules()
        if name and (type(module).__name__ in type_names or matches(clean_name(name), patterns))
    }
    if not chosen:
        available = sorted({type(m).__name__ for _, m in net.named_modules()})
        raise UserError(
            f"{owner} matched no layer of {type(net).__name__} (layers={patterns or None}, types={sorted(type_names) or None}); "
            f"give name patterns such as 'conv1' or 'stages.*', or types among {', '.join(available)}."
        )
    return chosen


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Glob match on dotted module names: ``*`` stays within one part, ``**`` spans parts.

    ``stages.*`` matches the stages themselves, ``stages.*.*`` their blocks and ``stages.**``
    everything below them.
    """
    return any(re.fullmatch(_glob_regex(p), name) for p in patterns)


def _glob_regex(pattern: str) -> str:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    return "".join({"**": ".*", "*": "[^.]*", "?": "[^.]"}.get(part, re.escape(part)) for part in parts)


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` to every logger at ``step`` (loggers write on global rank 0 only).

    Straight to the loggers rather than through ``LightningModule.log``, which would hold them
    back unless ``step`` happened to be a multiple of ``trainer.log_every_n_steps``.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class HookCallback(L.Callback):
    """Base of the callbacks that put hooks on the net: it checks they come before torch.compile
    and removes every handle at ``teardown`` or on an exception, so no hook outlives ``fit``."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._recording = False

    def hookable_net(self, pl_module: L.LightningModule) -> nn.Module:
        net = network(pl_module)
        if is_compiled(net):
            raise RuntimeError(
                f"{type(self).__name__} must register its hooks before torch.compile, but the net is already compiled; "
                "set model.compile=true instead of compiling the net yourself (the classifier compiles after callbacks' setup)."
            )
        return net

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._recording = False
