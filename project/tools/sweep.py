"""Run a wandb sweep file without a wandb server: trials chosen by wandb's own engine, state in a folder.

    python -m project sweep experiments/sweeps/lenet_seeds.yaml --workers 2
    python -m project sweep SWEEP.yaml --dir runs/sweeps/lenet-1 --count 4     # another worker on the same sweep

The ``sweeps`` package (what the wandb server runs) suggests each trial from the sweep file and
every trial already in the sweep directory; the trial's command line is the sweep's ``command``
with wandb's own macros (``${env} ${interpreter} ${program} ${args}`` ...), built by the code
``wandb agent`` uses. Every trial is one ``python -m project fit`` writing into
``DIR/trials/<trial id>`` (passed as ``PROJECT_RUN_DIR``).

The sweep directory is the only shared state, so any number of workers on one machine or on
a shared filesystem (SLURM array tasks) cooperate without a server:

    DIR/sweep.yaml      the sweep file, as the first worker read it (later workers must agree)
    DIR/trials.json     every trial's id, state, parameters and worker; rewritten atomically under
    DIR/sweep.lock      a lock (project/run/locks.py), held only while a worker reads and rewrites trials.json
    DIR/sweep.csv       the same as a table, plus the sweep metric's final value of every trial
    DIR/trials/<id>/    the trial's run directory (config.yaml, metrics.csv, checkpoints/)
    DIR/logs/<id>.log   the trial's stdout and stderr; DIR/logs/<id>.lock is locked by its worker

A trial marked running whose worker's lock is free (the worker died) and whose run is not locked
(see project/run/directory.py) is resumed by the next worker, in the same run directory with
``--ckpt_path last``; so are trials a stopped worker marked ``interrupted``.
"""

import argparse
import contextlib
import csv
import ctypes
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from project.errors import UserError
from project.run import checkpoints, directory, locks, metrics_file

with warnings.catch_warnings():  # sweeps still uses pydantic v1 configuration names
    warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
    import sweeps
    from sweeps.params import HyperParameter, HyperParameterSet
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

#: The most points a grid sweep may have: the ``sweeps`` package lists every point of the grid on every
#: suggestion (itertools.product), ~1 s and ~10 MB at this size, ~5 s and ~90 MB at ten times it.
MAX_GRID_POINTS = 100_000
#: Consecutive failed trials after which a worker gives up: the command itself is probably broken.
MAX_FAILURES_IN_A_ROW = 3
#: How often a worker looks at its running trials (and at early termination).
POLL_SECONDS = 0.5
#: Exit statuses of a trial stopped by a signal, having saved last.ckpt (the CLI's 130/143) or not.
INTERRUPTED_STATUSES = {130, 143, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL}


@dataclass
class Trial:
    """One row of the sweep: what the engine suggested and what became of it."""

    id: str
    config: dict  # {parameter: value}
    state: str = "running"  # running, finished, failed, interrupted, stopped (early termination)
    worker: str = ""
    starts: int = 0
    exit_status: int | None = None
    history: list = field(default_factory=list)  # the sweep metric's logged values, oldest first

    def as_sweep_run(self, metric: str | None) -> "sweeps.SweepRun":
        state = {
            "finished": sweeps.RunState.finished,
            "stopped": sweeps.RunState.finished,
            "failed": sweeps.RunState.failed,
        }.get(self.state, sweeps.RunState.running)
        summary = {metric: self.history[-1]} if metric and self.history else {}
        return sweeps.SweepRun(
            name=self.id,
            state=state,
            config={k: {"value": v} for k, v in self.config.items()},
            summary_metrics=summary,
            history=[{metric: v} for v in self.history] if metric else [],
        )


