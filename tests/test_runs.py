"""The life of a run (project/run/directory.py and the CLI around it): a saved config re-runs into a new run
without touching the old one, every output lands in the run directory, one process at a time writes
into a run, an extended cosine run keeps learning, and Ctrl-C or a SLURM signal at any moment saves
instead of killing the job."""

import concurrent.futures
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from project.run import directory
from project.run.cli import main
from tests.conftest import QUIET, REPO, kill_group, lenet_fit_args, make_npz, run_bounded, run_cli, run_dirs, start_cli
from tests.test_slurm import fake_scontrol, job_step_env


def fit_args(root: Path, npz: Path, *extra: str) -> list[str]:
    return lenet_fit_args(
        root,
        npz,
        "--trainer.max_epochs=1",
        "--test_after_fit=false",
        "--plots.enabled=false",
        *extra,
    )


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (folders as ``<dir>``)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(folder.rglob("*"))
    }


def probe(**init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "tests.probes.SendSignal", "init_args": init_args})


def val_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as file:
        return [float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")]


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return make_npz(tmp_path_factory.mktemp("data") / "d.npz")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, npz) -> Path:
    """A finished 2-epoch cosine run (12 optimiser steps); tests work on copies of it."""
    return main(fit_args(tmp_path_factory.mktemp("finished"), npz, "--trainer.max_epochs=2")).run_dir


def copy_run(run: Path, root: Path) -> Path:
    copy = root / "lenet" / run.name
    shutil.copytree(run, copy)
    return copy


# ---- 1. a saved config is portable ------------------------------------------------------------------


def assert_portable(config: Path, run: Path) -> None:
    text = config.read_text()
    assert str(run) not in text and run.name not in text, f"{config.name} names its own run directory"
    saved = yaml.safe_load(text)
    assert saved["ckpt_path"] is None and saved["run_dir"] is None
    assert saved["checkpoint"]["dirpath"] is None and saved["last_checkpoint"]["dirpath"] is None
    assert saved["trainer"]["default_root_dir"] == str(run.parent.parent)


def test_a_saved_config_reruns_into_a_new_run_and_leaves_the_old_one_untouched(tmp_path, npz):
    """`fit -c runs/lenet/<run>/config.yaml` once overwrote that run's last.ckpt and added a foreign
    best-*.ckpt to it; so did the config-<time>.yaml of a resumed run."""
    root = tmp_path / "runs"
    old = main(fit_args(root, npz)).run_dir
    # Resumed (extended by one epoch) in the same directory: the config of that fit goes beside the first one.
    assert main(fit_args(root, npz, "--ckpt_path=last", "--trainer.max_epochs=2")).run_dir == old
    (resumed_config,) = old.glob("config-*.yaml")
    for config in (old / "config.yaml", resumed_config):
        assert_portable(config, old)
    before = snapshot(old)

    new_runs = []
    for config in (old / "config.yaml", resumed_config):
        new = main(["fit", "-c", str(config), "--trainer.max_epochs=1"]).run_dir
        assert new.parent == old.parent and new != old
        assert (new / "checkpoints" / "last.ckpt").is_file() and list((new / "checkpoints").glob("best-*.ckpt"))
        assert snapshot(old) == before, f"re-running {config.name} changed the old run"
        new_runs.append(new)
    assert run_dirs(root, "lenet") == sorted([old, *new_runs])


def test_an_evaluation_run_records_the_checkpoint_it_evaluated(tmp_path, npz, finished):
    """`test --ckpt_path last` once saved ckpt_path null, so its config.yaml did not say what was tested
    and re-running it tested randomly initialised weights."""
    root = tmp_path / "runs"
    run = copy_run(finished, root)
    args = [
        "-c",
        str(REPO / "experiments/lenet.yaml"),
        f"--data.npz={npz}",
        *QUIET,
        "--data.val_size=16",
        f"--trainer.default_root_dir={root}",
    ]
    tested = main(["test", *args, "--ckpt_path=last"])
    saved = yaml.safe_load((tested.run_dir / "config.yaml").read_text())
    assert saved["ckpt_path"] == str(run / "checkpoints" / "last.ckpt")
    again = main(["test", "-c", str(tested.run_dir / "config.yaml")])
    assert again.run_dir not in (tested.run_dir, run)
    assert again.trainer.callback_metrics["test/loss"] == tested.trainer.callback_metrics["test/loss"]


