"""The clinical CSV: `slide_id, time, event[, fold][, covariates...]`, one row per slide.

`time` is follow-up in months (>= 0), `event` 1 = recurrence observed at `time`, 0 = censored at `time`.
An optional `fold` column (integers) fixes the cross-validation folds; other numeric columns are covariates
for the clinical Cox model and the subgroup tables.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
from collections.abc import Sequence

import numpy as np

from xmag_jax.errors import UserError

REQUIRED = ("slide_id", "time", "event")
FOLD = "fold"


class ClinicalError(UserError):
    """The clinical CSV is malformed (names the file, line and field)."""


@dataclasses.dataclass(frozen=True)
class Clinical:
    """Outcomes of `slide_ids` (sorted): `time [N]` months, `event [N]` 0/1, optional `fold [N]`, covariates."""

    slide_ids: list[str]
    time: np.ndarray
    event: np.ndarray
    fold: np.ndarray | None
    covariates: dict[str, np.ndarray]

    def subset(self, ids: Sequence[str]) -> Clinical:
        index = {s: i for i, s in enumerate(self.slide_ids)}
        rows = np.array([index[s] for s in ids], int)
        return Clinical(list(ids), self.time[rows], self.event[rows],
                        None if self.fold is None else self.fold[rows],
                        {k: v[rows] for k, v in self.covariates.items()})


def _number(path: pathlib.Path, line: int, field: str, text: str | None) -> float:
    try:
        value = float((text or "").strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ClinicalError(f"{path}:{line}: {field} {text!r} is missing or not a number")
    return value


def read_clinical(path: str | pathlib.Path, covariates: Sequence[str] = ()) -> Clinical:
    """Reads and checks the CSV; `covariates` names the covariate columns (empty: every other column)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ClinicalError(f"{path}: clinical CSV not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = fields
        missing = [c for c in REQUIRED if c not in fields]
        if missing:
            raise ClinicalError(f"{path}: missing column(s) {missing}; expected a header slide_id,time,event[,...], "
                                f"got {fields}")
        names = list(covariates) or [c for c in fields if c not in (*REQUIRED, FOLD)]
        absent = [c for c in names if c not in fields]
        if absent:
            raise ClinicalError(f"{path}: covariate column(s) {absent} named in the config are not in {fields}")
        rows: dict[str, tuple] = {}
        for line, row in enumerate(reader, start=2):
            slide_id = (row["slide_id"] or "").strip()
            if not slide_id:
                raise ClinicalError(f"{path}:{line}: empty slide_id")
            if slide_id in rows:
                raise ClinicalError(f"{path}:{line}: slide {slide_id!r} appears twice")
            time = _number(path, line, "time", row["time"])
            if time < 0:
                raise ClinicalError(f"{path}:{line}: time {time} is negative; expected months >= 0")
            event = (row["event"] or "").strip()
            if event not in ("0", "1", "0.0", "1.0"):
                raise ClinicalError(f"{path}:{line}: event {row['event']!r}; expected 0 (censored) or 1 (recurrence)")
            fold = int(_number(path, line, FOLD, row[FOLD])) if FOLD in fields else None
            cov = tuple(_number(path, line, c, row[c]) for c in names)
            rows[slide_id] = (time, int(float(event)), fold, cov)
    if not rows:
        raise ClinicalError(f"{path}: no slides")
    ids = sorted(rows)
    cov = np.array([rows[s][3] for s in ids], np.float64).reshape(len(ids), len(names))
    return Clinical(ids, np.array([rows[s][0] for s in ids], np.float64), np.array([rows[s][1] for s in ids], np.int32),
                    np.array([rows[s][2] for s in ids], np.int32) if FOLD in fields else None,
                    {c: cov[:, j] for j, c in enumerate(names)})
