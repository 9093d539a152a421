"""`predict` writes <run>/predictions.csv: one row per predict image, in dataset order, also under DDP."""

import csv
from pathlib import Path

import pytest
import torch

from project.data import CIFAR10_CLASSES as CLASSES
from project.data import CIFAR10DataModule
from project.run.cli import main
from tests.conftest import QUIET, REPO, make_npz, run_cli

N_PREDICT = 37  # not a multiple of the batch size nor of 2 processes: uneven last batch and shares
COMMON = [*QUIET, "--data.val_size=16", "--data.eval_batch_size=8", "--plots.enabled=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One LeNet epoch on random images; the predict split is the npz's 37 test images."""
    tmp = tmp_path_factory.mktemp("predict")
    npz = make_npz(tmp / "d.npz", n_test=N_PREDICT)
    cli = main(
        [
            "fit",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--data.npz={npz}",
            f"--trainer.default_root_dir={tmp / 'runs'}",
            *COMMON,
            "--trainer.max_epochs=1",
            "--test_after_fit=false",
        ]
    )
    return {"npz": npz, "root": tmp / "runs", "ckpt": cli.run_dir / "checkpoints" / "last.ckpt"}


def read_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def expected_probs(trained) -> torch.Tensor:
    """The checkpoint's probabilities for the predict images, computed here in dataset order."""
    from project.classifier import ImageClassifier

    model = ImageClassifier.load_from_checkpoint(trained["ckpt"], weights_only=True).eval()
    dm = CIFAR10DataModule(npz=trained["npz"], val_size=16, eval_batch_size=8, pipeline="dataloader")
    dm.setup("predict")
    with torch.no_grad():
        return torch.cat([model.predict_step(batch, i)["probs"] for i, batch in enumerate(dm.predict_dataloader())])


def check_csv(path, expected: torch.Tensor) -> None:
    header, rows = read_rows(path)
    assert header == ["index", "pred", "pred_name", *(f"prob_{c}" for c in CLASSES)]
    assert [int(r["index"]) for r in rows] == list(range(N_PREDICT)), "one row per image, in dataset order"
    probs = torch.tensor([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    torch.testing.assert_close(probs.sum(-1), torch.ones(N_PREDICT), atol=1e-4, rtol=0)
    assert [int(r["pred"]) for r in rows] == probs.argmax(-1).tolist()
    assert [r["pred_name"] for r in rows] == [CLASSES[int(r["pred"])] for r in rows]
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pipeline", ["dataloader", "device"])
def test_predict_writes_one_row_per_image_in_dataset_order(trained, pipeline):
    cli = main(
        [
            "predict",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--data.npz={trained['npz']}",
            f"--trainer.default_root_dir={trained['root']}",
            *COMMON,
            f"--data.pipeline={pipeline}",
            f"--ckpt_path={trained['ckpt']}",
        ]
    )
    check_csv(cli.run_dir / "predictions.csv", expected_probs(trained))
    assert not list(cli.run_dir.glob(".*.tmp")), "no temporary file is left behind"


def test_predictions_can_be_switched_off_or_sent_elsewhere_in_the_run(trained, tmp_path):
    cli = main(
        [
            "predict",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--data.npz={trained['npz']}",
            f"--trainer.default_root_dir={trained['root']}",
            *COMMON,
            f"--ckpt_path={trained['ckpt']}",
            "--predictions.output_dir=out",
            "--predictions.filename=test-preds.csv",
        ]
    )
    assert (cli.run_dir / "out" / "test-preds.csv").is_file() and not (cli.run_dir / "predictions.csv").exists()
    cli = main(
        [
            "predict",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--data.npz={trained['npz']}",
            f"--trainer.default_root_dir={trained['root']}",
            *COMMON,
            f"--ckpt_path={trained['ckpt']}",
            "--predictions.enabled=false",
        ]
    )
    assert not (cli.run_dir / "predictions.csv").exists()


@pytest.mark.parametrize("pipeline", ["dataloader", "device"])
def test_ddp_predict_gathers_both_processes_shares_in_dataset_order(trained, pipeline):
    """2 CPU processes (gloo): Lightning's predict sampler gives them 19 and 18 images, the device
    pipeline pads both shares to 19 (one image twice); the file has each image once, in order."""
    evaluations = Path(trained["ckpt"]).parent.parent / "eval"  # the trained run's: its checkpoint is evaluated
    before = set(evaluations.glob("*-predict"))
    out = run_cli(
        [
            "predict",
            "-c",
            "experiments/lenet.yaml",
            "-c",
            "experiments/presets/ddp_cpu.yaml",
            f"--data.npz={trained['npz']}",
            f"--trainer.default_root_dir={trained['root']}",
            *COMMON,
            f"--data.pipeline={pipeline}",
            f"--ckpt_path={trained['ckpt']}",
        ],
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = set(evaluations.glob("*-predict")) - before  # both processes wrote into one folder
    check_csv(run / "predictions.csv", expected_probs(trained))
