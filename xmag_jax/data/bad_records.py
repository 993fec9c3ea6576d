"""Counting and skipping records that fail to decode, with a checkpointed budget.

Two Grain iterator stages, because the skip must happen before batching (inside the prefetch workers)
while the count must live in the main process, in the checkpointed iterator state:

- `SkipBadRecordsIterDataset` (before `batch`): drops `BadRecord` markers and stamps each good element
  with `bad_skipped` (markers dropped right before it) and `bad_last_index` (the last one's source index);
  `max_in_a_row` bad records in a row raise right there (else a data set with no good record never yields).
- `BadRecordBudgetIterDataset` (on top, after multiprocess prefetch): removes those two fields from the
  batch, sums them into `bad_records` / `records_seen`, and once at least `min_records` records were seen
  raises `TooManyBadRecordsError` when `bad_records > max_fraction * records_seen`.

Grain's own `DatasetOptions(filter_raise_threshold_ratio=...)` was not used: it judges fixed windows of 1000
elements per worker, keeps no count one can read or checkpoint, and cannot name a bad record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import logging

from xmag_jax.data.pairs import BadRecord

BAD_SKIPPED = "bad_skipped"
BAD_LAST_INDEX = "bad_last_index"


class TooManyBadRecordsError(RuntimeError):
    """More than `data.max_bad_record_fraction` of the records seen failed to decode."""


class SkipBadRecordsIterDataset(grain.IterDataset):
    """Drops BadRecord markers; good elements gain `bad_skipped` and `bad_last_index` (int64 scalars)."""

    def __init__(self, parent: grain.IterDataset, *, max_in_a_row: int):
        super().__init__(parent)
        self._max_in_a_row = max_in_a_row

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipBadRecordsIterator(self._parent.__iter__(), self._max_in_a_row)

    def __str__(self) -> str:
        return f"SkipBadRecordsIterDataset(max_in_a_row={self._max_in_a_row})"


class _SkipBadRecordsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_in_a_row: int):
        super().__init__(parent)
        self._max_in_a_row = max_in_a_row

    def __next__(self) -> dict[str, Any]:
        skipped, last = 0, -1
        while True:
            element = next(self._parent)
            if not isinstance(element, BadRecord):
                return {**element, BAD_SKIPPED: np.int64(skipped), BAD_LAST_INDEX: np.int64(last)}
            skipped, last = skipped + 1, element.index
            if skipped >= self._max_in_a_row:
                raise TooManyBadRecordsError(
                    f"{skipped} records in a row failed to decode; the latest: {element.reason}"
                )

    # A checkpoint is taken between batches, when no skipped count is pending: the parent's state suffices.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class BadRecordBudgetIterDataset(grain.IterDataset):
    """Counts the bad records skipped upstream and enforces `max_fraction`; see the module doc.

    `describe(index)` re-reads one record and says why it is bad; it is called only to word the error.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        max_fraction: float,
        min_records: int,
        describe: Callable[[int], str],
    ):
        super().__init__(parent)
        if not 0.0 <= max_fraction < 1.0:
            raise ValueError(f"data.max_bad_record_fraction must be in [0, 1), got {max_fraction}")
        self._max_fraction = max_fraction
        self._min_records = min_records
        self._describe = describe

    def __iter__(self) -> BadRecordBudgetIterator:
        return BadRecordBudgetIterator(
            self._parent.__iter__(),
            max_fraction=self._max_fraction,
            min_records=self._min_records,
            describe=self._describe,
        )

    def __str__(self) -> str:
        return f"BadRecordBudgetIterDataset(max_fraction={self._max_fraction}, min_records={self._min_records})"


class BadRecordBudgetIterator(grain.DatasetIterator):
    """The pipeline's top iterator: batches without the bookkeeping fields; `bad_records`, `records_seen`."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        *,
        max_fraction: float,
        min_records: int,
        describe: Callable[[int], str],
    ):
        super().__init__(parent)
        self._max_fraction = max_fraction
        self._min_records = min_records
        self._describe = describe
        self.bad_records = 0
        self.records_seen = 0
        self._last_bad_index = -1

    def __next__(self) -> dict[str, np.ndarray]:
        # Batches from worker processes arrive as Grain shared-memory arrays: copied into plain numpy arrays.
        batch = {k: v if type(v) is np.ndarray else np.array(v) for k, v in next(self._parent).items()}
        skipped = batch.pop(BAD_SKIPPED)
        last_index = batch.pop(BAD_LAST_INDEX)
        new_bad = int(np.sum(skipped))
        self.bad_records += new_bad
        self.records_seen += new_bad + len(skipped)
        if new_bad:
            self._last_bad_index = int(np.max(last_index))
            logging.warning("skipped %d bad records so far, of %d records seen", self.bad_records, self.records_seen)
        if self.records_seen >= self._min_records and self.bad_records > self._max_fraction * self.records_seen:
            raise TooManyBadRecordsError(
                f"{self.bad_records} of {self.records_seen} records "
                f"({100.0 * self.bad_records / self.records_seen:.1f}%) failed to decode, more than "
                f"data.max_bad_record_fraction={self._max_fraction}; the latest: {self._describe(self._last_bad_index)}"
            )
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "bad_records": self.bad_records,
            "records_seen": self.records_seen,
            "last_bad_index": self._last_bad_index,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.bad_records = int(state["bad_records"])
        self.records_seen = int(state["records_seen"])
        self._last_bad_index = int(state["last_bad_index"])

    def __str__(self) -> str:
        return "BadRecordBudgetIterator"
