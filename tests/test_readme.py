"""The README cannot drift: its CPU commands run as written (tiny-limited, offline) and write the
files and names it promises; its numbers (steps per epoch, parameter counts) and its layout are
checked against the code."""

import csv
import re
import shlex
from pathlib import Path

import pytest
import torch

from project.data import CIFAR10DataModule
from project.models import LeNet, ResNet18, ResNet20
from project.run.cli import main
from tests.conftest import REPO, SUBSET, run_dirs

README = (REPO / "README.md").read_text()
#: What keeps a README command tiny and offline; it is added after the command's own arguments.
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--data.num_workers=0",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    """The ``python -m project`` command lines of a bash block, as argument lists (comments dropped,
    continuation lines joined, the ``bash .ci/setup && .venv/bin/python -m project`` prefix removed)."""
    lines = block.replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        line = line.split(" #", 1)[0]
        match = re.search(r"(?:\.venv/bin/)?python -m project (.*)", line)
        if match:
            found.append(shlex.split(match[1]))
    return found


def section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.find("\n## ", start + len(title) + 2)
    return README[start : end if end > 0 else None]


@pytest.fixture
def offline_run(tmp_path, subset_npz, monkeypatch):
    """The README's offline command (its first bash block after "Offline"), run tiny-limited from the
    repository's root with ../shared beside it, as the README says; returns the run directory."""
    (block,) = [b for b in bash_blocks(section("## Two commands")) if "--data.npz" in b]
    (args,) = commands(block)
    assert args[:3] == ["fit", "-c", "experiments/lenet.yaml"] and "--data.val_size" in args
    monkeypatch.chdir(REPO)
    cli = main([*args, *TINY, f"--trainer.default_root_dir={tmp_path / 'runs'}"])
    (run,) = run_dirs(tmp_path / "runs", "lenet")
    return cli, run


def test_the_offline_command_writes_every_file_the_run_directory_table_lists(offline_run, capfd, caplog):
    cli, run = offline_run
    # rank_zero_info goes through logging (here, while the fixture ran the command)
    err = capfd.readouterr().err + "\n".join(r.getMessage() for r in caplog.get_records("setup"))
    # "It prints `Run directory: /<absolute path>/runs/lenet/<time>-<id>`" (once).
    assert err.count("Run directory: ") == 1 and f"Run directory: {run}" in err
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]+", run.name)
    table = section("### Run directories").split("| file | what it is |", 1)[1].split("\n\n", 1)[0]
    promised = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    assert promised == [
        "config.yaml",
        "metrics.csv",
        "hparams.yaml",
        "checkpoints/best-epochE-stepS.ckpt",
        "checkpoints/last.ckpt",
        "net.pt",
    ]
    for name in promised:
        pattern = name.replace("best-epochE-stepS", "best-epoch[0-9]*-step[0-9]*")
        assert list(run.glob(pattern)), f"the README promises {name} in the run directory"
    header = next(csv.reader((run / "metrics.csv").open()))
    for column in (
        "train/loss_epoch",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_top5",
        "test/acc",
        "lr-SGD/base",
        "lr-SGD/base/no_decay",
    ):
        assert column in header
    hparams = (run / "hparams.yaml").read_text()
    for key in re.findall(r"flattened to dotted names \(([^)]*)\)", table)[0].replace("`", "").split(", "):
        if key != "...":
            assert f"{key}:" in hparams, key
    assert set(torch.load(run / "net.pt", weights_only=True)) == set(LeNet().state_dict())


