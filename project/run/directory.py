"""The life of one run, outside Lightning: its directory, its lock, the checkpoint it resumes from,
its metrics.csv, and the signals that stop it cleanly.

The CLI (project/run/cli.py) asks :meth:`Run.open` for a run once the configuration is parsed, and
closes it when the command ends. Nothing here imports Lightning, so the policy reads (and tests)
on its own. See the README's "Run directories" for what a user sees.
"""

import csv
import errno
import io
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from project.errors import UserError
from project.run import checkpoints, locks, metrics_file

#: Set by the process that chose the run directory, so the processes Lightning launches for
#: DDP (which re-run this command line) write into the same one. Users may set it themselves.
RUN_DIR_ENV = "PROJECT_RUN_DIR"
#: Held (flock) by the process that writes into a run directory, for as long as its command runs.
LOCK_FILE = "run.lock"
#: ``--ckpt_path`` values that name a checkpoint of the experiment's newest run.
NAMED_CHECKPOINTS = {"last": "last*.ckpt", "best": "best*.ckpt"}
#: What a fit writes before its first step; a new run dir holding only these after a failure is removed.
STARTUP_FILES = ("config.yaml", "hparams.yaml", LOCK_FILE)


def current() -> "Run | None":
    """The run this process's command writes into (the CLI opened it), or ``None`` outside the CLI."""
    return _open_run


def run_directory(trainer) -> Path:
    """Where this run writes: the open run's directory, else (a Trainer used without the CLI)
    ``trainer.log_dir`` or its ``default_root_dir``. Without a run every rank must ask (log_dir broadcasts)."""
    if _open_run is not None:
        return _open_run.directory
    return Path(trainer.log_dir or trainer.default_root_dir)


def path_in_run(value: str | Path | None, option: str, default: str = ".") -> Path | None:
    """``value`` (default: ``default``) resolved against the open run's directory, or one sentence
    refusing a path that leads outside it (``..``, an absolute path, a symbolic link elsewhere).
    Outside the CLI (no run open): ``value`` as given, ``None`` for none."""
    if _open_run is None:
        return Path(value) if value else None
    path = (_open_run.directory / (value or default)).resolve()
    if not path.is_relative_to(_open_run.directory):
        raise UserError(
            f"{option}={value} leads outside the run directory {_open_run.directory}; every file a run writes stays "
            f"inside its own directory: give a path relative to it (e.g. {default})."
        )
    return path


def experiment_name(config) -> str:
    """``--name``, else the stem of the last --config file (presets never name a run), else ``run``."""
    if config.get("name") is not None:
        return config.name
    # An inline --config '{...}' is recorded as None: it names no run.
    sources = [source for source in config.get("config") or [] if source is not None]
    # Presets (experiments/presets/*.yaml: strategy, precision, compile) never name a run.
    named = [s for s in sources if Path(str(s)).parent.name != "presets"] or sources
    return Path(str(named[-1])).stem if named else "run"


def check_name(name: str, option: str = "--name") -> str:
    """``name`` if it is one path component (a folder name), else one sentence saying so."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise UserError(f"{option}={name!r} must be a single folder name (no '/', not '.' or '..'), e.g. lenet-wide.")
    return name


def new_run_name() -> str:
    """A sortable, collision-free directory name: local time plus random hex."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job id>_<task id>`` for array tasks, else ``$SLURM_JOB_ID``."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def sweep_run_name() -> str | None:
    """``sweep-<sweep id>-<run id>`` inside a trial started by ``wandb agent``, else ``None``."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run and re.fullmatch(r"[\w-]+", sweep + run):
        return f"sweep-{sweep}-{run}"
    return None


def is_primary_process() -> bool:
    """False in the processes a launcher started beside the first one (DDP workers, srun tasks,
    torchrun ranks): they share the first one's run directory, its lock and its resume plan."""
    return all(os.environ.get(key, "0") == "0" for key in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "NODE_RANK"))