# ---- 2. everything in the run directory ----------------------------------------------------------


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_the_evaluated_checkpoint_is_read_from_disk_once(tmp_path, npz, finished, monkeypatch, subcommand):
    """The run reads --ckpt_path (memory-mapped) for its checks; Lightning loads those same contents
    through the checkpoint I/O plugin instead of reading the file a second time."""
    (best,) = (finished / "checkpoints").glob("best-*.ckpt")
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).resolve() == best.resolve():
            reads.append(kwargs.get("mmap"))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    args = fit_args(tmp_path / "runs", npz, f"--ckpt_path={best}")
    args[0] = subcommand
    args.remove("--test_after_fit=false")
    cli = main(args)
    assert reads == [True], f"{best.name} was read {len(reads)} times: {reads}"
    assert cli.trainer.ckpt_path == str(best)


def test_without_a_logger_every_output_lands_in_the_run_directory(tmp_path, npz):
    """`--trainer.logger false` once wrote config.yaml, net.pt and plots/ into the shared root folder."""
    root = tmp_path / "runs"
    run = main(fit_args(root, npz, "--trainer.logger=false", "--plots.enabled=true", "--plots.num_samples=4")).run_dir
    for name in ("config.yaml", "net.pt", "checkpoints/last.ckpt", "plots"):
        assert (run / name).exists(), name
    assert [p.name for p in root.iterdir()] == ["lenet"], "only experiment folders directly under the root"
    assert [p for p in (root / "lenet").iterdir()] == [run]


#: Options that name a file or folder, given a value that leads out of the run directory (``{other}``: another
#: run of the same experiment), and the option the one-sentence refusal names.
ESCAPES = [
    (
        "best checkpoint over another run's last.ckpt",
        "--checkpoint.filename=../../{other}/checkpoints/last",
        "checkpoint.filename",
    ),
    ("best checkpoint above the experiment", "--checkpoint.filename=../../../x", "checkpoint.filename"),
    ("best checkpoint named last", "--checkpoint.filename=last", "checkpoint.filename=last"),
    ("best checkpoint folder elsewhere", "--checkpoint.dirpath={tmp}/elsewhere", "checkpoint.dirpath"),
    ("last checkpoint folder above the run", "--last_checkpoint.dirpath=..", "last_checkpoint.dirpath"),
    ("experiment name with a path", "--name=../../x", "--name='../../x' must be a single folder name"),
    ("experiment name ..", "--name=..", "must be a single folder name"),
    ("exported net above the run", "--export.filename=../net.pt", "export.filename"),
    ("predictions elsewhere", "--predictions.output_dir={tmp}/out", "predictions.output_dir"),
    ("logger files in another run", "--trainer.logger.save_dir=../{other}", "trainer.logger.save_dir"),
    (
        "profiler report elsewhere",
        '--trainer.profiler={{"class_path": "SimpleProfiler", "init_args": {{"dirpath": "{tmp}/prof", "filename": "p"}}}}',
        "SimpleProfiler's dirpath",
    ),
    (
        "an added ModelCheckpoint elsewhere",
        '--trainer.callbacks+={{"class_path": "ModelCheckpoint", "init_args": {{"dirpath": "{tmp}/mc"}}}}',
        "ModelCheckpoint's dirpath",
    ),
]


