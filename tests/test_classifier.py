"""ImageClassifier: parameter groups, optimisers and schedules, metrics, hyperparameters."""

import csv
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn

from project.classifier import ImageClassifier
from project.errors import UserError
from project.models import LeNet, ResNet20
from project.schedules import WarmupCosine


def sgd(lr: float, **kwargs):
    """``model.optimizer`` as the CLI builds it from class_path and init_args."""
    return functools.partial(torch.optim.SGD, lr=lr, **kwargs)


def test_no_weight_decay_on_biases_and_norms():
    model = ImageClassifier(ResNet20(), optimizer=sgd(0.05, weight_decay=1e-3), scheduler=None)
    decay, no_decay = model.configure_optimizers().param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.net.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "stem.1.weight" in no_decay_names and "fc.bias" in no_decay_names and "fc.weight" not in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.net.parameters()))


class _Tiny(L.LightningDataModule):
    def train_dataloader(self):
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


ADAMW = functools.partial(torch.optim.AdamW, lr=0.01)
#: (optimizer, scheduler, the optimizer's class, its lr, the scheduler's class); None: ImageClassifier's default.
SCHEDULE_CASES = {
    "default-sgd-warmup-cosine": (None, None, torch.optim.SGD, 0.05, WarmupCosine),
    "adamw-onecycle": (
        ADAMW,
        functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01),
        torch.optim.AdamW,
        0.01,
        torch.optim.lr_scheduler.OneCycleLR,
    ),
    "default-sgd-step": (
        None,
        functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        torch.optim.SGD,
        0.05,
        torch.optim.lr_scheduler.StepLR,
    ),
    "adamw-constant": (ADAMW, "null", torch.optim.AdamW, 0.01, None),
}


@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_optimisers_and_schedules_train(tmp_path, case):
    optimizer, scheduler, opt_cls, lr, sched_cls = SCHEDULE_CASES[case]
    kwargs = {"optimizer": optimizer} if optimizer is not None else {}
    if scheduler is not None:
        kwargs["scheduler"] = None if scheduler == "null" else scheduler
    model = ImageClassifier(LeNet(), **kwargs)
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=_Tiny())
    opt = trainer.optimizers[0]
    assert isinstance(opt, opt_cls)
    if sched_cls is None:
        assert trainer.lr_scheduler_configs == []
        assert opt.param_groups[0]["lr"] == lr
        return
    config = trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, sched_cls)
    if sched_cls is torch.optim.lr_scheduler.StepLR:
        assert config.interval == "epoch" and opt.param_groups[0]["lr"] == pytest.approx(lr * 0.5**2)
    else:
        # Per-step schedules span exactly the run: 2 epochs x 4 batches.
        assert config.interval == "step"
        assert config.scheduler.total_steps == 8
        assert opt.param_groups[0]["lr"] < lr * 0.1  # annealed far below the peak by the end
    if optimizer is None:  # the default recipe: SGD with Nesterov momentum
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_label_smoothing_only_in_training():
    model = ImageClassifier(LeNet(), label_smoothing=0.2)
    logits = torch.tensor([[10.0, -10.0] + [-10.0] * 8])
    labels = torch.tensor([0])
    model.net = nn.Identity()  # logits in, logits out
    model.log = model.log_dict = lambda *a, **k: None
    train = model._step((logits, labels), "train")
    val = model._step((logits, labels), "val")
    assert train.item() > 1.0 and val.item() < 1e-6


def test_a_batch_transform_mixes_training_batches_only_and_its_soft_targets_reach_the_loss():
    calls = []

    def swap_halves(images, labels):  # a user's own callable: each image its neighbour's, targets 50/50
        calls.append(len(labels))
        soft = 0.5 * F.one_hot(labels, 10).float() + 0.5 * F.one_hot(labels.roll(1), 10).float()
        return images.roll(1, 0), soft

    model = ImageClassifier(LeNet(), batch_transform=swap_halves)
    model.net = nn.Identity()  # logits in, logits out
    model.log = model.log_dict = lambda *a, **k: None
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    soft = 0.5 * F.one_hot(labels, 10).float() + 0.5 * F.one_hot(labels.roll(1), 10).float()
    train = model._step((logits, labels), "train")
    assert torch.allclose(train, F.cross_entropy(logits.roll(1, 0), soft)) and calls == [4]
    model._step((logits, labels), "val")
    assert calls == [4], "validation sees the images as they are"
    # Training accuracy counts the batch's own labels (the mixed image's logits against them).
    assert model.metrics["train_metrics"]["acc"].compute() == (logits.roll(1, 0).argmax(1) == labels).float().mean()


