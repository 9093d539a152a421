"""``python -m project summary``: every layer's output shape, parameters and buffers, from one dry forward pass.

    python -m project summary --model project.models.ResNet18 --input-size 3 32 32
    python -m project summary -c experiments/lenet.yaml --depth 1
    python -m project summary --model project.models.ResNet20 --internals --depth 2

The classic "print each layer's output shape" exercise, for any model and input size: a forward
hook on every submodule records what it returns while one random batch goes through the model
(in eval mode, without gradients, so no buffer changes); the hooks are removed afterwards.

With ``model.param_groups`` in the config (or ``--param-groups``) it also lists the optimiser's
parameter groups: which parameters train at which learning rate and weight decay (the lr in
``model.optimizer.init_args`` times the group's ``lr_scale``; the group's own weight decay, else the
optimiser's). ``--internals`` prints, instead of the table, what each module keeps in its
``_parameters``, ``_buffers``, ``_modules`` and hook dictionaries, and a hook being registered and removed.
"""

import argparse
import importlib
import inspect
import sys
from collections.abc import Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn

from project.errors import UserError
from project.run.config_files import read_config_file


def net_factory(class_path: str):
    """What ``class_path`` names, once it is known to build a ``torch.nn.Module``: a subclass, or a function
    annotated to return one (``torchvision.models.resnet18``, ``timm.create_model``), as ``fit`` takes for
    ``model.net``. Nothing is called before that: a config naming, say, ``os.system`` runs nothing."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(
            f"Cannot import the model class {class_path!r} ({err}); give a dotted path such as project.models.LeNet."
        ) from err
    if isinstance(factory, type) and issubclass(factory, nn.Module):
        return factory
    returns = inspect.signature(factory).return_annotation if inspect.isfunction(factory) else None
    if isinstance(returns, type) and issubclass(returns, nn.Module):
        return factory
    kind = f"the class {factory.__name__}" if isinstance(factory, type) else f"a {type(factory).__name__}"
    raise UserError(
        f"{class_path} is {kind}, not a torch.nn.Module subclass, so it was not called; "
        "give a model class such as project.models.LeNet (or a function that returns one)."
    )


def build_model(class_path: str, init_args: dict | None = None) -> nn.Module:
    """Instantiate ``package.module.Class`` (or call a model function) with keyword arguments, e.g.
    ``project.models.ResNet20`` or ``torchvision.models.resnet18``."""
    return net_factory(class_path)(**(init_args or {}))


class _Parsed(Exception):
    """Carries the parsed configuration out of the CLI before it builds anything."""

    def __init__(self, config) -> None:
        super().__init__("parsed")
        self.config = config


def net_through_cli(path: str, init_args: dict) -> nn.Module:
    """``model.net`` of ``path`` as ``fit -c path`` builds it: the config parsed by the CLI's own parser
    (the same defaults, types, links and one-sentence errors), ``init_args`` given as
    ``--model.net.init_args.<key>``, and ``num_classes`` the data module's unless ``init_args`` has one."""
    from jsonargparse import ArgumentParser  # imports Lightning: only for -c
    from lightning.pytorch import LightningDataModule

    from project.run.cli import ProjectCLI
    from project.run.data_contract import read_declared
    from project.run.model_contract import takes_num_classes, with_num_classes

    class ParseOnly(ProjectCLI):
        def before_instantiate_classes(self) -> None:  # before any run directory or object exists
            raise _Parsed(self.config[self.subcommand])

    overrides = [f"--model.net.init_args.{key}={yaml.safe_dump(value).strip()}" for key, value in init_args.items()]
    try:
        ParseOnly(args=["fit", "-c", path, *overrides])
    except _Parsed as parsed:
        config = parsed.config
    net = config.model.init_args.net.as_dict()
    if "num_classes" not in init_args and takes_num_classes(net["class_path"]):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--data", type=LightningDataModule)
        data = parser.instantiate(parser.parse_object({"data": config.data.as_dict()})).data
        net = with_num_classes(net, read_declared("num_classes", data))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)
    return parser.instantiate(parser.parse_object({"net": net})).net


