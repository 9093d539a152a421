"""Hook and buffer callbacks on real CPU fits: activation and gradient statistics, hook removal,
torch.compile ordering, BufferReport, and buffers through save, load and .to()."""

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from project.callbacks import ActivationStatistics, BufferReport, GradientStatistics
from project.callbacks.activations import activation_summary
from project.classifier import ImageClassifier
from project.data import CIFAR10DataModule
from project.models import InputStatistics, LeNet, ResNet20


def fit(
    tmp_path: Path, npz: Path, model: ImageClassifier, callbacks: list, steps: int = 4, **trainer_kwargs
) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=CIFAR10DataModule(npz=npz, val_size=16, batch_size=8))
    return trainer


def logged(tmp_path: Path) -> list[dict]:
    with open(tmp_path / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def hooked(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks]


def test_activation_summary_counts_zeros_and_dead_units():
    x = torch.randn(4, 5, 3, 3).abs() + 0.1  # every unit positive somewhere
    x[:, 1] = 0.0  # channel 1 never fires: a dead ReLU
    x[:, 3] = -x[:, 3]  # channel 3 is negative everywhere: dead once a ReLU follows
    mean, std, zeros, dead = activation_summary(x).tolist()
    assert mean == pytest.approx(x.mean().item()) and std == pytest.approx(x.std(correction=0).item())
    assert zeros == pytest.approx(1 / 5) and dead == pytest.approx(2 / 5)
    relu = activation_summary(torch.relu(x))
    assert relu[2].item() == pytest.approx(2 / 5) and relu[3].item() == pytest.approx(2 / 5)


def test_activation_statistics_logs_chosen_layers_and_removes_its_hooks(tmp_path, tiny_npz):
    model = ImageClassifier(ResNet20())
    callback = ActivationStatistics(every_n_steps=2, layers=["stem.2", "stages.2.*"], types=["Linear"])
    fit(tmp_path, tiny_npz, model, [callback])
    assert callback.names == ["stem.2", "stages.2.0", "stages.2.1", "stages.2.2", "fc"]
    rows = [r for r in logged(tmp_path) if "act/fc/mean" in r]
    assert [r["step"] for r in rows] == [0, 2], "every 2nd optimiser step, training only"
    for row in rows:
        assert set(k.split("/")[1] for k in row if k.startswith("act/")) == set(callback.names)
        # Block outputs come after a ReLU: non-negative, with a share of exact zeros.
        assert row["act/stages.2.0/mean"] > 0 and 0 < row["act/stages.2.0/zeros"] < 1
        assert 0 <= row["act/fc/dead"] <= 1 and row["act/fc/zeros"] == 0
    assert hooked(model) == [], "every hook handle is removed when fit ends"


def test_activation_statistics_match_a_direct_forward(tmp_path, tiny_npz):
    """The hook's numbers equal those of the same layer's output computed by hand on the same batch."""

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                with torch.no_grad():
                    conv = pl_module.net.conv1(batch[0])
                self.expected = activation_summary(conv).tolist()

    model, probe, callback = (
        ImageClassifier(LeNet()),
        Probe(),
        ActivationStatistics(every_n_steps=100, layers=["conv1"]),
    )
    fit(tmp_path, tiny_npz, model, [probe, callback], steps=1)
    got = [callback.last[f"act/conv1/{s}"] for s in ("mean", "std", "zeros", "dead")]
    assert got == pytest.approx(probe.expected, rel=1e-5)


def test_gradient_statistics_are_the_gradients_the_optimiser_applies(tmp_path, tiny_npz):
    """Norms per layer, update ratios and output-gradient norms against independent measurements:
    parameter .grad read by another callback, weights before and after the step, and a tensor hook
    on the logits (a different mechanism from the module's full backward hook)."""

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            def keep_grad(module, inputs, output):
                output.register_hook(lambda g: setattr(self, "logit_grad", g.norm().item()))

            self.handle = pl_module.net.fc3.register_forward_hook(keep_grad)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            net = pl_module.net
            self.conv1 = torch.cat([net.conv1.weight.grad.flatten(), net.conv1.bias.grad]).norm().item()
            self.total = torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item()
            self.before = torch.cat([net.fc1.weight.detach().flatten(), net.fc1.bias.detach()]).clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            net = pl_module.net
            after = torch.cat([net.fc1.weight.detach().flatten(), net.fc1.bias.detach()])
            self.ratio = ((after - self.before).norm() / self.before.norm()).item()
            self.handle.remove()

    grads = GradientStatistics(every_n_steps=1, update_ratio=True, output_grads=True, types=["Linear"])
    probe = Probe()
    model = ImageClassifier(LeNet())
    fit(tmp_path, tiny_npz, model, [grads, probe], steps=1)
    last = grads.last
    assert last["grad/conv1/norm"] == pytest.approx(probe.conv1, rel=1e-5)
    assert last["grad/total_norm"] == pytest.approx(probe.total, rel=1e-5)
    assert last["grad/fc1/update_ratio"] == pytest.approx(probe.ratio, rel=1e-4)
    assert last["grad/fc3/output_norm"] == pytest.approx(probe.logit_grad, rel=1e-5)
    assert {k for k in last if k.endswith("/output_norm")} == {f"grad/fc{i}/output_norm" for i in (1, 2, 3)}
    assert hooked(model) == []


def test_gradient_statistics_wait_for_the_step_under_accumulation(tmp_path, tiny_npz):
    """With 2 batches per optimiser step, the norms are read once per recorded step, at the step."""
    grads = GradientStatistics(every_n_steps=1)
    fit(tmp_path, tiny_npz, ImageClassifier(LeNet()), [grads], steps=4, accumulate_grad_batches=2)
    steps = [r["step"] for r in logged(tmp_path) if "grad/total_norm" in r]
    assert steps == [0, 1]


def test_hooks_are_registered_before_compile(tmp_path, tiny_npz):
    """model.compile: the callbacks' setup runs first, so their hooks are on the plain net when
    Lightning calls configure_model, which compiles it in place. The eager backend keeps the test
    fast; it traces the same hooks through TorchDynamo as the default one."""
    acts = ActivationStatistics(every_n_steps=1, layers=["conv2"])
    grads = GradientStatistics(every_n_steps=1, output_grads=True, layers=["fc3"])
    model = ImageClassifier(LeNet(), compile={"backend": "eager"})
    fit(tmp_path, tiny_npz, model, [acts, grads], steps=2)
    assert model.net._compiled_call_impl is not None
    assert math.isfinite(acts.last["act/conv2/std"]) and grads.last["grad/fc3/output_norm"] > 0
    assert all(k.startswith("net.") and "_orig_mod" not in k for k in model.state_dict())
    assert hooked(model) == []


def test_an_already_compiled_net_is_refused(tmp_path, tiny_npz):
    net = LeNet()
    net.compile(backend="eager")
    with pytest.raises(RuntimeError, match="before torch.compile"):
        fit(tmp_path, tiny_npz, ImageClassifier(net), [ActivationStatistics()], steps=1)


def test_unknown_layers_are_a_clear_error(tmp_path, tiny_npz):
    with pytest.raises(ValueError, match=r"matched no layer of LeNet.*Conv2d, LeNet, Linear"):
        fit(tmp_path, tiny_npz, ImageClassifier(LeNet()), [ActivationStatistics(layers=["stages.*"])], steps=1)


def test_buffer_report_lists_saved_and_unsaved_buffers(tmp_path, tiny_npz):
    model, report = ImageClassifier(ResNet20()), BufferReport()
    fit(tmp_path, tiny_npz, model, [report], steps=2)
    data = json.loads(report.path.read_text())
    rows = {r["name"]: r for r in data["buffers"]}
    assert data["synchronisation"].startswith("one process")
    assert rows["net.input_stats.count"] == {
        **rows["net.input_stats.count"],
        "saved": True,
        "values": 16,
        "dtype": "int64",
    }
    assert rows["net.input_stats.std"]["saved"] is False
    assert rows["net.stem.1.running_mean"]["saved"] and rows["net.stem.1.num_batches_tracked"]["values"] == 2
    assert {n for n, r in rows.items() if not r["saved"]} == {"net.input_stats.std"}
    assert set(rows) == {f"net.{n}" for n, _ in model.net.named_buffers()}


# --- buffers without Lightning: state_dict, save/load, .to() ---------------------------------


def trained_resnet() -> ResNet20:
    net = ResNet20().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 32, 32) * 2 + 1)
    return net


