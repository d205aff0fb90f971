"""Where a cache lives: a local directory or any ``fsspec`` URL (``s3://``, ``gs://``, ``memory://``).

``Store(root)`` offers the few operations a cache needs, named after what they do for it:
whole and ranged reads, atomic writes, sizes of the directory's files, listing and deletion.

- A plain path uses the local filesystem directly: writes go to a temp file, are fsynced and
  renamed into place, so a reader or a killed job never sees half a file.
- A URL (``file://`` included) goes through ``fsspec``. Object stores (S3, GCS, Azure, memory)
  make an object visible only once its upload is complete, so files are written in one put;
  other filesystems get a temp file and a rename.

Remote filesystems are imported lazily: a local cache never needs ``fsspec``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from clt_lens.errors import InputError, MissingFileError
from clt_lens.fsutil import fsync_dir

# fsspec protocols whose writes become visible whole (a put / a completed multipart upload)
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "r2",
                  "memory", "hf"}


def is_url(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


class Store:
    """A cache directory: ``Store("runs/cache")`` or ``Store("s3://bucket/cache")``.

    File names are relative to the root and use ``/`` (``"jobs/job-0-of-1.json"``).
    """

    def __init__(self, root: str | Path) -> None:
        root = str(root)
        if not root:
            raise InputError("a cache path must not be empty")
        self.url = is_url(root)
        if self.url:
            try:
                import fsspec
            except ImportError:  # pragma: no cover - fsspec is a dependency
                raise InputError(f"{root}: URLs need the fsspec package") from None
            try:
                self.fs, path = fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as e:
                raise InputError(f"cannot open cache location {root!r}: {e}") from None
            self.root = path.rstrip("/") or "/"
            protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (
                self.fs.protocol,)
            self.whole_puts = bool(set(protocols) & _OBJECT_STORES)
        else:
            self.fs = None
            self.root = root
            self.whole_puts = False
        self.display = root.rstrip("/") if self.url else str(Path(root))

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"Store({self.display!r})"

    def path(self, name: str) -> str:
        """The full path (local) or URL of a file, for messages and for fsspec calls."""
        if self.url:
            return f"{self.display}/{name}"
        return str(Path(self.root) / name)

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}" if self.url else str(Path(self.root) / name)

    # -- reading ---------------------------------------------------------------------------------

    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytearray:
        """Bytes ``[start, end)`` of a file (the whole file by default).

        Raises ``FileNotFoundError`` if it does not exist.
        """
        if self.url:
            try:
                return bytearray(self.fs.cat_file(self._p(name), start=start, end=end))
            except FileNotFoundError:
                raise MissingFileError(self.path(name)) from None
        # A writable buffer: arrays made from it need no copy (and torch no warning).
        with open(self._p(name), "rb") as f:
            lo = start or 0
            hi = end if end is not None else os.fstat(f.fileno()).st_size
            data = bytearray(max(0, hi - lo))
            if lo:
                f.seek(lo)
            n = f.readinto(data)
            del data[n:]
            return data

    def read_json(self, name: str) -> Any:
        return json.loads(self.read(name))

    def exists(self, name: str = "") -> bool:
        if self.url:
            return bool(self.fs.exists(self._p(name) if name else self.root))
        return os.path.exists(self._p(name) if name else self.root)

    def is_dir(self) -> bool:
        if self.url:
            return bool(self.fs.isdir(self.root))
        return os.path.isdir(self.root)

    def size(self, name: str) -> int:
        """Size in bytes; ``FileNotFoundError`` if missing."""
        if self.url:
            try:
                return int(self.fs.size(self._p(name)))
            except FileNotFoundError:
                raise MissingFileError(self.path(name)) from None
        return os.stat(self._p(name)).st_size

    def sizes(self, subdir: str = "") -> dict[str, int]:
        """``{file name: size}`` for the files directly in ``subdir`` (one listing call)."""
        if self.url:
            base = f"{self.root}/{subdir}".rstrip("/") if subdir else self.root
            try:
                entries = self.fs.ls(base, detail=True)
            except FileNotFoundError:
                return {}
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                    for e in entries if e.get("type") == "file"}
        base = Path(self.root) / subdir
        if not base.is_dir():
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(base) if e.is_file()}

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        if self.url:
            with self.fs.open(self._p(name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        else:
            with open(self._p(name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()

    # -- writing ---------------------------------------------------------------------------------

    def makedirs(self, subdir: str = "") -> None:
        if self.url:
            self.fs.makedirs(f"{self.root}/{subdir}".rstrip("/"), exist_ok=True)
        else:
            (Path(self.root) / subdir).mkdir(parents=True, exist_ok=True)

    def write_atomic(self, name: str, data: bytes | bytearray | list[bytes]) -> None:
        """Write a whole file so that nobody ever sees it half written."""
        chunks = data if isinstance(data, list) else [data]
        if self.url:
            target = self._p(name)
            parent = target.rsplit("/", 1)[0]
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            blob = b"".join(bytes(c) if not isinstance(c, bytes) else c for c in chunks)
            if self.whole_puts:
                self.fs.pipe_file(target, blob)
            else:
                tmp = f"{target}.{os.getpid()}.tmp"
                try:
                    self.fs.pipe_file(tmp, blob)
                    self.fs.mv(tmp, target)
                except BaseException:
                    if self.fs.exists(tmp):
                        self.fs.rm(tmp)
                    raise
            return
        path = Path(self._p(name))
        # A per-process temp name: concurrent jobs may write the same file (config, manifest).
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        fsync_dir(path.parent)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_atomic(name, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def remove(self, name: str) -> None:
        """Delete a file if it exists."""
        try:
            if self.url:
                self.fs.rm(self._p(name))
            else:
                os.unlink(self._p(name))
        except FileNotFoundError:
            pass


def as_store(root: str | Path | Store) -> Store:
    return root if isinstance(root, Store) else Store(root)