def test_the_running_experiments_commands_evaluate_and_predict_as_described(offline_run, tmp_path, monkeypatch):
    _, run = offline_run
    block = bash_blocks(section("## Running experiments"))[0]
    evaluate = [args for args in commands(block) if args[0] in ("validate", "test", "predict")]
    assert [a[0] for a in evaluate] == ["validate", "test", "predict"]
    (best,) = run.glob("checkpoints/best-*.ckpt")
    for args in evaluate:
        args = [a.replace("runs/lenet/<run>", str(run)).replace("best-<...>.ckpt", best.name) for a in args]
        main([*args, *TINY, f"--trainer.default_root_dir={tmp_path / 'runs'}", f"--data.npz={SUBSET}"])
    # A saved config keeps its experiment's name: the evaluations are runs of lenet too.
    predictions = [r for r in run_dirs(tmp_path / "runs", "lenet") if (r / "predictions.csv").exists()]
    (predicted,) = predictions
    rows = list(csv.reader((predicted / "predictions.csv").open()))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert rows[0] == ["index", "pred", "pred_name", *[f"prob_{c}" for c in classes]]  # the header the README shows
    assert [int(r[0]) for r in rows[1:]] == list(range(len(rows) - 1))
    for row in rows[1:]:
        probs = [float(p) for p in row[3:]]
        assert int(row[1]) == probs.index(max(probs)) and row[2] == classes[int(row[1])]
        assert sum(probs) == pytest.approx(1, abs=1e-3)


def test_the_print_config_command_says_where_the_run_writes(monkeypatch, capsys):
    block = bash_blocks(section("## Running experiments"))[0]
    (args,) = [a for a in commands(block) if "--print_config" in a]
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("# This run writes every file into a new directory runs/lenet/")
    assert "model:" in out and "class_path: torch.optim.SGD" in out


def test_the_quoted_step_counts_follow_from_the_data(subset_npz):
    # "That run trains 30 epochs of 4,670 images (37 steps each)".
    quoted = re.search(r"trains (\d+) epochs of ([\d,]+) images \((\d+) steps each\)", README)
    epochs, images, steps = int(quoted[1]), int(quoted[2].replace(",", "")), int(quoted[3])
    data = CIFAR10DataModule(npz=str(subset_npz), val_size=500, batch_size=128, num_workers=0)
    data.setup("fit")
    assert len(data.train_dataloader().dataset) == images
    assert len(data.train_dataloader()) == steps
    assert f"max_epochs: {epochs}" in (REPO / "experiments" / "lenet.yaml").read_text()


def test_parameter_counts_in_the_experiment_table():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert f"LeNet ({count(LeNet()):,} parameters)" in README
    assert f"ResNet-18, CIFAR layout ({count(ResNet18()):,})" in README
    assert f"ResNet-20 ({count(ResNet20()) / 1e6:.2f}M)" in README


def layout_paths() -> list[Path]:
    """Every file and folder the README's Layout names, resolved by its indentation."""
    layout = section("## Layout").split("```", 2)[1]
    folder_of_indent: dict[int, Path] = {}
    paths = []
    for line in layout.splitlines():
        match = re.match(r"( *)([^\s,]+(?:, [^\s,]+)*)", line)  # the names: up to the first double space
        if not match or line.strip() == "":
            continue
        indent, names = len(match[1]), match[2]
        if indent >= 20:  # a description's continuation line
            continue
        parent = folder_of_indent.get(indent - 2, REPO) if indent else REPO
        for part in names.split(","):
            part = part.strip()
            if not re.fullmatch(r"[\w.]+/?|[\w]+\.\w+", part):
                continue
            paths.append(parent / part)
            if part.endswith("/"):
                folder_of_indent[indent] = parent / part
    return paths


def test_every_file_of_the_layout_exists():
    for path in layout_paths():
        assert path.exists(), f"README's Layout lists {path.relative_to(REPO)}"


def test_the_layout_names_every_module():
    listed = set(layout_paths())
    modules = {p for p in (REPO / "project").rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(str(p.relative_to(REPO)) for p in modules - listed)
    assert not missing, f"README's Layout does not name {missing}"


def test_experiments_comment_gives_the_offline_command_of_the_readme():
    offline = [c for b in bash_blocks(section("## Two commands")) for c in commands(b) if "--data.npz" in c][0]
    comment = (REPO / "experiments" / "lenet.yaml").read_text().splitlines()[2]
    assert comment.startswith("# Offline: python -m project ")
    assert shlex.split(comment.split("python -m project ", 1)[1]) == offline
