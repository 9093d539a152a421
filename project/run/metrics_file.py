"""The one reader of a run's ``metrics.csv`` (Lightning's CSVLogger file), for the figures, compare,
the sweep and a resumed fit; a damaged file is one error naming the file and the line.
"""

import csv
from pathlib import Path

import numpy as np

from project.errors import UserError

#: Columns that place a row rather than measure something.
POSITION_COLUMNS = ("step", "epoch")


class DamagedMetrics(UserError):
    """``metrics.csv`` is not a file the CSVLogger wrote, or was cut or changed since (a UserError, so a ValueError)."""


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (``{column: text}``, ``""`` for an empty cell) of ``path``; a row with more
    cells than the header, or a file that is not CSV text, raises :class:`DamagedMetrics`."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise DamagedMetrics(
            f"{path} is not a CSV text file ({err}); give a run directory written by the CSVLogger."
        ) from None
    for line, row in enumerate(rows, start=2):
        if None in row:  # more cells than the header has columns
            raise DamagedMetrics(f"{path}, line {line}: more values than the header has columns; the file is damaged.")
    return header, [{k: "" if v is None else v for k, v in row.items()} for row in rows]


def read_series(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (steps, values)}`` for every metric column, in logged order; a cell that is not a number
    raises :class:`DamagedMetrics` naming the line."""
    header, rows = read_rows(path)
    if "step" not in header:
        raise DamagedMetrics(
            f"{path} has no step column (its header is {header[:5]}); it was not written by the CSVLogger."
        )
    series: dict[str, tuple[list[float], list[float]]] = {}
    for line, row in enumerate(rows, start=2):
        step = row["step"]
        for key, value in row.items():
            if key in POSITION_COLUMNS or value == "" or step == "":
                continue
            try:
                point = float(step), float(value)
            except ValueError:
                raise DamagedMetrics(
                    f"{path}, line {line}: step {step!r} or {key} {value!r} is not a number; the file is damaged."
                ) from None
            steps, values = series.setdefault(key, ([], []))
            steps.append(point[0])
            values.append(point[1])
    return {k: (np.array(s), np.array(v)) for k, (s, v) in series.items()}


def values_of(path: Path, metric: str) -> list[float]:
    """Every logged value of ``metric``, oldest first ([] when the file or the column does not exist yet)."""
    if not Path(path).is_file():
        return []
    series = read_series(path).get(metric)
    return [] if series is None else series[1].tolist()
