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
2. The unit of reading is a *chunk* (``chunk_tokens`` tokens of one shard; a format-1 shard is
   one chunk). With ``shuffle``, a rank's shards are taken in groups of G consecutive shards,
   G = the number of chunks a window holds, and each group's chunks are listed round-robin:
   chunk 0 of every shard of the group, then chunk 1 ... Without ``shuffle``, chunks come in
   token order.
3. The chunks are grouped, in order, into windows of at least ``buffer_tokens`` tokens. Each
   window is decoded whole and its tokens are visited in a permutation drawn from
   ``(seed, e, rank, window)``: this is the shuffle buffer. By step 2 a window holds chunks of
   up to G different shards, so a batch mixes tokens of many shards however large the shards
   are, and memory does not grow with the shard size.
4. The epoch's token sequence is the concatenation of the windows; batches are consecutive runs
   of ``batch_size`` tokens. With ``loop=True`` epochs follow each other without a break (every
   batch is full); with ``loop=False`` iteration stops at the end of the epoch (the last batch
   may be short, or is dropped with ``drop_last``) and iterating again continues with the next.

The position is ``(epoch, offset)``: tokens consumed in that epoch. A background thread cuts
batches (``prefetch`` of them queued) while the next window is decoded by ``decode_threads``
threads, one chunk per task (zstd, hashing and torch release the GIL; every step is a
vectorised pass over a chunk, never a Python loop over tokens). The position saved is the one
after the last batch handed out, so a restored reader yields exactly the batches an
uninterrupted one would have yielded next. A restore may change ``batch_size``; the token order
stays the same.

Dequantisation runs on ``decode_device`` (default: the output ``device``): on a GPU only the
compact codes cross PCIe and the float32 window lives in GPU memory. Every byte used is
verified: the shard header against the manifest's sha256, each chunk and the parameters
against the header's (format 1: the whole file against the manifest). A bad or missing file
raises ``CacheError`` naming it.

Memory: two windows of float32 ``x`` and ``y`` (``2 * 2 * buffer_tokens * L * d * 4`` bytes, on
``decode_device``) plus the queued batches and the chunks being decoded, whatever the size of
the cache or of its shards. By default a window holds up to 256 MiB of decoded activations
(65,536 tokens at most).

