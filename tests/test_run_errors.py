"""Run-lifecycle mistakes end in one sentence and exit status 2, and leave no run directory behind."""

import errno
import os

import pytest

from tests.conftest import QUIET, make_npz, run_cli, run_dirs


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_ckpt_path_last_without_any_run_is_refused(tmp_path, subcommand):
    """`validate --ckpt_path last` in an experiment that has no run with a last checkpoint once
    evaluated randomly initialised weights and exited 0."""
    npz = make_npz(tmp_path / "d.npz")
    root = tmp_path / "runs"
    out = run_cli(
        [
            subcommand,
            "-c",
            "experiments/lenet.yaml",
            f"--data.npz={npz}",
            f"--trainer.default_root_dir={root}",
            *QUIET,
            "--data.val_size=16",
            "--ckpt_path=last",
        ],
        timeout=180,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "last" in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert run_dirs(root, "lenet") == [], "no run directory is created"


# ---- every user mistake: one sentence, exit status 2, nothing written -----------------------------------

from project.run import tracking  # noqa: E402
from project.run.cli import main  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.test_runs import snapshot  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A root holding one earlier run (whose files must never change), a file, a folder and a tiny npz."""
    home = tmp_path_factory.mktemp("mistakes")
    make_npz(home / "d.npz")
    (home / "a-file").write_text("not a directory")
    (home / "a-folder").mkdir()
    earlier = home / "runs" / "lenet" / "20250101-000000-abcdef"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "config.yaml").write_text("name: lenet\n")
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"earlier results")
    for name, content in CONFIG_FILES.items():
        (home / name).write_bytes(content)
    return home


#: -c files that are not usable experiments; each must be refused naming the file.
CONFIG_FILES = {
    "empty.yaml": b"",
    "comments.yaml": b"# nothing but a comment\n",
    "binary.yaml": bytes(range(256)),
    "syntax.yaml": b"model:\n  lr: [0.1\ntrainer:\n  max_epochs: 1\n",
    "twice.yaml": b"trainer:\n  max_epochs: 1\n  max_epochs: 2\n",
    "list.yaml": b"- model\n- trainer\n",
    "python-object.yaml": b"seed_everything: !!python/object/apply:os.getpid []\n",
    "no-layer.yaml": b"trainer:\n  callbacks:\n    - class_path: project.callbacks.ActivationStatistics\n"
    b"      init_args: {layers: ['nomatch*']}\n",
}


def with_config(name):
    return lambda h: fit_args(h, "-c", str(h / name))


def fit_args(home, *extra, root=None, npz=True):
    return [
        "fit",
        "-c",
        str(REPO / "experiments/lenet.yaml"),
        *([f"--data.npz={home / 'd.npz'}"] if npz else []),
        *QUIET,
        "--data.val_size=16",
        "--data.batch_size=8",
        "--trainer.max_epochs=1",
        "--test_after_fit=false",
        "--plots.enabled=false",
        f"--trainer.default_root_dir={root or home / 'runs'}",
        *extra,
    ]


#: (id, arguments given the workspace, words the sentence must contain)
MISTAKES = [
    ("root-is-a-file", lambda h: fit_args(h, root=h / "a-file"), "is a file"),
    ("run-dir-is-a-file", lambda h: fit_args(h, f"--run_dir={h / 'a-file'}"), "is a file"),
    ("ckpt-path-missing", lambda h: fit_args(h, f"--ckpt_path={h / 'missing.ckpt'}"), "does not exist"),
    ("ckpt-path-is-a-folder", lambda h: fit_args(h, f"--ckpt_path={h / 'a-folder'}"), "is a directory"),
    ("ckpt-path-is-not-a-checkpoint", lambda h: fit_args(h, f"--ckpt_path={h / 'a-file'}"), "not a PyTorch checkpoint"),
    ("fit-from-best", lambda h: fit_args(h, "--ckpt_path=best"), "fit --ckpt_path best found no best*.ckpt"),
    ("npz-missing", lambda h: fit_args(h, f"--data.npz={h / 'missing.npz'}"), "does not exist"),
    ("npz-is-a-folder", lambda h: fit_args(h, f"--data.npz={h / 'a-folder'}"), "a-folder"),
    ("data-dir-is-a-file", lambda h: fit_args(h, f"--data.data_dir={h / 'a-file'}", npz=False), "is not a directory"),
    # Arguments of model.optimizer's and model.scheduler's classes: torch checks some, the model the rest.
    (
        "learning-rate",
        lambda h: fit_args(h, "--model.optimizer.lr=-0.1"),
        "error: model.optimizer refused its arguments: Invalid learning rate: -0.1",
    ),
    (
        "momentum",
        lambda h: fit_args(h, "--model.optimizer.momentum=1.5"),
        "error: model.optimizer.momentum must be in [0, 1), got 1.5.",
    ),
    (
        "betas",
        lambda h: fit_args(h, "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.betas=[2,0.9]"),
        "error: model.optimizer refused its arguments: Invalid beta parameter at index 0: 2.0",
    ),
    (
        "step-size",
        lambda h: fit_args(
            h, "--model.scheduler", "torch.optim.lr_scheduler.StepLR", "--model.scheduler.step_size", "0"
        ),
        "error: model.scheduler.step_size must be at least 1, got 0.",
    ),
    ("max-epochs", lambda h: fit_args(h, "--trainer.max_epochs=-5"), "max_epochs"),
    (
        "last-checkpoint-every-n",
        lambda h: fit_args(h, "--last_checkpoint.every_n_train_steps=-1"),
        "every_n_train_steps",
    ),
    ("num-workers", lambda h: fit_args(h, "--data.num_workers=-1"), "data.num_workers"),
    ("batch-size", lambda h: fit_args(h, "--data.batch_size=0"), "data.batch_size"),
    (
        "net-rejects-its-arguments",
        lambda h: fit_args(h, "--model.net.init_args.init=normal", "--model.net.init_args.init_scale=-1"),
        "Init scale",
    ),
    (
        "too-many-cpu-processes",
        lambda h: fit_args(h, "--trainer.accelerator=cpu", "--trainer.devices=4096"),
        "trainer.devices",
    ),
    # -c files: named, with the line where there is one.
    ("config-empty", with_config("empty.yaml"), "empty.yaml is empty"),
    ("config-only-comments", with_config("comments.yaml"), "comments.yaml is empty"),
    ("config-binary", with_config("binary.yaml"), "binary.yaml is not a text file"),
    ("config-syntax", with_config("syntax.yaml"), "syntax.yaml is not valid YAML at line 3"),
    ("config-key-twice", with_config("twice.yaml"), "twice.yaml: the key 'max_epochs' is given twice (lines 2 and 3)"),
    ("config-not-a-mapping", with_config("list.yaml"), "list.yaml is a list, not a mapping"),
    ("config-python-object", with_config("python-object.yaml"), "a Python object is never built"),
    # Values Lightning or numpy refused late (a ZeroDivisionError mid-fit, a traceback after the run
    # directory existed) or not at all.
    (
        "accumulate-zero",
        lambda h: fit_args(h, "--trainer.accumulate_grad_batches=0"),
        "accumulate_grad_batches must be at least 1",
    ),
    (
        "seed-negative",
        lambda h: fit_args(h, "--seed_everything=-1"),
        "seed_everything must be true, false or a whole number",
    ),
    ("seed-too-large", lambda h: fit_args(h, "--seed_everything=4294967296"), "from 0 to 4294967295"),
    (
        "seed-not-a-number",
        lambda h: fit_args(h, "--seed_everything=abc"),
        ('Parser key "seed_everything"', "Given value: abc"),
    ),
    (
        "precision-unknown",
        lambda h: fit_args(h, "--trainer.precision=15"),
        ('Parser key "trainer.precision"', "Given value: 15"),
    ),
    (
        "batch-size-not-a-number",
        lambda h: fit_args(h, "--data.batch_size=abc"),
        ('Parser key "batch_size"', "Expected a <class 'int'>. Got value: abc"),
    ),
    (
        "clip-negative",
        lambda h: fit_args(h, "--trainer.gradient_clip_val=-1"),
        "gradient_clip_val must be a finite number >= 0",
    ),
    (
        "clip-not-a-number",
        lambda h: fit_args(h, "--trainer.gradient_clip_val=abc"),
        ('Parser key "trainer.gradient_clip_val"', "Given value: abc"),
    ),
    (
        "check-val-every-zero",
        lambda h: fit_args(h, "--trainer.check_val_every_n_epoch=0"),
        "check_val_every_n_epoch must be at least 1",
    ),
    ("val-check-interval-zero", lambda h: fit_args(h, "--trainer.val_check_interval=0"), "val_check_interval must be"),
    (
        "val-check-interval-fraction",
        lambda h: fit_args(h, "--trainer.val_check_interval=1.5"),
        "fraction of the epoch in (0, 1]",
    ),
    ("devices-negative", lambda h: fit_args(h, "--trainer.devices=-2"), "trainer.devices must be at least 1"),
    ("limit-train-batches", lambda h: fit_args(h, "--trainer.limit_train_batches=-1"), "limit_train_batches"),
    ("limit-val-batches", lambda h: fit_args(h, "--trainer.limit_val_batches=1.5"), "limit_val_batches"),
    ("max-steps", lambda h: fit_args(h, "--trainer.max_steps=-5"), "max_steps"),
    ("num-nodes", lambda h: fit_args(h, "--trainer.num_nodes=0"), "num_nodes"),
    ("eval-batch-size", lambda h: fit_args(h, "--data.eval_batch_size=0"), "data.eval_batch_size"),
    ("val-size-negative", lambda h: fit_args(h, "--data.val_size=-3"), "data.val_size"),
    (
        "val-size-not-a-number",
        lambda h: fit_args(h, "--data.val_size=x"),
        ('Parser key "val_size"', "x"),
    ),
    (
        "val-size-fraction-above-one",
        lambda h: fit_args(h, "--data.val_size=1.5"),
        "or a fraction between 0 and 1, got 1.5",
    ),
    (
        "data-url-not-http",
        lambda h: fit_args(h, "--data.url=file:///etc/passwd", npz=False),
        "data.url must be an http",
    ),
    ("layer-pattern-matches-nothing", with_config("no-layer.yaml"), "ActivationStatistics matched no layer of LeNet"),
]


def one_sentence(capsys) -> str:
    """The error report: one ``error:`` line, with nothing but its own details after it (jsonargparse's
    report on a value names the key, then the value it refused), and no traceback or usage screen."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    return "\n".join(lines[errors[0] :])


@pytest.mark.parametrize("make_args, words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_user_mistake_is_one_sentence_and_writes_nothing(workspace, capsys, make_args, words):
    """Each of these once ended in a traceback (or, for a checkpoint that cannot be read, left a
    locked run directory behind)."""
    before = snapshot(workspace)
    with pytest.raises(SystemExit) as exited:
        main(make_args(workspace))
    assert exited.value.code == 2
    report = one_sentence(capsys)
    assert all(word in report for word in ((words,) if isinstance(words, str) else words)), report
    assert snapshot(workspace) == before, "no new directory, no changed file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into any folder")
def test_an_unwritable_root_is_one_sentence(workspace, capsys):
    locked = workspace / "read-only"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as exited:
            main(fit_args(workspace, root=locked / "runs"))
        assert exited.value.code == 2 and "cannot write" in one_sentence(capsys)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_a_value_the_parser_refuses_names_it_and_writes_nothing(workspace, capsys):
    before = snapshot(workspace)
    with pytest.raises(SystemExit) as exited:
        main(fit_args(workspace, "--model.net.init_args.init=bogus"))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.startswith("error:") and '"init"' in err and "Got value: bogus" in err  # the key, the value
    assert snapshot(workspace) == before


@pytest.mark.parametrize("where", ["checkpoint", "metrics.csv"])
def test_a_full_disk_is_one_sentence(workspace, capsys, monkeypatch, where):
    """The disk fills up while a checkpoint is written (fsync fails, as it does with ENOSPC, naming no
    file) or while metrics.csv is appended to: one sentence, not a traceback; the earlier run is intact."""
    import project.run.checkpoints

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        monkeypatch.setattr(project.run.checkpoints.os, "fsync", full)
    else:
        monkeypatch.setattr(tracking.ContinuingExperimentWriter, "save", full)
    earlier = snapshot(workspace / "runs" / "lenet" / "20250101-000000-abcdef")
    with pytest.raises(SystemExit) as exited:
        main(fit_args(workspace))
    assert exited.value.code == 2
    assert one_sentence(capsys).startswith(
        "error: No space left on the device while writing the run's files; free some space"
    )
    assert snapshot(workspace / "runs" / "lenet" / "20250101-000000-abcdef") == earlier


# ---- bugs stay tracebacks -------------------------------------------------------------------------------


def test_a_bug_inside_the_project_keeps_its_traceback(workspace, monkeypatch):
    """A ValueError raised by the template's own code is a bug, not a user mistake: it propagates
    (a traceback), whatever file it comes from. It once became `error: ...` with exit status 2."""
    from project.run.cluster import _signal_from_name

    def broken_log_config(trainer, config):
        _signal_from_name("SIGKILL")  # a ValueError raised inside project/

    monkeypatch.setattr(tracking, "log_config", broken_log_config)
    with pytest.raises(ValueError, match="SIGKILL"):
        main(fit_args(workspace))


def test_a_user_error_raised_anywhere_is_one_sentence(workspace, capsys, monkeypatch):
    from project.errors import UserError

    def refusing_log_config(trainer, config):
        raise UserError("The logger refused the config; fix it.")

    monkeypatch.setattr(tracking, "log_config", refusing_log_config)
    with pytest.raises(SystemExit) as exited:
        main(fit_args(workspace))
    assert exited.value.code == 2
    assert one_sentence(capsys) == "error: The logger refused the config; fix it."


def test_a_val_size_larger_than_the_training_set_is_one_sentence(workspace, capsys):
    with pytest.raises(SystemExit) as exited:
        main(fit_args(workspace, "--data.val_size=64"))
    assert exited.value.code == 2 and "val_size" in one_sentence(capsys)


def test_an_npz_that_is_a_folder_is_called_a_folder(workspace, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(workspace, f"--data.npz={workspace / 'a-folder'}"))
    assert "directory" in one_sentence(capsys)


@pytest.mark.parametrize("key", ["abc123", "x" * 39, " " + "a" * 40, "ключ" * 10])
def test_a_malformed_wandb_api_key_fails_before_any_network_call(workspace, capsys, monkeypatch, key):
    """With WANDB_MODE=online, such a key once made wandb try to log in for about 100 s and end in a
    traceback, leaving a run directory. The format is checked first (no network here: a call would
    hang or fail differently); the key itself is never printed."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(workspace / "a-folder"))
    before = snapshot(workspace)
    args = fit_args(workspace)
    args[1:1] = ["-c", str(REPO / "experiments/loggers/wandb.yaml")]  # the preset before the experiment
    with pytest.raises(SystemExit) as exited:
        main(args)
    sentence = one_sentence(capsys)
    assert exited.value.code == 2 and sentence.startswith("error: WANDB_API_KEY is not a wandb API key")
    assert key.strip() not in sentence
    assert snapshot(workspace) == before
