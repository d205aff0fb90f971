"""Process layout for training: single process, data parallel, feature sharded, or both.

Ranks form a 2-D grid ``data_size x feature_size`` (rank = data_rank * feature_size +
feature_rank). Ranks in one *feature group* share a batch and each hold a slice of the F
features of every layer; their partial reconstructions are summed by one all-reduce per step.
Ranks in one *data group* hold the same feature slice and read different data; their
gradients are averaged. With both sizes 1 every collective is a no-op, so the trainer runs the
same code in one process.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist

from clt_lens.clt.comm import FeatureComm
from clt_lens.clt.storage import feature_dim, feature_slice
from clt_lens.errors import InputError

__all__ = ["Parallel", "feature_dim"]


class _SumPartials(torch.autograd.Function):
    """All-reduce (sum) in forward; identity in backward.

    Every rank of a feature group computes the same loss from the summed reconstruction, so
    d loss / d partial_r equals d loss / d sum on each rank: no reduction of the gradient.
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, comm: _GroupComm) -> torch.Tensor:
        out = t.clone()
        with comm.timed("sum_partials", out):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=comm.group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class _GroupComm(FeatureComm):
    """The feature group of a process grid, as ``clt_lens.clt.comm`` needs it.

    ``stats`` counts, per collective, the bytes this rank sent and the seconds it waited
    (benchmarks/distributed.py reports them)."""

    def __init__(self, group: Any, size: int) -> None:
        self.group, self.size = group, size
        self.stats: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def timed(self, op: str, t: torch.Tensor):
        start = time.perf_counter()
        yield
        st = self.stats.setdefault(op, {"bytes": 0.0, "seconds": 0.0, "calls": 0.0})
        st["bytes"] += t.numel() * t.element_size()
        st["seconds"] += time.perf_counter() - start
        st["calls"] += 1

    def sum_partials(self, t: torch.Tensor) -> torch.Tensor:
        return _SumPartials.apply(t, self)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        with self.timed("gather_topk", t):
            dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        with self.timed(f"all_reduce_{op}", t):
            dist.all_reduce(t, op=_OPS[op], group=self.group)
        return t


@dataclass
class Parallel:
    data_size: int = 1
    feature_size: int = 1
    data_rank: int = 0
    feature_rank: int = 0
    data_group: Any = None
    feature_group: Any = None
    backend: str | None = None

    @property
    def world_size(self) -> int:
        return self.data_size * self.feature_size

    @property
    def rank(self) -> int:
        return self.data_rank * self.feature_size + self.feature_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ---- setup -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, mode: str, feature_parallel_size: int, device: str) -> Parallel:
        """Join the process group torchrun set up (env://); single process if there is none."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if mode == "none" or world == 1:
            if mode != "none":  # same maths, no collectives: say so, since it is rarely meant
                warnings.warn(
                    f"distributed={mode!r} but no process group: training as ONE process. "
                    "Launch every rank with torchrun, e.g. 'torchrun --nproc_per_node 8 -m "
                    f"clt_lens train CONFIG --distributed {mode}'",
                    stacklevel=2,
                )
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        rank = dist.get_rank()
        if mode == "ddp":
            fsize = 1
        elif mode == "feature":
            fsize = world
        else:  # 2d
            fsize = feature_parallel_size
        if world % fsize:
            raise InputError(
                f"distributed=2d: world size {world} is not divisible by "
                f"feature_parallel_size {fsize}"
            )
        dsize = world // fsize
        p = cls(
            data_size=dsize,
            feature_size=fsize,
            data_rank=rank // fsize,
            feature_rank=rank % fsize,
            backend=dist.get_backend(),
        )
        # new_group must be called by every rank for every group, in the same order.
        for d in range(dsize):
            g = dist.new_group([d * fsize + f for f in range(fsize)])
            if d == p.data_rank:
                p.feature_group = g
        for f in range(fsize):
            g = dist.new_group([d * fsize + f for d in range(dsize)])
            if f == p.feature_rank:
                p.data_group = g
        return p

    def device_for(self, device: str) -> str:
        """cuda -> this process's GPU (LOCAL_RANK), so nothing assumes cuda:{global rank}."""
        if (
            torch.device(device).type == "cuda"
            and self.active
            and torch.device(device).index is None
        ):
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return device

    # ---- collectives ---------------------------------------------------------------------
    @cached_property
    def comm(self) -> FeatureComm:
        """The feature group for ``training_forward`` (no-op with one feature rank)."""
        if self.feature_size == 1:
            return FeatureComm()
        return _GroupComm(self.feature_group, self.feature_size)

    def reduce_partials(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.sum_partials(t)

    def sum_features(self, t: torch.Tensor) -> torch.Tensor:
        if self.feature_size > 1:
            dist.all_reduce(t, group=self.feature_group)
        return t

    def sum_data(self, t: torch.Tensor) -> torch.Tensor:
        if self.data_size > 1:
            dist.all_reduce(t, group=self.data_group)
        return t

    def max_data(self, t: torch.Tensor) -> torch.Tensor:
        if self.data_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.data_group)
        return t

    def sum_all(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t)
        return t

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of gradients over the data group (one flat all-reduce)."""
        if self.data_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.data_group)
        flat /= self.data_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def shard_slice(self, n: int) -> slice:
        """This rank's slice of n features (n must divide evenly; checked at setup)."""
        return feature_slice(n, self.feature_rank, self.feature_size)

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, indexed by global rank (picklable objects; small ones only)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def shutdown(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
