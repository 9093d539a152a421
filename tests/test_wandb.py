"""wandb logging without a wandb server: offline runs read back from their own files, and no account.

``WANDB_MODE=offline`` is wandb's real client writing its real run folder (``wandb/offline-run-*``);
only the upload (``wandb sync``) cannot happen here. The folder's ``run-<id>.wandb`` file is a
LevelDB-style log of protobuf records, read below with wandb's own protobuf classes.
"""

import json
import os
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from project.run import tracking
from tests.conftest import QUIET, REPO, run_cli, run_dirs

WANDB_PRESET = str(REPO / "experiments/loggers/wandb.yaml")
LENET = str(REPO / "experiments/lenet.yaml")
CANARY_KEY = "canary0123456789abcdef0123456789abcdef01"  # a fake API key that must never reach the disk


def wandb_env(tmp_path: Path, mode: str = "offline") -> dict[str, str]:
    """wandb's own folders inside the test's tmp_path, and the canary key in the environment."""
    return {
        "WANDB_MODE": mode,
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_API_KEY": CANARY_KEY,
    }


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks, each
    with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is zero padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def read_offline_run(folder: Path) -> dict:
    """What a run folder holds: id, name, tags, every config update, history keys."""
    (log,) = folder.glob("run-*.wandb")
    out = {"configs": [], "history": set()}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, name=record.run.display_name, tags=list(record.run.tags))
        elif kind == "config":
            out["configs"].append({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            out["history"] |= {item.key or item.nested_key[0] for item in record.history.item}
    return out


def test_ddp_fit_makes_one_offline_run_with_the_resolved_config_metrics_and_plots(tmp_path, tiny_npz):
    """Two DDP processes, one wandb run: rank zero's. Its config is the resolved CLI config, logged
    once under the command line's dotted names; its history has the metrics and the plots."""
    done = run_cli(
        [
            "fit",
            "-c",
            WANDB_PRESET,
            "-c",
            LENET,
            f"--data.npz={tiny_npz}",
            "--data.val_size=16",
            "--data.batch_size=8",
            "--trainer.max_epochs=2",
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--plots.every_n_epochs=1",
            "--test_after_fit=true",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            *QUIET,
        ],
        cwd=tmp_path,
        env=wandb_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "runs", "lenet")
    folders = list(tmp_path.rglob("offline-run-*"))
    assert [f.parent for f in folders] == [run / "wandb"], folders  # one run, inside the run directory

    logged = read_offline_run(folders[0])
    assert logged["name"] == f"lenet/{run.name}" and logged["tags"] == ["cifar10"]
    assert folders[0].name.endswith(logged["id"])
    config = [c for c in logged["configs"] if "model.optimizer.lr" in c]
    assert len(config) == 1, "the resolved config is logged once"
    config = config[0]
    assert config["model.optimizer.lr"] == 0.05 and config["data.batch_size"] == 8 and config["seed_everything"] == 42
    assert config["trainer.devices"] in (2, "2") and config["model.net"] == "project.models.LeNet"
    assert not any("optimizer" in c for c in logged["configs"]), (
        "Lightning's own partial hparams are not logged besides"
    )
    assert {"train/loss_epoch", "val/acc", "test/acc", "trainer/global_step"} <= logged["history"]
    assert {"val/confusion_matrix", "val/predictions", "test/confusion_matrix", "test/predictions"} <= logged["history"]
    assert len(list(folders[0].glob("files/media/images/val/confusion_matrix_*.png"))) == 2  # epochs 0 and 1
    assert (run / "metrics.csv").is_file() and (run / "plots" / "test-confusion.png").is_file()

    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert CANARY_KEY.encode() not in path.read_bytes(), f"the API key was written to {path}"


def test_resumed_fit_continues_the_same_wandb_run(tmp_path, tiny_npz):
    base = [
        "fit",
        "-c",
        WANDB_PRESET,
        "-c",
        LENET,
        f"--data.npz={tiny_npz}",
        "--data.val_size=16",
        "--data.batch_size=16",
        "--test_after_fit=false",
        "--plots.enabled=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        *QUIET,
    ]
    first = run_cli([*base, "--trainer.max_epochs=1"], cwd=tmp_path, env=wandb_env(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "runs", "lenet")
    again = run_cli([*base, "--trainer.max_epochs=2", f"--run_dir={run}"], cwd=tmp_path, env=wandb_env(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming from {run / 'checkpoints'}" in again.stderr
    ids = {read_offline_run(folder)["id"] for folder in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1


def test_wandb_is_off_in_tests_and_an_account_is_asked_for_clearly(tmp_path, tiny_npz):
    """The suite runs with WANDB_MODE=disabled: no wandb files. Without it and without an API key,
    the fit stops at once with one sentence naming both ways out."""
    base = [
        "fit",
        "-c",
        WANDB_PRESET,
        "-c",
        LENET,
        f"--data.npz={tiny_npz}",
        "--data.val_size=16",
        "--trainer.max_epochs=1",
        "--test_after_fit=false",
        "--plots.enabled=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        *QUIET,
    ]
    assert os.environ["WANDB_MODE"] == "disabled"
    off = run_cli(base, cwd=tmp_path)
    assert off.returncode == 0, off.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "runs", "lenet")
    assert not list(tmp_path.rglob("*run-*")) and (run / "metrics.csv").is_file()
    assert "model.optimizer.lr: 0.05" in (run / "hparams.yaml").read_text()  # the CSV logger records the same config

    env = {**wandb_env(tmp_path, mode="online"), "HOME": str(tmp_path / "home")}  # online is wandb's default
    del env["WANDB_API_KEY"]
    no_account = run_cli(base, cwd=tmp_path, env=env)
    assert no_account.returncode == 2
    assert no_account.stderr.strip().splitlines()[-1] == (
        "error: wandb could not start a run (No API key configured. Use `wandb login` to log in.): log in with "
        "`wandb login`, or set WANDB_MODE=offline to keep the run in the run directory and upload it later with `wandb sync`."
    )


def test_wandb_logger_is_named_after_its_run_directory_and_joins_the_sweep_project(tmp_path, monkeypatch):
    for key in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "lenet" / "20250101-120000-abcdef"
    (run / "wandb" / "offline-run-20250101_120001-old11111").mkdir(parents=True)
    (run / "wandb" / "run-20250102_090000-new22222").mkdir()
    identity = tracking.wandb_identity(run, "lenet", name=None, id=None, project="image-classification")
    assert identity == ("lenet/20250101-120000-abcdef", "new22222", "image-classification")

    # Inside a sweep trial wandb agent names the run (WANDB_RUN_ID) and its project (WANDB_PROJECT).
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
    monkeypatch.setenv("WANDB_RUN_ID", "tr1al")
    monkeypatch.setenv("WANDB_PROJECT", "sweeps-project")
    identity = tracking.wandb_identity(
        tmp_path / "fresh", "lenet", name="mine", id=None, project="image-classification"
    )
    assert identity == ("mine", None, "sweeps-project")
    assert tracking.sweep_run_name() == "sweep-sw33p-tr1al"


def test_flatten_uses_the_command_line_names():
    nested = {
        "model": {
            "class_path": "X",
            "init_args": {"lr": 0.1, "net": {"class_path": "LeNet", "init_args": {"d": (1,)}}},
        },
        "trainer": {"logger": [{"a": 1}], "devices": [0, 1]},
    }
    assert tracking.flatten(nested) == {
        "model": "X",
        "model.lr": 0.1,
        "model.net": "LeNet",
        "model.net.d": [1],
        "trainer.logger.0.a": 1,
        "trainer.devices": [0, 1],
    }