def choose_run_dir(root: Path, name: str, explicit: str | Path | None, resume_last: bool, fit: bool = False) -> Path:
    """Where this run writes; see the README's "Run directories" for the policy."""
    if explicit:
        return Path(explicit)
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    experiment = root / name
    sweep_run = sweep_run_name()
    if sweep_run:
        # One directory per trial, also when one SLURM job runs a `wandb agent` for many trials.
        return experiment / sweep_run
    job_id = slurm_job_id()
    if job_id and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        # Stable across requeues of the same job, so a requeued job finds its own checkpoints.
        run_dir = experiment / f"slurm-{job_id}"
        if fit and not resume_last:
            refuse_earlier_job(run_dir, "SLURM_RESTART_COUNT", f"SLURM job {job_id}", "SLURM reuses ids")
        return run_dir
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        if run_id == "none":
            raise UserError(
                "Under torchrun every rank must agree on the run directory: pass torchrun --rdzv-id=<unique id> "
                f"or give --run_dir (or set {RUN_DIR_ENV})."
            )
        run_dir = experiment / f"torchrun-{run_id}"
        if fit and not resume_last:
            refuse_earlier_job(run_dir, "TORCHELASTIC_RESTART_COUNT", f"torchrun --rdzv-id {run_id}", "ids are reused")
        return run_dir
    if resume_last:
        newest = newest_run_with(experiment, NAMED_CHECKPOINTS["last"])
        if newest is not None:
            return newest
    return experiment / new_run_name()


def refuse_earlier_job(run_dir: Path, restart_count: str, job: str, why: str) -> None:
    """One sentence, before anything is written, when the first start of a job finds a run in the directory
    named after its id: that run is an earlier job's ({why}), never this one's to resume. Every rank of the job
    decides alike: its own config.yaml is written only after all ranks joined. A requeue or an elastic restart
    (``restart_count`` > 0) is this job again and resumes."""
    if int(os.environ.get(restart_count) or 0) > 0 or not (run_dir / "config.yaml").exists():
        return
    raise UserError(
        f"{run_dir} holds the run of an earlier job with the same id ({why}); this fit is the first start of "
        f"{job}, not a restart of that one ({restart_count} is {os.environ.get(restart_count) or 'unset'}): give --name or --run_dir to start a run of "
        "its own, or --ckpt_path last to continue that run on purpose."
    )


def newest_run_with(experiment: Path, pattern: str) -> Path | None:
    """The run of ``experiment`` whose ``checkpoints/<pattern>`` was written last."""
    found = [p for p in experiment.glob(f"*/checkpoints/{pattern}")]
    newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
    return newest.parent.parent if newest is not None else None


def newest_checkpoint(run_dir: Path, pattern: str = "*.ckpt") -> Path | None:
    """The most recently written ``<run_dir>/checkpoints/<pattern>`` (a file, or an FSDP sharded
    checkpoint directory), if any."""
    return max((run_dir / "checkpoints").glob(pattern), key=lambda p: p.stat().st_mtime, default=None)


def run_dir_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """``<run>`` when ``ckpt_path`` is ``<run>/checkpoints/<file>.ckpt`` written by this template."""
    if not names_a_path(ckpt_path):
        return None
    path = Path(ckpt_path)
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


def lightnings_own(ckpt_path: str | None) -> bool:
    """Whether ``--ckpt_path`` is one of Lightning's own names, ``hpc`` or ``registry[:...]``, left to Lightning."""
    return bool(ckpt_path) and (ckpt_path == "hpc" or ckpt_path.startswith("registry"))


def names_a_path(ckpt_path: str | None) -> bool:
    """Whether ``--ckpt_path`` is a path, not ``last``/``best`` or one of Lightning's own names."""
    return bool(ckpt_path) and ckpt_path not in NAMED_CHECKPOINTS and not lightnings_own(ckpt_path)


def check_checkpoint_path(ckpt_path: str) -> Path:
    """``ckpt_path`` as a path to read, or one sentence saying why it cannot be."""
    path = Path(ckpt_path)
    if not path.exists():
        raise UserError(
            f"--ckpt_path {ckpt_path} does not exist; give a .ckpt file from a run's checkpoints/ folder, or `last`."
        )
    if path.is_dir() and not (path / "meta.pt").is_file() and not (path / ".metadata").is_file():
        raise UserError(
            f"--ckpt_path {ckpt_path} is a directory, not a checkpoint; give a .ckpt file from a run's checkpoints/ folder."
        )
    if not os.access(path, os.R_OK):
        raise UserError(f"--ckpt_path {ckpt_path} is not readable by this user; check its permissions.")
    if path.is_dir() and (path / ".metadata").is_file():
        checkpoints.check_distributed_checkpoint(path)  # Lightning's FSDP loader would unpickle any entry
    return path


