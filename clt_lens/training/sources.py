"""Where training activations come from: a clt-lens cache, or a model run on the fly.

Both sources hand out ``(x, y)`` float32 batches of shape [B, L, d] and can save and restore
their position, so a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from clt_lens.errors import InputError
from clt_lens.training.config import TrainConfig


@dataclass
class SourceInfo:
    model_id: str
    model_name: str
    input_hook: str
    output_hook: str
    n_layers: int
    d_model: int
    context_size: int
    dataset: str


class CacheSource:
    """Batches from an activation cache directory (see clt_lens.cache)."""

    def __init__(
        self,
        cfg: TrainConfig,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        partition: bool = True,
        cache_dir: str | None = None,
        seed: int | None = None,
        loop: bool = True,
    ) -> None:
        from clt_lens.cache import CacheReader

        path = cache_dir or cfg.cache_dir
        self.reader = CacheReader(
            path,
            batch_size=batch_size,
            shuffle=True,
            seed=cfg.seed if seed is None else seed,
            rank=rank,
            world_size=world_size,
            partition=partition,
            loop=loop,
            device=cfg.device,
        )
        m = self.reader.manifest
        self.info = SourceInfo(
            model_id=m.model_id,
            model_name=m.model_name,
            input_hook=m.hooks.input_hook,
            output_hook=m.hooks.output_hook,
            n_layers=m.n_layers,
            d_model=m.d_model,
            context_size=m.context_size,
            dataset=m.dataset,
        )
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.reader)
        return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cache", "reader": self.reader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state["reader"])
        self._it = None

    def close(self) -> None:
        close = getattr(self.reader, "close", None)
        if close:
            close()


class StreamSource:
    """Runs the model on packed token sequences and yields shuffled activation batches.

    The token stream is cut into refills of ``stream_sequences_per_refill`` sequences (more if
    a batch needs more); each
    refill is run through the model once and its tokens are shuffled with a generator seeded by
    (seed, refill index). The position is (refill index, batches used from it), so a restore
    replays just one refill. With ``world_size`` > 1 (data parallel) rank r takes refills
    r, r + W, ...
    """

    def __init__(
        self,
        cfg: TrainConfig,
        batch_size: int,
        *,
        model: Any = None,
        rank: int = 0,
        world_size: int = 1,
        split: str | None = None,
        seed: int | None = None,
    ) -> None:
        from clt_lens.models import load_model, model_id, resolve_hooks

        self.cfg = cfg
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.split = split or cfg.source.split
        self.seed = cfg.seed if seed is None else seed
        self.model = model if model is not None else load_model(cfg.source.model, device=cfg.device)
        self.hooks = resolve_hooks(self.model, cfg.source.input_hook, cfg.source.output_hook)
        self.context_size = cfg.source.context_size or self.model.cfg.n_ctx
        self.info = SourceInfo(
            model_id=model_id(self.model),
            model_name=cfg.source.model,
            input_hook=self.hooks.input_hook,
            output_hook=self.hooks.output_hook,
            n_layers=self.model.cfg.n_layers,
            d_model=self.model.cfg.d_model,
            context_size=self.context_size,
            dataset=cfg.source.dataset,
        )
        # a refill must hold at least one batch (BOS positions are not activations)
        self.seqs_per_refill = max(cfg.stream_sequences_per_refill,
                                   -(-batch_size // (self.context_size - 1)))
        self._empty_refills = 0
        self.refill = rank  # index of the next refill to load, in the global refill sequence
        self.used = 0  # batches already taken from the current buffer
        self._buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tokens: Iterator[torch.Tensor] | None = None
        self._tokens_pos = 0  # refills consumed from the token iterator

    def _token_iter(self) -> Iterator[torch.Tensor]:
        from clt_lens.data import iter_token_batches

        return iter_token_batches(
            self.cfg.source.dataset,
            tokenizer=self.model.tokenizer,
            context_size=self.context_size,
            batch_size=self.seqs_per_refill,
            split=self.split,
            seed=self.seed,
        )

    def _tokens_for(self, refill: int) -> torch.Tensor:
        if self._tokens is None or self._tokens_pos > refill:
            self._tokens, self._tokens_pos = self._token_iter(), 0
        while True:
            try:
                toks = next(self._tokens)
            except StopIteration:  # end of the dataset: start the next epoch
                self._tokens = self._token_iter()
                toks = next(self._tokens)
            self._tokens_pos += 1
            if self._tokens_pos - 1 == refill:
                return toks

    @torch.no_grad()
    def _load(self, refill: int) -> tuple[torch.Tensor, torch.Tensor]:
        from clt_lens.activations import collect_activations

        toks = self._tokens_for(refill)
        xs, ys = [], []
        for chunk in toks.split(self.cfg.stream_model_batch_size):
            x, y = collect_activations(self.model, chunk.to(self.cfg.device), self.hooks)
            xs.append(x)
            ys.append(y)
        x, y = torch.cat(xs), torch.cat(ys)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + refill) & 0x7FFFFFFF)
        perm = torch.randperm(x.shape[0], generator=g).to(x.device)
        return x[perm], y[perm]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._buffer is None:
                self._buffer = self._load(self.refill)
            x, y = self._buffer
            lo = self.used * self.batch_size
            if lo + self.batch_size <= x.shape[0]:
                self.used += 1
                return x[lo : lo + self.batch_size], y[lo : lo + self.batch_size]
            if self.used == 0:  # a short refill (end of the data) gave no batch at all
                self._empty_refills += 1
                if self._empty_refills > 2:
                    raise InputError(
                        f"dataset {self.cfg.source.dataset!r} split {self.split!r} cannot fill "
                        f"a batch of {self.batch_size} tokens"
                    )
            else:
                self._empty_refills = 0
            self._buffer, self.used = None, 0
            self.refill += self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stream", "refill": self.refill, "used": self.used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refill, self.used, self._buffer = int(state["refill"]), int(state["used"]), None

    def close(self) -> None:
        pass


class SyntheticSource:
    """Gaussian inputs and ``y = relu(x @ M_l)`` per layer, for benchmarks and tests.

    Batch n is drawn from a generator seeded with n, so the stream restores exactly and is
    the same on every rank (what feature sharding and slice reads expect).
    """

    def __init__(self, batch_size: int, n_layers: int, d_model: int, context_size: int = 128):
        self.batch, self.n = batch_size, 0
        self.info = SourceInfo("synthetic@0", "synthetic", "ln2.hook_normalized", "hook_mlp_out",
                               n_layers, d_model, context_size, "synthetic")  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        self.M = torch.randn(n_layers, d_model, d_model, generator=gen) / d_model**0.5

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.n += 1
        gen = torch.Generator().manual_seed(self.n)
        x = torch.randn(self.batch, self.info.n_layers, self.info.d_model, generator=gen)
        return x, torch.relu(torch.einsum("bld,lde->ble", x, self.M))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "synthetic", "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])

    def close(self) -> None:
        pass


def make_source(
    cfg: TrainConfig,
    batch_size: int,
    *,
    model: Any = None,
    rank: int = 0,
    world_size: int = 1,
    partition: bool = True,
) -> CacheSource | StreamSource:
    if cfg.cache_dir:
        return CacheSource(cfg, batch_size, rank=rank, world_size=world_size, partition=partition)
    if not partition:
        rank, world_size = 0, 1
    return StreamSource(cfg, batch_size, model=model, rank=rank, world_size=world_size)
