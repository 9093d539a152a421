"""Many runs, one table: group runs by what differs in their configs, and summarise each group's metrics.

    python -m project compare runs/sweeps/lenet_seeds-20250101-120000-abc123
    python -m project compare runs/lenet --by model.optimizer.lr --metric val/acc --metric val/loss

PATH is a run directory, a sweep directory (python -m project.tools.sweep) or any folder of runs: every
folder holding a ``config.yaml`` and a ``metrics.csv``. Runs are grouped by the config keys on
which they differ (``seed_everything`` and each run's own paths and names are pooled over), or by
``--by``. Each group gets ``n`` and, per metric, the mean and sample standard deviation (n-1) of
its runs' final values. With ``--out DIR`` writes ``compare.csv`` and ``compare.png`` (each group's learning
curve of the first metric: mean line, min-max band) there; it never writes into the runs it reads. A run whose files
cannot be read is left out and named on stderr; only when no run is readable is it an error.
"""

import argparse
import csv
import io
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

from project.errors import UserError
from project.run import directory, figures, metrics_file
from project.run.checkpoints import write_atomically
from project.run.config_files import flatten

#: Metrics compared when none is given, those present in the runs.
DEFAULT_METRICS = ("val/acc", "val/loss", "test/acc")
#: Config keys that differ between runs of one experiment without making them a different experiment: the seed,
#: and (by prefix) what records, shows or exports a run without changing its training.
POOLED_KEYS = {"seed_everything"}
POOLED_PREFIXES = (
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.profiler",
    "plots.",
    "predictions.",
    "export.",
)
#: Last parts of config keys that name a run's own files or identity (its directory, checkpoints, logger names).
POOLED_LEAVES = {"run_dir", "ckpt_path", "dirpath", "save_dir", "default_root_dir", "name", "version", "id", "log_dir"}


@dataclass
class RunRecord:
    """One run: where it is, its flattened config, and its logged series ``{metric: (steps, values)}``."""

    path: Path
    config: dict
    series: dict

    def final(self, metric: str) -> float | None:
        steps_values = self.series.get(metric)
        return float(steps_values[1][-1]) if steps_values is not None and len(steps_values[1]) else None


def is_pooled(key: str) -> bool:
    return key in POOLED_KEYS or key.startswith(POOLED_PREFIXES) or key.rsplit(".", 1)[-1] in POOLED_LEAVES


def find_runs(paths: Sequence[Path]) -> tuple[list[RunRecord], list[str]]:
    """Every readable run under ``paths`` (a run directory itself counts), each once, in path order, and
    one line for each run that could not be read (its config.yaml or metrics.csv is damaged). Nothing
    readable is an error: the first reason, and how many more runs were unreadable."""
    found: dict[Path, None] = {}
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist; give a run directory, a sweep directory or a folder of runs.")
        candidates = [path] if (path / "config.yaml").is_file() else sorted(p.parent for p in path.rglob("config.yaml"))
        for run in candidates:
            # A run's evaluations (<run>/eval/<time>-<command>/) belong to it: not runs of their own.
            if (run / "metrics.csv").is_file() and run.parent.name != "eval":
                found[run.resolve()] = None
    if not found:
        raise UserError(
            f"no runs (folders with config.yaml and metrics.csv) under {', '.join(map(str, paths))}; "
            "give a run directory, a sweep directory or a folder of runs."
        )
    runs, skipped = [], []
    for run in found:
        try:
            runs.append(read_run(run))
        except UserError as err:
            skipped.append(str(err))
    if not runs:
        more = f" (and {len(skipped) - 1} more runs could not be read)" if len(skipped) > 1 else ""
        raise UserError(f"{skipped[0]}{more}")
    return runs, skipped


