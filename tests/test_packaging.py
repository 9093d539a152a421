"""Packaging: setup.cfg (pip) and environment.yml (conda) list the same dependencies."""

import configparser

import yaml

from tests.conftest import REPO


def _requirements() -> tuple[set[str], set[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    setup = {line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()}
    setup |= {line.strip() for line in cfg["options.extras_require"]["test"].splitlines() if line.strip()}
    conda = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    (pip,) = [d["pip"] for d in conda if isinstance(d, dict)]
    env = {req for req in pip if not req.startswith("-e")}
    return setup, env


def test_setup_cfg_and_environment_yml_agree():
    setup, env = _requirements()
    assert setup == env, f"only in setup.cfg: {setup - env}; only in environment.yml: {env - setup}"
