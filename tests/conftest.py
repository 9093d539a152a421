"""Shared fixtures: the real CIFAR-10 subset (skipped without ../shared), tiny npz files, generated
archives in the official CIFAR layouts, CLI runners."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO.parent / "shared" / "data" / "cifar10_subset.npz"

# No test talks to a wandb server, and runs never inherit a run directory from the environment.
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("PROJECT_RUN_DIR", None)
# Nor a cluster job's or a launcher's identity (the suite may run inside `salloc` or a sweep agent):
# the tests that need these variables set them themselves.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
for _key in list(os.environ):
    if _key in LAUNCH_VARIABLES or _key.startswith(("SLURM_", "TORCHELASTIC_", "WANDB_SWEEP_", "WANDB_RUN_")):
        del os.environ[_key]


@pytest.fixture(autouse=True)
def restore_environment():
    """Give every test the environment the previous one started with. Lightning writes MASTER_ADDR,
    MASTER_PORT and rank variables into os.environ while it sets up a strategy; left behind, a
    fake SLURM job's node name would send every later DDP run looking for that host."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    """The in-process CLI tests give their command line as ``main(args)``; LightningCLI warns when
    ``sys.argv`` holds other arguments beside them (here pytest's own), so a test sees only a program name."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


#: Arguments that make a CLI run quiet and small; tests add their own on top.
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=0"]


@pytest.fixture(scope="session")
def subset_npz() -> Path:
    """The 5,170/508 real CIFAR-10 images from ../shared; tests that need them skip without it."""
    if not SUBSET.is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {SUBSET} (../shared is not beside the repository)")
    return SUBSET


def make_npz(
    path: Path, n_train: int = 64, n_test: int = 32, seed: int = 0, num_classes: int = 10, **overrides
) -> Path:
    """A small random npz in the Keras layout with labels 0..num_classes-1; ``overrides`` replace or
    (with None) drop arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, num_classes, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, num_classes, n_test).astype(np.uint8),
    }
    for key, value in overrides.items():
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


def lenet_fit_args(root: Path, npz: Path, *options: str) -> list[str]:
    """``fit`` of experiments/lenet.yaml on ``npz`` at the smallest sizes, writing under ``root``, then ``options``:
    the command line the CLI tests start from."""
    return [
        "fit",
        "-c",
        str(REPO / "experiments/lenet.yaml"),
        f"--data.npz={npz}",
        *QUIET,
        "--data.val_size=16",
        "--data.batch_size=8",
        f"--trainer.default_root_dir={root}",
        *options,
    ]


def subset_fit_args(root: Path, subset_npz: Path, experiment: str, *options: str) -> list[str]:
    """``fit -c experiments/<experiment>.yaml`` on the real subset (500 validation images, batch 64), quiet,
    without plots, writing under ``root``, then ``options``: the learning checks' command line."""
    config = str(REPO / f"experiments/{experiment}.yaml")
    data = [f"--data.npz={subset_npz}", "--data.val_size=500", "--data.batch_size=64", "--plots.enabled=false"]
    return ["fit", "-c", config, *data, *QUIET, f"--trainer.default_root_dir={root}", *options]


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    return make_npz(tmp_path / "tiny.npz")


def run_cli(
    args: list[str], cwd: Path | None = None, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m project <args>`` in a subprocess (for DDP and exit codes), bounded by ``timeout``.

    The child gets its own process group, and the whole group (DDP workers included) is killed
    when the timeout expires or the test is interrupted, so nothing is left running.
    """
    return run_bounded([sys.executable, "-m", "project", *args], cwd=cwd or REPO, env=cli_env(env), timeout=timeout)


def cli_env(env: dict | None = None) -> dict:
    """The environment of a CLI subprocess: this one, the repository importable, no inherited run directory."""
    # The repository first; entries already there stay after it (benchmarks/run_gpu.sh puts the
    # packages it installs from its wheelhouse on PYTHONPATH).
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    full_env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
    full_env.pop("PROJECT_RUN_DIR", None)
    return full_env


def start_cli(args: list[str], stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """``python -m project <args>`` started in the background from the repository, in its own process
    group (signal it as a terminal would; the caller stops it with ``kill_group`` in a ``finally``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "project", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=stdout,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def run_bounded(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` that kills the child's whole process group on timeout or error."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        kill_group(proc)
        _, err = proc.communicate()
        expired.add_note(f"stderr of the killed command, last 3000 characters:\n{(err or '')[-3000:]}")
        raise
    except BaseException:
        kill_group(proc)
        raise
    kill_group(proc)  # stragglers (e.g. a DDP worker whose parent already exited)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_dirs(root: Path, name: str) -> list[Path]:
    """Run directories under ``<root>/<name>/``, oldest first."""
    return sorted(p for p in (root / name).iterdir() if p.is_dir()) if (root / name).is_dir() else []


def official_archive(path: Path, fmt, per_file: int = 12, seed: int = 0) -> tuple[Path, dict]:
    """A small tar.gz in the official python layout of ``fmt`` (a CIFARFormat): its folder, train and
    test pickles (``fmt.label_key`` labels; CIFAR-100's also carry coarse labels, which must be ignored)
    and the meta file with the class names; returns the path and each file's dict."""
    rng = np.random.default_rng(seed)
    contents = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in (*fmt.train_files, *fmt.test_files):
            batch = {
                "batch_label": f"{name}",
                fmt.label_key: rng.integers(0, fmt.num_classes, per_file).tolist(),
                "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                "filenames": [f"img_{i}.png" for i in range(per_file)],
            }
            if fmt.label_key == "fine_labels":
                batch["coarse_labels"] = rng.integers(0, 20, per_file).tolist()
            contents[name] = batch
            _add_to_tar(tar, f"{fmt.folder_name}/{name}", pickle.dumps(batch, protocol=2))
        meta = {fmt.meta_key: list(fmt.classes)}
        _add_to_tar(tar, f"{fmt.folder_name}/{fmt.meta_file}", pickle.dumps(meta, protocol=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path, contents


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ---- test tiers -----------------------------------------------------------------------------------
#: Seconds each test took on the reference machine (2 CPU cores) with coverage on, as the daily loop runs,
#: written by ``pytest --store-durations``: a test that took SLOW_SECONDS or more is marked ``slow``, so
#: ``pytest -m "not slow"`` (the daily loop) is chosen by measurement, not by guess.
DURATIONS = Path(__file__).with_name("durations.json")
SLOW_SECONDS = 1.25
#: A parametrized test whose rows together took MATRIX_SECONDS or more is a matrix (every option against every
#: file, every mistake of a table): the daily loop runs its first MATRIX_SAMPLE rows, CI runs them all.
MATRIX_SECONDS = 5.0
MATRIX_SAMPLE = 2


def pytest_addoption(parser):
    parser.addoption(
        "--store-durations",
        action="store_true",
        help=f"record every test's duration into {DURATIONS.name} (run the full suite on the reference machine)",
    )


def pytest_collection_modifyitems(config, items):
    durations = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    rows: dict[str, list] = {}
    for item in items:
        if durations.get(item.nodeid, 0.0) >= SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)
        if hasattr(item, "callspec"):
            rows.setdefault(item.nodeid.partition("[")[0], []).append(item)
    for matrix in rows.values():
        if sum(durations.get(item.nodeid, 0.0) for item in matrix) >= MATRIX_SECONDS:
            for item in matrix[MATRIX_SAMPLE:]:
                item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under pytest-xdist (the daily loop's ``-n 2``) each worker has a core: torch's own threads would
    only contend with the other worker for it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    # setup (fixtures it alone uses), call and teardown: what the test costs the run.
    _measured[report.nodeid] = _measured.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    # Under pytest-xdist the controller receives every worker's reports and writes the file once.
    if session.config.getoption("--store-durations") and _measured and not os.environ.get("PYTEST_XDIST_WORKER"):
        stored = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
        stored.update({nodeid: round(seconds, 2) for nodeid, seconds in _measured.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(stored.items())), indent=1) + "\n")
