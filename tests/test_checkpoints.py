"""project.run.checkpoints: every checkpoint layout this template writes becomes the plain net's state_dict,
safely, with one clear error for what does not fit; `python -m project convert` converts."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from project.classifier import ImageClassifier
from project.models import LeNet, ResNet20
from project.run.checkpoints import (
    CheckpointError,
    convert,
    load_file,
    load_into,
    plain_state_dict,
    read_checkpoint,
    strip_prefixes,
)
from project.run.cli import main as cli_main
from project.tools.convert import main
from tests.conftest import QUIET, REPO


@pytest.fixture(scope="module")
def lenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return LeNet().state_dict()


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "net.",
        "module.net.",
        "_forward_module.net.",
        "model.net.",
        "_orig_mod.",
        "net._orig_mod.",
        "_orig_mod.net.",
        "module._orig_mod.",
    ],
)
def test_wrapper_prefixes_are_stripped(lenet_state, prefix):
    wrapped = {f"{prefix}{k}": v for k, v in lenet_state.items()}
    if "net." in prefix:  # the classifier's own entries beside the net's are dropped
        wrapped["metrics.val_metrics.acc.tp"] = torch.zeros(1)
    assert same(strip_prefixes(wrapped), lenet_state)


def test_wrapper_parts_inside_keys_are_removed():
    """FSDP units, activation checkpointing and compiled submodules insert parts mid-key."""
    state = {
        "net.stages.0._fsdp_wrapped_module.0.conv1.weight": torch.ones(1),
        "net.stages.0._fsdp_wrapped_module._checkpoint_wrapped_module.1.bn1.bias": torch.ones(1),
        "net.fc._orig_mod.weight": torch.ones(1),
    }
    assert list(strip_prefixes(state)) == ["stages.0.0.conv1.weight", "stages.0.1.bn1.bias", "fc.weight"]


def test_colliding_keys_are_refused():
    with pytest.raises(CheckpointError, match="both become 'conv1.weight'"):
        strip_prefixes({"conv1.weight": torch.ones(1), "module.conv1.weight": torch.ones(1)})
    # torch's consume_prefix renames in place: 'module.module.x' first would overwrite 'module.x' silently.
    with pytest.raises(CheckpointError, match="both become 'module.x'"):
        strip_prefixes({"module.module.x": torch.ones(1), "module.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="both become 'x'"):
        strip_prefixes({"module.x": torch.ones(1), "module.module.x": torch.zeros(1)})


class Holder(torch.nn.Module):
    """A net whose own children are called ``model`` and ``net``: the names wrappers use."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(4, 3)
        self.net = torch.nn.Linear(3, 2)


def test_a_nets_own_children_named_like_wrappers_keep_their_names(tmp_path):
    holder = Holder()
    classifier = ImageClassifier(holder, num_classes=2)
    for wrapped in (classifier.state_dict(), {f"module.{k}": v for k, v in classifier.state_dict().items()}):
        assert same(strip_prefixes(wrapped), holder.state_dict())
    # A plain state_dict of such a net loads as it is, and so does the classifier's checkpoint.
    assert same(load_into(Holder(), holder.state_dict()).state_dict(), holder.state_dict())
    assert same(load_into(Holder(), {"state_dict": classifier.state_dict()}).state_dict(), holder.state_dict())


def test_compiled_model_state_dict_loads_into_the_plain_class(lenet_state):
    """torch.compile(model) wraps it (keys gain _orig_mod.); nothing is compiled until it is called."""
    compiled = torch.compile(LeNet())
    compiled.load_state_dict({f"_orig_mod.{k}": v for k, v in lenet_state.items()})
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    plain = load_into(LeNet(), compiled.state_dict())
    assert same(plain.state_dict(), lenet_state)


def test_classifier_compile_keeps_plain_keys():
    """model.compile compiles the net in place (Module.compile), so the keys never change."""
    model = ImageClassifier(LeNet(), compile=True)
    before = list(model.state_dict())
    model.configure_model()  # what Lightning calls; compilation itself is lazy
    assert model.net._compiled_call_impl is not None and list(model.state_dict()) == before


