"""wandb sweeps without a wandb server: every sweep file against the CLI, and real trials end to end.

The wandb server's part of a sweep is choosing the next hyperparameters; that part is the open
source ``sweeps`` package (grid, random and Bayesian search), called here directly. The agent's
part is turning a suggestion into a command line; that is wandb's own agent code
(``wandb/wandb_agent.py``, ``Agent._command_run``), called here with the command a server would send.
Only the network between the two is missing.
"""

import csv
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import pytest
import yaml

with warnings.catch_warnings():  # sweeps still uses pydantic v1 configuration names
    warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
    import sweeps
from wandb import wandb_agent

from project.run.cli import ProjectCLI
from tests.conftest import QUIET, REPO, run_bounded, run_dirs

SWEEP_FILES = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def agent_command(sweep_config: dict, run_config: dict) -> list[str]:
    """The command ``wandb agent`` runs for one suggested run, built by the agent itself
    (``wandb.wandb_agent.Agent._command_run``) from the command dict a wandb server would send: the
    run's parameters and the sweep file's ``program``. A stand-in for ``AgentProcess`` records the
    command instead of starting it; the agent's "python" (from PATH) becomes this interpreter."""
    assert "program" in sweep_config, "wandb's agent reads command['program'] for every trial (wandb#4187)"
    started = []

    class RecordedProcess:  # stands in for the trial process: nothing is started here
        def __init__(self, command=None, **kwargs):
            started.append(command)

    saved = dict(os.environ)
    try:
        with (
            tempfile.TemporaryDirectory() as wandb_dir,
            mock.patch.object(wandb_agent, "AgentProcess", RecordedProcess),
        ):
            os.environ.update(
                {"WANDB_DIR": wandb_dir, "WANDB_SWEEP_ID": "sw33p"}
            )  # where the agent saves the run's config
            agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sw33p")
            agent._sweep_command = list(sweep_config["command"])  # what the agent reads from the server's sweep
            # A server sends the suggestion as JSON: plain numbers, never numpy's (the Bayes engine's).
            args = json.loads(json.dumps(run_config, default=lambda value: value.item()))
            agent._command_run({"run_id": "r1", "program": sweep_config["program"], "args": args})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    (command,) = started
    assert command[1] == "python"
    return [command[0], sys.executable, *command[2:]]


def candidate_values(spec: dict) -> list:
    """Every value a parameter can take that is worth parsing: all listed values, or a range's ends."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def lookup(config: dict, dotted: str):
    """``data.batch_size`` in a saved config, where a class given by class_path keeps it under init_args."""
    for part in dotted.split("."):
        config = config[part] if part in config else config["init_args"][part]
    return config


def run_trial(command: list[str], env: dict, tmp_path: Path, subset_npz: Path, *extra: str):
    """One trial as the agent starts it, shrunk to two steps on the real subset by arguments appended after
    the agent's (data, size and device only; never a swept parameter)."""
    shrink = [
        f"--data.npz={subset_npz}",
        "--data.val_size=500",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--test_after_fit=false",
        "--plots.enabled=false",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
        *extra,
    ]
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    full_env.pop("PROJECT_RUN_DIR", None)
    return run_bounded([*command, *shrink], cwd=REPO, env=full_env, timeout=300)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_is_valid_and_every_parameter_value_reaches_the_cli(path, capsys, monkeypatch):
    """A typo in a parameter name, or a value the CLI rejects, fails here instead of in every trial."""
    config = load(path)
    assert sweeps.schema_violations_from_proposed_config(config) == []
    command = agent_command(config, {})
    assert command[:5] == ["/usr/bin/env", sys.executable, "-m", "project", "fit"]
    assert "${args}" in config["command"] and config["metric"]["name"] in ("val/acc", "val/loss")
    assert "seed_everything" in config["parameters"], "trials need an explicit seed"
    monkeypatch.chdir(REPO)  # the sweep's --config paths are relative to the repository root
    monkeypatch.setattr(sys, "argv", ["project"])
    for name, spec in config["parameters"].items():
        for value in candidate_values(spec):
            args = agent_command(config, {name: {"value": value}})[4:]
            assert f"--{name}={value}" in args
            with pytest.raises(SystemExit) as done:
                ProjectCLI(args=[*args, "--print_config"])
            printed = capsys.readouterr()
            assert done.value.code == 0, f"{path.name}: --{name}={value} was refused:\n{printed.err[-2000:]}"
            resolved = lookup(yaml.safe_load(printed.out), name)
            if isinstance(resolved, dict):  # a class given by name, e.g. model.net
                resolved = resolved["class_path"]
            assert resolved == value, f"{path.name}: --{name}={value} resolved to {resolved!r}"