@pytest.mark.parametrize(("case", "option", "named"), ESCAPES, ids=[e[0] for e in ESCAPES])
def test_a_path_leading_out_of_the_run_is_refused_and_nothing_is_written(
    tmp_path, npz, finished, capsys, case, option, named
):
    """`--checkpoint.filename ../../<other run>/checkpoints/last` once overwrote another run's last.ckpt
    (exit 0), `--name ../../x` put the run outside the root; now each is one sentence, exit status 2,
    and every byte under tmp_path (the other run, the root, the folder above it) is as it was."""
    root = tmp_path / "runs"
    other = copy_run(finished, root)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(root, npz, option.format(other=other.name, tmp=tmp_path)))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and named in lines[-1], lines[-3:]
    assert snapshot(tmp_path) == before


def test_paths_inside_the_run_are_kept_there(tmp_path, npz):
    """The same options, given paths inside the run, write where they say, relative to the run directory."""
    run = main(
        fit_args(
            tmp_path / "runs",
            npz,
            "--checkpoint.dirpath=best",
            "--checkpoint.filename=top/{epoch}",
            "--export.filename=weights/plain.pt",
            "--trainer.logger.save_dir=logs",
        )
    ).run_dir
    assert len(list((run / "best" / "top").glob("*.ckpt"))) == 1
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "weights" / "plain.pt").is_file()
    assert (run / "logs" / "metrics.csv").is_file()


# ---- 3. one process per run --------------------------------------------------------------------------


def test_a_second_fit_into_a_locked_run_is_refused_and_resumes_once_it_is_free(tmp_path, npz, finished):
    """Two `fit --ckpt_path last` at once once trained into the same directory, each overwriting the other's files."""
    root = tmp_path / "runs"
    run = copy_run(finished, root)
    before = snapshot(run)
    lock = directory.RunLock(run)
    lock.acquire()
    try:
        out = run_cli(fit_args(root, npz, "--ckpt_path=last", "--trainer.max_epochs=3"), timeout=240)
        after = snapshot(run)
    finally:
        lock.release()
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"process {os.getpid()} on " in errors[0] and str(run) in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    after.pop(directory.LOCK_FILE)
    assert after == before, "the refused fit changed the run"
    assert run_dirs(root, "lenet") == [run]

    assert not (run / directory.LOCK_FILE).exists(), "release removes the lock file"
    assert main(fit_args(root, npz, "--ckpt_path=last", "--trainer.max_epochs=3")).run_dir == run
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 18
    assert not (run / directory.LOCK_FILE).exists()


TRY_LOCK = """
import sys
from project.run import directory
try:
    directory.RunLock(directory.Path(sys.argv[1])).acquire()
except directory.RunLocked as err:
    print(err)
    sys.exit(3)
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin or kills this process
"""


