"""Faults and bad input: atomic checkpoints, SIGTERM, non-finite loss, unsafe files, clear errors."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from project.classifier import ImageClassifier
from project.models import LeNet
from project.run.callbacks.checkpointing import AtomicCheckpointIO, LastCheckpoint
from project.run.checkpoints import CheckpointError
from project.run.cli import main as cli_main
from tests.conftest import QUIET, REPO, kill_group, lenet_fit_args, make_npz, run_cli, run_dirs, start_cli

KILL_MID_WRITE = textwrap.dedent(
    """
    import sys, torch
    import project.run.callbacks.checkpointing as ck
    import project.run.checkpoints as writer  # where AtomicCheckpointIO's (and net.pt's) writes happen

    real_open = open

    class Stalling:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2]); self.f.flush()
            print("HALF-WRITTEN", flush=True)
            sys.stdin.readline()  # wait here until the test kills us
        def flush(self): self.f.flush()
        def fileno(self): return self.f.fileno()

    io = ck.AtomicCheckpointIO()
    path = sys.argv[1]
    io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, path)
    writer.open = lambda p, mode="r": Stalling(real_open(p, mode))
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 2}, path)
    """
)


def test_checkpoint_killed_mid_write_keeps_the_previous_one(tmp_path):
    """The writer is SIGKILLed with half of the new checkpoint on disk: last.ckpt stays the old, whole file."""
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_MID_WRITE, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "HALF-WRITTEN"  # blocks until the writer is mid-file
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.zeros(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert all(name.endswith(".tmp") for name in leftovers)  # at worst a stray temporary file


def test_pickle_payload_is_refused_without_running(tmp_path, tiny_npz):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, evil)
    out = run_cli(
        [
            "test",
            "-c",
            "experiments/lenet.yaml",
            f"--data.npz={tiny_npz}",
            f"--ckpt_path={evil}",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ],
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "could run code" in out.stderr.splitlines()[-1]
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="could run code"):
        AtomicCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()


def test_sigterm_saves_and_stops_then_resumes(tmp_path, tiny_npz):
    """SIGTERM (what clusters send) mid-run: a checkpoint at that step, exit status 143, then resume."""
    args = [
        "fit",
        "-c",
        "experiments/lenet.yaml",
        f"--data.npz={tiny_npz}",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
        "--data.val_size=0",
        "--data.batch_size=8",
        "--trainer.max_epochs=500",
        "--last_checkpoint.every_n_train_steps=5",
        "--test_after_fit=false",
    ]
    proc = start_cli(args)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("lenet/*/checkpoints/last.ckpt")):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "fit never wrote a checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM received: saved" in err
    (run,) = run_dirs(tmp_path, "lenet")
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    stopped_at = int(err.split("SIGTERM received: saved")[1].split("at step ")[1].split(";")[0])
    assert ckpt["global_step"] == stopped_at and stopped_at < 500 * 8  # 64 images, batch 8: 8 steps per epoch

    same_run = [a for a in args if not a.startswith("--trainer.max_epochs")]
    resumed = run_cli([*same_run, f"--trainer.max_epochs={ckpt['epoch'] + 2}", "--ckpt_path=last"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dirs(tmp_path, "lenet") == [run]  # resumed into the same run directory
    final = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    # Continued from the saved step with the same batch size (8 steps per epoch; batch 128 would make it 1)
    # to the end of the next epoch; last.ckpt is written every 5 steps, so it holds the last multiple of 5.
    end = (ckpt["epoch"] + 2) * 8
    assert final["global_step"] == end - end % 5 and final["global_step"] > stopped_at


class _SigtermAfterStep(ImageClassifier):
    """Receives SIGTERM in its own on_train_batch_end at ``step``: after every callback's hook, so after
    LastCheckpoint's periodic save of that step, where Lightning raises SIGTERMException itself."""

    def __init__(self, step: int):
        super().__init__(LeNet(), scheduler=None)
        self.step = step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler runs in this thread, before the next line


def test_sigterm_to_every_process_of_the_job_saves_although_dataloader_workers_get_it_too(tmp_path, tiny_npz):
    """A scheduler's SIGTERM (``scancel``, pre-emption) reaches every process of the job, DataLoader workers
    included: the fit still saves at that batch boundary and exits 143 (PyTorch's workers used to die of it
    first, and the fit with them: "DataLoader worker ... is killed by signal: Terminated", nothing saved)."""
    args = lenet_fit_args(tmp_path, tiny_npz, "--data.pipeline=dataloader", "--test_after_fit=false")
    args.remove("--data.num_workers=0")
    proc = start_cli(
        [*args, "--data.num_workers=2", "--trainer.max_epochs=3", "--trainer.callbacks+=tests.probes.SignalJob"]
    )
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        kill_group(proc)
    assert proc.returncode == 143 and "killed by signal" not in err, err[-3000:]
    (run,) = run_dirs(tmp_path, "lenet")
    assert "SIGTERM received: saved" in err
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 6 + 2  # epoch 1, batch 1