def test_which_buffers_the_state_dict_holds():
    net = trained_resnet()
    keys = set(net.state_dict())
    assert {"input_stats.count", "input_stats.mean", "input_stats.var"} <= keys
    assert {"stem.1.running_mean", "stem.1.running_var", "stem.1.num_batches_tracked"} <= keys
    assert "input_stats.std" not in keys and "input_stats.std" in dict(net.named_buffers())
    assert sum(p.numel() for p in net.parameters()) == 272_474, "buffers add no parameters"


def test_input_statistics_are_exact_and_only_learn_in_training():
    stats = InputStatistics(3).train()
    batches = [torch.randn(5, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 1 for _ in range(4)]
    for x in batches:
        stats(x)
    pixels = torch.cat(batches).transpose(0, 1).reshape(3, -1)
    assert stats.count.item() == 20
    torch.testing.assert_close(stats.mean, pixels.mean(1))
    torch.testing.assert_close(stats.var, pixels.var(1, correction=0))
    torch.testing.assert_close(stats.std, stats.var.sqrt())
    stats.eval()(torch.randn(7, 3, 4, 4))
    assert stats.count.item() == 20


def test_buffers_survive_save_and_load_and_the_cache_is_rebuilt(tmp_path):
    net = trained_resnet()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    fresh = ResNet20()
    assert torch.equal(fresh.input_stats.std, torch.zeros(3))
    fresh.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))
    for name, buf in net.named_buffers():
        assert torch.equal(dict(fresh.named_buffers())[name], buf), name
    # std was not in the file: load_state_dict's post-hook recomputed it from the loaded var.
    assert "input_stats.std" not in torch.load(tmp_path / "net.pt", weights_only=True)


