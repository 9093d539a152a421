"""Reading an experiment YAML file (``-c`` of the CLI and of ``project.tools.summary``) with a loader that
cannot run code, and one sentence naming the file (and line) for every way the file can be wrong:
not text, empty, a syntax error, a key given twice (YAML would keep the last one silently), or not
a mapping of options."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from project.errors import UserError


class ConfigFileError(UserError):
    """An experiment YAML file cannot be used; the message names the file and, where known, the line."""


class _StrictSafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no Python objects), refusing a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` may repeat keys on purpose
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigFileError(
                            f"{self.name}: the key {key!r} is given twice (lines {seen[key]} and {line}); "
                            "YAML would keep only the last one, so remove one of them."
                        )
                    seen[key] = line
                except TypeError:
                    continue  # an unhashable key: construct_mapping reports it
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict:
    """The options in the YAML file ``path`` (a mapping), or one :class:`ConfigFileError` sentence."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigFileError(f"Cannot read the config file {path} ({err.strerror or err}); check the path.") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(
            f"{path} is not a text file (byte {err.start} is not UTF-8); give an experiment YAML such as experiments/lenet.yaml."
        ) from None
    if not text.strip() or all(line.lstrip().startswith("#") for line in text.splitlines() if line.strip()):
        raise ConfigFileError(f"{path} is empty (no options); give an experiment YAML such as experiments/lenet.yaml.")
    loader = _StrictSafeLoader(text)
    loader.name = str(path)
    try:
        options = loader.get_single_data()
    except yaml.constructor.ConstructorError as err:
        line = f" (line {err.problem_mark.line + 1})" if err.problem_mark is not None else ""
        raise ConfigFileError(
            f"{path} asks for something a config file cannot hold{line}: {err.problem}; only plain values, lists "
            "and mappings are read (a Python object is never built from YAML)."
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigFileError(
            f"{path} is not valid YAML{where}: {err.problem or err.context}; fix the syntax there."
        ) from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path} is not valid YAML ({' '.join(str(err).split())}); fix the syntax.") from None
    finally:
        loader.dispose()
    if not isinstance(options, dict):
        kind = "empty" if options is None else f"a {type(options).__name__}, not a mapping of options"
        raise ConfigFileError(
            f"{path} is {kind}; an experiment YAML maps option names to values (e.g. `model:`, `trainer:`)."
        )
    return options


def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """Dotted keys as the command line and the sweep files name them: ``{class_path, init_args}`` becomes the
    key's value (the class) plus its arguments under the key (``model.optimizer.lr``, ``data.batch_size``);
    lists of such blocks are numbered (``trainer.callbacks.0``); tuples become lists, so a setting read back
    from a checkpoint compares equal to the config's."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, Mapping) and value:
            if "class_path" in value:
                flat[name] = value["class_path"]
                value = {
                    **(value.get("init_args") or {}),
                    **{k: v for k, v in value.items() if k not in ("class_path", "init_args")},
                }
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat
