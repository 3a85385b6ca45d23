"""Record a row and refresh the tables: the one write path of every series of analyses.

:func:`hesd.analyze_checkpoints`, :class:`hesd.Monitor` and the training callbacks all keep
their rows in a :class:`SeriesRecorder`: each new row is stored atomically (when there is a
results folder) and ``results.csv``, ``results.json`` and ``selection.json`` are rebuilt, so
what is on disk always follows the last finished checkpoint.

Examples:
    >>> import hesd
    >>> from hesd.analysis.recorder import SeriesRecorder
    >>> from hesd.analysis.rows import RowIdentity
    >>> rec = SeriesRecorder(hesd.AnalysisSettings())  # no folder: in memory
    >>> rec.record(RowIdentity("a.pt", "a.pt", 1).failed("CheckpointError: corrupt"))
    >>> rec.table["status"].tolist()
    ['failed']
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from .rows import build_table, records, series_order
from .selection import SelectionRule
from .settings import AnalysisSettings
from .store import ResultStore

__all__ = ["SeriesRecorder"]


class SeriesRecorder:
    """The rows of a series, in memory and (with a store) on disk.

    Args:
        settings: the analysis settings (for QS flags and the default rules).
        store: the results folder's store, or ``None`` to keep rows in memory.
        rules: selection rules (default: :func:`hesd.analysis.default_rules`).
        order: ``"epoch"`` sorts rows by epoch, then name (:func:`~hesd.analysis.rows.series_order`:
            a training run's analyses, a results folder written by several invocations);
            ``"arrival"`` keeps the order they were recorded in.
        rows: rows recorded earlier (the folder's stored rows), keyed by checkpoint identity; they
            are part of every table and pick, so ``results.csv`` and ``selection.json`` always
            cover the whole folder.
    """

    def __init__(
        self,
        settings: AnalysisSettings,
        store: ResultStore | None = None,
        *,
        rules: list[SelectionRule] | None = None,
        order: str = "epoch",
        rows: Iterable[dict] = (),
    ) -> None:
        self.settings, self.store, self.rules, self.order = settings, store, rules, order
        self._rows: dict[str, dict] = {r["checkpoint"]: r for r in rows}

    def record(self, row: dict, *, store: bool = True) -> None:
        """Add (or replace) ``row``; store it and rewrite the tables (``store=False``: a row read back)."""
        self._rows[row["checkpoint"]] = row
        if self.store is None:
            return
        if store:
            self.store.put(ResultStore.key_for(row["checkpoint"]), row)
        table, selections, _ = self.build()
        self.store.write_tables(records(table))
        self.store.write_json("selection.json", selections)

    @property
    def rows(self) -> list[dict]:
        """The rows, in series order."""
        rows = list(self._rows.values())
        return sorted(rows, key=series_order) if self.order == "epoch" else rows

    def build(self):
        """``(table, selections, spectra)`` of the rows so far (:func:`hesd.analysis.rows.build_table`)."""
        return build_table(self.rows, self.settings, self.rules)

    @property
    def table(self) -> pd.DataFrame:
        """The results table so far."""
        return self.build()[0]

    @property
    def selections(self) -> dict[str, dict]:
        """What each selection rule picks so far."""
        return self.build()[1]

    def __len__(self) -> int:
        return len(self._rows)
