"""benchmarks/run_gpu.sh, the one-call GPU runbook: its wheelhouse installs without network access
into an environment that has only what the lent GPU machine has, and the CLI then runs; the
script refuses to start, with one sentence, when something it needs is missing.

The fresh environment is a new venv whose site-packages links to this environment's copies of
torch, lightning, torchmetrics, torchvision, matplotlib (and what they require), numpy, pyyaml,
rich, typing-extensions, packaging and pip, the packages the GPU machine provides, and nothing
else: no jsonargparse, no wandb (torch is far too big to install afresh for a test). The GPU
itself cannot exist here; GPU_RUNBOOK_DRY_RUN=1 makes the script stop after its install and
import checks and run one CPU step instead of the GPU ones.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import QUIET, REPO, make_npz, run_bounded

RUNBOOK = REPO / "benchmarks" / "run_gpu.sh"
WHEELHOUSE = REPO / "benchmarks" / "wheelhouse"
SCRIPTS = ["run_gpu.sh", "gpu_install.sh", "gpu_wheelhouse.sh", "gpu_stage.sh"]
#: What the lent GPU machine has installed (its image's documentation), besides Python itself.
GPU_MACHINE_HAS = [
    "torch",
    "torchvision",
    "lightning",
    "pytorch-lightning",
    "torchmetrics",
    "matplotlib",
    "numpy",
    "pyyaml",
    "rich",
    "typing-extensions",
    "packaging",
    "pip",
]


def pinned_wheels() -> dict[str, str]:
    lines = (REPO / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(name): version for name, version in pins}


def bash(args: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_RUNBOOK_DRY_RUN", "PYTHON")}
    return run_bounded(["bash", *args], timeout=timeout, env={**clean, **(env or {})})


@pytest.mark.parametrize("script", SCRIPTS)
def test_runbook_scripts_parse(script):
    result = bash(["-n", str(REPO / "benchmarks" / script)])
    assert result.returncode == 0, result.stderr


def test_runbook_refuses_to_start_without_out():
    result = bash([str(RUNBOOK)])
    assert result.returncode == 2
    assert result.stderr == "error: OUT is not set: run OUT=<folder for the results> bash benchmarks/run_gpu.sh.\n"


def test_runbook_refuses_to_start_without_the_wheelhouse_or_the_subset(tmp_path):
    """In a copy of the layout: first no wheels, then wheels but no carried subset."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(RUNBOOK, tmp_path / "benchmarks" / "run_gpu.sh")
    env = {"OUT": str(tmp_path / "out")}
    result = bash([str(tmp_path / "benchmarks" / "run_gpu.sh")], env)
    assert result.returncode == 2 and result.stderr == (
        "error: benchmarks/wheelhouse/ holds no wheels: build it with bash benchmarks/gpu_stage.sh and carry benchmarks/wheelhouse.\n"
    )
    (tmp_path / "benchmarks" / "wheelhouse").mkdir()
    (tmp_path / "benchmarks" / "wheelhouse" / "x-1.0-py3-none-any.whl").write_bytes(b"")
    result = bash([str(tmp_path / "benchmarks" / "run_gpu.sh")], env)
    assert result.returncode == 2 and result.stderr == (
        "error: benchmarks/data/cifar10_subset.npz is missing: stage it with bash benchmarks/gpu_stage.sh and carry benchmarks/data.\n"
    )
    assert not (tmp_path / "out").exists(), "nothing written before the checks pass"


def requirement_closure(roots: list[str]) -> list[metadata.Distribution]:
    """The installed distributions ``roots`` need, following their requirements without extras."""
    found, todo = {}, [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this environment does not have
        found[name] = dist
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return list(found.values())


def fresh_environment(root: Path, exclude: set[str]) -> Path:
    """A new venv exposing only GPU_MACHINE_HAS and their requirements from this environment; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    )
    ours = Path(sysconfig.get_paths()["purelib"]).resolve()
    for dist in requirement_closure(GPU_MACHINE_HAS):
        assert canonicalize_name(dist.metadata["Name"]) not in exclude
        base = Path(dist.locate_file("")).resolve()
        if base != ours:
            continue  # e.g. the base interpreter's own packages
        for file in dist.files or []:
            top = file.parts[0]
            if top != ".." and top != "__pycache__" and not (site / top).exists() and (base / top).exists():
                (site / top).symlink_to(base / top)
    return python


def test_wheelhouse_installs_offline_into_a_fresh_environment_and_the_cli_runs(tmp_path):
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.skip(
            "benchmarks/wheelhouse/ is absent: build it with `bash benchmarks/gpu_wheelhouse.sh` (.ci/setup does)"
        )
    pins = pinned_wheels()
    wheels = {canonicalize_name(w.name.split("-")[0]): w.name.split("-")[1] for w in WHEELHOUSE.glob("*.whl")}
    assert wheels == pins, "the wheelhouse holds exactly the pinned wheels of benchmarks/gpu_wheels.txt"
    python = fresh_environment(tmp_path / "venv", exclude={*pins, "wandb"})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    def probe(code: str) -> subprocess.CompletedProcess:
        return run_bounded([str(python), "-c", code], timeout=120, env=env, cwd=tmp_path)

    assert probe("import torch, lightning, torchmetrics, torchvision, matplotlib, yaml").returncode == 0
    for missing in ("jsonargparse", "wandb", "docstring_parser", "typeshed_client"):
        assert "ModuleNotFoundError" in probe(f"import {missing}").stderr, (
            f"{missing} must not be in the fresh environment"
        )

    # The runbook itself, with this interpreter: install (--no-index), import checks, one CPU step.
    out, site = tmp_path / "out", tmp_path / "site"
    staged = REPO / "benchmarks" / "data" / "cifar10_subset.npz"
    made_subset = not staged.exists()
    if made_subset:  # a stand-in for the carried copy, which CI does not have
        staged.parent.mkdir(parents=True, exist_ok=True)
        make_npz(staged)
    try:
        result = run_bounded(
            ["bash", str(RUNBOOK)],
            timeout=300,
            cwd=tmp_path,
            env={**env, "PYTHON": str(python), "OUT": str(out), "GPU_SITE": str(site), "GPU_RUNBOOK_DRY_RUN": "1"},
        )
    finally:
        if made_subset:
            staged.unlink()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["run_gpu-steps.json", "run_gpu.log"]
    assert '"status": "ok"' in (out / "run_gpu-steps.json").read_text()
    assert "--trainer.fast_dev_run" in (out / "run_gpu.log").read_text(), "the dry-run step printed the CLI's help"
    assert {p.name for p in site.iterdir()} >= {"jsonargparse", "docstring_parser", "typeshed_client"}

    # And a real (one-batch) fit through the CLI in that environment.
    npz = make_npz(tmp_path / "tiny.npz")
    fit = run_bounded(
        [
            str(python),
            "-m",
            "project",
            "fit",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            *QUIET,
            f"--data.npz={npz}",
            "--data.val_size=16",
            "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu",
            "--test_after_fit=false",
            "--plots.enabled=false",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
        ],
        timeout=300,
        cwd=REPO,
        env={**env, "PYTHONPATH": f"{REPO}{os.pathsep}{site}", "WANDB_MODE": "disabled"},
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Running in `fast_dev_run` mode" in fit.stderr + fit.stdout