def test_sigterm_right_after_a_periodic_save_says_where_it_saved(tmp_path, caplog):
    """The race CI once lost: the signal lands after the save of this step, so nothing new is written,
    but the stop still names the checkpoint of the step it stopped at."""
    last = LastCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path / "checkpoints"))
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[last],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,)))
    with caplog.at_level("INFO"), pytest.raises(SIGTERMException):
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        trainer.fit(_SigtermAfterStep(step=4), loader, val_dataloaders=loader)
    assert last.saved_at_step == 4
    assert f"SIGTERM received: saved {tmp_path / 'checkpoints' / 'last.ckpt'} at step 4;" in caplog.text
    assert caplog.text.count("SIGTERM received: saved") == 1
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


class _NaNData(L.LightningDataModule):
    """Random images; the batches listed in ``poisoned`` carry a NaN pixel."""

    def __init__(self, poisoned=(2,)):
        super().__init__()
        self.poisoned = set(poisoned)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g)
        for i in self.poisoned:
            x[8 * i, 0, 0, 0] = float("nan")
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path):
    return L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_nonfinite_loss_stops_with_the_step(tmp_path):
    model = ImageClassifier(LeNet(), scheduler=None)
    with pytest.raises(FloatingPointError, match=r"training loss became nan at step 2 \(epoch 0, batch 2\)"):
        _trainer(tmp_path).fit(model, datamodule=_NaNData())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_skip_up_to_a_limit(tmp_path):
    model = ImageClassifier(LeNet(), scheduler=None, on_nonfinite_loss="skip", max_nonfinite_skips=2)
    trainer = _trainer(tmp_path)
    trainer.fit(model, datamodule=_NaNData(poisoned=(1, 3)))
    assert model.nonfinite_skips == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    over = ImageClassifier(LeNet(), scheduler=None, on_nonfinite_loss="skip", max_nonfinite_skips=1)
    with pytest.raises(FloatingPointError, match=r"at step \d+ \(epoch 0, batch 3\)"):
        _trainer(tmp_path).fit(over, datamodule=_NaNData(poisoned=(1, 3)))


def test_diverging_run_keeps_last_good_checkpoint(tmp_path, tiny_npz):
    out = run_cli(
        [
            "fit",
            "-c",
            "experiments/lenet.yaml",
            f"--data.npz={tiny_npz}",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
            "--data.val_size=0",
            "--data.batch_size=8",
            "--model.optimizer.lr=1e8",
            "--model.scheduler=null",
            "--trainer.max_epochs=50",
            "--last_checkpoint.every_n_train_steps=1",
        ],
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    last_line = out.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: The training loss became")
    # It names the option to lower.
    assert "lower model.optimizer.lr" in last_line, last_line
    (run,) = run_dirs(tmp_path, "lenet")
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


# --------------------------------------------------------------------------- bad input, one table


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """A finished run whose files every failing command below must leave untouched."""
    root = tmp_path_factory.mktemp("runs")
    npz = make_npz(root / "ok.npz")
    # In this process: the run's files are what matters here, and a second interpreter would cost its imports.
    cli_main(
        ["fit", "-c", str(REPO / "experiments/lenet.yaml"), f"--data.npz={npz}", f"--trainer.default_root_dir={root}"]
        + [*QUIET, "--data.val_size=16", "--trainer.max_epochs=1"]
    )
    return root, npz


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _bad_files(root: Path) -> dict[str, Path]:
    files = {}
    files["truncated"] = root / "truncated.ckpt"
    last = next(root.glob("lenet/*/checkpoints/last.ckpt"))
    files["truncated"].write_bytes(last.read_bytes()[:2000])
    files["text"] = root / "notes.ckpt"
    files["text"].write_text("not a checkpoint\n")
    files["resnet"] = root / "resnet.ckpt"
    model = ImageClassifier(LeNet(num_classes=10))
    state = {"state_dict": {f"net.{k}": v for k, v in torch.nn.Linear(4, 10).state_dict().items()}}
    torch.save({**state, "hyper_parameters": {}}, files["resnet"])
    del model
    files["npz_keys"] = make_npz(root / "keys.npz", y_test=None)
    files["npz_size"] = make_npz(root / "size.npz", x_test=np.zeros((32, 28, 28, 3), np.uint8))
    files["npz_labels"] = make_npz(root / "labels.npz", y_train=np.full(64, 12, np.uint8))
    files["npz_dtype"] = make_npz(root / "dtype.npz", x_train=np.zeros((64, 32, 32, 3), np.float32))
    files["classes100"] = root / "classes100.ckpt"
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in LeNet(num_classes=100).state_dict().items()}, "hyper_parameters": {}},
        files["classes100"],
    )
    return files


