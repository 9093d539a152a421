"""The template uses Lightning's public API only: no private Lightning module, method or attribute
is imported, called, read or overridden anywhere in project/ (but the few in ALLOWED, each said why)."""

import ast
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import torch

import project

#: Private Lightning names project/ may use (a Lightning upgrade can change any of them silently): only where no
#: public API exists, each with a comment at its use naming this test.
ALLOWED: set[str] = {
    # project/run/model_contract.py ModelInstantiator: LightningCLI writes every applied link into the model's
    # hparams, and jsonargparse 4.53 reports links it skipped as applied; only its instantiator sees both.
    "_InstantiatorFn",
    "_dump_config",
    "_add_instantiators",
}
PROJECT = Path(project.__file__).parent


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _project_modules() -> dict[str, object]:
    names = [info.name for info in pkgutil.walk_packages([str(PROJECT)], "project.")]
    return {name: importlib.import_module(name) for name in ["project", *names]}


def _lightning_private_names() -> set[str]:
    """Every private name of a loaded Lightning module, of a class defined in one, or set on ``self``
    in one (instance attributes such as ``DDPStrategy._ddp_kwargs`` live in no class dict)."""
    found: set[str] = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("lightning") or module is None:
            continue
        found.update(n for n in vars(module) if _is_private(n))
        source = getattr(module, "__file__", None)
        if source and source.endswith(".py"):
            found.update(re.findall(r"\bself\.(_[A-Za-z]\w*)", Path(source).read_text(errors="replace")))
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == name:
                found.update(n for n in vars(value) if _is_private(n))
    # torch.nn.Module's own machinery (_modules, _parameters, hook dictionaries) is torch's, not
    # Lightning's, although every LightningModule has it; summary --internals shows it on purpose.
    return found - set(vars(torch.nn.Module)) - set(vars(torch.nn.Module()))


def _lightning_bases(cls: type) -> list[type]:
    return [base for base in cls.__mro__[1:] if base.__module__.startswith("lightning")]


def private_lightning_uses() -> list[str]:
    """``file:line name`` for every use in project/ of a private Lightning module, import, attribute,
    or a private member of a Lightning base class that a project class overrides."""
    modules = _project_modules()
    lightning_private = _lightning_private_names()
    uses, own, overrides = [], set(), []
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sorted(PROJECT.rglob("*.py"))}
    module_of = {Path(m.__file__): m for m in modules.values()}

    for path, tree in trees.items():
        where = lambda node, path=path: f"{path.relative_to(PROJECT.parent)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
                if any(_is_private(part) for part in node.module.split(".")):
                    uses.append(f"{where(node)} from {node.module} import ...")
                uses.extend(
                    f"{where(node)} {alias.name}"
                    for alias in node.names
                    if _is_private(alias.name) and alias.name not in ALLOWED
                )
            elif isinstance(node, ast.Import):
                uses.extend(
                    f"{where(node)} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("lightning") and any(map(_is_private, alias.name.split(".")))
                )
            elif isinstance(node, ast.ClassDef):
                cls = getattr(module_of[path], node.name, None)
                bases = _lightning_bases(cls) if isinstance(cls, type) else []
                members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                members |= {
                    t.attr
                    for n in ast.walk(node)
                    if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                }
                for member in filter(_is_private, members):
                    if any(member in vars(base) for base in bases):
                        overrides.append((f"{where(node)} {node.name}.{member}", member))
                    else:
                        own.add(member)  # the project's own private state or helper
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(node.name):
                own.add(node.name)

    for path, tree in trees.items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
                names = [
                    arg.value for arg in node.args[1:2] if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                ]
            for name in names:
                if _is_private(name) and name not in own and name in lightning_private and name not in ALLOWED:
                    uses.append(f"{path.relative_to(PROJECT.parent)}:{node.lineno} .{name}")
    uses.extend(location for location, member in overrides if member not in ALLOWED)
    return uses


def test_project_uses_no_other_private_lightning_api():
    assert private_lightning_uses() == [], (
        "project/ uses private Lightning API; use the public API, or (if there is truly none) add the name to "
        "ALLOWED with a comment at the use naming this test"
    )


def test_the_check_sees_a_private_use(tmp_path, monkeypatch):
    """The check itself works: a project file that reads Lightning's private attributes is reported, line by line."""
    package = tmp_path / "project"
    package.mkdir()
    (package / "resume.py").write_text(
        "def resumed_from(trainer):\n    return trainer._checkpoint_connector._ckpt_path\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PROJECT", package)
    monkeypatch.setattr(sys.modules[__name__], "_project_modules", lambda: {})
    assert sorted(private_lightning_uses()) == [
        "project/resume.py:2 ._checkpoint_connector",
        "project/resume.py:2 ._ckpt_path",
    ]


def test_buffer_report_reads_broadcast_buffers_from_the_public_ddp_wrapper(tmp_path):
    """sync_policy once read DDPStrategy._ddp_kwargs; it now asks torch's DistributedDataParallel
    wrapper (``broadcast_buffers``). A one-process gloo group stands in for a DDP job."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    from project.callbacks.buffers import sync_policy

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for broadcast, expected in ((True, "DDP: broadcast from rank 0"), (False, "DDP with broadcast_buffers=False")):
            strategy = DDPStrategy(broadcast_buffers=broadcast)
            # torch 2.14 renamed the argument (forward_sync_buffers) and warns on the old one; the property stays.
            renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": broadcast}
            strategy.model = DistributedDataParallel(torch.nn.BatchNorm1d(2), **sync)
            assert sync_policy(SimpleNamespace(world_size=2, strategy=strategy, callbacks=[])).startswith(expected)
    finally:
        dist.destroy_process_group()
