"""``python -m project curves RUN``: a run's learning curves from its ``metrics.csv``, as a PNG."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from project.errors import UserError
from project.run import directory
from project.run.figures import learning_curves_figure, save
from project.run.metrics_file import read_series


def plot_learning_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Read ``<run_dir>/metrics.csv`` and write ``learning_curves-<run name>.png`` in the current directory (or ``out``):
    a later command never writes into a run."""
    metrics_file = Path(run_dir) / "metrics.csv"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} does not exist; give a run directory written by the CSVLogger.")
    return save(
        learning_curves_figure(read_series(metrics_file), title=Path(run_dir).name),
        out or Path(f"learning_curves-{Path(run_dir).resolve().name}.png"),
        "curves",
    )


def main(argv: Sequence[str] | None = None) -> None:
    directory.new_command()  # a command of its own: what earlier ones wrote is not its to replace
    parser = argparse.ArgumentParser(
        prog="python -m project curves", description="Plot learning curves from a run's metrics.csv."
    )
    parser.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/lenet/20250101-120000-abc123")
    parser.add_argument("--out", type=Path, default=None, help="output PNG (default: ./learning_curves-<run name>.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_learning_curves(args.run_dir, args.out))
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)  # a user's mistake, like every command of the template
    except OSError as err:  # e.g. --out in a folder that does not exist or cannot be written
        print(
            f"error: {err.strerror or err}: {err.filename}; check that path or choose another --out.", file=sys.stderr
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