class SweepDir:
    """The sweep directory: the lock, the state file, the table, and where each trial writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state_file = path / "trials.json"

    def run_dir(self, trial_id: str) -> Path:
        return self.path / "trials" / trial_id

    def log(self, trial_id: str) -> Path:
        return self.path / "logs" / f"{trial_id}.log"

    def trial_lock(self, trial_id: str) -> Path:
        return self.path / "logs" / f"{trial_id}.lock"

    def locked(self) -> locks.ProcessLock:
        """DIR/sweep.lock, as a context that waits for it (other workers hold it only for a read and a rewrite)."""
        return locks.ProcessLock(self.path / "sweep.lock")

    def read(self) -> list[Trial]:
        if not self.state_file.is_file():
            return []
        try:
            return [Trial(**row) for row in json.loads(self.state_file.read_text())["trials"]]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{self.state_file} is not a sweep state file ({err}); give a new --dir.") from None

    def write(self, trials: list[Trial], config: dict) -> None:
        """Rewrite trials.json and sweep.csv; each is replaced whole, so a reader never sees half a file."""
        checkpoints.write_atomically(
            json.dumps({"trials": [asdict(t) for t in trials]}, indent=1).encode(), self.state_file
        )
        metric = (config.get("metric") or {}).get("name")
        names = list(config["parameters"])
        buffer = io.StringIO()
        table = csv.writer(buffer)
        table.writerow(["trial", "state", *names, "run_dir", *([metric] if metric else [])])
        for trial in trials:
            values = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in map(trial.config.get, names)]
            final = [trial.history[-1] if trial.history else ""] if metric else []
            table.writerow([trial.id, trial.state, *values, f"trials/{trial.id}", *final])
        checkpoints.write_atomically(buffer.getvalue().encode(), self.path / "sweep.csv")


def load_sweep_file(path: Path) -> dict:
    """The sweep file, checked by the ``sweeps`` package's own schema; one sentence when it is not one."""
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read the sweep file {path}: {err.strerror}.") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the file.") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a wandb sweep file (expected a mapping with method, parameters and command).")
    violations = sweeps.schema_violations_from_proposed_config(config)
    if violations:
        raise UserError(f"{path} is not a valid wandb sweep file: {violations[0]}")
    if not config.get("command"):
        raise UserError(f"{path} has no command; give the trial's command line (see experiments/sweeps/).")
    if config.get("method") == "grid":
        check_grid_size(config, path)
    return config


def grid_size(parameters: dict) -> int:
    """How many points a grid over ``parameters`` has: the product of each parameter's value count, computed
    from the counts alone (the ``sweeps`` package's own reading of each parameter; nothing is enumerated)."""
    size = 1
    for parameter in HyperParameterSet.from_config(parameters):
        spec = parameter.config
        if parameter.type == HyperParameter.CATEGORICAL:
            size *= len(spec["values"])
        elif parameter.type == HyperParameter.INT_UNIFORM:
            size *= max(0, spec["max"] - spec["min"] + 1)
        elif parameter.type == HyperParameter.Q_UNIFORM:  # np.arange(min, max, q), as the grid search builds it
            size *= max(0, math.ceil((spec["max"] - spec["min"]) / spec["q"]))
        # a constant counts once; a continuous distribution the grid search refuses itself, in its own words
    return size


def check_grid_size(config: dict, path: Path) -> None:
    size = grid_size(config["parameters"])
    if size > MAX_GRID_POINTS:
        raise UserError(
            f"{path} describes a grid of {size:,} points (the product of its parameters' value counts), more than "
            f"the {MAX_GRID_POINTS:,} a grid sweep can list; use method: random or bayes, or fewer values."
        )


def trial_command(config: dict, trial: Trial, args_json_file: Path) -> list[str]:
    """The sweep's command for ``trial``, its macros filled in as ``wandb agent`` does
    (wandb/wandb_agent.py, ``Agent._command_run``), with this interpreter for ``${interpreter}``."""
    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in trial.config.items()}})
    sweep_vars["interpreter"] = [sys.executable]  # wandb's agent runs "python" from PATH
    sweep_vars["program"] = [config.get("program", "")]
    sweep_vars["args_json_file"] = [str(args_json_file)]
    sweep_vars["env"] = ["/usr/bin/env"]
    command: list[str] = []
    for part in create_sweep_command(list(config["command"])):
        part = str(part)
        if part.startswith("${") and part.endswith("}"):
            command += sweep_vars.get(part[2:-1]) or []
        else:
            command.append(part)
    if trial.starts > 1:
        command.append("--ckpt_path=last")  # its own run directory's last.ckpt (or a fresh start if none)
    return command


