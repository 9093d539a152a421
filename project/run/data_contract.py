"""Data modules as plug-ins: what the template reads from any LightningDataModule named in a YAML
``data:`` block, and the checks the CLI makes on it, each failing with one sentence.

Required: ``num_classes`` (int) and ``image_shape`` ((channels, height, width)); the CLI links
them into the model. Optional: ``classes`` (class names, for the plots; default ``0, 1, ...``)
and ``mean`` and ``std`` (the per-channel normalisation the module applied; the plots undo it).
"""

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser

from project.errors import UserError
from project.run.config_files import ConfigFileError, read_config_file

#: The attributes every data module must have: the CLI sets the model's from them.
REQUIRED = ("num_classes", "image_shape")
RECIPE = 'see the README\'s "Add your own dataset"'


class DataModuleError(UserError):
    """The configured data module lacks an attribute the model is built from (``REQUIRED``)."""


def declared(name: str) -> Callable[[LightningDataModule], Any]:
    """``compute_fn`` of an argument link from the data module: its attribute ``name``, or one sentence
    saying it is missing (jsonargparse would otherwise skip the link and leave the model's default).
    A partial of a module-level function, so the parser stays picklable (ddp_spawn pickles it)."""
    return functools.partial(read_declared, name)


def read_declared(name: str, data: LightningDataModule) -> Any:
    value = getattr(data, name, None)
    if value is None:
        raise DataModuleError(
            f"The data module {type(data).__module__}.{type(data).__qualname__} has no {name}; "
            f"give it the attributes {' and '.join(REQUIRED)} (the model is built from them), {RECIPE}."
        )
    return value


_NOT_A_DATAMODULE = re.compile(r"Import path (\S+) does not correspond to a subclass of LightningDataModule")
_NOT_IMPORTABLE = re.compile(
    r"Problem with given class_path '([^']+)':\s*(No module named \S+|module '[^']+' has no attribute '[^']+')"
)


def data_class_problem(message: str) -> str | None:
    """One sentence for jsonargparse's report on a ``data`` class_path it refused, or None for other errors."""
    if not message.startswith('Parser key "data":'):
        return None
    found = _NOT_A_DATAMODULE.search(message)
    if found is None and "does not correspond to a subclass of LightningDataModule" in message:
        found = re.search(r"Given value: (\S+)", message)  # --data os.system: the import path is only echoed
    if found:
        return (
            f"data.class_path {found[1]} is not a LightningDataModule subclass, so it was not called; "
            f"name a LightningDataModule such as project.data.CIFAR100DataModule, {RECIPE}."
        )
    if found := _NOT_IMPORTABLE.search(message):
        return (
            f"data.class_path {found[1]} cannot be imported ({found[2]}); check the spelling and that its package "
            f"is importable (installed, or on PYTHONPATH), {RECIPE}."
        )
    return None  # e.g. a wrong init_args value: jsonargparse's message names the key


#: The classes that replaced the string values of model.optimizer and model.scheduler (null: no scheduler).
_RENAMED_CLASSES = {
    "sgd": "torch.optim.SGD",
    "adamw": "torch.optim.AdamW",
    "cosine": "project.schedules.WarmupCosine",
    "onecycle": "torch.optim.lr_scheduler.OneCycleLR",
    "step": "torch.optim.lr_scheduler.StepLR",
    "none": "null",
}
#: Model options that moved into model.optimizer's or model.scheduler's init_args.
_MOVED_MODEL_KEYS = ("lr", "momentum", "nesterov", "betas", "weight_decay", "step_size", "gamma")
_OLD_STRING = re.compile(
    r'Parser key "model\.(optimizer|scheduler)":.*(?:dot import path string|Given value): (\w+)\s*$', re.S
)
_MOVED_KEY = re.compile(r"Group 'model' does not accept option '(\w+)'|unrecognized arguments:.*--model\.(\w+)")


