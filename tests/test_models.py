"""Plain models: shapes, parameter counts, state_dict keys, containers, init schemes, no Lightning."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from project.models import (
    INIT_SCHEMES,
    LeNet,
    ResidualBlock,
    ResNet,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet34,
    ResNet56,
    initialize,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TextbookLeNet(nn.Module):
    """LeNet exactly as written in the PyTorch CIFAR-10 tutorial (a different class, same names)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_lenet_matches_the_tutorial():
    net = LeNet()
    assert n_params(net) == 62_006
    assert list(net.state_dict()) == [
        f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2", "fc3") for kind in ("weight", "bias")
    ]
    textbook = TextbookLeNet()
    net.load_state_dict(textbook.state_dict())  # strict: same names, same shapes
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(net(x), textbook(x), rtol=0, atol=0)


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_lenet_output_shape(num_classes):
    assert LeNet(num_classes).fc3.out_features == num_classes
    assert LeNet(num_classes)(torch.randn(3, 3, 32, 32)).shape == (3, num_classes)


@pytest.mark.parametrize(
    ("cls", "params"),
    [(ResNet18, 11_173_962), (ResNet34, 21_282_122), (ResNet20, 272_474), (ResNet32, 466_906), (ResNet56, 855_770)],
)
def test_resnet_depths_parameter_counts(cls, params):
    assert n_params(cls()) == params


def test_resnet_forward_shape_and_containers():
    net = ResNet20(num_classes=7)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert isinstance(net.stages, nn.ModuleList) and len(net.stages) == 3
    assert all(isinstance(stage, nn.Sequential) for stage in net.stages)
    assert [len(stage) for stage in net.stages] == [3, 3, 3]


def test_resnet_depth_and_width_are_arguments():
    net = ResNet(blocks_per_stage=(1, 2), widths=(8, 16), num_classes=3)
    assert [len(s) for s in net.stages] == [1, 2]
    assert net.fc.in_features == 16
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="same length"):
        ResNet(blocks_per_stage=(1, 2), widths=(8,))


def test_residual_block_shortcut():
    same = ResidualBlock(16, 16, stride=1)
    assert isinstance(same.shortcut, nn.Sequential) and len(same.shortcut) == 0
    assert not any(k.startswith("shortcut") for k in same.state_dict())
    down = ResidualBlock(16, 32, stride=2)
    conv, bn = down.shortcut
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d)
    assert down(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    for conv in (down.conv1, down.conv2):
        assert conv.kernel_size == (3, 3) and conv.bias is None


def test_residual_block_supports_full_backward_hooks():
    """No in-place ReLU: a full backward hook on the block fires without a runtime error."""
    block = ResidualBlock(4, 4)
    seen = []
    block.register_full_backward_hook(lambda m, gin, gout: seen.append(gout[0].shape))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    block(x).sum().backward()
    assert seen == [torch.Size([2, 4, 8, 8])]


def test_resnet18_state_dict_keys_are_stable():
    keys = list(ResNet18().state_dict())
    assert keys[:3] == ["stem.0.weight", "stem.1.weight", "stem.1.bias"]
    assert "stages.1.0.shortcut.0.weight" in keys and "stages.0.0.shortcut.0.weight" not in keys
    assert "stages.3.1.bn2.running_mean" in keys and keys[-2:] == ["fc.weight", "fc.bias"]


def _weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_init_schemes(scheme):
    torch.manual_seed(0)
    net = ResNet(blocks_per_stage=(1, 1), widths=(64, 128), init=scheme)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    big = convs[-1]  # 128x128x3x3: enough samples for tight statistics
    w = big.weight.detach()
    fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
    if scheme == "kaiming_normal":
        assert w.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    elif scheme == "xavier_uniform":
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    elif scheme == "normal":
        assert w.std().item() == pytest.approx(0.01, rel=0.05)
    elif scheme == "uniform":
        assert w.abs().max().item() <= 0.05 and w.std().item() == pytest.approx(0.05 / 3**0.5, rel=0.05)
    else:  # PyTorch's default: kaiming_uniform(a=sqrt(5)) -> std = 1/sqrt(3 fan_in)
        assert w.std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.05)
    if scheme != "default":
        assert torch.all(net.fc.bias == 0)


def test_init_scale_and_errors():
    net = initialize(LeNet(), "normal", scale=0.5)
    assert net.fc1.weight.std().item() == pytest.approx(0.5, rel=0.05)
    assert LeNet(init="uniform", init_scale=0.2).fc1.weight.abs().max().item() <= 0.2
    with pytest.raises(ValueError, match="Unknown init scheme 'orthogonal'"):
        initialize(LeNet(), "orthogonal")
    with pytest.raises(ValueError, match="scale must be > 0"):
        initialize(LeNet(), "normal", scale=0)


def test_train_eval_changes_batchnorm_behaviour():
    net = ResNet20().eval()
    x = torch.randn(4, 3, 32, 32)
    before = net.stem[1].running_mean.clone()
    with torch.no_grad():
        out1, out2 = net(x), net(x[:1])
    torch.testing.assert_close(out1[:1], out2, rtol=1e-4, atol=1e-4)  # eval: per-sample output independent of the batch
    assert torch.equal(net.stem[1].running_mean, before)  # and no running-stat updates
    net.train()
    net(x)
    assert not torch.equal(net.stem[1].running_mean, before)


