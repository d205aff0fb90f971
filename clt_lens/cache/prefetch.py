"""The background side of a ``CacheReader``: a thread that cuts batches from decoded windows
while the decode threads decode the next window (``reader.py``'s docstring: position,
prefetch and decode threads).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from clt_lens.cache.errors import CacheError

if TYPE_CHECKING:  # annotations only: reader.py imports this module
    from clt_lens.cache.reader import CacheReader

_OMP: Any = None  # the OpenMP library torch uses, found once (False: none)


def single_threaded_torch() -> None:
    """Make torch ops issued by *this* thread run on one thread.

    Decoding runs on several Python threads next to the trainer; torch's OpenMP pool in each
    of them would oversubscribe the cores (on 2 cores a 2-thread elementwise op ran 3x slower
    than a 1-thread one). OpenMP keeps the thread count per thread, so this sets it for the
    calling thread only; ``torch.set_num_threads`` would also change the default of threads
    created later.
    """
    global _OMP
    torch.get_num_threads()  # torch's lazy per-thread init first, or it would undo ours
    if _OMP is None:
        _OMP = False
        try:
            with open("/proc/self/maps") as f:
                libs = {ln.split()[-1] for ln in f if "libgomp" in ln or "libiomp" in ln}
            for lib in sorted(libs):
                _OMP = ctypes.CDLL(lib)
                break
        except OSError:
            pass
    if _OMP:
        _OMP.omp_set_num_threads(1)


class Prefetcher:
    """Background thread producing ("batch", x, y, pos_after) items from a start position.

    The next window is decoded (by the decode threads) while batches of the current one are
    cut, so a consumer faster than one window's decode never waits at window boundaries.
    """

    def __init__(self, reader: CacheReader, pos: tuple[int, int]) -> None:
        self.reader = reader
        self.q: queue.Queue = queue.Queue(maxsize=reader.prefetch)
        self._stop = threading.Event()
        self.pool = ThreadPoolExecutor(reader.decode_threads, thread_name_prefix="clt-decode",
                                       initializer=single_threaded_torch)
        self.ahead = ThreadPoolExecutor(1, thread_name_prefix="clt-window",
                                        initializer=single_threaded_torch)
        self.free: list[tuple[Tensor, Tensor]] = []  # window buffers not in use
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
        self.ahead.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, pos: tuple[int, int]) -> None:
        single_threaded_torch()
        try:
            self._produce(pos)
        except BaseException as e:  # hand every failure to the consumer
            self._put(("error", e))

    def _next_window(self, e: int, w: int) -> tuple[int, int] | None:
        r = self.reader
        if w + 1 < len(r.epoch_plan(e).windows):
            return e, w + 1
        return (e + 1, 0) if r.epoch_plan(e + 1).n_tokens else None

    def _submit(self, e: int, w: int) -> Future:
        r = self.reader
        bufs = self.free.pop() if self.free else None  # (producer thread only)
        return self.ahead.submit(r._decode_window, r.epoch_plan(e), e, w, self.pool,
                                 self._stop, bufs)

    def _window(self, e: int, w: int, pending: dict[tuple[int, int], Future]) -> tuple:
        fut = pending.pop((e, w), None)
        for stale in pending.values():
            stale.cancel()
        pending.clear()
        if fut is None:
            fut = self._submit(e, w)
        nxt = self._next_window(e, w)
        win = fut.result()
        if nxt is not None and not self._stop.is_set():
            pending[nxt] = self._submit(*nxt)
        return win

    def _produce(self, pos: tuple[int, int]) -> None:
        r = self.reader
        epoch, offset = pos
        loaded: tuple[int, int] | None = None  # (epoch, window) in `win`
        win: tuple | None = None  # (x, y, perm, buffers)
        pending: dict[tuple[int, int], Future] = {}
        pin = r.device.type == "cuda" and r.decode_device.type == "cpu"
        while not self._stop.is_set():
            plan = r.epoch_plan(epoch)
            if plan.n_tokens == 0:
                raise CacheError(f"cache {r.store}: rank {r.rank} has no tokens in epoch {epoch}")
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
                    if win is not None:  # batches hold copies: its buffers can be reused
                        self.free.append(win[3])
                    win = None
                    win = self._window(e, w, pending)
                    loaded = (e, w)
                wx, wy, perm, _ = win
                lo = o - p.starts[w]
                take = min(need, wx.shape[0] - lo)
                if perm is None:
                    parts_x.append(wx[lo : lo + take].clone())
                    parts_y.append(wy[lo : lo + take].clone())
                else:
                    idx = perm[lo : lo + take]
                    parts_x.append(wx.index_select(0, idx))
                    parts_y.append(wy.index_select(0, idx))
                o += take
                need -= take
            if need > 0 and r.drop_last:
                epoch, offset = e, o
                continue
            # parts are copies (index_select, clone): window buffers get reused
            x = parts_x[0] if len(parts_x) == 1 else torch.cat(parts_x)
            y = parts_y[0] if len(parts_y) == 1 else torch.cat(parts_y)
            if x.device != r.device:
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                x = x.to(r.device, non_blocking=pin)
                y = y.to(r.device, non_blocking=pin)
            epoch, offset = e, o
            if not self._put(("batch", x, y, (epoch, offset))):
                return
