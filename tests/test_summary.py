"""`python -m project.tools.summary`: each layer's output shape and parameter/buffer counts from a dry run."""

import re
import sys

import pytest
import torch
import yaml

from project.models import LeNet, ResNet20
from project.tools.summary import hook_demo, layer_table, main, module_internals
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "project.models.LeNet", "--input-size", "3", "28", "28"],
            "LeNet cannot take an input of shape [2, 3, 28, 28]",
        ),
        (["--model", "project.models.Nope"], "Cannot import the model class 'project.models.Nope'"),
        (["--model", "project.models.LeNet", "--init", "depth"], "--init expects key=value"),
    ],
)
def test_user_errors_are_one_sentence(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_runs_as_a_command():
    out = run_bounded(
        [sys.executable, "-m", "project", "summary", "--model", "project.models.LeNet"], timeout=120, cwd=REPO
    )
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
    assert (
        "error: os.system is a builtin_function_or_method, not a torch.nn.Module subclass, so it was not called" in err
    )
    assert not marker.exists(), "the named callable ran"


def test_a_class_that_is_no_module_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "collections.OrderedDict"])
    assert exit_info.value.code == 2
    assert "collections.OrderedDict is the class OrderedDict, not a torch.nn.Module subclass" in capsys.readouterr().err


def test_internals_print_each_modules_dictionaries():
    text = main(["--model", "project.models.ResNet20", "--internals", "--init", "logit_scale=true", "pool=avgmax"])
    assert "Layer  " not in text, "--internals replaces the layer table"
    assert (
        "_modules     {stem: Sequential, input_stats: InputStatistics, stages: ModuleList, pool: ModuleDict, fc: Linear, logit_scale: ParameterDict}"
        in text
    )
    assert "_parameters  {weight: [16, 3, 3, 3], bias: None}" in text, "a conv without bias keeps a None entry"
    assert "_buffers     {running_mean: [16], running_var: [16], num_batches_tracked: [] int64}" in text
    assert (
        "_buffers     {count: [] int64, mean: [3], var: [3], std: [3]}  (non-persistent, not in state_dict: std)"
        in text
    )
    assert re.search(r"hooks        \{_load_state_dict_post_hooks: \{\d+: _refresh_after_load\}\}", text)
    assert "_modules     {avg: AdaptiveAvgPool2d, max: AdaptiveMaxPool2d}" in text
    assert "logit_scale (ParameterDict)\n    _parameters  {bias: [10], scale: [10]}" in text


def test_internals_show_a_hook_registered_and_removed():
    net = LeNet()
    net.plain = torch.zeros(2)
    rows = module_internals(net)
    assert (
        rows["hooks"] == "all 8 hook dictionaries empty"
        and "plain tensors" in rows
        and "plain: [2]" in rows["plain tensors"]
    )
    handle = net.fc3.register_forward_hook(lambda *args: None)
    assert module_internals(net.fc3)["hooks"] == f"{{_forward_hooks: {{{handle.id}: <lambda>}}}}"
    handle.remove()
    assert module_internals(net.fc3)["hooks"] == "all 8 hook dictionaries empty"
    lines = hook_demo(net, "fc3", (3, 32, 32)).splitlines()
    assert lines[1] == "before register_forward_hook: {}"
    assert re.fullmatch(r"after handle = fc3.register_forward_hook\(record_output\): \{\d+: record_output\}", lines[2])
    assert lines[3] == "one forward pass: record_output saw [2, 10]" and lines[4] == "after handle.remove(): {}"
    assert not net.fc3._forward_hooks and net.training


