"""Fine-tuning (issue 22.3): model.init_from (run directory, net.pt, .ckpt, torchvision and timm pretrained weights)
copies what fits and names what stays fresh; model.freeze keeps parameters and their norms' statistics fixed;
Lightning's BaseFinetuning works with the template's optimiser. Pretrained weights are placed in a tmp
TORCH_HOME / Hugging Face cache (no network here): the libraries' own loaders find them there."""

import ast
import functools
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning

from project.classifier import ImageClassifier
from project.errors import UserError
from project.finetune import init_from
from project.models import LeNet, ResNet20
from project.run.cli import main
from tests.conftest import REPO, lenet_fit_args, make_npz, run_dirs, subset_fit_args


def same(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


def one_sentence(err: Exception) -> str:
    text = str(err)
    assert text.endswith(".") and ". " not in text.replace("e.g. ", "").replace("..", ""), text
    return text


# --------------------------------------------------------------------------- init_from: files


def test_a_net_pt_copies_what_fits_and_names_the_fresh_head(tmp_path):
    source = LeNet(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "net.pt")
    target = LeNet(num_classes=5)  # another number of classes: the head cannot be copied
    fresh_fc3 = target.fc3.weight.detach().clone()
    line = init_from(target, str(tmp_path / "net.pt"))
    assert line == (
        f"model.init_from {tmp_path / 'net.pt'}: copied 8 of 10 state_dict entries; "
        "left freshly initialised: fc3.weight, fc3.bias (2 entries)."
    )
    assert all(
        torch.equal(getattr(target, n).weight, getattr(source, n).weight) for n in ("conv1", "conv2", "fc1", "fc2")
    )
    assert torch.equal(target.fc3.weight, fresh_fc3)


def test_a_run_directory_and_a_lightning_checkpoint(tmp_path):
    """A .ckpt holds the classifier's state_dict (net. prefixed, beside the metrics' entries)."""
    trained = ImageClassifier(ResNet20(), scheduler=None)
    torch.nn.init.normal_(trained.net.fc.weight)
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "m.ckpt")
    target = ResNet20()
    assert init_from(target, str(tmp_path / "m.ckpt")).endswith(
        f"copied {len(target.state_dict())} of {len(target.state_dict())} state_dict entries."
    )
    assert same(target, trained.net)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": trained.state_dict()}, run / "checkpoints" / "last.ckpt")
    assert same(init_from_run(run), trained.net), "a run without net.pt (fit interrupted): its last.ckpt"
    other = ResNet20()
    torch.save(other.state_dict(), run / "net.pt")
    assert same(init_from_run(run), other), "a run's net.pt comes first"


def init_from_run(run) -> torch.nn.Module:
    net = ResNet20()
    ImageClassifier(net, init_from=str(run), scheduler=None)
    return net


class Payload:
    """Not a tensor: unpickling it would import and build a Python object."""


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist: give a run directory, its net.pt, a .ckpt file"),
        (lambda p: torch.save({"net": Payload()}, p), "holds Python objects beyond tensors, so it was not loaded"),
        (lambda p: torch.save(ResNet20().state_dict(), p), "fits no parameter of LeNet"),
        (lambda p: p.write_text("not a checkpoint"), "is not a torch.save file: give a net.pt or a .ckpt file"),
        (lambda p: p.mkdir(), "is a directory without net.pt or checkpoints/last.ckpt"),
    ],
    ids=["missing", "pickled-code", "fits-nothing", "not-torch", "empty-directory"],
)
def test_a_source_that_cannot_be_used_is_one_sentence(tmp_path, make, message):
    path = tmp_path / "source.pt"
    make(path)
    with pytest.raises(UserError, match=message) as info:
        ImageClassifier(LeNet(), init_from=str(path))
    one_sentence(info.value)


# --------------------------------------------------------------------------- init_from: pretrained weights