def _shape(value) -> str:
    if isinstance(value, torch.Tensor):
        return str(list(value.shape))
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def layer_table(model: nn.Module, input_size: Sequence[int], batch_size: int = 2, device: str = "cpu") -> list[dict]:
    """One row per module (the model itself first): name, depth, type, output shapes, parameter and buffer counts.

    Counts include submodules; parameters are Lightning's ModelSummary counts (as ``fit`` prints). A module
    that runs more than once lists every output; one that never runs (or is replaced by a functional call
    such as ``F.relu``) shows ``-``.
    """
    outputs: dict[str, list[str]] = {}
    handles = []
    for name, module in model.named_modules():

        def record(mod, inputs, output, name=name):
            outputs.setdefault(name, []).append(_shape(output))

        handles.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.to(device).eval()
        with torch.no_grad():
            model(torch.randn(batch_size, *input_size, device=device))
    except RuntimeError as err:
        last = next(reversed(outputs), None)
        where = f"; the last layer that ran was {last} with output {outputs[last][-1]}" if last is not None else ""
        raise ValueError(
            f"{type(model).__name__} cannot take an input of shape {[batch_size, *input_size]} ({err}){where}; "
            "change --input-size or the model."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    params = parameter_counts(model)
    rows = []
    for name, module in model.named_modules():
        rows.append(
            {
                "name": name or type(model).__name__,
                "depth": name.count(".") + 1 if name else 0,
                "type": type(module).__name__,
                "output": " ; ".join(outputs.get(name, ["-"])),
                "params": params[name],
                "buffers": sum(b.numel() for b in module.buffers()),  # ModelSummary counts no buffers
            }
        )
    return rows


class _Holder(L.LightningModule):
    """ModelSummary summarises a LightningModule: this one holds the plain net as ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of every module (``""``: the model itself), submodules included, from Lightning's
    ``ModelSummary`` (the counts ``fit`` prints), read for every depth."""
    summary = ModelSummary(_Holder(model), max_depth=-1)
    counts = {name.removeprefix("net").removeprefix("."): n for name, n in zip(summary.layer_names, summary.param_nums)}
    return {name: counts[name] for name, _ in model.named_modules()}


def format_table(model: nn.Module, rows: list[dict], max_depth: int | None = None) -> str:
    shown = [r for r in rows if max_depth is None or r["depth"] <= max_depth]
    cells = [
        (("  " * r["depth"]) + r["name"], r["type"], r["output"], f"{r['params']:,}", f"{r['buffers']:,}")
        for r in shown
    ]
    header = ("Layer", "Type", "Output shape", "Params", "Buffers")
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*c) for c in cells]
    summary = ModelSummary(_Holder(model), max_depth=0)
    params, trainable = summary.total_parameters, summary.trainable_parameters
    buffers = list(model.named_buffers())
    state = model.state_dict()
    not_saved = [name for name, _ in buffers if name not in state]
    size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    lines += [
        "",
        f"Parameters: {params:,} ({trainable:,} trainable)",
        f"Buffers: {sum(b.numel() for _, b in buffers):,} values in {len(buffers)} tensors"
        + (f" ({len(not_saved)} non-persistent, not in the state_dict: {', '.join(not_saved)})" if not_saved else ""),
        f"state_dict: {len(state)} tensors, {size_mb:.2f} MB",
    ]
    return "\n".join(lines)


#: The dictionaries in which an nn.Module keeps its hooks (each maps a handle id to a function).
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _tensor(value) -> str:
    if value is None:
        return "None"
    dtype = "" if value.dtype == torch.get_default_dtype() else f" {str(value.dtype).removeprefix('torch.')}"
    return f"{list(value.shape)}{dtype}"