def test_run_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lock = directory.RunLock(tmp_path)
    lock.acquire()
    other = run_bounded([sys.executable, "-c", TRY_LOCK, str(tmp_path)], timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert other.returncode == 3, other.stderr
    assert f"process {os.getpid()} on " in other.stdout
    lock.release()

    holder = subprocess.Popen(
        [sys.executable, "-c", TRY_LOCK, str(tmp_path)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(directory.RunLocked, match=f"process {holder.pid} on "):
            directory.RunLock(tmp_path).acquire()
        holder.kill()  # SIGKILL: no release, the lock file stays behind
        holder.wait(timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / directory.LOCK_FILE).exists()
    again = directory.RunLock(tmp_path)
    again.acquire()  # the kernel dropped the dead holder's flock
    assert str(os.getpid()) in (tmp_path / directory.LOCK_FILE).read_text()
    again.release()


# ---- 4. extending a finished cosine run -------------------------------------------------------------


def test_an_extended_cosine_run_keeps_learning(tmp_path, npz, finished):
    """`fit --ckpt_path last --trainer.max_epochs 3` on a finished 2-epoch cosine run once trained its
    third epoch at learning rate 0: the same weights, the same validation loss."""
    root = tmp_path / "runs"
    run = copy_run(finished, root)
    at_two = torch.load(run / "net.pt", weights_only=True)
    assert main(fit_args(root, npz, "--ckpt_path=last", "--trainer.max_epochs=3")).run_dir == run
    at_three = torch.load(run / "net.pt", weights_only=True)
    assert any(not torch.equal(at_two[key], at_three[key]) for key in at_two), "the third epoch changed no weight"
    losses = val_losses(run)
    assert len(losses) == 3 and losses[2] != losses[1], losses


def test_a_resume_whose_plan_ends_before_the_steps_done_is_refused(tmp_path, npz, finished, capsys):
    """A 2-epoch fit resumed with a plan of fewer steps than it has done once trained at lr 0, exit 0."""
    root = tmp_path / "runs"
    run = copy_run(finished, root)
    before = snapshot(run)
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(root, npz, "--ckpt_path=last", "--trainer.max_epochs=4", "--trainer.limit_train_batches=2"))
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "error: The schedule now plans 8 optimiser steps, but the checkpoint has done 12 already; "
    ) and ("give a longer plan" in last), last
    assert snapshot(run) == before  # no config-<time>.yaml, no metrics row lost, no checkpoint touched


# ---- 5. signals ---------------------------------------------------------------------------------------


def test_ctrl_c_saves_the_step_reached_and_the_run_resumes(tmp_path, npz):
    """SIGINT (Ctrl-C) once ended the fit with a KeyboardInterrupt traceback and saved nothing."""
    root = tmp_path / "runs"
    out = run_cli(
        fit_args(root, npz, "--trainer.max_epochs=2", probe(signal="SIGINT", when="train", step=3)), timeout=240
    )
    assert out.returncode == 130, out.stderr[-3000:]
    assert "resume with --ckpt_path last" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    (run,) = run_dirs(root, "lenet")
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    assert not (run / "net.pt").exists() and not (run / directory.LOCK_FILE).exists()

    resumed = main(fit_args(root, npz, "--ckpt_path=last", "--trainer.max_epochs=2"))
    assert resumed.run_dir == run and resumed.trainer.global_step == 12 and (run / "net.pt").is_file()


def test_ctrl_c_during_the_test_after_fit_stops_at_once(tmp_path, npz):
    """Ctrl-C during --test_after_fit once printed "saving at the next batch boundary", then let the
    test run to its end and exited 0: the fit is saved already, so the test stops, with status 130."""
    root = tmp_path / "runs"
    out = run_cli(fit_args(root, npz, "--test_after_fit=true", probe(signal="SIGINT", when="test")), timeout=240)
    assert out.returncode == 130, out.stderr[-3000:]
    assert "saving at the next batch boundary" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    (run,) = run_dirs(root, "lenet")
    assert (run / "net.pt").is_file() and (run / "checkpoints/last.ckpt").is_file(), "the fit itself was complete"
    with open(run / "metrics.csv", newline="") as file:
        assert not any(row.get("test/acc") for row in csv.DictReader(file)), "the test did not run to its end"


def ctrl_c_from_a_terminal(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Start ``python -m project <args>`` in its own process group, wait until it prints
    ``training at step`` (tests.probes.Announce), then send SIGINT to the whole group, as a
    terminal does on Ctrl-C (DataLoader workers and DDP ranks included)."""
    proc = start_cli(args)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            err = pool.submit(proc.stderr.read)  # drained meanwhile: a full pipe would stall the run
            seen: list[str] = []

            def read_until_training() -> bool:
                for line in proc.stdout:
                    seen.append(line)
                    if "training at step" in line:
                        return True
                return False

            assert pool.submit(read_until_training).result(timeout=timeout), f"training never started: {seen}"
            os.killpg(proc.pid, signal.SIGINT)
            rest = pool.submit(proc.stdout.read)
            proc.wait(timeout=timeout)
            return subprocess.CompletedProcess(
                proc.args, proc.returncode, "".join(seen) + rest.result(timeout=60), err.result(timeout=60)
            )
    finally:
        kill_group(proc)


@pytest.mark.parametrize("preset", ["workers", "ddp_cpu"])
def test_ctrl_c_from_a_terminal_saves_and_resumes(tmp_path, preset):
    """Ctrl-C reaches the whole process group. With 2 DataLoader workers the workers once died of it
    first (`DataLoader worker ... killed by signal`, exit 1, nothing saved); under DDP both ranks
    deadlocked in a broadcast inside Lightning's SIGTERM handler, and a second Ctrl-C did nothing."""
    root, npz = tmp_path / "runs", make_npz(tmp_path / "d.npz", n_train=512)
    extra = ["--data.num_workers=2"] if preset == "workers" else ["-c", str(REPO / "experiments/presets/ddp_cpu.yaml")]
    args = [
        *fit_args(root, npz, "--trainer.max_epochs=50", *extra),
        '--trainer.callbacks+={"class_path": "tests.probes.Announce", "init_args": {"step": 3}}',
    ]
    out = ctrl_c_from_a_terminal(args)
    assert out.returncode == 130, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "killed by signal" not in out.stderr, out.stderr[-3000:]
    saved_line = [line for line in out.stderr.splitlines() if "SIGINT received: saved" in line]
    assert len(saved_line) == 1 and saved_line[0].endswith("resume with --ckpt_path last."), out.stderr[-3000:]
    (run,) = run_dirs(root, "lenet")
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert f"at step {saved['global_step']};" in saved_line[0] and saved["global_step"] >= 3
    assert not (run / "net.pt").exists() and not (run / directory.LOCK_FILE).exists()

    epochs = saved["epoch"] + 2
    resumed = run_cli([*fit_args(root, npz, f"--trainer.max_epochs={epochs}", *extra), "--ckpt_path=last"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dirs(root, "lenet") == [run] and (run / "net.pt").is_file()
    steps_per_epoch = 496 // 8 // (2 if preset == "ddp_cpu" else 1)
    final = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == epochs * steps_per_epoch


def test_ctrl_c_during_start_up_exits_130_and_leaves_nothing(tmp_path, npz):
    """Ctrl-C while the CLI builds its classes once ended in a KeyboardInterrupt traceback."""
    root = tmp_path / "runs"
    out = run_cli(fit_args(root, npz, "--trainer.callbacks+=tests.probes.CtrlCWhileBuilding"), timeout=120)
    assert out.returncode == 130, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1] == "Interrupted (Ctrl-C).", out.stderr
    assert run_dirs(root, "lenet") == [], "the run directory chosen at start-up stays behind"


@pytest.mark.parametrize("when", ["sanity", "test"])
def test_the_requeue_signal_outside_training_requeues_instead_of_killing_the_job(tmp_path, npz, when):
    """SIGUSR1 in a SLURM job during the sanity check or the test after fit once killed the job
    (SIGUSR1's default action), without a checkpoint or a requeue. Fake SLURM: see tests/test_slurm.py."""
    root = tmp_path / "runs"
    scontrol_log = fake_scontrol(tmp_path / "bin")
    env = {**job_step_env(job_id="4242"), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    out = run_cli(
        fit_args(
            root,
            npz,
            "--trainer.accelerator=cpu",
            f"--test_after_fit={when == 'test'}",
            probe(signal="SIGUSR1", when=when),
        ),
        env=env,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert scontrol_log.read_text() == "requeue 4242\n"
    run = root / "lenet" / "slurm-4242"
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    if when == "sanity":
        # Training stopped at its first batch boundary, with a checkpoint to resume from.
        assert saved["global_step"] == 1 and not (run / "net.pt").exists()
    else:
        assert saved["global_step"] == 6 and (run / "net.pt").is_file()  # the fit had finished