def test_mismatch_is_one_error_listing_keys_and_shapes(lenet_state):
    with pytest.raises(CheckpointError) as err:
        load_into(LeNet(num_classes=100), {**lenet_state, "extra.weight": torch.zeros(1)})
    message = str(err.value)
    assert "unexpected keys [extra.weight] (1)" in message
    assert (
        "fc3.weight: file (10, 84) vs model (100, 84)" in message and "fc3.bias: file (10,) vs model (100,)" in message
    )
    with pytest.raises(CheckpointError, match=r"missing keys \[conv1.bias"):
        load_into(LeNet(), {k: v for k, v in lenet_state.items() if k != "conv1.bias"})


def test_loading_is_weights_only_by_default(tmp_path, lenet_state):
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": lenet_state, "extra": os.path.join}, path)  # a pickled function
    with pytest.raises(CheckpointError, match="could run code"):
        read_checkpoint(path)
    assert same(plain_state_dict(read_checkpoint(path, weights_only=False)), lenet_state)


def write_sharded_checkpoint(path, lenet_state, meta: dict | None = None) -> None:
    """A torch.distributed.checkpoint directory in the layout of Lightning's FSDP sharded checkpoints
    ({"model": ..., "optimizer_0": ...} plus meta.pt), written by one process without a process group."""
    state = {
        "model": {f"net.{k}": v.clone() for k, v in lenet_state.items()},
        "optimizer_0": {"state": {"net.conv1.weight": {"momentum_buffer": torch.ones(6, 3, 5, 5)}}},
    }
    dcp.save(state, checkpoint_id=path, no_dist=True)
    torch.save(meta or {"epoch": 3, "global_step": 12}, path / "meta.pt")


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_sharded_checkpoint_directory_is_read_in_one_process(tmp_path, lenet_state):
    path = tmp_path / "last.ckpt"
    write_sharded_checkpoint(path, lenet_state)
    checkpoint = read_checkpoint(path)
    assert checkpoint["epoch"] == 3 and "optimizer_0" not in checkpoint, (
        "metadata from meta.pt, optimiser state skipped"
    )
    assert same(plain_state_dict(checkpoint), lenet_state)
    assert same(load_into(LeNet(), path).state_dict(), lenet_state)
    convert(path, tmp_path / "net.pt")
    assert same(torch.load(tmp_path / "net.pt", weights_only=True), lenet_state)


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_sharded_checkpoint_metadata_cannot_run_code(tmp_path, lenet_state):
    path = tmp_path / "evil.ckpt"
    write_sharded_checkpoint(path, lenet_state)
    payload = _RunsCode()
    payload.marker = tmp_path / "pwned"
    with open(path / ".metadata", "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match="could run code"):
        read_checkpoint(path)
    assert not payload.marker.exists()


class _RunsCodeWhenLoaded:
    """A non-tensor entry that creates ``marker`` when unpickled without restrictions."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
@pytest.mark.parametrize("where", ["model", "optimizer_0"])
def test_a_sharded_checkpoint_entry_cannot_run_code(tmp_path, lenet_state, capsys, where):
    """torch.distributed.checkpoint saves every non-tensor entry as a pickle inside the .distcp data and
    its planners read them with weights_only=False: `python -m project convert <dir>` once ran one.
    The model entry is refused by the conversion and load_into; one in the optimiser state (which they
    skip) by the check a fit makes before Lightning's FSDP loader reads the directory."""
    path = tmp_path / "evil.ckpt"
    marker = tmp_path / "pwned"
    state = {
        "model": {f"net.{k}": v.clone() for k, v in lenet_state.items()},
        "optimizer_0": {"state": {}, "param_groups": [{"lr": 0.1, "params": ["net.conv1.weight"]}]},
    }
    state[where]["payload"] = _RunsCodeWhenLoaded(marker)
    dcp.save(state, checkpoint_id=path, no_dist=True)
    torch.save({"epoch": 0, "global_step": 1}, path / "meta.pt")
    from project.run.checkpoints import check_distributed_checkpoint

    with pytest.raises(CheckpointError, match="could run code"):
        check_distributed_checkpoint(path)
    if where == "model":
        with pytest.raises(CheckpointError, match=r"holds an entry \(model.payload\).*could run code"):
            read_checkpoint(path)
        with pytest.raises(CheckpointError, match="could run code"):
            load_into(LeNet(), path)
        with pytest.raises(SystemExit) as exited:
            main([str(path), str(tmp_path / "net.pt")])
        assert exited.value.code == 2 and not (tmp_path / "net.pt").exists()
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "could run code" in err and len(err.splitlines()) == 1
    assert not marker.exists(), "the pickled payload ran"


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_a_plain_sharded_checkpoint_passes_the_check(tmp_path, lenet_state):
    from project.run.checkpoints import check_distributed_checkpoint

    path = tmp_path / "last.ckpt"
    write_sharded_checkpoint(path, lenet_state)
    check_distributed_checkpoint(path)


def test_deepspeed_directory(tmp_path, lenet_state):
    """The ZeRO 1/2 layout, written here by torch.save since DeepSpeed is not installed (a stand-in
    for its files): the full weights sit under "module", behind Lightning's _forward_module. prefix."""
    ckpt = tmp_path / "epoch=0.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    torch.save(
        {"module": {f"_forward_module.net.{k}": v for k, v in lenet_state.items()}, "global_step": 5},
        ckpt / "checkpoint" / "mp_rank_00_model_states.pt",
    )
    assert same(plain_state_dict(read_checkpoint(ckpt)), lenet_state)
    torch.save({"module": {}}, ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save({}, ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="ZeRO stage 3.*zero_to_fp32.py"):
        read_checkpoint(ckpt)


def test_unknown_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither a torch.distributed.checkpoint"):
        read_checkpoint(tmp_path)


def test_convert_command_on_a_real_lightning_checkpoint(tmp_path, tiny_npz, capsys):
    cli = cli_main(
        [
            "fit",
            "-c",
            str(REPO / "experiments/resnet20.yaml"),
            f"--data.npz={tiny_npz}",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--data.val_size=16",
            "--data.batch_size=16",
            "--test_after_fit=false",
            "--plots.enabled=false",
        ]
    )
    run = cli.run_dir
    out = main([str(run / "checkpoints/last.ckpt"), str(tmp_path / "converted.pt")])
    assert "Wrote" in capsys.readouterr().out
    converted, exported = torch.load(out, weights_only=True), torch.load(run / "net.pt", weights_only=True)
    assert same(converted, exported) and "input_stats.count" in converted and "input_stats.std" not in converted
    load_into(ResNet20(), out)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.ckpt"), str(tmp_path / "x.pt")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_convert_runs_as_a_module_with_torch_alone(tmp_path, lenet_state):
    """The command imports no Lightning: a collaborator with only torch can run it."""
    torch.save({"state_dict": {f"net.{k}": v for k, v in lenet_state.items()}}, tmp_path / "x.ckpt")
    code = (
        "import sys, runpy; sys.argv = ['x', 'convert', sys.argv[1], sys.argv[2]]; runpy.run_module('project', run_name='__main__');"
        "assert not any(m.startswith('lightning') for m in sys.modules), 'lightning was imported'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x.ckpt"), str(tmp_path / "net.pt")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert same(torch.load(tmp_path / "net.pt", weights_only=True), lenet_state)


# --------------------------------------------------------------------------- the converter's path arguments


def _snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _convert_fails(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, f"not one line: {err!r}"
    return err


@pytest.mark.parametrize("spelling", ["same", "relative", "dotted", "symlink", "hardlink"])
def test_converter_refuses_to_overwrite_its_input(tmp_path, monkeypatch, capsys, lenet_state, spelling):
    """`python -m project convert X.ckpt X.ckpt` once replaced the checkpoint with its plain weights."""
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in lenet_state.items()}, "epoch": 3}, ckpt)
    monkeypatch.chdir(tmp_path)
    out = {
        "same": ckpt,
        "relative": "last.ckpt",
        "dotted": tmp_path / "sub" / ".." / "last.ckpt",
        "symlink": tmp_path / "link.pt",
        "hardlink": tmp_path / "hard.pt",
    }[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        out.symlink_to(ckpt)
    if spelling == "hardlink":
        os.link(ckpt, out)
    before = _snapshot(tmp_path)
    err = _convert_fails(capsys, [ckpt, out])
    assert "is the checkpoint being converted" in err and "give another output path" in err
    assert _snapshot(tmp_path) == before
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3, "the checkpoint is intact"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("input missing", "does not exist; check the path"),
        ("input is a plain directory", "is a directory but neither a torch.distributed.checkpoint"),
        ("input is not a checkpoint", "is not a PyTorch checkpoint (not a torch.save archive)"),
        ("input is empty", "is not a PyTorch checkpoint (not a torch.save archive)"),
        ("output is a directory", "is a directory; give a file path"),
        ("output directory missing", "does not exist; create it first"),
        ("output directory is a file", "is not a directory; create it first"),
        ("output inside a sharded checkpoint", "lies inside the checkpoint directory"),
        ("output name too long", "Cannot write"),
    ],
)
def test_converter_path_mistakes_are_one_sentence_and_write_nothing(tmp_path, capsys, lenet_state, case, message):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in lenet_state.items()}}, ckpt)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "outdir").mkdir()
    source, out = ckpt, tmp_path / "net.pt"
    if case == "input missing":
        source = tmp_path / "missing.ckpt"
    elif case == "input is a plain directory":
        source = tmp_path / "plain_dir"
    elif case == "input is not a checkpoint":
        source = tmp_path / "notes.txt"
    elif case == "input is empty":
        source = tmp_path / "empty.ckpt"
    elif case == "output is a directory":
        out = tmp_path / "outdir"
    elif case == "output directory missing":
        out = tmp_path / "nowhere" / "net.pt"
    elif case == "output directory is a file":
        out = tmp_path / "notes.txt" / "net.pt"
    elif case == "output inside a sharded checkpoint":
        source = tmp_path / "sharded.ckpt"
        write_sharded_checkpoint(source, lenet_state)
        out = source / "net.pt"
    elif case == "output name too long":
        out = tmp_path / ("x" * 300 + ".pt")  # the write itself fails (ENAMETOOLONG), also for root
    before = _snapshot(tmp_path)
    err = _convert_fails(capsys, [source, out])
    assert message in err
    assert _snapshot(tmp_path) == before, "nothing was written"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into any directory")