def _entries(mapping: dict, describe) -> str:
    return "{" + ", ".join(f"{key}: {describe(value)}" for key, value in mapping.items()) + "}"


def _function_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def module_internals(module: nn.Module) -> dict[str, str]:
    """What ``module`` itself (not its children) keeps in the dictionaries behind its attributes.

    ``nn.Module.__setattr__`` files an ``nn.Parameter`` under ``_parameters``, a registered buffer
    under ``_buffers`` and a submodule under ``_modules``; ``register_*_hook`` adds to a hook
    dictionary. These private dictionaries are read here only to show that machinery; code should
    use ``named_parameters()``, ``named_buffers()``, ``named_children()`` and the hook handles.
    """
    saved = module.state_dict(keep_vars=True)  # holds the persistent buffers, by their own name at the top level
    rows = {
        "_parameters": _entries(module._parameters, _tensor),
        "_buffers": _entries(module._buffers, lambda b: _tensor(b)),
        "_modules": _entries(module._modules, lambda m: type(m).__name__),
    }
    not_saved = [name for name, buffer in module._buffers.items() if buffer is not None and name not in saved]
    if not_saved:
        rows["_buffers"] += f"  (non-persistent, not in state_dict: {', '.join(not_saved)})"
    hooks = {name: getattr(module, name) for name in HOOK_DICTS if getattr(module, name, None)}
    rows["hooks"] = (
        _entries(hooks, lambda d: _entries(d, _function_name))
        if hooks
        else f"all {len(HOOK_DICTS)} hook dictionaries empty"
    )
    plain = {name: value for name, value in vars(module).items() if isinstance(value, torch.Tensor)}
    if plain:
        rows["plain tensors"] = (
            _entries(plain, _tensor) + "  (not registered: not in parameters(), state_dict() or moved by .to())"
        )
    return rows


def format_internals(model: nn.Module, max_depth: int | None = None) -> str:
    lines = []
    for name, module in model.named_modules():
        depth = name.count(".") + 1 if name else 0
        if max_depth is not None and depth > max_depth:
            continue
        lines.append(f"{'  ' * depth}{name or type(model).__name__} ({type(module).__name__})")
        lines += [f"{'  ' * depth}  {key:<12} {value}" for key, value in module_internals(module).items()]
    return "\n".join(lines)