The path may be a local directory or an fsspec URL (``s3://...``, ``memory://...``).

The order (steps 1-3) is planned by ``order.py``; the background thread is ``prefetch.py``.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clt_lens.activations import HookSpec
from clt_lens.cache.errors import CacheError, CacheMismatchError
from clt_lens.cache.manifest import CacheManifest, read_manifest
from clt_lens.cache.order import EpochPlan, seed_for
from clt_lens.cache.prefetch import Prefetcher
from clt_lens.cache.shard import ShardView, parse_header, parse_shard, sha256_hex
from clt_lens.cache.storage import Store
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


class CacheReader:
    """Iterable of float32 ``(x [B, L, d], y [B, L, d])`` batches from a cache.

    See the module docstring for the order, partitioning, decoding and resume semantics.
    ``expected`` (keys among model_id, model_name, hooks, input_hook, output_hook, n_layers,
    d_model, context_size, dataset, split) is checked against the manifest before anything
    is read. ``decode_threads`` (default: half the cores, 2 to 8) decode chunks in parallel;
    ``decode_device`` (default: ``device``) is where the codes are dequantised.
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
        decode_threads: int | None = None,
        decode_device: str | torch.device | None = None,
    ) -> None:
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        if not (0 <= rank < world_size):
            raise InputError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        if decode_threads is None:
            decode_threads = min(8, max(2, (os.cpu_count() or 2) // 2))
        if prefetch < 1 or decode_threads < 1:
            raise InputError("prefetch and decode_threads must be >= 1")
        try:
            self.store = Store(path)
        except ValueError as e:
            raise CacheError(str(e)) from None
        self.path: Path | str = str(path) if self.store.url else Path(path)
        self.manifest = read_manifest(self.store)
        if expected:
            check_expected(self.manifest, expected, str(self.store))
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
        self.decode_device = torch.device(decode_device) if decode_device is not None \
            else self.device
        self.decode_threads = int(decode_threads)
        self._check_files()
        self.chunk_sizes = [s.chunk_sizes() for s in self.manifest.shards]
        typical = max((c[0] for c in self.chunk_sizes if c), default=1)
        self.group_shards = max(1, math.ceil(self.buffer_tokens / typical))
        self._epochs: dict[int, EpochPlan] = {}
        self._plan_lock = threading.Lock()
        self._pos = (0, 0)  # (epoch, tokens consumed in it) after the last batch handed out
        self._worker: Prefetcher | None = None
        self._shards: OrderedDict[int, tuple[ShardView, Any]] = OrderedDict()
        self._shards_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats = {"bytes_read": 0, "bytes_to_device": 0, "tokens_decoded": 0}

    # -- plan -----------------------------------------------------------------------------------

    def _check_files(self) -> None:
        m = self.manifest
        if not m.shards:
            raise CacheError(f"cache {self.store} holds no shards")
        sizes = self.store.sizes()
        for s in m.shards:
            p = self.store.path(s.file)
            if s.file not in sizes:
                raise CacheError(f"shard {p} listed in the manifest is missing")
            if sizes[s.file] != s.nbytes:
                raise CacheError(
                    f"shard {p}: {sizes[s.file]} bytes on disk, manifest says {s.nbytes} "
                    "(truncated?)"
                )
        if self.partition and len(m.shards) < self.world_size:
            raise CacheError(
                f"cache {self.store} has {len(m.shards)} shards, fewer than world_size "
                f"{self.world_size}: regenerate with smaller shards or use partition=False"
            )

    def epoch_plan(self, epoch: int) -> EpochPlan:
        with self._plan_lock:  # the worker plans ahead while the caller may ask too
            if epoch not in self._epochs:
                if len(self._epochs) > 3:
                    self._epochs.pop(min(self._epochs))
                self._epochs[epoch] = EpochPlan(
                    self.chunk_sizes, epoch, shuffle=self.shuffle, seed=self.seed,
                    partition=self.partition, rank=self.rank, world_size=self.world_size,
                    group_shards=self.group_shards, buffer_tokens=self.buffer_tokens)
            return self._epochs[epoch]

    def epoch_tokens(self, epoch: int = 0) -> int:
        """Tokens this rank reads in ``epoch``."""
        return self.epoch_plan(epoch).n_tokens

    def shards_for_epoch(self, epoch: int = 0) -> list[int]:
        """Shard indices this rank reads in ``epoch``, in order of first use."""
        seen: dict[int, None] = {}
        for u in self.epoch_plan(epoch).units:
            seen.setdefault(u[0], None)
        return list(seen)

    def window_shards(self, epoch: int = 0) -> list[list[int]]:
        """For each window of ``epoch``: the shards its chunks come from."""
        p = self.epoch_plan(epoch)
        return [sorted({p.units[i][0] for i in w}) for w in p.windows]

    def __len__(self) -> int:
        """Batches in epoch 0 for this rank (with loop=False)."""
        n = self.epoch_tokens(0)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def stats(self) -> dict[str, int]:
        """Counters since construction: compressed bytes read, bytes moved to the decoding
        device (codes and parameters; 0 when decoding on the CPU), tokens decoded."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, **kw: int) -> None:
        with self._stats_lock:
            for k, v in kw.items():
                self._stats[k] += v

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
                self._worker = Prefetcher(self, self._pos)
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

    # -- decoding (runs in the decode threads) ---------------------------------------------------

    def _shard(self, k: int) -> tuple[ShardView, Any]:
        """A chunked shard's verified header and decoder (parameters on the decode device)."""
        with self._shards_lock:
            if k in self._shards:
                self._shards.move_to_end(k)
                return self._shards[k]
        entry = self.manifest.shards[k]
        where = self.store.path(entry.file)
        head = self._read(entry.file, 0, entry.header_nbytes)
        if sha256_hex(head) != entry.header_sha256:
            raise CacheError(f"shard {where}: sha256 of its header does not match the "
                             "manifest's (corrupt or replaced file)")
        header, hn = parse_header(head, where)
        view = ShardView(header, None, where, hn)
        self._check_header(view, entry)
        info = view.params_info()
        lo = hn + int(info["offset"])
        region = self._read(entry.file, lo, lo + int(info["nbytes"]))
        decoder = view.decoder(self.decode_device, region)
        if self.decode_device.type != "cpu":
            self._count(bytes_to_device=len(region))
        with self._shards_lock:
            self._shards[k] = (view, decoder)
            while len(self._shards) > max(4, 2 * self.group_shards):
                self._shards.popitem(last=False)
        return view, decoder

    def _check_header(self, view: ShardView, entry: Any) -> None:
        m = self.manifest
        got = view.shape
        if got != (entry.n_tokens, m.n_layers, m.d_model) or \
                view.header.get("chunk_tokens") != entry.chunk_tokens:
            raise CacheError(
                f"shard {view.source}: header says (tokens, L, d) = {got}, chunks of "
                f"{view.header.get('chunk_tokens')}; manifest says "
                f"{(entry.n_tokens, m.n_layers, m.d_model)}, chunks of {entry.chunk_tokens}"
            )

    def _read(self, name: str, start: int | None = None, end: int | None = None) -> bytearray:
        try:
            data = self.store.read(name, start, end)
        except FileNotFoundError:
            raise CacheError(f"shard {self.store.path(name)} is missing") from None
        self._count(bytes_read=len(data))
        return data

    def _load_unit(self, unit: tuple[int, int, int, int], out_x: Tensor, out_y: Tensor) -> None:
        k, j, start, n = unit
        entry = self.manifest.shards[k]
        if entry.header_nbytes is None:  # format 1: one chunk, checked by the file's sha256
            data = self._read(entry.file)
            where = self.store.path(entry.file)
            if len(data) != entry.nbytes or sha256_hex(data) != entry.sha256:
                raise CacheError(f"shard {where}: sha256 or size does not match the manifest's "
                                 "(corrupt file)")
            view = parse_shard(data, where)
            self._check_header(view, entry)
            decoder = view.decoder(self.decode_device)
            arrays = view.chunk(0)
        else:
            view, decoder = self._shard(k)
            info = view.chunk_info(j)
            if (int(info["start"]), int(info["n_tokens"])) != (start, n):
                raise CacheError(f"shard {view.source}: chunk {j} covers other tokens than the "
                                 "manifest implies")
            lo = view.header_nbytes + int(info["offset"])
            region = self._read(entry.file, lo, lo + int(info["nbytes"]))
            arrays = view.chunk(j, region)
        if self.decode_device.type != "cpu":
            self._count(bytes_to_device=sum(a.nbytes for a in arrays.values()))
        view.decode_chunk_into(decoder, arrays, out_x, out_y)
        self._count(tokens_decoded=n)

    def _decode_window(self, plan: EpochPlan, epoch: int, w: int, pool: ThreadPoolExecutor | None,
                       stop: threading.Event | None = None,
                       bufs: tuple[Tensor, Tensor] | None = None
                       ) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, Tensor]]:
        """Decode window ``w`` into ``bufs`` (reused buffers: a fresh allocation costs a page
        fault per 4 KiB written, which made decoding 3-4x slower) -> (x, y, perm, bufs)."""
        units = [plan.units[i] for i in plan.windows[w]]
        n = plan.starts[w + 1] - plan.starts[w]
        if bufs is None or bufs[0].shape[0] < n:
            bufs = self.window_buffers(n)
        x, y = bufs[0][:n], bufs[1][:n]
        jobs = []
        lo = 0
        for u in units:
            jobs.append((u, lo))
            lo += u[3]

        def load(job: tuple[tuple[int, int, int, int], int]) -> None:
            u, lo = job
            if stop is None or not stop.is_set():  # a closed reader drops the window
                self._load_unit(u, x[lo : lo + u[3]], y[lo : lo + u[3]])

        if pool is None or len(jobs) == 1:
            for job in jobs:
                load(job)
        else:
            list(pool.map(load, jobs))
        perm = None
        if self.shuffle:
            g = torch.Generator().manual_seed(seed_for(self.seed, epoch, self.rank, w, 1))
            perm = torch.randperm(n, generator=g).to(self.decode_device)
        return x, y, perm, bufs

    def window_buffers(self, n: int) -> tuple[Tensor, Tensor]:
        """A pair of float32 window buffers of at least ``n`` tokens on the decode device."""
        m = self.manifest
        biggest = max((c for sizes in self.chunk_sizes for c in sizes), default=1)
        n = max(n, self.buffer_tokens + biggest - 1)
        return (torch.empty(n, m.n_layers, m.d_model, device=self.decode_device),
                torch.empty(n, m.n_layers, m.d_model, device=self.decode_device))