def old_training_option(message: str) -> str | None:
    """One sentence showing the class_path form for the string form of the optimiser and schedule
    (``optimizer: sgd``, ``scheduler: cosine``, ``model.lr``) that the template used before; None for other errors."""
    see = 'see the README\'s "Change the optimiser or schedule"'
    if (found := _MOVED_KEY.search(message)) and (found[1] or found[2]) in _MOVED_MODEL_KEYS:
        name = found[1] or found[2]
        owner, example = (
            ("scheduler", "{class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 30, gamma: 0.1}}")
            if name in ("step_size", "gamma")
            else (
                "optimizer",
                "{class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}}",
            )
        )
        return (
            f"model.{name} is the old form: it is now an argument of model.{owner}'s class, --model.{owner}.{name} "
            f"on the command line, or in YAML model: {{{owner}: {example}}}; {see}."
        )
    found = _OLD_STRING.search(message)
    if not found or found[2].lower() not in _RENAMED_CLASSES:
        return None
    key, value = found[1], found[2].lower()
    new = _RENAMED_CLASSES[value]
    yaml = "null" if new == "null" else f"{{class_path: {new}, init_args: {{...}}}}"
    command_line = f"--model.{key} null" if new == "null" else f"--model.{key} {new} --model.{key}.<argument> <value>"
    moved = (
        "(model.lr, momentum, ... moved into them)" if key == "optimizer" else "(model.step_size, gamma moved into it)"
    )
    return (
        f"model.{key} {value} is the old form: model.{key} is now a class with its own arguments {moved}, "
        f"{command_line} on the command line, or in YAML {key}: {yaml}; {see}."
    )


_UNKNOWN_CLASS = re.compile(
    r'Parser key "model\.(optimizer|scheduler)":.*?(?:dot import path string: (\S+)|'
    r"(module '[\w.]+' has no attribute '\w+')\. Got value: (\S+))",
    re.S,
)


def unknown_class(message: str) -> str | None:
    """One sentence for a model.optimizer or model.scheduler that names no importable class, or a
    class (or function) of another kind."""
    key = re.match(r'Parser key "model\.(optimizer|scheduler)":', message)
    if key is None:
        return None
    key = key[1]
    kind, example = (
        ("torch.optim", "torch.optim.AdamW")
        if key == "optimizer"
        else ("torch.optim.lr_scheduler", "torch.optim.lr_scheduler.StepLR")
    )
    advice = f"give its full class_path, e.g. {example} (any {kind} class, or your own by its import path)."
    wrong_kind = re.search(r"Expected '([\w.]+)' to be a (?:subclass of|function that returns)", message)
    if wrong_kind:
        what = "an optimiser" if key == "optimizer" else "a learning-rate scheduler"
        return f"model.{key} {wrong_kind[1]} is not {what} class: {advice}"
    found = _UNKNOWN_CLASS.search(message)
    if not found:
        return None
    value = found[2] or found[4]
    why = f" ({found[3]})" if found[3] else ""
    return f"model.{key} {value} is not a class that can be imported{why}: {advice}"


_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "NoneType": "null",
}


def union_problem(message: str) -> str | None:
    """One sentence for jsonargparse's report on a value no type of a Union accepts (8-12 lines listing
    every subtype and why each refused it), or None for other errors."""
    if "Does not validate against any of the Union subtypes" not in message:
        return None
    key, given = re.match(r'Parser key "([^"]+)"', message), re.search(r"Given value: (.*)", message)
    if key is None or given is None:
        return None
    # A nested key of a class (data.val_size) refused its value: that key's own report, under the outer key.
    nested = message.find('Parser key "', 1)
    if nested > 0 and "Does not validate against any of the Union subtypes" in message[nested:]:
        sentence = union_problem(message[nested:])
        if sentence is not None:
            return f"{key[1]}.{sentence}"
    inner = re.search(r'Parser key "([^"]+)":\s*Expected an? (.+?)\. Got value: (.*)', message)
    if inner:
        expected = re.sub(r"<class '(?:\w+\.)*(\w+)'>", lambda m: _TYPE_WORDS.get(m[1], m[1]), inner[2])
        return f"{key[1]}.{inner[1]} must be {expected}, got {inner[3].strip()!r}."
    # A class that the key takes, refused for its own reason (a required argument missing, an unknown
    # one; a wrong value is the rule above): jsonargparse's reason, never "does not accept Namespace(...)".
    problem = re.search(
        r"- Problem with given class_path '([^']+)':\s*(.+?)(?=\n\s*- |\n\s*Given value|\Z)", message, re.S
    )
    if problem:
        reason = " ".join(problem[2].split()).rstrip(".")
        return f"{key[1]} {problem[1]}: {reason}; give them as --{key[1]}.init_args.<argument> <value> (or in YAML)."
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    choices: list[str] = []
    found = re.findall(r"Literal\[([^\]]*)\]|<class '(?:\w+\.)*(\w+)'>", subtypes[1] if subtypes else "")
    for literal, cls in found:
        words = [v.strip().strip("'\"") for v in literal.split(",")] if literal else [_TYPE_WORDS.get(cls, f"a {cls}")]
        choices += [w for w in words if w and w not in choices]
    if "a number" in choices and "a whole number" in choices:
        choices.remove("a whole number")  # int or float: any number
    valid = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else "".join(choices) or "another value"
    one_of = "one of " if any(literal for literal, _ in found) else ""
    return f"{key[1]} does not accept {given[1].strip()!r}; give {one_of}{valid}."