def hook_demo(
    model: nn.Module, module_name: str, input_size: Sequence[int], batch_size: int = 2, device: str = "cpu"
) -> str:
    """Register a forward hook on one module, run one batch, remove the hook: its ``_forward_hooks`` at each step."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError as err:
        names = [n for n, _ in model.named_children()]
        raise ValueError(
            f"--hook-on {module_name!r} is not a module of {type(model).__name__} ({err}); try one of {', '.join(names)}."
        ) from err
    label = module_name or type(model).__name__
    seen = []

    def record_output(mod, inputs, output):
        seen.append(_shape(output))

    lines = [
        f"A hook is an entry in one of those dictionaries, keyed by its handle's id ({label}._forward_hooks):",
        f"before register_forward_hook: {_entries(module._forward_hooks, _function_name)}",
    ]
    handle = module.register_forward_hook(record_output)
    lines.append(
        f"after handle = {label}.register_forward_hook(record_output): {_entries(module._forward_hooks, _function_name)}"
    )
    was_training = model.training
    try:
        model.to(device).eval()
        with torch.no_grad():
            model(torch.randn(batch_size, *input_size, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    lines.append(f"one forward pass: record_output saw {' ; '.join(seen) or 'nothing (the module did not run)'}")
    lines.append(f"after handle.remove(): {_entries(module._forward_hooks, _function_name)}")
    return "\n".join(lines)


def model_options(path: str | None) -> dict:
    """``model.param_groups`` and the optimiser's ``lr`` and ``weight_decay`` (``model.optimizer.init_args``)
    from an experiment YAML file, where given."""
    if not path:
        return {}
    model = model_section(path)
    for key in ("lr", "weight_decay"):
        if key in model:
            raise UserError(
                f"{path}: model.{key} is the old form: it is now an argument of the optimizer's class, "
                f"model: {{optimizer: {{class_path: torch.optim.SGD, init_args: {{{key}: ...}}}}}}; move it there."
            )
    options = {key: model[key] for key in ("param_groups",) if model.get(key) is not None}
    optimizer = model.get("optimizer")
    if isinstance(optimizer, str):  # a class_path alone: the class's own defaults
        optimizer = {"class_path": optimizer}
    if isinstance(optimizer, dict):
        init_args = optimizer.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise UserError(
                f"{path}: model.optimizer.init_args is a {type(init_args).__name__}, not a mapping of the optimizer's arguments."
            )
        options["optimizer_class"] = optimizer.get("class_path")
        options.update({key: init_args[key] for key in ("lr", "weight_decay") if init_args.get(key) is not None})
    return options


def optimizer_settings(options: dict) -> tuple[str, float | None, float | None]:
    """The optimiser's class path, ``lr`` and ``weight_decay`` that ImageClassifier would train with: those
    ``options`` give (from ``model.optimizer.init_args``), else the defaults of the class it names (read from its
    signature; the class is not called), else those of ``project.classifier.DEFAULT_OPTIMIZER``. None: the
    optimizer has no such argument."""
    from project.classifier import DEFAULT_OPTIMIZER  # imports Lightning: only when asked for

    class_path = options.get("optimizer_class") or DEFAULT_OPTIMIZER["class_path"]
    if class_path == DEFAULT_OPTIMIZER["class_path"] and not options.get("optimizer_class"):
        defaults = dict(DEFAULT_OPTIMIZER["init_args"])
    else:
        defaults = _signature_defaults(class_path)
    values = [options.get(key, defaults.get(key)) for key in ("lr", "weight_decay")]
    return class_path, *values


def _signature_defaults(class_path: str) -> dict:
    """The keyword defaults of the optimiser class ``class_path`` names (empty when it cannot be imported)."""
    from project.classifier import keyword_arguments  # imports Lightning: only when asked for

    module_name, _, name = class_path.rpartition(".")
    try:
        arguments = keyword_arguments(getattr(importlib.import_module(module_name), name)) or {}
    except (ImportError, AttributeError):
        return {}
    return {k: v for k, v in arguments.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def model_section(path: str) -> dict:
    """The ``model:`` mapping of an experiment YAML file (empty when it has none)."""
    model = read_config_file(path).get("model")
    if model is not None and not isinstance(model, dict):
        raise UserError(
            f"{path}: model is a {type(model).__name__}, not a mapping of model options (e.g. `net:`, `optimizer:`)."
        )
    model = model or {}
    # A saved config.yaml names the model's class: its arguments are under init_args.
    return model.get("init_args") or {} if "class_path" in model else model


def format_param_groups(
    model: nn.Module, lr: float | None, weight_decay: float | None, param_groups, optimizer: str = "torch.optim.SGD"
) -> str:
    """The optimiser's parameter groups as ImageClassifier builds them (``project.param_groups.group_parameters``):
    each group's lr is the optimiser's ``lr`` times its ``lr_scale``; its weight decay its own, else the optimiser's."""
    from project.param_groups import group_parameters  # imports torch: only when asked for

    groups = group_parameters(model, param_groups)
    header = ("Group", "lr", "Weight decay", "Params", "Parameters")
    cells = []
    for group in groups:
        names = group["param_names"]
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} tensors)" if len(names) > 3 else "")
        group_lr = None if lr is None else lr * group.get("lr_scale", 1.0)
        decay = group.get("weight_decay", weight_decay)
        cells.append(
            (group["name"], _number(group_lr), _number(decay), f"{sum(p.numel() for p in group['params']):,}", shown)
        )
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" if i in (1, 2, 3) else f"{{:<{w}}}" for i, w in enumerate(widths))
    lines = [
        f"Parameter groups ({optimizer}: model.optimizer.lr {_number(lr)}, model.optimizer.weight_decay "
        f"{_number(weight_decay)}; log columns lr-<Optimizer>/<Group>):",
        "",
    ]
    lines += [fmt.format(*header).rstrip(), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*c).rstrip() for c in cells]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    """A learning rate or weight decay for the table; ``-`` where the optimizer has no such argument."""
    return "-" if value is None else f"{value:.4g}"