def test_trials_from_the_sweep_engine_run_end_to_end_and_a_crashing_trial_fails_alone(tmp_path, subset_npz):
    """Grid suggestions for the LeNet sweep, then a Bayesian suggestion for the ResNet sweep after two
    finished runs: each trial is its own process with its own run directory and config.yaml holding the
    suggested values. A trial with an impossible learning rate exits non-zero with the reason (so wandb
    marks that run failed), writes nothing, and the next trial runs as if nothing happened."""
    lenet = load(REPO / "experiments/sweeps/lenet_cpu.yaml")
    suggestions = sweeps.next_runs(lenet, [], validate=True, n=2)
    env = {"WANDB_SWEEP_ID": "sw33p", "WANDB_PROJECT": "sweep-project"}  # what wandb agent sets (no server: disabled)

    finished = []
    for i, suggestion in enumerate(suggestions):
        done = run_trial(
            agent_command(lenet, suggestion.config), {**env, "WANDB_RUN_ID": f"trial{i}"}, tmp_path, subset_npz
        )
        assert done.returncode == 0, done.stderr[-3000:]
        run = tmp_path / "lenet" / f"sweep-sw33p-trial{i}"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        for name, spec in suggestion.config.items():
            assert lookup(saved, name) == spec["value"], name
        with open(run / "metrics.csv") as f:
            val_acc = [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]
        finished.append(
            sweeps.SweepRun(
                name=f"trial{i}",
                state=sweeps.RunState.finished,
                config=suggestion.config,
                summary_metrics={"val/acc": val_acc[-1]},
                history=[{"val/acc": val_acc[-1]}],
            )
        )
    # The grid moves on to a point it has not tried.
    third = sweeps.next_run(lenet, finished, validate=True)
    assert third.config not in [s.config for s in suggestions]

    crash = run_trial(
        agent_command(lenet, {**suggestions[0].config, "model.optimizer.lr": {"value": -0.1}}),
        {**env, "WANDB_RUN_ID": "bad"},
        tmp_path,
        subset_npz,
    )
    assert crash.returncode == 2
    assert (
        crash.stderr.strip().splitlines()[-1]
        == "error: model.optimizer refused its arguments: Invalid learning rate: -0.1"
    )
    assert not (tmp_path / "lenet" / "sweep-sw33p-bad").exists()

    resnet = load(REPO / "experiments/sweeps/resnet_gpu.yaml")
    tried = []
    for i, suggestion in enumerate(sweeps.next_runs(resnet, [], validate=True, n=2)):
        tried.append(
            sweeps.SweepRun(
                name=f"r{i}",
                state=sweeps.RunState.finished,
                config=suggestion.config,
                summary_metrics={"val/acc": 0.3 + 0.1 * i},
                history=[{"val/acc": 0.3 + 0.1 * i}],
            )
        )
    bayes = sweeps.next_run(resnet, tried, validate=True)
    assert bayes.search_info is not None  # a Bayesian suggestion, informed by the finished runs
    done = run_trial(
        agent_command(resnet, bayes.config),
        {**env, "WANDB_RUN_ID": "bayes"},
        tmp_path,
        subset_npz,
        "--data.batch_size=32",
    )  # not swept here; smaller for the CPU
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = run_dirs(tmp_path, "resnet20")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (
        run.name == "sweep-sw33p-bayes"
        and saved["model"]["init_args"]["net"]["class_path"] == bayes.config["model.net"]["value"]
    )
    assert saved["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(
        bayes.config["model.optimizer.lr"]["value"]
    )