def find_named_checkpoint(experiment: Path, name: str) -> Path:
    """The newest ``last``/``best`` checkpoint among ``experiment``'s runs, or one sentence saying there is none."""
    run = newest_run_with(experiment, NAMED_CHECKPOINTS[name])
    if run is None:
        raise UserError(
            f"--ckpt_path {name} found no {NAMED_CHECKPOINTS[name]} under {experiment}/*/checkpoints/; "
            "train first (fit), give the experiment's --name, or pass the checkpoint file itself."
        )
    return newest_checkpoint(run, NAMED_CHECKPOINTS[name])


def check_writable_dir(path: Path, option: str) -> None:
    """Refuse a directory option that names a file or lies under a folder this user cannot write."""
    existing = path
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise UserError(
                f"{option} {path}: {existing} is a broken symbolic link; remove it or choose another directory."
            )
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, not a directory; choose another directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: this user cannot write to {existing}; choose a directory you can write to.")


# ---- the one rule of every file a command writes ------------------------------------------------

#: The files this command wrote through checkpoints.write_atomically (the one place the template writes), by writer.
_written: dict[Path, str] = {}
#: Folders whose existing files this command continues: a fit's own run when it resumes (or is requeued) there.
_owned: set[Path] = set()


def new_command() -> None:
    """What an earlier command of this process wrote is not the next one's (tests, notebooks run many)."""
    _written.clear()
    _owned.clear()


def own(folder: Path) -> None:
    """This command continues the files in ``folder`` (a run it resumes, a sweep it joins)."""
    _owned.add(Path(folder).resolve())


def check_write(path: Path, writer: str) -> None:
    """The rule every write meets (checkpoints.write_atomically calls it): inside the open run's directory; never
    a file this command did not create (but in a run it continues); one writer per file. One sentence otherwise,
    before the write: what was there stays as it was."""
    path = path.parent.resolve() / path.name
    if _open_run is not None and not path.is_relative_to(_open_run.directory):
        raise UserError(
            f"{writer} would write {path}, outside the run directory {_open_run.directory}; every file a run writes "
            "stays inside its own directory: give a path relative to it."
        )
    first = _written.get(path)
    if first is None and path.exists() and not any(path.is_relative_to(folder) for folder in _owned):
        raise UserError(
            f"{writer} would replace {path}, which this command did not create; no command replaces another's file "
            "(a finished run stays as it is): give another path, or move that file away yourself."
        )
    if first not in (None, writer):
        raise UserError(
            f"{writer} would replace {path}, which {first} wrote; every file has one writer: give one of them another path."
        )
    _written[path] = writer