BAD_INPUT = [
    # (case id, extra CLI args, expected fragment of stderr)
    ("unknown key", ["--model.learning_rate=0.1"], "learning_rate"),
    ("wrong type", ["--data.batch_size=many"], "batch_size"),
    # torch checks the optimizer's arguments as it builds it; lr 0 and momentum >= 1 are the template's checks.
    (
        "lr negative",
        ["--model.optimizer.lr=-1"],
        "error: model.optimizer refused its arguments: Invalid learning rate: -1.0",
    ),
    ("lr zero", ["--model.optimizer.lr=0"], "error: model.optimizer.lr must be > 0, got 0.0."),
    (
        "momentum at 1 or more",
        ["--model.optimizer.momentum=1.5"],
        "error: model.optimizer.momentum must be in [0, 1), got 1.5.",
    ),
    (
        "weight decay negative",
        ["--model.optimizer.weight_decay=-0.5"],
        "error: model.optimizer refused its arguments: Invalid weight_decay value: -0.5",
    ),
    ("batch size zero", ["--data.batch_size=0"], "error: data.batch_size must be at least 1, got 0."),
    ("val split too large", ["--data.val_size=64"], "error: data.val_size=64 leaves no training images"),
    ("unknown model", ["--model.net=project.models.VGG16"], "VGG16"),
    ("unknown strategy", ["--trainer.strategy=warp_drive"], "warp_drive"),
    (
        "unknown optimizer",
        ["--model.optimizer=adam"],
        "Expected a dot import path string: adam",  # jsonargparse's report, under the key "optimizer"
    ),
    ("gpu not available", ["--trainer.accelerator=gpu"], "error: No supported gpu backend found!"),
    (
        "more CPU processes than CPUs",
        ["--trainer.accelerator=cpu", f"--trainer.devices={(os.cpu_count() or 1) + 1}"],
        f"error: trainer.devices={(os.cpu_count() or 1) + 1} asks for {(os.cpu_count() or 1) + 1} CPU processes, but this machine has",
    ),
    ("truncated checkpoint", ["--ckpt_path={truncated}"], "is not a PyTorch checkpoint (not a torch.save archive)"),
    ("not a checkpoint", ["--ckpt_path={text}"], "is not a PyTorch checkpoint"),
    (
        "other architecture",
        ["--ckpt_path={resnet}"],
        "resnet.ckpt does not fit LeNet (missing keys [conv1.bias, conv1.weight",
    ),
    (
        "other number of classes",
        ["--ckpt_path={classes100}"],
        "does not fit LeNet (shape mismatches [fc3.weight: file (100, 84) vs model (10, 84), fc3.bias: file (100,) vs model (10,)]",
    ),
    ("npz wrong keys", ["--data.npz={npz_keys}"], "lacks the arrays y_test"),
    (
        "npz wrong image size",
        ["--data.npz={npz_size}"],
        "x_test is uint8 (32, 28, 28, 3), expected uint8 (N, 32, 32, 3)",
    ),
    ("npz labels out of range", ["--data.npz={npz_labels}"], "labels in [12, 12], outside 0..9"),
    ("npz wrong dtype", ["--data.npz={npz_dtype}"], "x_train is float32 (64, 32, 32, 3), expected uint8"),
]


