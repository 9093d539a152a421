"""`python -m project.summary`: each layer's output shape and parameter/buffer counts from a dry run."""

import sys

import pytest
import torch

from project.models import LeNet, ResNet20
from project.summary import layer_table, main
from tests.conftest import REPO, run_bounded


def rows_by_name(rows):
    return {r["name"]: r for r in rows}


def test_lenet_layer_shapes_and_counts():
    rows = rows_by_name(layer_table(LeNet(), (3, 32, 32), batch_size=4))
    assert rows["conv1"]["output"] == "[4, 6, 28, 28]" and rows["conv2"]["output"] == "[4, 16, 10, 10]"
    assert rows["fc1"]["output"] == "[4, 120]" and rows["fc3"]["output"] == "[4, 10]"
    assert rows["LeNet"]["params"] == 62_006 and rows["fc1"]["params"] == 16 * 5 * 5 * 120 + 120


def test_dry_run_changes_nothing_and_leaves_no_hooks():
    net = ResNet20().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rows = rows_by_name(layer_table(net, (3, 32, 32)))
    assert net.training, "the train/eval mode is restored"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "eval mode: no buffer moved"
    assert all(not m._forward_hooks for m in net.modules())
    assert rows["stages.2"]["output"] == "[2, 64, 8, 8]" and rows["input_stats"]["buffers"] == 1 + 3 + 3 + 3
    assert rows["stages.0.0.shortcut"]["params"] == 0 and rows["stages.1.0.shortcut"]["params"] == 16 * 32 + 2 * 32


def test_command_prints_the_table_and_totals(capsys):
    text = main(["--model", "project.models.ResNet18", "--input-size", "3", "64", "64", "--depth", "1"])
    assert "Parameters: 11,173,962 (11,173,962 trainable)" in text
    assert "stages.3" not in text and "  stages " in text, "--depth 1 shows the top-level children only"
    assert "not in the state_dict: input_stats.std" in text
    assert "[2, 10]" in text and "[2, 64, 64, 64]" in text  # 64x64 input: the stem keeps the resolution
    assert text in capsys.readouterr().out


def test_model_from_an_experiment_file_with_arguments():
    text = main(["-c", str(REPO / "experiments/lenet.yaml"), "--init", "num_classes=100", "--batch-size", "1"])
    assert "project.models.LeNet on input [1, 3, 32, 32]" in text and "[1, 100]" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "project.models.LeNet", "--input-size", "3", "28", "28"],
     "LeNet cannot take an input of shape [2, 3, 28, 28]"),
    (["--model", "project.models.Nope"], "Cannot import the model class 'project.models.Nope'"),
    (["--model", "project.models.LeNet", "--init", "depth"], "--init expects key=value"),
])
def test_user_errors_are_one_sentence(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_runs_as_a_command():
    out = run_bounded([sys.executable, "-m", "project.summary", "--model", "project.models.LeNet"], timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "conv2  Conv2d  [2, 16, 10, 10]" in out.stdout


@pytest.mark.parametrize("how", ["config", "model flag"])
def test_a_class_path_that_is_no_module_is_never_called(tmp_path, capsys, how):
    """A config naming os.system with init_args once ran the shell command before the nn.Module check."""
    marker = tmp_path / "created-by-os-system"
    command = f"touch {marker}"
    if how == "config":
        config = tmp_path / "evil.yaml"
        config.write_text(f"model:\n  net:\n    class_path: os.system\n    init_args:\n      command: {command}\n")
        args = ["-c", str(config)]
    else:
        args = ["--model", "os.system", "--init", f"command={command}"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "error: os.system is a builtin_function_or_method, not a torch.nn.Module subclass, so it was not called" in err
    assert not marker.exists(), "the named callable ran"


def test_a_class_that_is_no_module_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "collections.OrderedDict"])
    assert exit_info.value.code == 2
    assert "collections.OrderedDict is the class OrderedDict, not a torch.nn.Module subclass" in capsys.readouterr().err
