"""The tree is ruff-clean and ruff-formatted (settings in pyproject.toml), so CI fails on drift the
pre-commit hook would have fixed."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def ruff() -> list[str]:
    found = shutil.which("ruff", path=str(REPO / ".venv" / "bin")) or shutil.which("ruff")
    if found is None:
        try:
            import ruff as _  # noqa: F401
        except ImportError:
            pytest.skip("ruff is not installed (pip install -e '.[test]')")
        return [sys.executable, "-m", "ruff"]
    return [found]


@pytest.mark.parametrize("command", [["check", "--no-fix"], ["format", "--check"]], ids=["lint", "format"])
def test_the_tree_is_ruff_clean(command):
    out = subprocess.run([*ruff(), *command, "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (
        f"ruff {' '.join(command)} (fix: ruff check --fix . && ruff format .):\n{out.stdout[-3000:]}"
    )
