"""Run-lifecycle mistakes end in one sentence and exit status 2, and leave no run directory behind."""

import pytest

from tests.conftest import QUIET, make_npz, run_cli, run_dirs


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_ckpt_path_last_without_any_run_is_refused(tmp_path, subcommand):
    """`validate --ckpt_path last` in an experiment that has no run with a last checkpoint once
    evaluated randomly initialised weights and exited 0."""
    npz = make_npz(tmp_path / "d.npz")
    root = tmp_path / "runs"
    out = run_cli([subcommand, "-c", "experiments/lenet.yaml", f"--data.npz={npz}", f"--trainer.default_root_dir={root}",
                   *QUIET, "--data.val_size=16", "--ckpt_path=last"], timeout=180)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "last" in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert run_dirs(root, "lenet") == [], "no run directory is created"
