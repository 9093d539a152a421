"""Any LightningModule through the CLI (model: by class_path): an ImageClassifier subclass with an argument of
its own and a module that is not ours (examples/, outside project/): fit, resume, validate and predict from the
run's config.yaml, and the features the module does not offer skipped with one line (project/run/model_contract.py)."""

import csv
import logging

import pytest
import torch
import yaml
from conftest import QUIET, REPO, make_npz, run_dirs

from project.run.cli import main

MIXUP = "examples.mixup.MixupClassifier"
LIT = "examples.lit_classifier.LitClassifier"


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # as `python -m project` from the repository's root has it


@pytest.fixture
def data(tmp_path):
    return make_npz(tmp_path / "tiny.npz", n_train=48, n_test=24)


def fit(root, npz, *options, config=None):
    return main(
        [
            "fit",
            "-c",
            str(config or REPO / "experiments/lenet.yaml"),
            f"--data.npz={npz}",
            *QUIET,
            "--data.val_size=16",
            "--data.batch_size=8",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={root}",
            *options,
        ]
    )


def evaluate(command, run, npz, *options):
    """``command`` with the run's own config.yaml: a resume (fit), an evaluation."""
    return main([command, "-c", str(run / "config.yaml"), f"--data.npz={npz}", *QUIET, *options])


def skipped(caplog) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records if ": skipped, " in r.getMessage()]


def predictions(root) -> list[dict]:
    (path,) = root.rglob("predictions.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_an_imageclassifier_subclass_with_its_own_argument_fits_resumes_validates_and_predicts(tmp_path, data, caplog):
    caplog.set_level(logging.INFO)
    cli = fit(tmp_path, data, "--model", MIXUP, "--model.alpha=0.4")
    (run,) = run_dirs(tmp_path, "lenet")
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["class_path"] == MIXUP and saved["init_args"]["alpha"] == 0.4
    assert saved["init_args"]["net"]["class_path"] == "project.models.LeNet"
    assert type(cli.model).__name__ == "MixupClassifier" and cli.model.hparams.alpha == 0.4
    assert (run / "net.pt").is_file() and skipped(caplog) == [], "an ImageClassifier offers every feature"
    steps = cli.trainer.global_step

    # A changed argument of its own is refused on resume, like any other model setting.
    with pytest.raises(SystemExit) as refused:
        evaluate("fit", run, data, "--ckpt_path=last", "--model.alpha=0.1")
    assert refused.value.code == 2

    resumed = evaluate("fit", run, data, "--ckpt_path=last", "--trainer.max_epochs=2")
    assert resumed.run_dir == run and resumed.trainer.global_step == 2 * steps
    assert type(resumed.model).__name__ == "MixupClassifier"

    validated = evaluate("validate", run, data, "--ckpt_path=last")
    assert type(validated.model).__name__ == "MixupClassifier" and "val/acc" in validated.trainer.callback_metrics

    evaluate("predict", run, data, "--ckpt_path=last")
    rows = predictions(tmp_path)
    assert len(rows) == 24 and len([k for k in rows[0] if k.startswith("prob_")]) == 10


def test_a_subclass_in_yaml_with_class_path_and_init_args(tmp_path, data):
    """``model: {class_path: ..., init_args: {...}}`` was refused ("does not accept option 'model.init_args...'")."""
    config = tmp_path / "mixup.yaml"
    config.write_text(
        f"model:\n  class_path: {MIXUP}\n  init_args:\n    alpha: 0.3\n"
        "    net: {class_path: project.models.LeNet}\n    label_smoothing: 0.1\n"
    )
    cli = fit(tmp_path, data, config=config)
    assert cli.model.hparams.alpha == 0.3 and cli.model.hparams.label_smoothing == 0.1
    assert cli.model.net.fc3.out_features == 10, "num_classes linked from the data module into the subclass's net"


def test_a_lightningmodule_that_is_not_ours_fits_resumes_validates_and_predicts(tmp_path, data, caplog):
    caplog.set_level(logging.INFO)
    cli = fit(tmp_path, data, "--trainer.log_every_n_steps=1", config=REPO / "experiments/own_module.yaml")
    (run,) = run_dirs(tmp_path, "own_module")
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved == {"class_path": LIT, "init_args": {"width": 32, "lr": 0.002}}  # linked values are the data's
    assert cli.model.model[-1].out_features == 10, "num_classes is linked into any model that takes it"
    hparams = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
    assert "image_shape" not in hparams, "a link the module does not take is not written into its hparams"
    assert list(run.glob("checkpoints/best-*.ckpt")), "the best checkpoint monitors the module's own val_acc"
    assert not (run / "net.pt").exists() and not (run / "plots").exists()
    assert sorted(set(skipped(caplog))) == ["net.pt", "plots"], caplog.text[-2000:]
    steps = cli.trainer.global_step

    resumed = evaluate("fit", run, data, "--ckpt_path=last", "--trainer.max_epochs=2")
    assert resumed.run_dir == run and resumed.trainer.global_step == 2 * steps

    validated = evaluate("validate", run, data, "--ckpt_path=best")
    assert "val_acc" in validated.trainer.callback_metrics

    evaluate("predict", run, data, "--ckpt_path=last")  # its predict_step returns logits
    rows = predictions(tmp_path)
    assert len(rows) == 24 and {row["pred"] for row in rows} <= {str(i) for i in range(10)}


def test_a_module_whose_predict_step_returns_something_else_skips_predictions_csv(tmp_path, data, caplog, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "labels.py").write_text(
        f"from {LIT.rpartition('.')[0]} import LitClassifier\n\n\nclass Labels(LitClassifier):\n"
        "    def predict_step(self, batch, batch_idx):\n        return batch[1]\n"
    )
    monkeypatch.syspath_prepend(str(package))
    fit(tmp_path, data, "--model=labels.Labels", config=REPO / "experiments/own_module.yaml")
    (run,) = run_dirs(tmp_path, "own_module")
    caplog.set_level(logging.INFO)
    caplog.clear()
    evaluate("predict", run, data, "--ckpt_path=last")
    assert skipped(caplog) == ["predictions.csv"] and not list(tmp_path.rglob("predictions.csv"))