def test_models_do_not_import_lightning():
    code = "import sys, project.models, project.run.checkpoints; print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_parameter_buffer_and_plain_tensor_attribute():
    """What each kind of tensor a module holds does in parameters(), state_dict() and .to() (resnet.py's docstring)."""
    net = ResNet(blocks_per_stage=(1,), widths=(8,), logit_scale=True)
    net.plain = torch.ones(3)  # a plain tensor attribute: nn.Module.__setattr__ files it nowhere
    params, buffers, state = dict(net.named_parameters()), dict(net.named_buffers()), net.state_dict()
    assert {
        "fc.weight",
        "logit_scale.scale",
        "logit_scale.bias",
    } <= params.keys() and "stem.1.running_mean" not in params
    assert {"stem.1.running_mean", "input_stats.count", "input_stats.std"} <= buffers.keys()
    assert {"fc.weight", "logit_scale.scale", "stem.1.running_mean", "input_stats.count"} <= state.keys()
    assert "input_stats.std" not in state, "non-persistent buffer"
    assert not any("plain" in name for name in [*params, *buffers, *state])
    net.to(torch.float64)
    assert (
        net.fc.weight.dtype
        == net.logit_scale["scale"].dtype
        == net.stem[1].running_mean.dtype
        == net.input_stats.std.dtype
        == torch.float64
    )
    assert net.input_stats.count.dtype == torch.int64, "integer buffers keep their dtype"
    assert net.plain.dtype == torch.float32, ".to() does not touch a plain attribute"
    net.to("meta")  # a device move, without a GPU
    assert net.fc.weight.is_meta and net.input_stats.std.is_meta and not net.plain.is_meta


def test_pool_is_a_module_dict_chosen_by_name():
    torch.manual_seed(0)
    net = ResNet(blocks_per_stage=(1,), widths=(8,), num_classes=3, pool="avgmax")
    assert isinstance(net.pool, nn.ModuleDict) and list(net.pool) == ["avg", "max"]
    assert {"pool.avg", "pool.max"} <= {name for name, _ in net.named_modules()}
    assert net.fc.in_features == 16, "avg and max features concatenated"
    net.eval()
    assert not net.pool["max"].training, "a ModuleDict's modules follow .eval()"
    x = torch.randn(2, 3, 32, 32)
    features = net.stages[0](net.stem(x))
    expected = net.fc(torch.cat([features.mean((2, 3)), features.amax((2, 3))], 1))
    torch.testing.assert_close(net(x), expected)
    # Parameter-free pools add no state_dict keys: the default head keeps the classic keys.
    default = ResNet(blocks_per_stage=(1,), widths=(8,), num_classes=3)
    assert list(default.pool) == ["avg"] and list(net.state_dict()) == list(default.state_dict())
    assert list(default.state_dict())[-2:] == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match="Unknown ResNet pool 'mean'"):
        ResNet(pool="mean")

    class PlainDict(nn.Module):  # the mistake a ModuleDict prevents
        def __init__(self):
            super().__init__()
            self.pool = {"avg": nn.AdaptiveAvgPool2d(1)}

    assert [name for name, _ in PlainDict().named_modules()] == [""], "a plain dict's modules are not registered"


def test_logit_scale_is_a_parameter_dict_of_per_class_scale_and_bias():
    net = ResNet20(num_classes=4, logit_scale=True)
    assert isinstance(net.logit_scale, nn.ParameterDict)
    assert net.logit_scale["scale"].shape == net.logit_scale["bias"].shape == (4,)
    assert list(net.state_dict())[-2:] == [
        "logit_scale.bias",
        "logit_scale.scale",
    ]  # a ParameterDict built from a dict sorts its keys
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    plain_logits = net.fc(torch.flatten(net.pool["avg"](_features(net, x)), 1))
    with torch.no_grad():
        net.logit_scale["scale"].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        net.logit_scale["bias"].fill_(0.5)
    torch.testing.assert_close(net(x), plain_logits * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 0.5)
    net(x).sum().backward()
    assert net.logit_scale["scale"].grad is not None, "trained with the rest"
    assert ResNet20().logit_scale is None and not any(k.startswith("logit_scale") for k in ResNet20().state_dict())


def _features(net, x):
    x = net.stem(net.input_stats(x))
    for stage in net.stages:
        x = stage(x)
    return x


def test_model_files_import_torch_and_at_most_one_sibling():
    """Each file in project/models/ can be copied with at most one other file, into a project with only torch."""
    import ast
    from pathlib import Path

    allowed = set(sys.stdlib_module_names) | {"torch"}
    for path in sorted((Path(__file__).parents[1] / "project" / "models").glob("*.py")):
        imported = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported.append(node.module)
        if path.name == "__init__.py":
            continue
        siblings = {name for name in imported if name.startswith("project.")}
        assert all(name.startswith("project.models.") for name in siblings), (path.name, siblings)
        assert len(siblings) <= 1, f"{path.name} imports {sorted(siblings)}"
        assert {name.split(".")[0] for name in imported if not name.startswith("project.")} <= allowed, path.name
