"""Which parameters train, and how: ``model.param_groups`` (per-layer lr and weight decay) and ``model.freeze``.

Both take globs over ``net.named_parameters()`` names (``fc*``, ``stages.0.*``); ``python -m project summary
--internals`` lists the names. A pattern that matches nothing is a mistake, refused in one sentence.
"""

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from project.errors import UserError
from project.state_dicts import clean_name

#: The keys of one ``model.param_groups`` entry.
PARAM_GROUP_KEYS = ("match", "lr_scale", "weight_decay", "name")
#: The name of the group of parameters that no ``param_groups`` entry matches (they train at the optimizer's lr).
BASE_GROUP = "base"


def _check_param_group_specs(specs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``model.param_groups`` entries with their defaults filled in; a mistake raises a one-sentence UserError."""
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise UserError(f"model.param_groups must be a list such as [{{match: 'fc*', lr_scale: 10}}], got {specs!r}.")
    checked, names = [], {BASE_GROUP}
    for i, spec in enumerate(specs):
        where = f"model.param_groups[{i}]"
        if not isinstance(spec, Mapping):
            raise UserError(f"{where} must be a mapping such as {{match: 'fc*', lr_scale: 10}}, got {spec!r}.")
        unknown = sorted(set(spec) - set(PARAM_GROUP_KEYS))
        if unknown:
            raise UserError(f"{where} has the unknown key {unknown[0]!r}; the keys are {', '.join(PARAM_GROUP_KEYS)}.")
        match = spec.get("match")
        if not isinstance(match, str) or not match:
            raise UserError(
                f"{where} needs match: a glob over parameter names such as 'fc*' or 'stages.0.*', got {match!r}."
            )
        lr_scale = spec.get("lr_scale", 1.0)
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise UserError(
                f"{where} (match {match!r}) needs lr_scale > 0 (the group's lr is the optimizer's lr times it), got {lr_scale!r}."
            )
        decay = spec.get("weight_decay")
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0):
            raise UserError(f"{where} (match {match!r}) needs weight_decay >= 0, got {decay!r}.")
        name = str(spec.get("name", match))
        if name in names:
            raise UserError(
                f"{where} is named {name!r} like another group ({BASE_GROUP!r} is taken too); set its name key to a unique one."
            )
        names.add(name)
        checked.append({"match": match, "lr_scale": float(lr_scale), "weight_decay": decay, "name": name})
    return checked


def _names_look_like(net: nn.Module, trainable: bool = True) -> str:
    """``(the names look like <first>, <last>; ...)``: what a pattern that matched nothing could have matched."""
    names = [n for n, p in net.named_parameters() if p.requires_grad or not trainable]
    example = f"{names[0]}, {names[-1]}" if names else "none: no trainable parameters"
    return f"the names look like {example}; python -m project summary --internals lists them all"


def group_parameters(net: nn.Module, param_groups: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The optimiser's parameter groups for ``net``: what ``ImageClassifier`` hands ``model.optimizer``.

    Each trainable parameter (frozen ones are left out) goes to the first ``param_groups`` entry whose
    ``match`` (a glob over ``net.named_parameters()`` names, e.g. ``fc*``) it matches, or else to the
    ``base`` group. Every entry makes up to two groups: ``<name>`` with its weights, with its
    ``weight_decay`` if it gives one (else the optimiser's), and ``<name>/no_decay`` with its biases and
    normalisation parameters (fewer than two dimensions), never decayed (``weight_decay`` 0). Empty
    groups are left out. Each group carries ``name`` (LearningRateMonitor's column:
    ``lr-<Optimizer>/<name>``), ``lr_scale`` (its lr is the optimiser's times it: see
    :func:`scale_learning_rates`), ``params`` and ``param_names``.
    """
    specs = _check_param_group_specs(param_groups or [])
    base = {"match": None, "lr_scale": 1.0, "weight_decay": None, "name": BASE_GROUP}
    buckets: list[tuple[list, list]] = [([], []) for _ in range(len(specs) + 1)]
    for raw_name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        name = clean_name(raw_name)  # without the names wrappers insert (FSDP units, activation checkpointing)
        index = next((i for i, spec in enumerate(specs) if fnmatch.fnmatchcase(name, spec["match"])), len(specs))
        buckets[index][0 if param.ndim >= 2 else 1].append((name, param))
    for spec, (decay, no_decay) in zip(specs, buckets):
        if not decay and not no_decay:
            raise UserError(
                f"model.param_groups entry {spec['name']!r} (match {spec['match']!r}) matches no trainable parameter of "
                f"{type(net).__name__} that an earlier entry has not taken ({_names_look_like(net)}): "
                "fix the pattern or drop the entry."
            )
    groups = []
    for spec, (decay, no_decay) in zip([*specs, base], buckets):
        for members, decay_value, suffix in ((decay, spec["weight_decay"], ""), (no_decay, 0.0, "/no_decay")):
            if members:
                group = {
                    "name": spec["name"] + suffix,
                    "params": [p for _, p in members],
                    "param_names": [n for n, _ in members],
                    "lr_scale": spec["lr_scale"],
                }
                if decay_value is not None:
                    group["weight_decay"] = float(decay_value)
                groups.append(group)
    return groups


def scale_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Set each group's lr to the optimiser's configured lr times the group's ``lr_scale``, once, right after
    the optimiser is built (before a scheduler records the groups' initial rates)."""
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    if all(scale == 1.0 for scale in scales):
        return
    if "lr" not in optimizer.defaults:
        raise UserError(
            f"model.param_groups sets lr_scale, but the optimizer {type(optimizer).__name__} has no lr argument to scale; "
            "drop lr_scale or use an optimizer with one."
        )
    for group, scale in zip(optimizer.param_groups, scales):
        group["lr"] = optimizer.defaults["lr"] * scale


def check_optimizer(optimizer: Callable, groups: list[dict[str, Any]]) -> None:
    """Build the optimiser once, so that a mistake in its arguments (torch checks them) or a learning rate
    that cannot train stops the command with one sentence naming the option, before anything runs."""
    try:
        built = optimizer(groups)
    except (ValueError, TypeError) as err:
        raise UserError(f"model.optimizer refused its arguments: {err}") from None
    lr = built.defaults.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
        raise UserError(f"model.optimizer.lr must be > 0, got {lr}.")
    # torch refuses only negative ones; 1 or more makes the step grow instead of average.
    for key in ("momentum", "betas"):
        values = built.defaults.get(key)
        values = values if isinstance(values, (tuple, list)) else [values]
        if any(isinstance(v, (int, float)) and not 0 <= v < 1 for v in values):
            raise UserError(f"model.optimizer.{key} must be in [0, 1), got {built.defaults[key]}.")
    scale_learning_rates(built)


# --------------------------------------------------------------------------- freezing

#: Normalisation layers with running statistics (BatchNorm*, SyncBatchNorm, InstanceNorm with track_running_stats).
RUNNING_STATS_NORMS = (nn.modules.batchnorm._NormBase,)


def freeze(net: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze the parameters of ``net`` whose names match any of the glob ``patterns`` (``model.freeze``):
    ``requires_grad=False``, so :func:`group_parameters` leaves them out of the optimiser. Returns the names
    of the normalisation layers that are frozen whole (each of its parameters and buffers matches a
    pattern): ``ImageClassifier`` puts them in ``eval()`` at every training epoch's start, so a frozen
    BatchNorm keeps the running statistics it was loaded with instead of re-estimating them on the new data.

    Unfreezing later (Lightning's ``BaseFinetuning.make_trainable``) is honoured: a norm layer whose
    parameters train again is left in training mode.
    """
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise UserError(
            f"model.freeze must be a list of globs over parameter names such as ['conv*'], got {patterns!r}."
        )
    named = {clean_name(n): p for n, p in net.named_parameters()}
    for pattern in patterns:
        matched = [p for n, p in named.items() if fnmatch.fnmatchcase(n, str(pattern))]
        if not matched:
            raise UserError(
                f"model.freeze pattern {pattern!r} matches no parameter of {type(net).__name__} "
                f"({_names_look_like(net, trainable=False)}): fix the pattern or drop it."
            )
        for param in matched:
            param.requires_grad_(False)

    def frozen(prefix: str, module: nn.Module) -> bool:
        names = [
            f"{prefix}.{n}" for n, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        ]
        return bool(names) and all(any(fnmatch.fnmatchcase(n, str(p)) for p in patterns) for n in names)

    return [
        clean_name(name)
        for name, module in net.named_modules()
        if isinstance(module, RUNNING_STATS_NORMS) and frozen(clean_name(name), module)
    ]


def keep_frozen_norms_in_eval(net: nn.Module, names: Sequence[str]) -> None:
    """Put the frozen normalisation layers ``names`` (from :func:`freeze`) in ``eval()``, unless their parameters
    train again: Lightning puts the whole model in training mode at each epoch's start, which would update
    their running statistics."""
    modules = {clean_name(n): m for n, m in net.named_modules()}
    for name in names:
        module = modules[name]
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def name_added_groups(optimizer: torch.optim.Optimizer, net: nn.Module) -> None:
    """Let groups added to ``optimizer`` later without names (Lightning's ``BaseFinetuning.unfreeze_and_add_param_group``)
    join the groups of :func:`group_parameters`: torch refuses a group without ``param_names`` beside groups with
    them, so their parameters' names, and a ``name`` (``added_<index>``, LearningRateMonitor's column), are filled in."""
    names = {param: clean_name(name) for name, param in net.named_parameters()}
    add = optimizer.add_param_group

    def add_param_group(group: dict[str, Any]) -> None:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        named = {"param_names": [names.get(p, f"param{i}") for i, p in enumerate(params)]}
        add({"name": f"added_{len(optimizer.param_groups)}", **named, **group, "params": params})

    optimizer.add_param_group = add_param_group
