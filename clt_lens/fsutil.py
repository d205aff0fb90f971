"""Crash-safe file writes: the one home for "write a sibling, fsync, rename over the target".

A reader never sees a half-written file: it sees the old file or the new one. The temporary
sibling is hidden (``.NAME.tmpPID``, per process, so concurrent writers never share one) and is
removed if the write fails.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; skipped where the OS/filesystem cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``path``'s new content to (by any writer that
    takes a path); on success it is fsynced and renamed over ``path``, on failure removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kw: Any) -> Iterator[IO[Any]]:
    """``open`` a temporary sibling of ``path`` for writing; renamed over ``path`` on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **kw) as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary sibling, fsync it, and rename it over ``path``."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON (UTF-8, non-ASCII kept, newline-terminated), written atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def is_safe_name(name: str) -> bool:
    """A plain file name (no path separators, no leading dot): safe to join to a folder."""
    return bool(_SAFE_NAME.match(name))