def test_buffers_follow_to_but_integers_keep_their_dtype():
    net = trained_resnet().to(torch.float64)
    buffers = dict(net.named_buffers())
    assert buffers["input_stats.std"].dtype == torch.float64 and buffers["stem.1.running_mean"].dtype == torch.float64
    assert (
        buffers["input_stats.count"].dtype == torch.int64 and buffers["stem.1.num_batches_tracked"].dtype == torch.int64
    )
    on_meta = ResNet20().to("meta")
    assert {b.device.type for b in on_meta.buffers()} == {"meta"}, "non-persistent buffers move too"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_buffers_move_to_cuda_and_keep_learning_there():
    net = trained_resnet().cuda()
    assert {b.device.type for b in net.buffers()} == {"cuda"}
    count = net.input_stats.count.item()
    net(torch.randn(2, 3, 32, 32, device="cuda"))
    assert net.input_stats.count.item() == count + 2 and net.input_stats.std.is_cuda


def _fit_with_bar(tmp_path, bar, batches: int = 8):
    x, y = torch.randn(batches * 4, 3, 32, 32), torch.randint(0, 10, (batches * 4,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
        default_root_dir=tmp_path,
    )
    trainer.fit(ImageClassifier(LeNet(), scheduler=None), train_dataloaders=loader)
    return trainer


def test_progress_bar_redraws_at_most_max_per_second_and_ends_at_the_full_count(tmp_path, monkeypatch):
    """Lightning's bar redraws after every batch (4 ms a step on a busy CPU); ours skips redraws
    within 1/max_per_second of the last one, but the first batch and the epoch's last are drawn."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from project.run.callbacks import ProgressBar

    drawn = []
    original = TQDMProgressBar.on_train_batch_end
    monkeypatch.setattr(
        TQDMProgressBar,
        "on_train_batch_end",
        lambda self, trainer, module, outputs, batch, batch_idx: (
            drawn.append(batch_idx),
            original(self, trainer, module, outputs, batch, batch_idx),
        ),
    )
    trainer = _fit_with_bar(tmp_path, ProgressBar(max_per_second=1e-6))  # one redraw per 11 days at most
    assert drawn == [0, 7]
    assert trainer.progress_bar_callback.train_progress_bar.n == 8
    drawn.clear()
    _fit_with_bar(tmp_path, ProgressBar(max_per_second=0))
    assert drawn == list(range(8)), "max_per_second=0 redraws after every batch, like Lightning's"


def test_progress_bar_stopped_mid_epoch_shows_the_batches_done(tmp_path):
    from project.run.callbacks import ProgressBar

    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    trainer = L.Trainer(
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[ProgressBar(max_per_second=1e-6)],
        default_root_dir=tmp_path,
    )
    trainer.fit(
        ImageClassifier(LeNet(), scheduler=None),
        train_dataloaders=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
    )
    assert trainer.progress_bar_callback.train_progress_bar.n == 5


def test_the_cli_installs_the_throttled_bar_but_keeps_a_configured_one(tmp_path, tiny_npz):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from project.run.callbacks import ProgressBar
    from project.run.cli import ProjectCLI

    common = [
        "-c",
        "experiments/lenet.yaml",
        f"--data.npz={tiny_npz}",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.num_workers=0",
    ]
    trainer = ProjectCLI(args=common, run=False).trainer
    assert isinstance(trainer.progress_bar_callback, ProgressBar)
    assert sum(isinstance(cb, TQDMProgressBar) for cb in trainer.callbacks) == 1
    own = ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar", "--trainer.callbacks.refresh_rate=5"]
    trainer = ProjectCLI(args=[*common, *own], run=False).trainer
    assert type(trainer.progress_bar_callback) is TQDMProgressBar and trainer.progress_bar_callback.refresh_rate == 5
    trainer = ProjectCLI(args=[*common, "--trainer.enable_progress_bar=false"], run=False).trainer
    assert trainer.progress_bar_callback is None