def test_torchvision_weights_through_torch_hub_cache(tmp_path, monkeypatch):
    """torchvision:<Weights> loads with the Weights enum's own get_state_dict (torch.hub's cache in $TORCH_HOME);
    the 1000-class ImageNet head does not fit a 10-class ResNet-18 and stays fresh."""
    from torchvision.models import ResNet, ResNet18_Weights, resnet18
    from torchvision.models.resnet import BasicBlock

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    imagenet = resnet18()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(imagenet.state_dict(), checkpoints / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10)  # the CLI's class form: torchvision.models.ResNet
    model = ImageClassifier(
        net,
        init_from="torchvision:ResNet18_Weights.IMAGENET1K_V1",
        freeze=["conv1.*", "bn1.*", "layer1.*"],
        scheduler=None,
    )
    assert torch.equal(net.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert net.fc.weight.shape == (10, 512) and not torch.equal(net.fc.bias, imagenet.fc.bias[:10])
    trainable = {n for g in model.configure_optimizers().param_groups for n in g["param_names"]}
    assert "fc.weight" in trainable and "layer2.0.conv1.weight" in trainable and "conv1.weight" not in trainable
    with pytest.raises(UserError, match="torchvision:ResNet18_Weights.IMAGENET9 names no torchvision weights") as info:
        ImageClassifier(LeNet(), init_from="torchvision:ResNet18_Weights.IMAGENET9")
    one_sentence(info.value)


def test_timm_weights_through_the_hugging_face_cache(tmp_path, monkeypatch):
    """timm:<name> loads with timm's own pretrained loading, which reads the Hugging Face cache (offline here)."""
    timm = pytest.importorskip("timm")
    import huggingface_hub.constants
    from safetensors.torch import save_file

    pretrained = timm.create_model("test_resnet", pretrained=False)
    repo, commit = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in pretrained.state_dict().items()},
        repo / "snapshots" / commit / "model.safetensors",
    )
    # huggingface_hub reads its cache and offline settings into constants when it is imported.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    line = init_from(net, "timm:test_resnet.r160_in1k")
    assert line.endswith("left freshly initialised: fc.weight, fc.bias (2 entries).")
    assert same(net, pretrained, prefix="layer")
    with pytest.raises(UserError, match="timm:no_such_net is not a timm model"):
        init_from(net, "timm:no_such_net")


# --------------------------------------------------------------------------- freeze


class _Tiny(L.LightningDataModule):
    def train_dataloader(self):
        torch.manual_seed(0)
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def fit(model, epochs: int = 1, callbacks=()):
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, datamodule=_Tiny())
    return trainer


