"""Speed switches: precision (32 / 16-mixed / bf16-mixed), channels_last, flip-averaged evaluation,
and the presets in experiments/presets that turn them on."""

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from project.classifier import ImageClassifier
from project.data import CIFAR10DataModule
from project.models import LeNet, ResNet20
from project.run.cli import main
from tests.conftest import QUIET, REPO

#: The speed presets (experiments/presets also holds the distributed-strategy ones, tested elsewhere).
SPEED_PRESETS = ["bf16", "fp16", "fp32", "channels_last", "compile", "device_data", "dataloader_data", "gpu_speed"]


class _DtypeProbe(L.Callback):
    """Records the dtype of the net's logits and parameters during training steps."""

    def __init__(self) -> None:
        self.logits, self.params = set(), set()

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.net.register_forward_hook(
            lambda module, args, out: self.logits.add(out.dtype) if module.training else None
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params |= {p.dtype for p in pl_module.parameters()}


def fit_tiny(tiny_npz: Path, tmp_path: Path, precision: str, **model_kwargs) -> tuple[L.Trainer, _DtypeProbe]:
    probe = _DtypeProbe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[probe],
    )
    model = ImageClassifier(
        LeNet(), optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9), **model_kwargs
    )
    trainer.fit(model, datamodule=CIFAR10DataModule(npz=tiny_npz, val_size=16, batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    return trainer, probe


@pytest.mark.parametrize("precision,logits", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_precision_on_cpu(tiny_npz, tmp_path, precision, logits):
    trainer, probe = fit_tiny(tiny_npz, tmp_path, precision)
    assert trainer.precision == precision
    assert probe.logits == {logits}  # autocast runs the net in bfloat16...
    assert probe.params == {torch.float32}  # ...while the weights and the optimiser stay float32


def test_fp16_mixed_on_cpu_runs_as_bf16(tiny_npz, tmp_path):
    """Lightning has no float16 autocast on CPU; it says so and uses bfloat16 (presets/fp16.yaml says so too)."""
    with pytest.warns(UserWarning, match="bf16-mixed"):
        trainer, probe = fit_tiny(tiny_npz, tmp_path, "16-mixed")
    assert trainer.precision == "bf16-mixed" and probe.logits == {torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision,logits", [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_mixed_precision_on_cuda(tiny_npz, tmp_path, precision, logits):
    probe = _DtypeProbe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cuda",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[probe],
    )
    trainer.fit(
        ImageClassifier(LeNet(), channels_last=True),
        datamodule=CIFAR10DataModule(npz=tiny_npz, val_size=16, batch_size=16),
    )
    assert probe.logits == {logits} and probe.params == {torch.float32}
    assert (trainer.precision_plugin.scaler is not None) == (precision == "16-mixed")


def _is_channels_last(t: torch.Tensor) -> bool:
    # 1x1 kernels are both layouts at once; the 3x3 ones tell the two apart.
    return t.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_weights_and_inputs_same_logits(tmp_path, tiny_npz):
    torch.manual_seed(0)
    reference = ImageClassifier(ResNet20()).eval()
    model = ImageClassifier(ResNet20(), channels_last=True).eval()
    model.load_state_dict(reference.state_dict())
    conv_weights = [p for p in model.net.parameters() if p.ndim == 4]
    assert conv_weights and all(_is_channels_last(w) for w in conv_weights)
    assert not any(_is_channels_last(w) for w in reference.net.parameters() if w.ndim == 4 and w.shape[-1] > 1)
    seen = []
    model.net.register_forward_pre_hook(lambda module, args: seen.append(_is_channels_last(args[0])))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)
    assert seen == [True] and not _is_channels_last(images)

    # Training keeps the layout; the checkpoint and net.pt are ordinary state_dicts.
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(model.train(), datamodule=CIFAR10DataModule(npz=tiny_npz, val_size=16, batch_size=16))
    assert all(_is_channels_last(p) for p in model.net.parameters() if p.ndim == 4)
    trainer.save_checkpoint(tmp_path / "cl.ckpt")
    plain = ResNet20()
    plain.load_state_dict(
        {
            k[len("net.") :]: v
            for k, v in torch.load(tmp_path / "cl.ckpt", weights_only=False)["state_dict"].items()
            if k.startswith("net.")
        }
    )
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), model.eval()(images), atol=1e-5, rtol=1e-5)


def test_tta_flip_averages_logits_of_image_and_mirror_at_evaluation_only(tiny_npz, tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(LeNet(), tta_flip=True).eval()
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = (model.net(images) + model.net(images.flip(-1))) / 2
        torch.testing.assert_close(model.evaluate(images), expected)
        assert not torch.allclose(model.evaluate(images), model.net(images))  # LeNet is not mirror-symmetric
        torch.testing.assert_close(model.predict_step((images,), 0)["probs"], expected.softmax(-1))
        torch.testing.assert_close(model(images), model.net(images))  # forward (and so training) is unchanged

    dm = CIFAR10DataModule(npz=tiny_npz, val_size=16, augment=False)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (metrics,) = trainer.test(model, datamodule=dm, verbose=False)
    x, y = dm.test_split.images, dm.test_split.labels
    batch = next(iter(dm.test_dataloader()))[0]
    with torch.no_grad():
        accuracy = (model.evaluate(batch).argmax(-1) == y).float().mean().item()
    assert len(x) == len(batch)
    assert metrics["test/acc"] == pytest.approx(accuracy)


@pytest.mark.parametrize("name", SPEED_PRESETS)
def test_speed_presets_combine_with_a_base_config(name, capsys):
    preset = REPO / "experiments" / "presets" / f"{name}.yaml"
    settings = yaml.safe_load(preset.read_text())
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(REPO / "experiments/lenet.yaml"), "-c", str(preset), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    for section, values in settings.items():
        for key, value in values.items():
            resolved = config[section].get("init_args", config[section])  # data: {class_path, init_args}
            assert resolved[key] == value, f"{preset.name} did not set {section}.{key}"
    assert config["model"]["init_args"]["net"]["class_path"] == "project.models.LeNet"  # the base config survives


def test_gpu_speed_preset_runs_on_cpu(tiny_npz, tmp_path):
    """bf16 autocast + channels_last + the device pipeline together, end to end through the CLI."""
    cli = main(
        [
            "fit",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            "-c",
            str(REPO / "experiments/presets/gpu_speed.yaml"),
            f"--data.npz={tiny_npz}",
            "--data.val_size=16",
            "--data.batch_size=16",
            "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu",
            "--trainer.benchmark=false",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.model.hparams.channels_last and cli.datamodule.resolved_pipeline() == "device"
    assert cli.trainer.global_step == 3
    assert (cli.run_dir / "net.pt").is_file()