def read_run(run: Path) -> RunRecord:
    """One run, or one sentence naming the file that keeps it from being read."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{run / 'config.yaml'} is not valid YAML ({str(err).splitlines()[0]}).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {run / 'config.yaml'} ({err}).") from None
    if not isinstance(config, Mapping):
        raise UserError(f"{run / 'config.yaml'} is not a saved run config (expected a mapping).")
    try:
        series = metrics_file.read_series(run / "metrics.csv")
    except metrics_file.DamagedMetrics as err:
        raise UserError(f"{run / 'metrics.csv'} is not a metrics file written by the CSVLogger ({err}).") from None
    except OSError as err:
        raise UserError(f"cannot read {run / 'metrics.csv'} ({err}).") from None
    # An empty list means what null means (`callbacks: []`, `callbacks: null`: none).
    return RunRecord(run, {k: None if v == [] else v for k, v in flatten(config).items()}, series)


def grouping_keys(runs: list[RunRecord]) -> list[str]:
    """The config keys, not pooled, whose values are not the same in every run."""
    keys = sorted({k for run in runs for k in run.config})
    return [k for k in keys if not is_pooled(k) and len({repr(run.config.get(k)) for run in runs}) > 1]


@dataclass
class Group:
    key: tuple
    runs: list[RunRecord]

    def label(self, keys: list[str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in zip(keys, self.key)) or "all runs"


def group_runs(runs: list[RunRecord], keys: list[str]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        values = tuple(run.config.get(k) for k in keys)  # any config value: lists and null too
        groups.setdefault(repr(values), Group(values, [])).runs.append(run)
    return list(groups.values())


def summarise(group: Group, metric: str) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one run) of the group's final values."""
    values = [v for v in (run.final(metric) for run in group.runs) if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def sweep_metric(paths: Sequence[Path]) -> tuple[str, str] | None:
    """``(name, goal)`` of the sweep metric when the first PATH is a sweep directory (project.tools.sweep)."""
    saved = paths[0] / "sweep.yaml"
    if not saved.is_file():
        return None
    metric = (yaml.safe_load(saved.read_text()) or {}).get("metric") or {}
    return (metric["name"], metric.get("goal", "maximize")) if "name" in metric else None


def curve_figure(groups: list[Group], keys: list[str], metric: str) -> Figure:
    """Each group's ``metric`` against the step: mean over its runs, shaded between their min and max."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for group in groups:
        series = [run.series[metric] for run in group.runs if metric in run.series]
        if not series:
            continue
        steps = np.unique(np.concatenate([s for s, _ in series]))
        table = np.full((len(series), len(steps)), np.nan)
        for row, (s, v) in enumerate(series):
            table[row, np.searchsorted(steps, s)] = v
        keep = ~np.all(np.isnan(table), axis=0)
        steps, table = steps[keep], table[:, keep]
        mean = np.nanmean(table, axis=0)
        (line,) = ax.plot(
            steps,
            mean,
            marker="o" if len(steps) < 30 else None,
            markersize=3,
            label=f"{group.label(keys)} (n={len(series)})",
        )
        ax.fill_between(steps, np.nanmin(table, axis=0), np.nanmax(table, axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean and min-max over each group's runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def compare(paths: Sequence[Path], metrics: Sequence[str] = (), by: Sequence[str] = (), out: Path | None = None) -> str:
    """Write compare.csv and compare.png; return the table as text. A run that cannot be read is left out,
    with one line on stderr naming it and why."""
    runs, skipped = find_runs(paths)
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    logged = {m for run in runs for m in run.series}
    sweep = sweep_metric(paths)
    for metric in metrics:
        if metric not in logged:
            raise UserError(f"no run logged the metric {metric!r}; the runs logged: {', '.join(sorted(logged))}.")
    if not metrics:
        metrics = ([sweep[0]] if sweep and sweep[0] in logged else []) + [m for m in DEFAULT_METRICS if m in logged]
        metrics = list(dict.fromkeys(metrics))
        if not metrics:
            raise UserError(
                f"none of {', '.join(DEFAULT_METRICS)} was logged; name one with --metric "
                f"(the runs logged: {', '.join(sorted(logged)) or 'nothing'})."
            )
    known = {k for run in runs for k in run.config}
    for key in by:
        if key not in known:
            raise UserError(
                f"--by {key} is not a key of the runs' config.yaml files (for example: "
                f"{', '.join(sorted(grouping_keys(runs))[:5]) or 'data.batch_size'})."
            )
    keys = list(by) or grouping_keys(runs)
    groups = group_runs(runs, keys)
    first = metrics[0]
    maximize = sweep[1] == "maximize" if sweep and sweep[0] == first else "loss" not in first
    groups.sort(
        key=lambda g: (
            math.isnan(summarise(g, first)[0]),
            -summarise(g, first)[0] if maximize else summarise(g, first)[0],
        )
    )

    header = [*keys, "n"]
    for metric in metrics:
        header += [f"{metric}.mean", f"{metric}.std"] + ([f"{metric}.best"] if sweep and metric == sweep[0] else [])
    rows = []
    for group in groups:
        row = [*group.key, len(group.runs)]
        for metric in metrics:
            row += summarise(group, metric)
            if sweep and metric == sweep[0]:
                finals = [v for v in (r.final(metric) for r in group.runs) if v is not None]
                row.append((max if sweep[1] == "maximize" else min)(finals) if finals else math.nan)
        rows.append(row)

    if out is not None:  # a later command never writes into the runs it reads
        directory.check_writable_dir(out, "--out")
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(header)
        writer.writerows([["" if isinstance(v, float) and math.isnan(v) else v for v in row] for row in rows])
        write_atomically(table.getvalue().encode(), out / "compare.csv", "compare")
        figures.save(curve_figure(groups, keys, first), out / "compare.png", "compare")

    cells = [header] + [[str(v) for v in row[: len(keys)]] + [_cell(v) for v in row[len(keys) :]] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if j >= len(keys) else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    left_out = f", {len(skipped)} unreadable left out" if skipped else ""
    written = f"; {out / 'compare.csv'}, {out / 'compare.png'}" if out is not None else ""
    return "\n".join([*lines, f"({len(runs)} runs{left_out}{written})"])


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, as the CLI's errors, not the usage screen
        print(f"error: {message} (see python -m project compare --help).", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    directory.new_command()  # a command of its own: what earlier ones wrote is not its to replace
    parser = _Parser(prog="python -m project compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", type=Path, nargs="+", metavar="PATH", help="run directories, sweep directories or folders of runs"
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        help=f"a logged metric (repeatable; default: the sweep metric, then {', '.join(DEFAULT_METRICS)} where logged)",
    )
    parser.add_argument(
        "--by",
        action="append",
        default=[],
        help="group by this config key (repeatable; "
        "default: the keys on which the runs differ, seeds and paths pooled)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write compare.csv and compare.png into this folder (default: print the table only)",
    )
    args = parser.parse_args(argv)
    try:
        print(compare(args.paths, args.metric, args.by, args.out))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
