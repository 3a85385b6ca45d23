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

One process writes a results folder at a time: :class:`ResultStore` takes an exclusive OS
lock on ``.hesd.lock`` (``fcntl.lockf``; released when the process ends, however it ends) and
a second writer gets :class:`ResultFolderLockedError` naming the holder's pid. Temporary files
carry their writer's pid (``.NAME.PID.RANDOM.tmp``); on opening, a writer removes only those
whose process is gone (killed mid-write), never a live process's (``hesd report`` writing the
report beside a running analysis). Rebuilding a report (:meth:`ResultStore.open_existing`)
takes no lock.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import HesdError, HesdFileNotFoundError, HesdPermissionError
from .rows import check_row

__all__ = [
    "ForeignFolderError",
    "ResultFolderLockedError",
    "ResultStore",
    "SettingsMismatchError",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale_temporaries",
]


class SettingsMismatchError(HesdError, ValueError):
    """The results folder was written with other settings or inputs."""


class ResultFolderLockedError(HesdError, RuntimeError):
    """Another process is writing to the results folder."""


class ForeignFolderError(HesdError, ValueError):
    """The folder holds files hesd did not write, or a damaged or foreign ``manifest.json`` or row."""


#: what a results folder may hold before its manifest exists (a writer killed before writing it)
_OWN_BEFORE_MANIFEST = frozenset({".hesd.lock", "rows"})


_FIX_ROW = "Remove the file to recompute that checkpoint"
_FIX_FOLDER = "Choose another output folder (--out), or remove the folder if it is yours"


def read_json_file(path: Path, what: str, fix: str = _FIX_FOLDER) -> dict:
    """``path`` parsed as a JSON object, or :class:`ForeignFolderError` naming the file and ``fix``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ForeignFolderError(
            f"{what}: {path} is not a JSON file hesd wrote ({type(exc).__name__}: {exc}); it was damaged or replaced. "
            f"{fix}"
        ) from None
    if not isinstance(value, dict):
        raise ForeignFolderError(
            f"{what}: {path} holds a JSON {type(value).__name__}, not the dict hesd writes; it was "
            f"damaged or replaced. {fix}"
        )
    return value


_TMP_RE = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(folder: str | Path) -> int:
    """Remove ``.*.tmp`` files in ``folder`` whose writer process is gone; return how many.

    Temporary names carry the writer's pid (module docs); one without a pid (written before
    hesd 0.3) is removed too, as only the lock holder calls this.
    """
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        m = _TMP_RE.match(tmp.name)
        if m is None or not _alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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
        lock: take the folder's writer lock (module docs); ``False`` only for rebuilding reports.

    Raises:
        SettingsMismatchError: the folder holds results computed with other settings or inputs.
        ResultFolderLockedError: another process is writing to the folder.
        PermissionError: the folder cannot be written.
    """

    def __init__(self, root: str | Path, settings: dict, *, overwrite: bool = False, lock: bool = True) -> None:
        self.root = Path(root)
        self.rows_dir = self.root / "rows"
        if lock and self.root.is_dir() and not (self.root / "manifest.json").exists():
            self._refuse_foreign_files()  # before creating anything in it
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
        self._lock_file = self._lock() if lock else None
        if lock:  # left by a process killed mid-write (rows, tables, figures)
            for folder in (self.root, self.rows_dir, self.root / "figures"):
                clean_stale_temporaries(folder)
        self.settings = _jsonable(settings)
        manifest = self.root / "manifest.json"
        if manifest.exists():
            stored = self._read_manifest(manifest)
            if _canonical(stored.get("settings", {})) != _canonical(self.settings):
                if not overwrite:
                    diff = self._diff(stored.get("settings", {}), self.settings)
                    raise SettingsMismatchError(
                        f"ResultStore: {self.root} holds results computed with other settings or inputs ({diff}); "
                        "resuming would mix them. Use another output folder, or overwrite=True (CLI: --overwrite) "
                        "to discard them"
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
        self.manifest = self._read_manifest(manifest)

    def _refuse_foreign_files(self) -> None:
        """Refuse a folder without a manifest that holds anything hesd did not put there."""
        foreign = sorted(p.name for p in self.root.iterdir()
                         if p.name not in _OWN_BEFORE_MANIFEST and not _TMP_RE.match(p.name))  # fmt: skip
        if self.rows_dir.is_dir():
            foreign += sorted(f"rows/{p.name}" for p in self.rows_dir.iterdir())
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ForeignFolderError(
                f"ResultStore: {self.root} already holds files hesd did not write ({shown}) and no hesd "
                "manifest.json; hesd writes only into a new folder or one it created, so it would overwrite or "
                "delete them. Choose another output folder (--out)"
            )

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        """The folder's manifest, checked to be hesd's (``hesd_version`` and a ``settings`` object)."""
        stored = read_json_file(path, "ResultStore")
        if not isinstance(stored.get("hesd_version"), str) or not isinstance(stored.get("settings"), dict):
            raise ForeignFolderError(
                f"ResultStore: {path} is not a manifest hesd wrote (no hesd_version and settings); the folder "
                "belongs to something else and hesd will not overwrite it. Choose another output folder (--out)"
            )
        return stored

    def _lock(self) -> Any:
        """Take the exclusive writer lock on ``.hesd.lock`` (POSIX; elsewhere no lock)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return None
        f = open(self.root / ".hesd.lock", "a+")  # held open for the store's lifetime
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ResultFolderLockedError(
                f"ResultStore: {self.root} is being written by another hesd process (pid {holder}). Wait for it "
                "to finish, or write to another --out; two runs on one folder would overwrite each other's tables"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        return f

    def close(self) -> None:
        """Release the writer lock (also released when the process ends)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @staticmethod
    def _diff(a: dict, b: dict, prefix: str = "") -> str:
        keys = sorted(set(a) | set(b))
        parts = []
        for k in keys:
            x, y = a.get(k), b.get(k)
            if x == y:
                continue
            if isinstance(x, dict) and isinstance(y, dict):
                parts.append(ResultStore._diff(x, y, f"{prefix}{k}."))
            else:
                parts.append(f"{prefix}{k}: {x!r} → {y!r}")
        return "; ".join(p for p in parts[:6] if p) or "different settings"

    @classmethod
    def open_existing(cls, root: str | Path) -> ResultStore:
        """Open a folder written earlier, with its own settings (for rebuilding reports)."""
        manifest = Path(root) / "manifest.json"
        if not manifest.exists():
            raise HesdFileNotFoundError(f"ResultStore: {root} holds no hesd results (no manifest.json)")
        return cls(root, cls._read_manifest(manifest)["settings"], lock=False)

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
        return self._read_row(p)

    def put(self, key: str, row: dict) -> None:
        """Store ``row`` under ``key`` atomically."""
        atomic_write_text(self._row_path(key), json.dumps(_jsonable(row), allow_nan=True))

    def rows(self) -> list[dict]:
        """All stored rows (any order), each checked (:func:`~hesd.analysis.rows.check_row`)."""
        return [self._read_row(p) for p in sorted(self.rows_dir.glob("*.json"))]

    @staticmethod
    def _read_row(path: Path) -> dict:
        row = read_json_file(path, "ResultStore", fix=_FIX_ROW)
        problem = check_row(row)
        if problem:
            raise ForeignFolderError(
                f"ResultStore: {path} is not a row hesd wrote ({problem}); it was damaged or edited. {_FIX_ROW}"
            )
        return row

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
