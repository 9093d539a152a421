"""Data modules as plug-ins: what the template reads from any LightningDataModule named in a YAML
``data:`` block, and the checks the CLI makes on it, each failing with one sentence.

Required: ``num_classes`` (int) and ``image_shape`` ((channels, height, width)); the CLI links
them into the model. Optional: ``classes`` (class names, for the plots; default ``0, 1, ...``)
and ``mean`` and ``std`` (the per-channel normalisation the module applied; the plots undo it).
"""

import functools
import os
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


class DataPluginParser(LightningArgumentParser):
    """LightningCLI's parser: a data module's own error (a required attribute missing, arguments it refuses)
    instead of jsonargparse's wrapped one, every parse error without the usage screen (exit status 2), and
    each -c file read strictly first."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises instead of exiting
        # The message without jsonargparse's usage screen (a hundred lines of options before it).
        sentence = message.rstrip()
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
