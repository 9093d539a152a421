"""The README and the pages under docs/ cannot drift: their CPU commands run as written (tiny-limited,
offline) and write the files and names they promise; every ``python -m project`` command line in them
parses; their numbers (steps per epoch, parameter counts) and the README's layout are checked against
the code; every relative link leads to a file and heading that exist."""

import argparse
import contextlib
import csv
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from project.__main__ import TOOLS
from project.data import CIFAR10DataModule
from project.models import LeNet, ResNet18, ResNet20
from project.run.cli import main
from tests.conftest import REPO, SUBSET, cli_env, run_bounded, run_dirs

#: The README first, then every page under docs/: where a check looks for the text it needs.
PAGES = {path: path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
README = PAGES[REPO / "README.md"]
ALL_PAGES = "\n".join(PAGES.values())
CLI_SUBCOMMANDS = ("fit", "validate", "test", "predict")
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


def outside_code(text: str) -> str:
    """The text with its fenced code blocks blanked out (a ``# comment`` in bash is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    """The ``python -m project`` command lines of a bash block, as argument lists (comments dropped,
    continuation lines joined, the ``bash .ci/setup && .venv/bin/python -m project`` prefix removed;
    ``torchrun ... -m project`` too)."""
    lines = block.replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        line = line.split(" #", 1)[0]
        match = re.search(r"(?:(?:\.venv/bin/)?python|\btorchrun\b.*?) -m project (.*)", line)
        if match:
            found.append(shlex.split(match[1]))
    return found


def sbatch_commands(block: str) -> list[list[str]]:
    """What the bash block's ``sbatch experiments/slurm/<script> ARGS`` lines hand the CLI or the sweep tool,
    as those scripts pass their arguments on (the options the scripts add themselves left out)."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        match = re.search(r"\bsbatch (?:--\S+ )*experiments/slurm/(\w+)\.sbatch (.*)", line.split(" #", 1)[0])
        if not match:
            continue
        script, (first, *rest) = match[1], shlex.split(match[2])
        if script in ("single_node", "multi_node"):  # srun python -m project fit --config "$1" ... "$@"
            found.append(["fit", "--config", first, *rest])
        elif script == "sweep_local":  # exec python -m project sweep "$1" --dir ... "$@"
            found.append(["sweep", first, "--dir", "runs/sweeps/x", *rest])
    return found


def documented_commands(inline: bool = False) -> list[tuple[str, list[str]]]:
    """(page, arguments) of every ``python -m project`` command line in the bash blocks of every page (and,
    with ``inline``, of every inline code span starting ``python -m project``)."""
    found = []
    for path, text in PAGES.items():
        page = str(path.relative_to(REPO))
        for block in bash_blocks(text):
            found += [(page, args) for args in commands(block) + sbatch_commands(block)]
        if inline:
            for span in re.findall(r"`python -m project ([^`]+)`", outside_code(text)):
                found.append((page, span.split()))
    return found


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every Markdown heading outside code blocks."""
    return [(len(m[1]), m[2].strip()) for m in re.finditer(r"^(#{1,6}) (.+)$", outside_code(text), re.M)]


def section(title: str) -> str:
    """The text under the heading ``title`` (e.g. ``"### Run directories"``) up to the next heading of
    its level or above, in whichever page holds it; exactly one page may."""
    level = len(title.split(" ", 1)[0])
    holders = [text for text in PAGES.values() if (level, title[level + 1 :]) in headings(text)]
    assert len(holders) == 1, f"{title!r} is a heading of {len(holders)} pages, not one"
    (text,) = holders
    start = text.index(f"\n{title}\n")
    later = [m.start() for m in re.finditer(rf"\n#{{1,{level}}} ", text) if m.start() > start]
    end = next((i for i in later if i not in code_spans(text)), None)
    return text[start:end]


def code_spans(text: str) -> set[int]:
    return {i for m in re.finditer(r"^```.*?^```", text, re.S | re.M) for i in range(m.start() - 1, m.end())}


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
    # "An evaluation of a run's checkpoint belongs to that run": a folder of its own inside it, no sibling run.
    assert run_dirs(tmp_path / "runs", "lenet") == [run]  # the fit's own, and no other
    (predicted,) = [p.parent for p in run.glob("eval/*-predict/predictions.csv")]
    assert {p.name.rsplit("-", 1)[1] for p in (run / "eval").iterdir()} >= {"validate", "test", "predict"}
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
    quoted = re.search(r"trains (\d+) epochs of ([\d,]+) images \((\d+) steps each\)", ALL_PAGES)
    epochs, images, steps = int(quoted[1]), int(quoted[2].replace(",", "")), int(quoted[3])
    data = CIFAR10DataModule(npz=str(subset_npz), val_size=500, batch_size=128, num_workers=0)
    data.setup("fit")
    assert len(data.train_dataloader().dataset) == images
    assert len(data.train_dataloader()) == steps
    assert f"max_epochs: {epochs}" in (REPO / "experiments" / "lenet.yaml").read_text()


def test_parameter_counts_in_the_experiment_table():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert f"LeNet ({count(LeNet()):,} parameters)" in ALL_PAGES
    assert f"ResNet-18, CIFAR layout ({count(ResNet18()):,})" in ALL_PAGES
    assert f"ResNet-20 ({count(ResNet20()) / 1e6:.2f}M)" in ALL_PAGES


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


# ---- links ----------------------------------------------------------------------------------------
def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces as ``-``, a repeated one numbered ``-1``, ``-2``, ..."""
    found, count = set(), {}
    for _, title in headings(text):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        found.add(f"{slug}-{count[slug]}" if slug in count else slug)
        count[slug] = count.get(slug, 0) + 1
    return found


def relative_links(text: str) -> list[str]:
    """The targets of a page's Markdown links outside code that are not web or mail addresses."""
    prose = re.sub(r"`[^`\n]*`", "", outside_code(text))
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", prose) if not re.match(r"[a-z]+:", t)]


def test_anchors_follow_githubs_rule():
    assert anchors("# A\n## Converting checkpoints to a plain `net.pt`\n## Many runs, one table\n## A\n") == {
        "a",
        "a-1",
        "converting-checkpoints-to-a-plain-netpt",
        "many-runs-one-table",
    }
    assert anchors("```bash\n# not a heading\n```\n") == set()


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    checked = 0
    for path, text in PAGES.items():
        for target in relative_links(text):
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(REPO)} links {target}"
            assert linked.exists(), f"{where}: no such file"
            assert linked.is_relative_to(REPO), f"{where}: outside the repository"
            if anchor:
                assert linked.suffix == ".md", f"{where}: an anchor into a file that is not Markdown"
                assert anchor in anchors(linked.read_text()), f"{where}: {linked.name} has no such heading"
            checked += 1
    assert checked >= 20  # the README's links to every page, and the pages' links back and across