def test_converter_refuses_an_unwritable_output_directory(tmp_path, capsys, lenet_state):
    torch.save(lenet_state, tmp_path / "net.pt")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        err = _convert_fails(capsys, [tmp_path / "net.pt", locked / "out.pt"])
        assert "is not writable" in err and not any(locked.iterdir())
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- torch.save's legacy format


def test_legacy_format_files_are_read(tmp_path, capsys, lenet_state):
    """torch.save(..., _use_new_zipfile_serialization=False) writes no zip archive; it was refused as truncated."""
    net = tmp_path / "net.pt"
    torch.save(lenet_state, net, _use_new_zipfile_serialization=False)
    assert same(load_into(LeNet(), net).state_dict(), lenet_state)
    assert same(read_checkpoint(net), lenet_state)
    assert same(load_file(net, mmap=True), lenet_state), "a legacy file cannot be mapped: it is read whole"
    ckpt = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in lenet_state.items()},
            "epoch": 2,
            "global_step": 8,
            "hyper_parameters": {"lr": 0.1, "net": {"class_path": "project.models.LeNet"}},
        },
        ckpt,
        _use_new_zipfile_serialization=False,
    )
    assert same(convert(ckpt, tmp_path / "a.pt"), lenet_state)
    main([str(ckpt), str(tmp_path / "b.pt")])
    assert "Wrote" in capsys.readouterr().out
    assert same(torch.load(tmp_path / "b.pt", weights_only=True), lenet_state)


def test_legacy_format_is_still_weights_only_and_truncation_is_clear(tmp_path, lenet_state):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": lenet_state, "extra": os.path.join}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="could run code"):
        read_checkpoint(evil)
    assert same(plain_state_dict(read_checkpoint(evil, weights_only=False)), lenet_state)
    legacy = tmp_path / "legacy.pt"
    torch.save(lenet_state, legacy, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(cut)


def test_cli_evaluates_a_legacy_format_checkpoint(tmp_path, tiny_npz):
    cli = cli_main(
        [
            "fit",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--data.npz={tiny_npz}",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--data.val_size=16",
            "--plots.enabled=false",
        ]
    )
    last = cli.run_dir / "checkpoints/last.ckpt"
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(last, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    fresh = cli_main(
        [
            "validate",
            "-c",
            str(REPO / "experiments/lenet.yaml"),
            f"--data.npz={tiny_npz}",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
            "--data.val_size=16",
            f"--ckpt_path={legacy}",
        ]
    )
    assert same(fresh.model.net.state_dict(), plain_state_dict(torch.load(last, weights_only=True))), (
        "the checkpoint's weights were validated"
    )
