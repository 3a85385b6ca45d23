"""A durable, resumable results store: one JSON file per checkpoint, written atomically.

Layout of a results folder::

    manifest.json        settings, hesd version, created-at (written once)
    rows/KEY.json        one row per checkpoint (KEY derived from the checkpoint's path)
    results.csv          tidy table, rebuilt atomically after every row
    results.json         the same table as JSON records

Every write goes to a temporary file in the same folder, is flushed and fsync'ed, then
renamed over the target (``os.replace`` is atomic on POSIX and Windows), so a process
killed at any instant leaves either the old file or the new one — never half a row.
Re-opening a folder with different settings raises :class:`SettingsMismatchError`
instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import HesdError, HesdFileNotFoundError, HesdPermissionError

__all__ = ["ResultStore", "SettingsMismatchError", "atomic_write_bytes", "atomic_write_text"]


class SettingsMismatchError(HesdError, ValueError):
    """The results folder was written with other settings."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def _canonical(settings: dict) -> str:
    return json.dumps(_jsonable(settings), sort_keys=True)


class ResultStore:
    """Rows of a checkpoint-series analysis in a folder, durable and resumable.

    Args:
        root: the results folder (created if needed).
        settings: the analysis settings; stored in ``manifest.json`` on first use and
            compared on every later use.
        overwrite: discard existing results written with other settings instead of raising.

    Raises:
        SettingsMismatchError: the folder holds results computed with other settings.
        PermissionError: the folder cannot be written.
    """

    def __init__(self, root: str | Path, settings: dict, *, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.rows_dir = self.root / "rows"
        try:
            self.rows_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HesdPermissionError(
                f"ResultStore: cannot create the results folder {self.root} ({exc.strerror}); choose a writable --out"
            ) from None
        if not os.access(self.root, os.W_OK):
            raise HesdPermissionError(
                f"ResultStore: the results folder {self.root} is not writable; choose another --out"
            )
        for stale in self.root.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        for stale in self.rows_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        self.settings = _jsonable(settings)
        manifest = self.root / "manifest.json"
        if manifest.exists():
            stored = json.loads(manifest.read_text())
            if _canonical(stored.get("settings", {})) != _canonical(self.settings):
                if not overwrite:
                    diff = self._diff(stored.get("settings", {}), self.settings)
                    raise SettingsMismatchError(
                        f"ResultStore: {self.root} holds results computed with other settings ({diff}). "
                        "Use another output folder, or overwrite=True (CLI: --overwrite) to discard them"
                    )
                for f in self.rows_dir.glob("*.json"):
                    f.unlink()
                manifest.unlink()
        if not manifest.exists():
            atomic_write_text(
                manifest,
                json.dumps(
                    {"hesd_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "settings": self.settings},
                    indent=2,
                ),
            )  # fmt: skip
        self.manifest = json.loads(manifest.read_text())

    @staticmethod
    def _diff(a: dict, b: dict) -> str:
        keys = sorted(set(a) | set(b))
        parts = [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
        return "; ".join(parts[:6]) or "different settings"

    @classmethod
    def open_existing(cls, root: str | Path) -> ResultStore:
        """Open a folder written earlier, with its own settings (for rebuilding reports)."""
        manifest = Path(root) / "manifest.json"
        if not manifest.exists():
            raise HesdFileNotFoundError(f"ResultStore: {root} holds no hesd results (no manifest.json)")
        return cls(root, json.loads(manifest.read_text())["settings"])

    @staticmethod
    def key_for(identity: str) -> str:
        """A file-safe key for a checkpoint identity (its resolved path)."""
        return hashlib.sha1(identity.encode("utf-8")).hexdigest()[:20]

    def _row_path(self, key: str) -> Path:
        return self.rows_dir / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored row for ``key``, or ``None``."""
        p = self._row_path(key)
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def put(self, key: str, row: dict) -> None:
        """Store ``row`` under ``key`` atomically."""
        atomic_write_text(self._row_path(key), json.dumps(_jsonable(row), allow_nan=True))

    def rows(self) -> list[dict]:
        """All stored rows (any order)."""
        return [json.loads(p.read_text()) for p in sorted(self.rows_dir.glob("*.json"))]

    def write_json(self, name: str, obj: Any) -> None:
        """Write a JSON side file (e.g. ``selection.json``) atomically."""
        atomic_write_text(self.root / name, json.dumps(_jsonable(obj), indent=2, allow_nan=True))

    def write_tables(self, records: list[dict]) -> None:
        """Write ``results.csv`` and ``results.json`` atomically from table records."""
        import pandas as pd

        df = pd.DataFrame.from_records(records)
        atomic_write_text(self.root / "results.csv", df.to_csv(index=False))
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]
        atomic_write_text(self.root / "results.json", json.dumps(_jsonable(clean), indent=1, allow_nan=True))
