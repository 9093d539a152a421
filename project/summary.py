"""``python -m project.summary``: every layer's output shape, parameters and buffers, from one dry forward pass.

    python -m project.summary --model project.models.ResNet18 --input-size 3 32 32
    python -m project.summary -c experiments/lenet.yaml --depth 1

The classic "print each layer's output shape" exercise, for any model and input size: a forward
hook on every submodule records what it returns while one random batch goes through the model
(in eval mode, without gradients, so no buffer changes); the hooks are removed afterwards.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

import torch
import yaml
from torch import nn

from project.errors import UserError


def build_model(class_path: str, init_args: dict | None = None) -> nn.Module:
    """Instantiate ``package.module.Class`` with keyword arguments, e.g. ``project.models.ResNet20``.

    What ``class_path`` names is called only once it is known to be a ``torch.nn.Module`` subclass
    (as ``fit`` requires of ``model.net``): a config naming, say, ``os.system`` runs nothing.
    """
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"Cannot import the model class {class_path!r} ({err}); give a dotted path such as project.models.LeNet.") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        kind = f"the class {cls.__name__}" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise UserError(
            f"{class_path} is {kind}, not a torch.nn.Module subclass, so it was not called; "
            "give a model class such as project.models.LeNet."
        )
    return cls(**(init_args or {}))


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

    Counts include submodules. A module that runs more than once lists every output; one that
    never runs (or is replaced by a functional call such as ``F.relu``) shows ``-``.
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
    rows = []
    for name, module in model.named_modules():
        rows.append({
            "name": name or type(model).__name__,
            "depth": name.count(".") + 1 if name else 0,
            "type": type(module).__name__,
            "output": " ; ".join(outputs.get(name, ["-"])),
            "params": sum(p.numel() for p in module.parameters()),
            "buffers": sum(b.numel() for b in module.buffers()),
        })
    return rows


def format_table(model: nn.Module, rows: list[dict], max_depth: int | None = None) -> str:
    shown = [r for r in rows if max_depth is None or r["depth"] <= max_depth]
    cells = [(("  " * r["depth"]) + r["name"], r["type"], r["output"], f"{r['params']:,}", f"{r['buffers']:,}") for r in shown]
    header = ("Layer", "Type", "Output shape", "Params", "Buffers")
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*c) for c in cells]
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
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


def net_from_config(path: str) -> tuple[str, dict]:
    """``model.net``'s class_path and init_args from an experiment YAML file."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    net = (config.get("model") or {}).get("net")
    if isinstance(net, str):
        return net, {}
    if not isinstance(net, dict) or "class_path" not in net:
        raise ValueError(f"{path} has no model.net.class_path; pass --model instead.")
    return net["class_path"], dict(net.get("init_args") or {})


def parse_init(pairs: Sequence[str]) -> dict:
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--init expects key=value, got {pair!r}.")
        args[key] = yaml.safe_load(value)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m project.summary", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="an experiment YAML; its model.net is summarised")
    parser.add_argument("--model", help="dotted class path of the net, e.g. project.models.ResNet18 (overrides --config)")
    parser.add_argument("--init", nargs="*", default=[], metavar="KEY=VALUE", help="constructor arguments, e.g. num_classes=100")
    parser.add_argument("--input-size", nargs="+", type=int, default=[3, 32, 32], metavar="N",
                        help="one input's shape without the batch dimension (default: 3 32 32)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--depth", type=int, default=None, help="show modules at most this deep (default: all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        class_path, init_args = net_from_config(args.config) if args.config else (None, {})
        class_path = args.model or class_path
        if class_path is None:
            parser.error("give --model CLASS_PATH or -c EXPERIMENT.yaml")
        model = build_model(class_path, {**init_args, **parse_init(args.init)})
        rows = layer_table(model, args.input_size, args.batch_size, args.device)
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    text = f"{class_path} on input {[args.batch_size, *args.input_size]}\n\n" + format_table(model, rows, args.depth)
    print(text)
    return text


if __name__ == "__main__":
    main()
