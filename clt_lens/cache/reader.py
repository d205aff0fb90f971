"""Reading a cache: shuffled, rank-partitioned, prefetched, exactly resumable batches.

Order of tokens (a pure function of the manifest and the reader's settings, which is what makes
``state_dict()`` / ``load_state_dict()`` exact):

1. Epoch e visits the shards in a permutation drawn from ``(seed, e)`` (identity without
   ``shuffle``). With ``partition=True`` rank r of W takes the shards at positions r, r + W,
   r + 2W ... of that permutation, so in every epoch the ranks read disjoint shards that
   together cover the cache. With ``partition=False`` every rank reads the same batches (for
   feature-parallel groups that must see identical inputs). Ranks' shares differ by at most
   one shard, so with ``loop=False`` they may get different numbers of batches per epoch;
   data-parallel training should use ``loop=True`` and count steps.
2. A rank's shards for the epoch are grouped, in order, into windows of at least
   ``buffer_tokens`` tokens. Each window is decoded whole and its tokens are visited in a
   permutation drawn from ``(seed, e, rank, window)``: this is the shuffle buffer.
3. The epoch's token sequence is the concatenation of the windows; batches are consecutive runs
   of ``batch_size`` tokens. With ``loop=True`` epochs follow each other without a break (every
   batch is full); with ``loop=False`` iteration stops at the end of the epoch (the last batch
   may be short, or is dropped with ``drop_last``) and iterating again continues with the next.

The position is ``(epoch, offset)``: tokens consumed in that epoch. A background thread decodes
windows and cuts batches ahead of use (``prefetch`` batches queued); the position saved is the
one after the last batch handed out, so a restored reader yields exactly the batches an
uninterrupted one would have yielded next. A restore may change ``batch_size``; the token order
stays the same.

Each shard's size and sha256 are checked against the manifest when it is read; a bad or missing
file raises ``CacheError`` naming it. Memory: about two windows of float32 ``x`` and ``y``
(``2 * 2 * buffer_tokens * L * d * 4`` bytes) plus the queued batches. By default a window
holds up to 256 MiB of decoded activations (65,536 tokens at most, one shard at least).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clt_lens.activations import HookSpec
from clt_lens.cache.format import (
    CacheError,
    CacheManifest,
    CacheMismatchError,
    read_manifest,
    read_shard_file,
)
from clt_lens.errors import InputError

STATE_VERSION = 1
DEFAULT_BUFFER_BYTES = 256 * 2**20  # decoded x + y per shuffle window
_EXPECTED_FIELDS = ("model_id", "model_name", "hooks", "input_hook", "output_hook", "n_layers",
                    "d_model", "context_size", "dataset", "split")


def check_expected(manifest: CacheManifest, expected: dict[str, Any], source: str) -> None:
    """Raise ``CacheMismatchError`` naming the first field where the cache differs."""
    for key, want in expected.items():
        if key not in _EXPECTED_FIELDS:
            raise CacheError(f"unknown expected field {key!r}; accepted: {list(_EXPECTED_FIELDS)}")
        if key == "hooks":
            have: Any = manifest.hooks
            if isinstance(want, dict):
                want = HookSpec.from_dict(want)
        elif key in ("input_hook", "output_hook"):
            have = getattr(manifest.hooks, key)
        else:
            have = getattr(manifest, key)
        if have != want:
            raise CacheMismatchError(
                f"cache {source} does not match: {key} is {have!r} in the cache, expected {want!r}"
            )


def _seed_for(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class _Epoch:
    """One epoch's plan for one rank: shards, windows and their token ranges."""

    def __init__(self, reader: CacheReader, epoch: int) -> None:
        m = reader.manifest
        n = len(m.shards)
        if reader.shuffle:
            g = torch.Generator().manual_seed(_seed_for(reader.seed, epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if reader.partition:
            order = order[reader.rank :: reader.world_size]
        self.windows: list[list[int]] = []
        cur: list[int] = []
        have = 0
        for k in order:
            cur.append(k)
            have += m.shards[k].n_tokens
            if have >= reader.buffer_tokens:
                self.windows.append(cur)
                cur, have = [], 0
        if cur:
            self.windows.append(cur)
        self.starts = [0]
        for w in self.windows:
            self.starts.append(self.starts[-1] + sum(m.shards[k].n_tokens for k in w))
        self.n_tokens = self.starts[-1]

    def window_at(self, offset: int) -> int:
        """Index of the window holding epoch position ``offset`` (< n_tokens)."""
        lo, hi = 0, len(self.windows) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo


class CacheReader:
    """Iterable of float32 ``(x [B, L, d], y [B, L, d])`` batches from a cache directory.

    See the module docstring for the order, partitioning and resume semantics. ``expected``
    (keys among model_id, model_name, hooks, input_hook, output_hook, n_layers, d_model,
    context_size, dataset, split) is checked against the manifest before anything is read.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        partition: bool = True,
        buffer_tokens: int | None = None,
        prefetch: int = 2,
        loop: bool = True,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        expected: dict[str, Any] | None = None,
        decode_threads: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        if not (0 <= rank < world_size):
            raise InputError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        if prefetch < 1 or decode_threads < 1:
            raise InputError("prefetch and decode_threads must be >= 1")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if expected:
            check_expected(self.manifest, expected, str(self.path))
        self.batch_size = int(batch_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.partition = bool(partition)
        self.rank, self.world_size = (int(rank), int(world_size)) if partition else (0, 1)
        if buffer_tokens is None:
            per_token = self.manifest.n_layers * self.manifest.d_model * 4 * 2
            buffer_tokens = min(65_536, DEFAULT_BUFFER_BYTES // per_token)
        self.buffer_tokens = max(0, int(buffer_tokens))
        self.prefetch, self.loop, self.drop_last = int(prefetch), bool(loop), bool(drop_last)
        self.device = torch.device(device)
        self.decode_threads = int(decode_threads)
        self._check_files()
        self._epochs: dict[int, _Epoch] = {}
        self._pos = (0, 0)  # (epoch, tokens consumed in it) after the last batch handed out
        self._worker: _Worker | None = None

    # -- plan -----------------------------------------------------------------------------------

    def _check_files(self) -> None:
        m = self.manifest
        if not m.shards:
            raise CacheError(f"cache {self.path} holds no shards")
        for s in m.shards:
            p = self.path / s.file
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise CacheError(f"shard {p} listed in the manifest is missing") from None
            if size != s.nbytes:
                raise CacheError(
                    f"shard {p}: {size} bytes on disk, manifest says {s.nbytes} (truncated?)"
                )
        if self.partition and len(m.shards) < self.world_size:
            raise CacheError(
                f"cache {self.path} has {len(m.shards)} shards, fewer than world_size "
                f"{self.world_size}: regenerate with smaller shards or use partition=False"
            )

    def epoch_plan(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            if len(self._epochs) > 8:
                self._epochs.clear()
            self._epochs[epoch] = _Epoch(self, epoch)
        return self._epochs[epoch]

    def epoch_tokens(self, epoch: int = 0) -> int:
        """Tokens this rank reads in ``epoch``."""
        return self.epoch_plan(epoch).n_tokens

    def shards_for_epoch(self, epoch: int = 0) -> list[int]:
        """Shard indices this rank reads in ``epoch``, in reading order."""
        return [k for w in self.epoch_plan(epoch).windows for k in w]

    def __len__(self) -> int:
        """Batches in epoch 0 for this rank (with loop=False)."""
        n = self.epoch_tokens(0)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # -- state ----------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "cache": self.manifest.config_hash or str(self.manifest.n_tokens),
            "n_shards": len(self.manifest.shards), "shuffle": self.shuffle, "seed": self.seed,
            # one reader sees every shard whether it partitions or not
            "rank": self.rank, "world_size": self.world_size,
            "partition": self.partition and self.world_size > 1,
            "buffer_tokens": self.buffer_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position after the last batch handed out."""
        return {"version": STATE_VERSION, "epoch": self._pos[0], "offset": self._pos[1],
                "settings": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise CacheError(f"reader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}")
        mine = self._fingerprint()
        theirs = state.get("settings", {})
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            raise CacheError(
                "reader state was saved with other settings, so its position means other "
                "batches: " + ", ".join(f"{k}: saved {theirs.get(k)!r}, now {mine[k]!r}"
                                        for k in diff)
            )
        self.close()
        self._pos = (int(state["epoch"]), int(state["offset"]))

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            if self._worker is None:
                self._worker = _Worker(self, self._pos)
            item = self._worker.get()
            kind = item[0]
            if kind == "batch":
                _, x, y, pos = item
                self._pos = pos
                yield x, y
            elif kind == "epoch_end":  # only with loop=False
                self._pos = item[1]
                return
            else:  # "error"
                self.close()
                raise item[1]

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # -- decoding (runs in the worker thread) ----------------------------------------------------

    def _decode_window(self, plan: _Epoch, epoch: int, w: int, pool: Any
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
        m = self.manifest
        shards = plan.windows[w]
        n = plan.starts[w + 1] - plan.starts[w]
        x = torch.empty(n, m.n_layers, m.d_model)
        y = torch.empty(n, m.n_layers, m.d_model)
        jobs = []
        lo = 0
        for k in shards:
            jobs.append((m.shards[k], lo))
            lo += m.shards[k].n_tokens

        def load(job: tuple[Any, int]) -> None:
            entry, lo = job
            view = read_shard_file(self.path / entry.file, nbytes=entry.nbytes,
                                   sha256=entry.sha256)
            h = view.header
            got = (h.get("n_tokens"), h.get("n_layers"), h.get("d_model"))
            if got != (entry.n_tokens, m.n_layers, m.d_model):
                raise CacheError(
                    f"shard {self.path / entry.file}: header says (tokens, L, d) = {got}, "
                    f"manifest says {(entry.n_tokens, m.n_layers, m.d_model)}"
                )
            view.decode(x[lo : lo + entry.n_tokens], y[lo : lo + entry.n_tokens])

        if pool is None or len(jobs) == 1:
            for job in jobs:
                load(job)
        else:  # zstd and torch release the GIL: shards of a window decode in parallel
            list(pool.map(load, jobs))
        perm = None
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed_for(self.seed, epoch, self.rank, w, 1))
            perm = torch.randperm(n, generator=g)
        return x, y, perm


class _Worker:
    """Background thread producing ("batch", x, y, pos_after) items from a start position."""

    def __init__(self, reader: CacheReader, pos: tuple[int, int]) -> None:
        self.reader = reader
        self.q: queue.Queue = queue.Queue(maxsize=reader.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pos,), daemon=True,
                                        name="clt-cache-reader")
        self._thread.start()

    def get(self) -> tuple:
        while True:
            try:
                return self.q.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self.q.empty():
                    return ("error", CacheError("cache reader thread stopped unexpectedly"))

    def stop(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a put()
                self.q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, pos: tuple[int, int]) -> None:
        r = self.reader
        pool = ThreadPoolExecutor(r.decode_threads) if r.decode_threads > 1 else None
        try:
            self._produce(pos, pool)
        except BaseException as e:  # hand every failure to the consumer
            self._put(("error", e))
        finally:
            if pool is not None:
                pool.shutdown(wait=False)

    def _produce(self, pos: tuple[int, int], pool: Any) -> None:
        r = self.reader
        epoch, offset = pos
        loaded: tuple[int, int] | None = None  # (epoch, window) in `win`
        win: tuple[Tensor, Tensor, Tensor | None] | None = None
        pin = r.device.type == "cuda"
        while not self._stop.is_set():
            plan = r.epoch_plan(epoch)
            if plan.n_tokens == 0:
                raise CacheError(f"cache {r.path}: rank {r.rank} has no tokens in epoch {epoch}")
            if offset >= plan.n_tokens:
                epoch, offset = epoch + 1, 0
                if not r.loop:
                    if not self._put(("epoch_end", (epoch, 0))):
                        return
                continue
            parts_x, parts_y = [], []
            need = r.batch_size
            e, o = epoch, offset
            while need > 0:
                p = r.epoch_plan(e)
                if o >= p.n_tokens:
                    if not r.loop:
                        break
                    e, o = e + 1, 0
                    continue
                w = p.window_at(o)
                if loaded != (e, w):
                    win = None  # free the old window before decoding the next
                    win = r._decode_window(p, e, w, pool)
                    loaded = (e, w)
                wx, wy, perm = win
                lo = o - p.starts[w]
                take = min(need, wx.shape[0] - lo)
                if perm is None:
                    parts_x.append(wx[lo : lo + take])
                    parts_y.append(wy[lo : lo + take])
                else:
                    idx = perm[lo : lo + take]
                    parts_x.append(wx.index_select(0, idx))
                    parts_y.append(wy.index_select(0, idx))
                o += take
                need -= take
            if need > 0 and r.drop_last:
                epoch, offset = e, o
                continue
            # index_select already copied; slices of an unshuffled window must be copied so a
            # batch does not keep its whole window alive.
            one = len(parts_x) == 1 and r.shuffle
            x = parts_x[0] if one else torch.cat(parts_x)
            y = parts_y[0] if one else torch.cat(parts_y)
            if r.device.type != "cpu":
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                x = x.to(r.device, non_blocking=pin)
                y = y.to(r.device, non_blocking=pin)
            epoch, offset = e, o
            if not self._put(("batch", x, y, (epoch, offset))):
                return