def test_torchvisions_cutmix_and_mixup_get_the_models_number_of_classes():
    from torchvision.transforms import v2

    either = v2.RandomChoice([v2.CutMix(), v2.MixUp(alpha=0.4)])
    model = ImageClassifier(LeNet(num_classes=7), num_classes=7, batch_transform=either)
    assert [t.num_classes for t in model.batch_transform.transforms] == [7, 7]
    images, targets = model.batch_transform(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 6]))
    assert targets.shape == (4, 7) and torch.allclose(targets.sum(1), torch.ones(4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"optimizer": sgd(-0.1)},
            "Invalid learning rate: -0.1",
        ),  # torch checks the optimizer's arguments when it is built
        ({"optimizer": sgd(0.05, weight_decay=-1)}, "Invalid weight_decay value: -1"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"num_classes": 1}, "num_classes must be at least 2"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier(LeNet(), **kwargs)


def test_top5_only_with_more_than_five_classes():
    assert set(ImageClassifier(LeNet(10)).metrics["val_metrics"].keys(keep_base=True)) == {"acc", "acc_top5"}
    assert set(ImageClassifier(LeNet(3), num_classes=3).metrics["val_metrics"].keys(keep_base=True)) == {"acc"}


def test_python_built_model_checkpoint(tmp_path):
    """Built in Python, the net and optimizer objects are not pickled into the hyperparameters; pass the net back on load."""
    model = ImageClassifier(LeNet(), optimizer=sgd(0.02), label_smoothing=0.1)
    assert "net" not in model.hparams and "optimizer" not in model.hparams and model.hparams.label_smoothing == 0.1
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=_Tiny())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    torch.load(tmp_path / "m.ckpt", weights_only=True)  # nothing but plain data inside
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt", net=LeNet())
    assert loaded.hparams.label_smoothing == 0.1 and torch.equal(loaded.net.fc1.weight, model.net.fc1.weight)


def test_images_of_another_size_are_refused_with_one_sentence():
    """LeNet would fail deep inside with a matmul shape error, a ResNet would silently accept them."""
    for net in (LeNet(), ResNet20()):
        model = ImageClassifier(net, image_shape=(3, 32, 32)).eval()  # the CLI links it from the data module
        assert model.predict_step(torch.rand(2, 3, 32, 32), 0)["preds"].shape == (2,)
        with pytest.raises(
            ValueError, match=r"takes images of shape \(N, 3, 32, 32\), got \(2, 3, 28, 28\): resize or crop"
        ):
            model.predict_step(torch.rand(2, 3, 28, 28), 0)