_TOP_LEVEL = re.compile(r"unrecognized arguments:.*?--(optimizer|lr_scheduler)(?:[= ](\S+))?")


def top_level_optimizer(message: str) -> str | None:
    """One sentence for LightningCLI's usual ``--optimizer Adam`` / ``--lr_scheduler StepLR``: here the
    optimiser and schedule are the model's arguments."""
    found = _TOP_LEVEL.search(message)
    if found is None:
        return None
    key = "optimizer" if found[1] == "optimizer" else "scheduler"
    value = found[2] or ("torch.optim.Adam" if key == "optimizer" else "torch.optim.lr_scheduler.StepLR")
    return (
        f"--{found[1]} is LightningCLI's top-level spelling; here the {'optimiser' if key == 'optimizer' else 'schedule'} "
        f"is the model's: give --model.{key} {value} (its arguments as --model.{key}.<argument> <value>), "
        'see the README\'s "Change the optimiser or schedule".'
    )


class DataPluginParser(LightningArgumentParser):
    """LightningCLI's parser, with one sentence (and exit status 2) for a bad ``data:`` class and for a
    data module that lacks a required attribute or refuses its arguments, instead of a wrapped
    traceback; every parse error is printed without the usage screen."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises instead of exiting
        # The message without jsonargparse's usage screen (a hundred lines of options before it).
        # unknown_class before union_problem: a scheduler of the wrong kind is a Union (or null) error too.
        sentence = (
            data_class_problem(message)
            or old_training_option(message)
            or unknown_class(message)
            or top_level_optimizer(message)
            or union_problem(message)
            or message.rstrip()
        )
        sys.stderr.write(f"error: {sentence}\n")
        sys.exit(2)

    def add_function_arguments(self, function, *args, linked_targets=None, **kwargs):
        # jsonargparse hands a function given as a class_path (``model.net: torchvision.models.resnet18``)
        # the link targets it hands a class, which add_function_arguments does not take (jsonargparse 4.53).
        added = super().add_function_arguments(function, *args, **kwargs)
        return added

    def parse_path(self, path, *args, **kwargs):
        # Every -c file is read once with a strict safe loader first, so an empty, binary or
        # malformed file, or a key given twice, is one sentence naming the file (and the line).
        try:
            read_config_file(path)
        except ConfigFileError as err:
            sys.stderr.write(f"error: {err}\n")
            sys.exit(2)
        return super().parse_path(path, *args, **kwargs)

    def instantiate(self, *args, **kwargs):
        try:
            return super().instantiate(*args, **kwargs)
        except ValueError as err:
            # In subclass mode jsonargparse wraps what a data module's __init__ or a link's compute_fn
            # raises ("Does not validate against any of the Union subtypes ..."); re-raise the original,
            # whose own sentence (and, for a bug, traceback) is what the user needs.
            cause = err
            while isinstance(cause.__cause__, Exception):
                cause = cause.__cause__
            if cause is err:
                raise
            raise cause from None