@pytest.mark.parametrize(("case", "extra", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_clearly_and_touches_nothing(existing_run, capsys, case, extra, message):
    """In-process, as `python -m project` runs it (project.run.cli.main): a user error is SystemExit(2)
    with one `error:` line; anything else would propagate out of main() and fail the test."""
    root, npz = existing_run
    files = (
        _bad_files(root)
        if not (root / "truncated.ckpt").exists()
        else {
            "truncated": root / "truncated.ckpt",
            "text": root / "notes.ckpt",
            "resnet": root / "resnet.ckpt",
            "npz_keys": root / "keys.npz",
            "npz_size": root / "size.npz",
            "npz_labels": root / "labels.npz",
            "npz_dtype": root / "dtype.npz",
            "classes100": root / "classes100.ckpt",
        }
    )
    before = _snapshot(root)
    runs_before = run_dirs(root, "lenet")
    args = [a.format(**files) for a in extra]
    sub = "test" if any(a.startswith("--ckpt_path") for a in args) else "fit"
    with pytest.raises(SystemExit) as exited:
        cli_main(
            [
                sub,
                "-c",
                str(REPO / "experiments/lenet.yaml"),
                f"--data.npz={npz}",
                f"--trainer.default_root_dir={root}",
                *QUIET,
                "--data.val_size=16",
                "--trainer.max_epochs=1",
                *args,
            ]
        )
    err = capsys.readouterr().err
    assert exited.value.code == 2, err[-2000:]
    assert message in err, err[-2000:]
    assert _snapshot(root) == before
    for run in run_dirs(root, "lenet"):
        assert run in runs_before or any(run.iterdir()), f"{case} left an empty run directory"
        assert run in runs_before or not any(run.rglob("*.ckpt")), f"{case} left a new run with checkpoints"


# --------------------------------------------------------------------------- long runs, secrets


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class _RSS(L.Callback):
    def __init__(self):
        self.per_epoch: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_epoch.append(_rss_mib())


@pytest.mark.slow
def test_memory_stays_flat_with_hook_callbacks(tmp_path, subset_npz):
    """Many epochs on the real subset with every hook callback firing every step: RSS must not creep.

    A leak of one activation tensor per step would add megabytes per epoch; after the first
    epochs (allocator warm-up) the growth must stay under 1 MiB per epoch.
    """
    from project.callbacks import ActivationStatistics, GradientStatistics
    from project.data import CIFAR10DataModule

    dm = CIFAR10DataModule(npz=subset_npz, val_size=500, batch_size=256, num_workers=0)
    rss = _RSS()
    activations = ActivationStatistics(every_n_steps=1)
    trainer = L.Trainer(
        max_epochs=9,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[activations, GradientStatistics(every_n_steps=1, update_ratio=True, output_grads=True), rss],
    )
    model = ImageClassifier(LeNet())
    trainer.fit(model, datamodule=dm)
    growth = (rss.per_epoch[-1] - rss.per_epoch[3]) / (len(rss.per_epoch) - 4)
    assert growth < 1.0, f"RSS grew {growth:.2f} MiB per epoch: {[round(r) for r in rss.per_epoch]}"
    hooks = [m for m in model.modules() if m._forward_hooks or m._backward_hooks]
    assert hooks == [], "hook handles must be removed when fit ends"


def test_secrets_never_reach_the_run_directory(tmp_path, tiny_npz):
    """WANDB_API_KEY and other credentials in the environment of a run with the wandb logger (offline, no server)."""
    secrets = {
        name: f"{name.lower()}-secret-" + "x7" * 20 for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY")
    }
    out = run_cli(
        [
            "fit",
            "-c",
            "experiments/lenet.yaml",
            "-c",
            "experiments/loggers/wandb.yaml",
            f"--data.npz={tiny_npz}",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
            "--data.val_size=16",
            "--trainer.max_epochs=1",
        ],
        env={**secrets, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files), "the wandb logger wrote nothing; the test would prove nothing"
    for secret in secrets.values():
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert leaked == [] and secret not in out.stdout + out.stderr


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL at an arbitrary moment of training, resume from the newest checkpoint: same final weights."""
    npz = make_npz(tmp_path / "d.npz", n_train=384)
    common = [
        "fit",
        "-c",
        "experiments/lenet.yaml",
        f"--data.npz={npz}",
        *QUIET,
        "--data.val_size=64",
        "--data.batch_size=16",
        "--trainer.max_epochs=6",
        "--test_after_fit=false",
    ]
    reference = run_cli([*common, f"--trainer.default_root_dir={tmp_path / 'ref'}"], timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    root = tmp_path / "killed"
    proc = start_cli(
        [*common, f"--trainer.default_root_dir={root}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not list(root.glob("lenet/*/checkpoints/last.ckpt")):
            assert proc.poll() is None and time.monotonic() < deadline, "fit ended before writing a checkpoint"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    (run,) = run_dirs(root, "lenet")
    killed_at = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"]
    assert not (run / "net.pt").exists() and killed_at < 5, "the kill must land before the run finished"

    resumed = run_cli([*common, f"--trainer.default_root_dir={root}", "--ckpt_path=last"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dirs(root, "lenet") == [run]
    (ref_run,) = run_dirs(tmp_path / "ref", "lenet")
    expected, got = torch.load(ref_run / "net.pt", weights_only=True), torch.load(run / "net.pt", weights_only=True)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