def test_param_groups_first_match_wins_and_keep_the_decay_split():
    groups = [
        {"match": "fc*", "lr_scale": 10},
        {"match": "fc1.*", "lr_scale": 99},
        {"match": "conv1.*", "lr_scale": 0.5, "weight_decay": 0},
    ]
    with pytest.raises(
        UserError,
        match=r"'fc1\.\*' \(match 'fc1\.\*'\) matches no trainable parameter of LeNet that an earlier entry has not taken",
    ):
        ImageClassifier(LeNet(), param_groups=groups)  # fc* took fc1.* already
    model = ImageClassifier(
        LeNet(), optimizer=sgd(0.1, weight_decay=1e-3), param_groups=[groups[0], groups[2]], scheduler=None
    )
    optimizer = model.configure_optimizers()
    by_name = {g["name"]: (g["param_names"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert by_name == {
        "fc*": (["fc1.weight", "fc2.weight", "fc3.weight"], pytest.approx(1.0), 1e-3),
        "fc*/no_decay": (["fc1.bias", "fc2.bias", "fc3.bias"], pytest.approx(1.0), 0.0),
        "conv1.*": (["conv1.weight"], 0.05, 0.0),  # its own weight_decay
        "conv1.*/no_decay": (["conv1.bias"], 0.05, 0.0),
        "base": (["conv2.weight"], 0.1, 1e-3),
        "base/no_decay": (["conv2.bias"], 0.1, 0.0),
    }


def test_param_groups_in_the_optimiser():
    model = ImageClassifier(
        ResNet20(),
        optimizer=sgd(0.1, weight_decay=1e-3),
        scheduler=None,
        param_groups=[
            {"match": "fc.*", "lr_scale": 10},
            {"match": "stages.0.*", "lr_scale": 0.1, "weight_decay": 0.0, "name": "early"},
        ],
    )
    optimizer = model.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["fc.*", "fc.*/no_decay", "early", "early/no_decay", "base", "base/no_decay"]
    assert groups["fc.*"]["param_names"] == ["fc.weight"] and groups["fc.*/no_decay"]["param_names"] == ["fc.bias"]
    assert groups["fc.*"]["lr"] == pytest.approx(1.0) and groups["fc.*"]["weight_decay"] == 1e-3
    assert groups["early"]["lr"] == pytest.approx(0.01) and groups["early"]["weight_decay"] == 0.0
    assert all(n.startswith("stages.0.") and "conv" in n for n in groups["early"]["param_names"])
    assert all(n.startswith("stages.0.") and ".bn" in n for n in groups["early/no_decay"]["param_names"])
    assert groups["base"]["lr"] == 0.1 and "stem.0.weight" in groups["base"]["param_names"]
    assert all(g["weight_decay"] == 0.0 for name, g in groups.items() if name.endswith("/no_decay"))
    # Every trainable parameter exactly once.
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.net.named_parameters())


@pytest.mark.parametrize(
    ("param_groups", "message"),
    [
        (
            [{"match": "fc*", "lr": 0.1}],
            r"model.param_groups\[0\] has the unknown key 'lr'; the keys are match, lr_scale, weight_decay, name",
        ),
        ([{"match": "fc*", "lr_scale": 0}], r"model.param_groups\[0\] \(match 'fc\*'\) needs lr_scale > 0"),
        ([{"match": "fc*", "lr_scale": -2}], r"needs lr_scale > 0 .*got -2"),
        ([{"match": "fc*", "weight_decay": -1}], r"needs weight_decay >= 0, got -1"),
        ([{"lr_scale": 2}], r"model.param_groups\[0\] needs match: a glob over parameter names"),
        (
            [{"match": "classifier.*", "lr_scale": 2}],
            r"'classifier\.\*' .*matches no trainable parameter of LeNet .*names look like conv1.weight, fc3.bias",
        ),
        ([{"match": "fc*", "name": "base"}], r"named 'base' like another group"),
        ({"match": "fc*"}, r"model.param_groups must be a list"),
        (["fc*"], r"model.param_groups\[0\] must be a mapping"),
    ],
)
def test_param_group_mistakes_are_one_sentence(param_groups, message):
    with pytest.raises(UserError, match=message) as info:
        ImageClassifier(LeNet(), param_groups=param_groups)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_model_summary_shows_shapes_and_flops():
    """Lightning's ModelSummary runs example_input_array (one image of image_shape) through the model."""
    model = ImageClassifier(LeNet(), image_shape=(3, 32, 32))
    summary = ModelSummary(model, max_depth=2)
    # LeNet's multiply-adds for one image, 2 FLOPs each: conv1 6x28x28x75, conv2 16x10x10x150, fc 400x120 + 120x84 + 84x10.
    assert summary.total_flops == 2 * (6 * 28 * 28 * 75 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10)
    sizes = dict(zip(summary.layer_names, summary.out_sizes))
    assert sizes["net"] == [1, 10] and sizes["net.conv2"] == [1, 16, 10, 10]
    assert model.example_input_array.shape == (1, 3, 32, 32)
    assert "example_input_array" not in dict(model.named_buffers()) and not any(
        k.startswith("example") for k in model.state_dict()
    )
    double = ImageClassifier(LeNet(), image_shape=(3, 32, 32)).double()  # e.g. trainer.precision=64-true
    assert double.example_input_array.dtype == torch.float64 and ModelSummary(double).total_flops > 0
    assert ImageClassifier(LeNet()).example_input_array is None  # no image_shape: nothing to run
    assert ImageClassifier(LeNet(), image_shape=(3, 32, 32), compile=True).example_input_array is None


class _LogitsProbe(L.Callback):
    """Records every training batch's logits (a forward hook on the plain net) and labels."""

    def setup(self, trainer, pl_module, stage) -> None:
        self.logits, self.labels = [], []
        pl_module.net.register_forward_hook(lambda module, args, out: self.logits.append(out.detach().clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.labels.append(batch[1].clone())


def test_training_metrics_are_the_epoch_totals_and_the_step_loss_is_logged_every_n_steps(tmp_path):
    """Training loss and accuracy are running sums on the device, not per-step torchmetrics
    updates and self.log calls: the epoch values must still equal the accuracy (top-1, top-5)
    and the mean loss over all of the epoch's batches, and train/loss_step must reach the logger
    on exactly the steps Lightning logs (every log_every_n_steps)."""
    from lightning.pytorch.loggers import CSVLogger
    from torchmetrics.functional.classification import multiclass_accuracy

    torch.manual_seed(0)
    probe = _LogitsProbe()
    model = ImageClassifier(LeNet(), optimizer=sgd(0.01, momentum=0.9), scheduler=None)
    trainer = L.Trainer(
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[probe],
    )
    trainer.fit(model, datamodule=_Tiny())
    logits, labels = torch.cat(probe.logits), torch.cat(probe.labels)
    assert len(labels) == 64
    metrics = trainer.callback_metrics
    assert metrics["train/acc"].item() == pytest.approx(multiclass_accuracy(logits, labels, 10, average="micro").item())
    assert metrics["train/acc_top5"].item() == pytest.approx(
        multiclass_accuracy(logits, labels, 10, top_k=5, average="micro").item()
    )
    losses = torch.stack([F.cross_entropy(x, y) for x, y in zip(probe.logits, probe.labels)])
    assert metrics["train/loss_epoch"].item() == pytest.approx(losses.mean().item(), rel=1e-5)
    assert (
        metrics["train/loss"].item() == metrics["train/loss_epoch"].item()
    )  # as before, for callbacks that monitor it
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
    assert sorted(logged) == [1, 3], "4 batches, log_every_n_steps=2: Lightning logs after steps 2 and 4 (0-based 1, 3)"
    assert logged[3] == pytest.approx(losses[3].item(), rel=1e-5)
    assert {k for r in rows for k, v in r.items() if v} >= {"train/loss_epoch", "train/acc", "train/acc_top5"}
