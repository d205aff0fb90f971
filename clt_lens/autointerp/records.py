"""autointerp.jsonl: one record per finished feature, appended and fsynced line by line.

A run killed mid-write leaves at most one partial last line. Readers ignore it; a new run
cuts it off before appending (``RecordWriter``), so the file stays valid JSON lines and the
feature whose record was cut is simply redone.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clt_lens.errors import CLTLensError, MissingFileError
from clt_lens.fsutil import atomic_write_json

RECORDS_FILE = "autointerp.jsonl"
SUMMARY_FILE = "autointerp_summary.json"
LOCK_FILE = "autointerp.lock"
RECORD_KEYS = (
    "layer", "index", "status", "explanation", "method", "model", "scores", "usage", "error",
)


def _valid(rec: Any) -> bool:
    return (
        isinstance(rec, dict)
        and isinstance(rec.get("layer"), int)
        and isinstance(rec.get("index"), int)
        and rec.get("status") in ("ok", "failed")
    )


def iter_records(features_dir: str | Path) -> Iterator[dict]:
    """Every complete, well-formed record in file order. A partial last line (a run killed
    while writing it) is skipped silently; a bad line elsewhere is skipped with a warning."""
    path = Path(features_dir) / RECORDS_FILE
    if not path.exists():
        return
    with open(path, "rb") as f:
        for k, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # an unfinished last line: the record it would have held never counted
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                warnings.warn(f"{path}:{k}: not valid JSON; line skipped", stacklevel=2)
                continue
            if _valid(rec):
                yield rec
            else:
                warnings.warn(f"{path}:{k}: not an autointerp record; line skipped", stacklevel=2)


def load_explanations(
    features_dir: str | Path, *, model: str | None = None
) -> dict[tuple[int, int], dict]:
    """The latest ``status == "ok"`` record per (layer, index), optionally for one LLM model.

    Returns {} when no autointerp run has written to ``features_dir`` yet.
    """
    d = Path(features_dir)
    if not d.is_dir():
        raise MissingFileError(f"features directory {str(d)!r} does not exist")
    out: dict[tuple[int, int], dict] = {}
    for rec in iter_records(d):
        if rec["status"] != "ok" or not rec.get("explanation"):
            continue
        if model is not None and rec.get("model") != model:
            continue
        out[(rec["layer"], rec["index"])] = rec
    return out


def latest_records(
    features_dir: str | Path, *, model: str | None = None
) -> dict[tuple[int, int], dict]:
    """The last record (ok or failed) per (layer, index), optionally for one LLM model."""
    out: dict[tuple[int, int], dict] = {}
    for rec in iter_records(features_dir):
        if model is None or rec.get("model") == model:
            out[(rec["layer"], rec["index"])] = rec
    return out


class RunLocked(CLTLensError, RuntimeError):
    """Another autointerp run is writing the same autointerp.jsonl."""


class RecordWriter:
    """Appends records; each line is flushed and fsynced before the next feature counts
    as finished. Holds an advisory lock so two runs cannot interleave lines in one file."""

    def __init__(self, features_dir: str | Path) -> None:
        self.dir = Path(features_dir)
        self.path = self.dir / RECORDS_FILE
        self._lock_fh = None
        self._fh = None
        self.repaired_bytes = 0

    def open(self) -> RecordWriter:
        self._acquire_lock()
        try:
            self.repaired_bytes = repair_tail(self.path)
            self._fh = open(self.path, "ab")
        except BaseException:
            self.close()
            raise
        return self

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; concurrent runs are the user's risk
            return
        fh = open(self.dir / LOCK_FILE, "a")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise RunLocked(
                f"another autointerp run is writing {self.path}; wait for it or stop it"
            ) from None
        self._lock_fh = fh

    def append(self, record: dict) -> None:
        assert self._fh is not None, "RecordWriter.open() first"
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        self._fh.write(line.encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing releases the flock
            self._lock_fh = None

    def __enter__(self) -> RecordWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair_tail(path: Path) -> int:
    """Cut a partial last line (no trailing newline) off ``path``; return the bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back in blocks for the last newline; records are small so this is short.
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            k = block.rfind(b"\n")
            if k >= 0:
                keep = pos + k + 1
                break
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_json(path, data)