def test_the_readme_links_every_page_under_docs():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(README)}
    orphans = sorted(p.name for p in PAGES if p.parent == REPO / "docs" and p.resolve() not in linked)
    assert not orphans, f"the README links no {orphans}"


# ---- every documented command ---------------------------------------------------------------------
def test_every_documented_command_is_a_subcommand_or_a_tool():
    found = documented_commands(inline=True)
    pages = {page for page, _ in found}
    assert {"README.md", "docs/runs.md", "docs/sweeps.md", "docs/internals.md"} <= pages
    unknown = [(page, " ".join(args)) for page, args in found if args[0] not in (*CLI_SUBCOMMANDS, *TOOLS)]
    assert not unknown, f"not a subcommand of python -m project ({', '.join(CLI_SUBCOMMANDS)}) or a tool: {unknown}"


def test_every_documented_command_line_parses(tmp_path):
    """Every ``python -m project`` line of every page's bash blocks, parsed by its own parser in one
    child process (bounded): the CLI's with ``--print_config`` added (or its ``-h``), a tool's argparse
    parser stopped right after parsing. Nothing trains, nothing is written under runs/."""
    found = documented_commands()
    assert len(found) >= 30
    (tmp_path / "commands.json").write_text(json.dumps([args for _, args in found]))
    proc = run_bounded([sys.executable, "-m", "tests.test_readme", str(tmp_path)], cwd=REPO, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    failed = [
        f"{page}: python -m project {shlex.join(args)}\n  -> {result}"
        for (page, args), result in zip(found, results, strict=True)
        if result != "parsed"
    ]
    assert not failed, "documented commands that do not parse:\n" + "\n".join(failed)


class _Parsed(Exception):
    """A tool's arguments parsed: stop before the tool runs."""


def parse_documented_commands(scratch: Path) -> list[str]:
    """Parse each command of ``scratch/commands.json`` as ``python -m project`` would, from the repository's
    root, and say for each ``parsed`` or why not. A run's ``config.yaml`` placeholder (``runs/lenet/<run>/
    config.yaml``) becomes the resolved config of its experiment, as a fit would save it."""
    results = []
    for args in json.loads((scratch / "commands.json").read_text()):
        args = [placeholder_config(a, scratch) if "<" in a and a.endswith("config.yaml") else a for a in args]
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                if args[0] in TOOLS:
                    parse_tool(args)
                else:
                    asks_help = any(a in ("-h", "--help") or a.endswith(".help") for a in args)
                    main([*args] if asks_help else [*args, "--print_config"])
            results.append("ran instead of stopping after parsing")
        except _Parsed:
            results.append("parsed")
        except SystemExit as exit_:
            results.append("parsed" if exit_.code in (0, None) else f"exit {exit_.code}: {err.getvalue()[-600:]}")
        except Exception as error:  # noqa: BLE001 - reported by the test, with the command
            results.append(f"{type(error).__name__}: {error}")
    return results


def parse_tool(args: list[str]) -> None:
    """Run the tool's ``main`` with ``argparse`` stopping it once its own parser has parsed ``args``."""
    import importlib

    tool = importlib.import_module(TOOLS[args[0]])
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_only
    try:
        tool.main(args[1:])
    finally:
        argparse.ArgumentParser.parse_args = original


def placeholder_config(arg: str, scratch: Path) -> str:
    experiment = re.fullmatch(r"runs/(\w+)/<[^>]+>/config\.yaml", arg)
    assert experiment, f"a config placeholder this test cannot fill: {arg}"
    saved = scratch / "runs" / experiment[1] / "config.yaml"
    if not saved.exists():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["fit", "-c", f"experiments/{experiment[1]}.yaml", "--print_config"])
        saved.parent.mkdir(parents=True)
        saved.write_text(out.getvalue())
    return str(saved)