@dataclass(frozen=True)
class ResumePlan:
    """What a fit resumes from, read from its checkpoint once: the path, the optimiser step
    reached (where metrics.csv continues) and the model settings it was trained with."""

    checkpoint: Path
    #: The whole checkpoint, memory-mapped (tensors are read only when used); for a sharded
    #: checkpoint directory, its ``meta.pt`` (loop state and hyperparameters, no tensors).
    contents: dict = field(repr=False, default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "ResumePlan":
        if path.is_dir() and (path / ".metadata").is_file():
            checkpoints.check_distributed_checkpoint(path)  # Lightning's FSDP loader would unpickle any entry
        stored = path / "meta.pt" if path.is_dir() else path
        return cls(path, checkpoints.load_file(stored, mmap=True) if stored.is_file() else {})

    @property
    def global_step(self) -> int | None:
        return self.contents.get("global_step")

    @property
    def hyper_parameters(self) -> dict:
        return dict(self.contents.get("hyper_parameters") or {})


class RunLocked(UserError):
    """Another process is writing into the run directory."""


class RunLock:
    """The lock on ``<run dir>/run.lock`` (project.run.locks), held while a command writes into the run.

    The file names its holder (host, pid, command, start time) for the error a second process
    gets. It is removed on release; a lock left by a killed process is not held (the kernel
    drops flocks with their process), so the next run takes it over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._lock = locks.ProcessLock(self.path)

    def acquire(self) -> None:
        try:
            self._lock.acquire(wait=False)
        except locks.Busy as busy:
            raise RunLocked(
                f"{self.path.parent} is in use by {busy.holder}; wait for that command to finish (or stop it), "
                "or start a new run without --ckpt_path/--run_dir."
            ) from None

    def release(self) -> None:
        self._lock.release()


@dataclass
class Run:
    """One command's run directory: chosen, created (remembering which folders are new), locked
    by the primary process, and closed when the command ends."""

    directory: Path
    #: The experiment: runs of the same name share ``<root>/<name>/``.
    name: str = ""
    #: The checkpoint this command loads (fit: the one it resumes from; validate/test/predict: the
    #: one evaluated, ``last``/``best`` resolved), handed to Lightning as ``trainer.ckpt_path``.
    checkpoint: Path | None = None
    #: That checkpoint file's contents, read once (memory-mapped) by this run; Lightning loads them
    #: from here (project.run.callbacks.checkpointing.AtomicCheckpointIO) instead of reading the file again.
    contents: dict | None = None
    resume: ResumePlan | None = None
    created: list[Path] = field(default_factory=list)
    lock: RunLock | None = None
    #: A temporary directory (fast_dev_run), removed with everything in it when the command ends.
    scratch: bool = False

    @classmethod
    def open(
        cls,
        *,
        subcommand: str,
        root: Path,
        name: str,
        run_dir: str | None,
        ckpt_path: str | None,
        scratch: bool = False,
    ) -> "Run":
        """Choose, check, create and lock the directory of this command; ``ckpt_path`` as given.
        ``scratch`` (``--trainer.fast_dev_run``): a temporary directory, removed when the command ends,
        so that a trial run leaves nothing under the runs folder."""
        global _open_run
        check_name(name)
        new_command()
        if scratch:
            if is_primary_process() and not os.environ.get(RUN_DIR_ENV):
                directory = Path(tempfile.mkdtemp(prefix=f"{name}-fast_dev_run-")).resolve()
                print(f"fast_dev_run: writing into {directory}, removed at the end; nothing is kept.", file=sys.stderr)
                _open_run = cls(directory, name=name, created=[directory], scratch=True)
            else:
                _open_run = cls(Path(os.environ[RUN_DIR_ENV]), name=name)  # a DDP rank of the primary's scratch run
            return _open_run
        if subcommand != "fit" and ckpt_path in NAMED_CHECKPOINTS:
            ckpt_path = str(find_named_checkpoint(root / name, ckpt_path))
        contents = None
        if names_a_path(ckpt_path):
            if check_checkpoint_path(ckpt_path).is_file() and subcommand != "fit":
                contents = checkpoints.load_file(ckpt_path, mmap=True)  # before anything is created
        evaluated = run_dir_of_checkpoint(ckpt_path)
        if subcommand == "fit":
            explicit = run_dir or evaluated
        else:
            # An evaluation of a run's checkpoint writes into a folder of its own inside that run (the rule of
            # check_write keeps the fit's files as they are); --run_dir, a folder of its own anywhere.
            # (DDP's other processes take the primary's, from the environment.)
            own_folder = evaluated and not os.environ.get(RUN_DIR_ENV)
            explicit = run_dir or (evaluated / "eval" / f"{new_run_name()}-{subcommand}" if own_folder else None)
        if explicit is not None:
            check_writable_dir(Path(explicit), "--run_dir")
        check_writable_dir(root, "--trainer.default_root_dir")
        directory = choose_run_dir(
            root, name, explicit, resume_last=subcommand == "fit" and ckpt_path == "last", fit=subcommand == "fit"
        )
        if directory.exists() and not directory.is_dir():
            raise UserError(f"The run directory {directory} is a file; remove it or choose another --run_dir.")
        run = cls(directory.resolve(), name=name)
        if subcommand != "fit" and names_a_path(ckpt_path):
            run.checkpoint, run.contents = Path(ckpt_path), contents
        if is_primary_process():
            run.created = _make_dirs(run.directory)
            run.lock = RunLock(run.directory)
            try:
                run.lock.acquire()
            except BaseException:
                run.lock = None
                run.remove_if_unused()
                raise
        if subcommand == "fit":
            try:
                resume_from = run.fit_checkpoint(ckpt_path)
                if resume_from is None and ckpt_path == "best":
                    # Else a new run would start from scratch, having been asked to continue from a best checkpoint.
                    raise UserError(
                        f"fit --ckpt_path best found no {NAMED_CHECKPOINTS['best']} in {run.directory}/checkpoints/ "
                        "(a fit resumes from its own run: --ckpt_path last); give the best-*.ckpt file itself to continue from it."
                    )
                run.resume = ResumePlan.read(resume_from) if resume_from is not None else None
                run.checkpoint = resume_from
                if run.resume is not None or (run.directory / "config.yaml").exists():
                    own(run.directory)  # a fit that continues its run (resumed, requeued) continues its files
                if resume_from is not None and resume_from.is_file():
                    run.contents = run.resume.contents
            except BaseException:
                # A checkpoint that cannot be read: the caller never gets the run to close.
                run.close(failed=True)
                raise
        _open_run = run
        return run

    def fit_checkpoint(self, ckpt_path: str | None) -> Path | None:
        """The checkpoint a fit resumes from: the one given; for ``last``, this run's newest
        ``last*.ckpt``; without ``--ckpt_path``, the newest checkpoint already in the directory (a
        requeued job, ``--run_dir``). ``None``: a fresh start."""
        if ckpt_path in NAMED_CHECKPOINTS:
            return newest_checkpoint(self.directory, NAMED_CHECKPOINTS[ckpt_path])
        if lightnings_own(ckpt_path):
            return None
        return Path(ckpt_path) if ckpt_path else newest_checkpoint(self.directory)

    def remove_if_unused(self) -> None:
        """Remove the folders this command created when it failed before writing results into them
        (anything beyond the config it saved at the start and empty folders)."""
        if self.directory in self.created:
            leftovers = [p for p in self.directory.rglob("*") if p.is_file()]
            if all(p.parent == self.directory and p.name in STARTUP_FILES for p in leftovers):
                for path in leftovers:
                    path.unlink()
        for directory in reversed(self.created):
            for leftover in (directory / "checkpoints", directory):
                try:
                    leftover.rmdir()  # only ever removes an empty directory
                except OSError:
                    pass
        self.created = []

    def close(self, failed: bool) -> None:
        """Release the lock; after a failure, take back the folders that stayed empty."""
        global _open_run
        if _open_run is self:
            _open_run = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.scratch:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.created = []
        if failed:
            self.remove_if_unused()
        # Only where ours is still the handler: Lightning's teardown already put back what it found (for SIGTERM,
        # which LastCheckpoint took over from Lightning's own handler, the handler from before the command).
        stop_signals.restore(if_current=True)


#: The run of the command running in this process (see :func:`current`).
_open_run: Run | None = None


def _make_dirs(directory: Path) -> list[Path]:
    """``mkdir -p`` that returns the folders it created, outermost first."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return list(reversed(missing))


#: Rows a fit never logs: a resumed fit keeps them wherever they stand (the test after the
#: interrupted fit, for one), since it would not log them again.
KEPT_METRIC_PREFIXES = ("test/",)


def keep_metrics_before(path: Path, step: int | None) -> list[str]:
    """Rewrite ``metrics.csv`` without the fit's rows logged at or after ``step`` (the interrupted
    run's steps past its checkpoint, which the resumed fit logs again; ``None``: keep every row),
    under a sorted header as Lightning's writer keeps it (it appends rows in that order); returns
    the header's keys."""
    if not path.is_file():
        return []
    header, rows = metrics_file.read_rows(path)
    keys = sorted(header)
    rows = [row for row in rows if step is None or _logged_before(row, step) or _never_logged_by_fit(row)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    checkpoints.write_atomically(buffer.getvalue().encode(), path, "metrics.csv")
    return keys


def _logged_before(row: dict, step: int) -> bool:
    return row.get("step", "").isdigit() and int(row["step"]) < step


def _never_logged_by_fit(row: dict) -> bool:
    return any(value not in ("", None) and key.startswith(KEPT_METRIC_PREFIXES) for key, value in row.items())


class StopSignals:
    """Signals that ask a command to stop at a safe point: the handler only notes them (saving
    inside it could catch the model in the middle of an optimiser step, and a collective inside it
    deadlocks DDP); callbacks act at the next batch boundary (LastCheckpoint for Ctrl-C and, during
    training under the CLI, SIGTERM; project.run.cluster.SLURMRequeue for the requeue signal).

    Ctrl-C (SIGINT) while ``save_on_sigint`` (during a fit): noted; LastCheckpoint saves ``last.ckpt``
    at the next training batch boundary and the CLI exits with status 130. A terminal sends Ctrl-C to
    the whole process group, so every DDP rank receives it itself; the ranks agree on the step at a
    batch boundary (LastCheckpoint). A second Ctrl-C stops at once, without saving (KeyboardInterrupt).
    Outside a fit Ctrl-C raises KeyboardInterrupt at once.

    A process forked from the one that installed the handler (a DataLoader worker) inherits it but
    ignores the signal: its parent decides when to stop, and a worker that died of Ctrl-C would end
    the fit with "DataLoader worker ... killed by signal" before anything is saved.
    """

    def __init__(self) -> None:
        self.received: set[int] = set()
        #: Whether Ctrl-C asks for a save (while fitting); once the fit is over (the test after it)
        #: there is nothing left to save and Ctrl-C stops at once.
        self.save_on_sigint = True
        self._previous: dict[int, object] = {}
        self._owner: int | None = None  # the process that installed the handlers

    def install(self, *signums: int) -> None:
        """Note ``signums`` from now on (installing one twice changes nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._owner = os.getpid()
        for signum in signums:
            if signum == signal.SIGINT:
                self.save_on_sigint = True
            if signum not in self._previous:
                self.received.discard(signum)
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._note)

    def listening(self, signum: int) -> bool:
        """Whether ``signum`` is noted by this process (installed and not restored)."""
        return signum in self._previous and self._owner == os.getpid()

    def _note(self, signum, frame) -> None:
        if os.getpid() != self._owner:
            return  # a forked child (a DataLoader worker): the parent stops the run (see the class docstring)
        first = signum not in self.received
        self.received.add(signum)
        if signum != signal.SIGINT:
            print(
                f"Received {signal.Signals(signum).name} at {time.strftime('%H:%M:%S')}: stopping at the next batch boundary.",
                file=sys.stderr,
                flush=True,
            )
            return
        if not first or not self.save_on_sigint:
            raise KeyboardInterrupt  # a second Ctrl-C, or no fit in progress to save
        print(
            "Received SIGINT: saving at the next batch boundary (Ctrl-C again to stop at once, without saving).",
            file=sys.stderr,
            flush=True,
        )

    def pending(self, signum: int) -> bool:
        """Whether ``signum`` arrived since it was installed (still true after restore)."""
        return signum in self.received

    def restore(self, *signums: int, if_current: bool = False) -> None:
        """Give ``signums`` (default: every installed one) back their previous handlers; with
        ``if_current``, only where ours is still the handler (someone else may have put theirs back)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in signums or list(self._previous):
            if signum in self._previous:
                previous = self._previous.pop(signum)
                if not if_current or signal.getsignal(signum) == self._note:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


#: The one set of stop signals of this process.
stop_signals = StopSignals()


#: OSErrors about a named path or the disk: the user's to fix (a full disk, a read-only folder,
#: a file where a folder should be), so one sentence too. Any other OSError keeps its traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
USER_OS_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def describe_os_error(err: OSError) -> str | None:
    """One sentence for an OSError that is the user's to fix, else None (it keeps its traceback)."""
    if err.errno not in USER_OS_ERRORS or (err.filename is None and err.errno not in DISK_FULL):
        return None
    if err.errno in DISK_FULL:
        # A failed write() names no file; only open() and the like do.
        writing = f"while writing {err.filename}" if err.filename else "while writing the run's files"
        return (
            f"No space left on the device {writing}; free some space (or choose another "
            "--trainer.default_root_dir) and run again: checkpoints written before are intact."
        )
    if err.errno == errno.EEXIST:
        return f"{err.filename} exists but is not a directory; remove it or choose another path."
    if err.errno == errno.ENOTDIR:
        return f"A part of {err.filename} is a file, not a directory; remove it or choose another path."
    if err.errno == errno.EISDIR:
        return f"{err.filename} is a directory where a file is needed; remove it or choose another path."
    return f"{err.strerror}: {err.filename}; check that path (and its permissions), or choose another one."