def final_history(metrics_csv: Path, metric: str | None) -> list[float]:
    """Every logged value of ``metric`` in a trial's metrics.csv, oldest first ([] if none yet)."""
    if not metric:
        return []
    try:
        return metrics_file.values_of(metrics_csv, metric)
    except metrics_file.DamagedMetrics:  # a trial still writing may end in half a row; the next read has it whole
        return []


def _die_with_parent() -> None:
    """In the trial's process (Linux): SIGTERM when the worker dies, so the trial saves last.ckpt and
    stops rather than training on, unrecorded, while another worker resumes it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Running:
    trial: Trial
    process: subprocess.Popen
    lock: locks.ProcessLock
    log: object


class Worker:
    """Claims trials from the sweep directory, runs up to ``workers`` of them at once, records each."""

    def __init__(self, config: dict, sweep_dir: SweepDir, workers: int, count: int | None) -> None:
        self.config, self.dir, self.workers, self.count = config, sweep_dir, workers, count
        self.metric = (config.get("metric") or {}).get("name")
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.started = 0
        self.failures_in_a_row = 0
        self.last_failure = ""
        self.stopping: int | None = None  # the signal that asked this worker to stop
        self.slots: list[Running | None] = [None] * workers
        self.gpus = self._visible_gpus()

    @staticmethod
    def _visible_gpus() -> list[str]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
        try:
            listed = subprocess.run(
                ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return []
        return listed.stdout.split() if listed.returncode == 0 else []

    def trial_env(self, slot: int, trial: Trial) -> dict:
        env = {
            **os.environ,
            directory.RUN_DIR_ENV: str(self.dir.run_dir(trial.id)),
            "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", self.dir.path.name),
        }
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        elif "OMP_NUM_THREADS" not in os.environ:
            # The workers share the cores; each trial's torch uses its share (torch reads OMP_NUM_THREADS).
            env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // self.workers))
        return env

    # -- claiming and recording, each under the sweep lock ----------------------------------------------

    def claim(self) -> tuple[Trial, locks.ProcessLock] | None:
        """The next trial for this worker, an interrupted or abandoned one first, else a new suggestion;
        with its trial lock, held until the trial is recorded."""
        with self.dir.locked():
            trials = self.dir.read()
            for trial in trials:
                abandoned = trial.state == "running" and not locks.is_held(self.dir.trial_lock(trial.id))
                if (trial.state == "interrupted" or abandoned) and not locks.is_held(
                    self.dir.run_dir(trial.id) / directory.LOCK_FILE
                ):
                    break
            else:
                trial = self._suggest(trials)
                if trial is None:
                    return None
                trials.append(trial)
            trial.state, trial.worker, trial.starts, trial.exit_status = "running", self.name, trial.starts + 1, None
            lock = self._lock_trial(trial)
            self.dir.write(trials, self.config)
            return trial, lock

    def _suggest(self, trials: list[Trial]) -> Trial | None:
        cap = self.config.get("run_cap")
        if cap is not None and len(trials) >= cap:
            return None
        suggestion = sweeps.next_run(self.config, [t.as_sweep_run(self.metric) for t in trials], validate=True)
        if suggestion is None:  # a grid with every point tried
            return None
        return Trial(id=f"trial-{len(trials):03d}", config={k: v["value"] for k, v in suggestion.config.items()})

    def _lock_trial(self, trial: Trial) -> locks.ProcessLock:
        path = self.dir.trial_lock(trial.id)
        path.parent.mkdir(exist_ok=True)
        return locks.ProcessLock(path).acquire()  # free: checked under the sweep lock

    def record(self, running: Running, status: int) -> None:
        trial = running.trial
        history = final_history(self.dir.run_dir(trial.id) / "metrics.csv", self.metric)
        if status == 0:
            state = "stopped" if trial.state == "stopped" else "finished"
        elif trial.state == "stopped" and status in INTERRUPTED_STATUSES:
            state = "stopped"
        elif self.stopping is not None:  # whatever made it end while this worker stopped it, it can resume
            state = "interrupted"
        else:
            state = "failed"
        with self.dir.locked():
            trials = self.dir.read()
            for row in trials:
                if row.id == trial.id:
                    row.state, row.exit_status, row.history = state, status, history
            self.dir.write(trials, self.config)
        running.lock.release()
        running.log.close()
        print(
            f"{trial.id} {state} (exit status {status})" + (f", {self.metric} = {history[-1]}" if history else ""),
            file=sys.stderr,
            flush=True,
        )
        if state == "failed":
            self.failures_in_a_row += 1
            reason = _last_line(self.dir.log(trial.id))
            print(f"  {reason}  [{self.dir.log(trial.id)}]", file=sys.stderr, flush=True)
            self.last_failure = reason
        elif state == "finished":
            self.failures_in_a_row = 0

    # -- the loop --------------------------------------------------------------------------------------

    def start(self, slot: int, trial: Trial, lock: locks.ProcessLock) -> Running:
        log = open(self.dir.log(trial.id), "a")
        args_json = self.dir.path / "logs" / f"{trial.id}.args.json"
        if "${args_json_file}" in self.config["command"]:
            args_json.write_text(json.dumps(trial.config))
        command = trial_command(self.config, trial, args_json)
        print(f"{trial.id} start {trial.starts} on slot {slot}: {' '.join(command)}", file=log, flush=True)
        print(
            f"{trial.id} {'resumed' if trial.starts > 1 else 'started'}: "
            + " ".join(f"{k}={v}" for k, v in trial.config.items()),
            file=sys.stderr,
            flush=True,
        )
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.trial_env(slot, trial),
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        return Running(trial, process, lock, log)

    def may_start(self) -> bool:
        return (
            self.stopping is None
            and self.failures_in_a_row < MAX_FAILURES_IN_A_ROW
            and (self.count is None or self.started < self.count)
        )

    def run(self) -> int:
        exhausted = False
        while True:
            for slot, running in enumerate(self.slots):
                if running is None and not exhausted and self.may_start():
                    claimed = self.claim()
                    if claimed is None:
                        exhausted = True
                    else:
                        self.started += 1
                        self.slots[slot] = self.start(slot, *claimed)
            if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW and self.stopping is None:
                self.stop(signal.SIGTERM, announce=False)  # the others are resumable, not failed
            if all(s is None for s in self.slots):
                break
            time.sleep(POLL_SECONDS)
            for slot, running in enumerate(self.slots):
                if running is not None and (status := running.process.poll()) is not None:
                    self.record(running, status)
                    self.slots[slot] = None
            self.terminate_early()
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise UserError(
                f"{MAX_FAILURES_IN_A_ROW} trials failed in a row, the last with: {self.last_failure} "
                f"(logs in {self.dir.path / 'logs'}); fix the sweep's command or parameters."
            )
        if self.stopping is not None:
            return 128 + self.stopping  # as a shell reports a process stopped by that signal
        return 0

    def stop(self, signum: int, announce: bool = True) -> None:
        """Forward a stop to every running trial: SIGTERM to its main process, which saves last.ckpt at a batch
        boundary, shuts its DataLoader workers down itself and exits (sent to the whole process group, it
        would kill those workers first: PyTorch's workers die on a SIGTERM that is not their parent's, and
        the trial with them, unsaved). The trial is marked interrupted so the next worker resumes it. A
        second signal stops them at once (SIGKILL to the whole group)."""
        again = self.stopping is not None
        self.stopping = self.stopping or signum
        if announce:
            print(
                f"Received {signal.Signals(signum).name}: stopping the running trials "
                f"({'at once' if again else 'they save last.ckpt first'}).",
                file=sys.stderr,
                flush=True,
            )
        for running in self.slots:
            if running is not None and running.process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if again:
                        os.killpg(running.process.pid, signal.SIGKILL)
                    else:
                        running.process.send_signal(signal.SIGTERM)

    def terminate_early(self) -> None:
        """The sweep's ``early_terminate`` (hyperband), decided by the ``sweeps`` package from every trial's
        history; a trial it stops gets SIGTERM (it saves and exits) and is recorded ``stopped``."""
        if not self.config.get("early_terminate") or not self.metric:
            return
        mine = {r.trial.id: r for r in self.slots if r is not None and r.trial.state == "running"}
        if not mine:
            return
        with self.dir.locked():
            trials = self.dir.read()
        for trial in trials:
            if trial.id in mine:
                trial.history = final_history(self.dir.run_dir(trial.id) / "metrics.csv", self.metric)
        with contextlib.suppress(ValueError):  # too little history to decide yet
            for stop in sweeps.stop_runs(self.config, [t.as_sweep_run(self.metric) for t in trials]):
                if stop.name in mine and mine[stop.name].process.poll() is None:
                    mine[stop.name].trial.state = "stopped"
                    print(
                        f"{stop.name}: stopped early by {self.config['early_terminate'].get('type')}",
                        file=sys.stderr,
                        flush=True,
                    )
                    mine[stop.name].process.send_signal(signal.SIGTERM)  # its main process: see stop()


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def open_sweep_dir(path: Path, config: dict, sweep_file: Path) -> SweepDir:
    """Create DIR, or join the sweep already in it (the same sweep file only)."""
    directory.check_writable_dir(path, "--dir")
    if path.exists() and not path.is_dir():
        raise UserError(f"--dir {path} is a file; choose a directory.")
    saved = path / "sweep.yaml"
    if path.is_dir() and not saved.is_file() and any(p.name != "sweep.lock" for p in path.iterdir()):
        raise UserError(f"--dir {path} is not empty and holds no sweep.yaml; choose a new or empty directory.")
    path.mkdir(parents=True, exist_ok=True)
    sweep_dir = SweepDir(path.resolve())
    directory.own(sweep_dir.path)  # every worker of the sweep rewrites its files
    with sweep_dir.locked():
        if saved.is_file():
            if yaml.safe_load(saved.read_text()) != config:
                raise UserError(
                    f"{path} holds another sweep ({saved} differs from {sweep_file}); "
                    "give the same sweep file or a new --dir."
                )
        else:  # the first worker (the others wait for the lock, then join)
            checkpoints.write_atomically(yaml.safe_dump(config, sort_keys=False).encode(), saved)
            sweep_dir.write([], config)
    return sweep_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, as the CLI's errors, not the usage screen
        print(f"error: {message} (see python -m project sweep --help).", file=sys.stderr)
        sys.exit(2)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    directory.new_command()  # a command of its own: what earlier ones wrote is not its to replace
    parser = _Parser(prog="python -m project sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file", type=Path, help="a wandb sweep file, e.g. experiments/sweeps/lenet_seeds.yaml")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="the sweep directory (default: runs/sweeps/<sweep file stem>-<time>); "
        "give the same one to every worker of a sweep",
    )
    parser.add_argument("--workers", type=_positive, default=1, help="trials run at once by this process")
    parser.add_argument("--count", type=_positive, default=None, help="at most this many trials by this process")
    args = parser.parse_args(argv)
    try:
        config = load_sweep_file(args.sweep_file)
        path = args.dir or Path("runs") / "sweeps" / f"{args.sweep_file.stem}-{directory.new_run_name()}"
        sweep_dir = open_sweep_dir(path, config, args.sweep_file)
        print(f"Sweep directory: {sweep_dir.path}", file=sys.stderr, flush=True)
        worker = Worker(config, sweep_dir, args.workers, args.count)
        # SIGUSR1: SLURM's warning before the time limit (experiments/slurm/sweep_local.sbatch).
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, lambda signum, frame: worker.stop(signum))
        status = worker.run()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"Table: {sweep_dir.path / 'sweep.csv'}", file=sys.stderr)
    if worker.stopping == signal.SIGUSR1 and directory.slurm_job_id():
        status = requeue(directory.slurm_job_id())
    sys.exit(status)


def requeue(job_id: str) -> int:
    """Put this SLURM job back in the queue: it starts again as a worker and resumes its interrupted trials."""
    from project.run.cluster import ignore_sigterm, requeue_job  # noqa: PLC0415 (Lightning only where needed)

    ignore_sigterm()
    problem = requeue_job(job_id)
    if problem is None:
        print(f"Requeued SLURM job {job_id}; its trials resume when it starts again.", file=sys.stderr)
        return 0
    print(
        f"error: SLURM job {job_id} was not requeued: {problem}; start another worker on this --dir to resume "
        "its trials.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    main()