if __name__ == "__main__":  # the child of test_every_documented_command_line_parses
    scratch = Path(sys.argv[1])
    sys.argv = sys.argv[:1]  # the commands are main()'s arguments, not this process's
    (scratch / "results.json").write_text(json.dumps(parse_documented_commands(scratch)))


def test_the_summary_outputs_in_the_docs_are_what_summary_prints(capsys):
    """The tables of internals.md's "Each layer's output shape before training", printed by the
    commands it names (LeNet's experiment, with the param_groups it shows; ResNet-20's internals)."""
    from project.tools import summary

    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section("## Each layer's output shape before training"), re.S | re.M)
    layers, groups, internals = [text for language, text in blocks if not language]
    printed = summary.main(["-c", "experiments/lenet.yaml", "--param-groups", '[{match: "fc*", lr_scale: 10}]'])
    assert layers.strip() in printed and groups.strip() in printed
    printed = summary.main(["--model", "project.models.ResNet20", "--internals", "--depth", "1", "--hook-on", "fc"])
    # A hook's key is its handle's id, a counter of the process: 0 in a fresh one, as the page shows.
    same = lambda line: re.sub(r"\{\d+: (?=_refresh)", "{<id>: ", line.strip())  # noqa: E731
    printed_lines = {same(line) for line in printed.splitlines()}
    for line in internals.splitlines():  # "..." stands for what the page leaves out
        if line.strip() and "..." not in line:
            assert same(line) in printed_lines, line
    capsys.readouterr()