def test_frozen_parameters_and_their_norm_statistics_stay_as_loaded():
    net = ResNet20()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = ImageClassifier(net, freeze=["stem.*", "stages.0.*"], scheduler=None)
    assert model.frozen_norms[0] == "stem.1" and all(n.startswith(("stem", "stages.0")) for n in model.frozen_norms)
    trainer = fit(model)
    trained = {n for g in trainer.optimizers[0].param_groups for n in g["param_names"]}
    assert not any(n.startswith(("stem", "stages.0.")) for n in trained) and "fc.weight" in trained
    after = net.state_dict()
    frozen = [k for k in before if k.startswith(("stem.", "stages.0."))]
    assert "stem.1.running_mean" in frozen and all(torch.equal(before[k], after[k]) for k in frozen), "nor statistics"
    assert not torch.equal(before["stages.1.0.bn1.running_mean"], after["stages.1.0.bn1.running_mean"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_a_freeze_pattern_that_matches_nothing_is_one_sentence():
    with pytest.raises(
        UserError, match=r"model.freeze pattern 'backbone\.\*' matches no parameter of LeNet .*conv1.weight"
    ) as info:
        ImageClassifier(LeNet(), freeze=["conv*", "backbone.*"])
    one_sentence(info.value)


class UnfreezeConvsAtEpoch1(BaseFinetuning):
    """Lightning's own fine-tuning callback: net.conv* frozen before training, trainable from epoch 1 at a tenth of the lr."""

    def freeze_before_training(self, pl_module):
        self.freeze([pl_module.net.conv1, pl_module.net.conv2])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group([pl_module.net.conv1, pl_module.net.conv2], optimizer, lr=0.005)


class _Snapshots(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        self.taken = [*getattr(self, "taken", []), pl_module.net.conv1.weight.detach().clone()]


def test_lightnings_base_finetuning_with_the_templates_optimiser():
    net = LeNet()
    initial = net.conv1.weight.detach().clone()
    snapshots = _Snapshots()
    trainer = fit(
        ImageClassifier(net, optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), scheduler=None),
        epochs=2,
        callbacks=[UnfreezeConvsAtEpoch1(), snapshots],
    )
    assert torch.equal(snapshots.taken[0], initial), "frozen in epoch 0"
    assert not torch.equal(snapshots.taken[1], initial), "trained once unfrozen"
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["base", "base/no_decay", "added_2"] and groups[-1]["lr"] == 0.005
    assert groups[-1]["param_names"] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("finetune") / "d.npz")


def fit_args(root, npz, *extra):
    return lenet_fit_args(
        root,
        npz,
        "--test_after_fit=false",
        "--plots.enabled=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        *extra,
    )


def test_the_cli_fine_tunes_from_a_run_with_frozen_convolutions(tmp_path, npz, caplog):
    main(fit_args(tmp_path / "a", npz))
    (source,) = run_dirs(tmp_path / "a", "lenet")
    with caplog.at_level(logging.INFO):
        cli = main(fit_args(tmp_path / "b", npz, f"--model.init_from={source}", "--model.freeze=[conv*]"))
    assert f"model.init_from {source}: copied 10 of 10 state_dict entries." in caplog.text
    start, end = torch.load(source / "net.pt", weights_only=True), torch.load(cli.run_dir / "net.pt", weights_only=True)
    assert all(torch.equal(start[k], end[k]) for k in ("conv1.weight", "conv2.bias")), "frozen"
    assert not torch.equal(start["fc1.weight"], end["fc1.weight"]), "fine-tuned"
    assert cli.model.hparams.freeze == ["conv*"] and cli.model.hparams.init_from == str(source)


def test_the_cli_refuses_a_missing_source_before_anything_runs(tmp_path, npz, capsys):
    with pytest.raises(SystemExit) as exited:
        main(fit_args(tmp_path, npz, f"--model.init_from={tmp_path / 'nowhere'}"))
    assert exited.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: model.init_from {tmp_path / 'nowhere'} does not exist"), line
    assert not run_dirs(tmp_path, "lenet"), "no run directory left behind"


def test_finetune_reads_with_torch_alone():
    """project/finetune.py is the torch-only reader (run/checkpoints.py may reuse it): no Lightning, no machinery."""
    tree = ast.parse((REPO / "project" / "finetune.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in modules if m.startswith(("lightning", "project.run", "project.tools"))}, modules


# --------------------------------------------------------------------------- on the real subset


def subset_fit(root, subset_npz, experiment, *extra):
    return main(subset_fit_args(root, subset_npz, experiment, *extra))


@pytest.mark.slow
def test_fine_tuning_on_the_real_subset_keeps_what_the_source_learned(tmp_path, subset_npz):
    """experiments/finetune.yaml's recipe in small: a LeNet trained for 4 epochs on the real images, then its
    fully connected layers retrained for one epoch on frozen convolutions. The same epoch on frozen *random*
    convolutions (init_from left out) is the control: the copied features must be worth more than chance
    and more than random ones, and stay bit for bit as loaded."""
    source = subset_fit(tmp_path / "source", subset_npz, "lenet", "--trainer.max_epochs=4").run_dir
    finetune = ["--trainer.max_epochs=1", "--model.freeze=[conv*]"]
    tuned = subset_fit(tmp_path / "tuned", subset_npz, "finetune", *finetune, f"--model.init_from={source}")
    control = subset_fit(tmp_path / "control", subset_npz, "finetune", *finetune, "--model.init_from=null")
    tuned_acc, control_acc = (cli.trainer.callback_metrics["test/acc"].item() for cli in (tuned, control))
    assert tuned_acc > 0.3 and tuned_acc > control_acc + 0.05, (tuned_acc, control_acc)
    start, end = (torch.load(p / "net.pt", weights_only=True) for p in (source, tuned.run_dir))
    assert all(torch.equal(start[k], end[k]) for k in start if k.startswith("conv"))