def net_from_config(path: str) -> tuple[str, dict]:
    """``model.net``'s class_path and init_args from an experiment YAML file."""
    net = model_section(path).get("net")
    if isinstance(net, str):
        return net, {}
    if not isinstance(net, dict) or "class_path" not in net:
        raise ValueError(f"{path} has no model.net.class_path; pass --model instead.")
    init_args = net.get("init_args") or {}
    if not isinstance(net["class_path"], str) or not isinstance(init_args, dict):
        raise UserError(f"{path}: model.net needs a class_path string and an init_args mapping; fix that block.")
    return net["class_path"], dict(init_args)


def parse_init(pairs: Sequence[str]) -> dict:
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--init expects key=value, got {pair!r}.")
        args[key] = inline_yaml(value, f"--init {pair}")
    return args


def inline_yaml(text: str, option: str):
    """A value given on the command line, read as YAML (plain values only)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{option} is not valid YAML ({' '.join(str(err).split())}); quote or fix it.") from None


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m project summary", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="an experiment YAML; its model.net is summarised")
    parser.add_argument(
        "--model", help="dotted class path of the net, e.g. project.models.ResNet18 (overrides --config)"
    )
    parser.add_argument(
        "--init", nargs="*", default=[], metavar="KEY=VALUE", help="constructor arguments, e.g. num_classes=100"
    )
    parser.add_argument(
        "--input-size",
        nargs="+",
        type=int,
        default=[3, 32, 32],
        metavar="N",
        help="one input's shape without the batch dimension (default: 3 32 32)",
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--depth", type=int, default=None, help="show modules at most this deep (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--param-groups",
        metavar="YAML",
        help="model.param_groups to show (default: the config's), e.g. '[{match: \"fc*\", lr_scale: 10}]'",
    )
    parser.add_argument(
        "--internals",
        action="store_true",
        help="print each module's _parameters, _buffers, _modules and hook dictionaries instead of the table",
    )
    parser.add_argument(
        "--hook-on",
        default="",
        metavar="MODULE",
        help="with --internals: the module the hook demonstration registers on (default: the model)",
    )
    args = parser.parse_args(argv)
    try:
        if args.model:
            class_path = args.model
            model = build_model(class_path, parse_init(args.init))
        elif args.config:
            class_path, _ = net_from_config(args.config)  # the file's own mistakes, one sentence each
            model_options(args.config)
            net_factory(class_path)  # never called unless it builds an nn.Module
            model = net_through_cli(args.config, parse_init(args.init))
        else:
            parser.error("give --model CLASS_PATH or -c EXPERIMENT.yaml")
        rows = layer_table(model, args.input_size, args.batch_size, args.device)
        sections = [format_internals(model, args.depth) if args.internals else format_table(model, rows, args.depth)]
        if args.internals:
            sections.append(hook_demo(model, args.hook_on, args.input_size, args.batch_size, args.device))
        options = model_options(args.config)
        if args.param_groups is not None:
            options["param_groups"] = inline_yaml(args.param_groups, "--param-groups")
        if options.get("param_groups"):
            optimizer, lr, weight_decay = optimizer_settings(options)
            sections.append(format_param_groups(model, lr, weight_decay, options["param_groups"], optimizer))
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    text = f"{class_path} on input {[args.batch_size, *args.input_size]}\n\n" + "\n\n".join(sections)
    print(text)
    return text


if __name__ == "__main__":
    main()