def test_param_groups_of_the_config_are_shown(tmp_path):
    config = tmp_path / "groups.yaml"
    optimizer = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.001}}
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "net": {"class_path": "project.models.LeNet"},
                    "optimizer": optimizer,
                    "param_groups": [{"match": "fc*", "lr_scale": 10}],
                }
            }
        )
    )
    text = main(["-c", str(config)])
    assert "Parameter groups (torch.optim.SGD: model.optimizer.lr 0.1, model.optimizer.weight_decay 0.001" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[-4:]}
    assert rows["fc*"][:4] == ["fc*", "1", "0.001", "58,920"] and rows["fc*/no_decay"][:4] == [
        "fc*/no_decay",
        "1",
        "0",
        "214",
    ]
    assert rows["base"][:4] == ["base", "0.1", "0.001", "2,850"] and rows["base/no_decay"][1:3] == ["0.1", "0"]
    # Without a config: the default optimizer's lr (0.05) and weight decay (5e-4); a group's own weight decay wins.
    shown = main(
        ["--model", "project.models.LeNet", "--param-groups", "[{match: 'conv*', lr_scale: 0.5, weight_decay: 0.01}]"]
    )
    assert "model.optimizer.lr 0.05, model.optimizer.weight_decay 0.0005" in shown
    assert "conv*           0.025          0.01" in shown and "base             0.05        0.0005" in shown


def test_param_groups_under_another_optimizer_use_its_own_defaults(tmp_path):
    """AdamW given only its lr decays at AdamW's own default (0.01), as ImageClassifier would train it."""
    config = tmp_path / "adamw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "net": {"class_path": "project.models.LeNet"},
                    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
                    "param_groups": [{"match": "fc*", "lr_scale": 2}],
                }
            }
        )
    )
    text = main(["-c", str(config)])
    assert "Parameter groups (torch.optim.AdamW: model.optimizer.lr 0.003, model.optimizer.weight_decay 0.01" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[-4:]}
    assert rows["fc*"][1:3] == ["0.006", "0.01"] and rows["base"][1:3] == ["0.003", "0.01"]
    assert rows["base/no_decay"][1:3] == ["0.003", "0"]


def test_the_old_lr_key_is_refused(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "net": {"class_path": "project.models.LeNet"},
                    "lr": 0.1,
                    "param_groups": [{"match": "fc*", "lr_scale": 10}],
                }
            }
        )
    )
    with pytest.raises(SystemExit) as exited:
        main(["-c", str(config)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "model.lr is the old form" in err and "optimizer: {class_path: torch.optim.SGD, init_args: {lr: ...}}" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "project.models.LeNet", "--param-groups", "[{match: 'nope*'}]"],
            "'nope*' (match 'nope*') matches no trainable parameter of LeNet",
        ),
        (
            ["--model", "project.models.LeNet", "--internals", "--hook-on", "fc9"],
            "--hook-on 'fc9' is not a module of LeNet",
        ),
    ],
)
def test_internals_and_param_group_mistakes(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "is empty"),
        (bytes(range(256)), "is not a text file"),
        (b"model:\n  net: [project.models.LeNet\n", "is not valid YAML at line 3"),
        (
            b"model:\n  net:\n    class_path: project.models.LeNet\n  net: project.models.ResNet20\n",
            "the key 'net' is given twice (lines 2 and 4)",
        ),
        (b"- model\n", "is a list, not a mapping of options"),
        (b"model: 5\n", "model is a int, not a mapping"),
        (
            b"model:\n  net:\n    class_path: project.models.LeNet\n    init_args: [1]\n",
            "needs a class_path string and an init_args mapping",
        ),
        (b"model: {net: !!python/object/apply:os.getpid []}\n", "a Python object is never built"),
        (b"trainer: {}\n", "has no model.net.class_path"),
    ],
    ids=[
        "empty",
        "binary",
        "syntax",
        "key-twice",
        "list",
        "model-not-a-mapping",
        "init-args-list",
        "python-object",
        "no-net",
    ],
)
def test_a_malformed_config_is_one_sentence(tmp_path, capsys, content, words):
    """Each once ended in a traceback (AttributeError, yaml's error naming `<unicode string>`) or,
    with a key given twice, summarised whichever came last."""
    config = tmp_path / "experiment.yaml"
    config.write_bytes(content)
    with pytest.raises(SystemExit) as exited:
        main(["-c", str(config)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err
