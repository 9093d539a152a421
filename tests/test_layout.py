"""The folders are the architecture (shared/DESIGN.md): the research core imports neither the run
machinery (project/run/) nor the tools (project/tools/), and the machinery never imports the tools."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PROJECT = REPO / "project"
CORE = [*PROJECT.glob("models/*.py"), *PROJECT.glob("data/*.py"), *PROJECT.glob("callbacks/*.py")]
CORE += [PROJECT / name for name in ("classifier.py", "schedules.py", "state_dicts.py", "errors.py")]
CORE += [PROJECT / name for name in ("param_groups.py", "finetune.py")]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PROJECT)))
def test_the_core_imports_no_machinery(path):
    bad = sorted(m for m in imported_modules(path) if m.startswith(("project.run", "project.tools")))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_models_import_torch_alone():
    for path in PROJECT.glob("models/*.py"):
        third_party = {m.split(".")[0] for m in imported_modules(path)} - {"project", "torch", "collections", "typing"}
        assert not third_party, f"{path.relative_to(REPO)} imports {third_party}"


@pytest.mark.parametrize("path", sorted(PROJECT.glob("run/**/*.py")), ids=lambda p: str(p.relative_to(PROJECT)))
def test_the_machinery_imports_no_tool(path):
    bad = sorted(m for m in imported_modules(path) if m.startswith("project.tools"))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"
