"""The public entry points: ``load_tokens`` (all rows at once) and ``iter_token_batches``
(streamed)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clt_lens.data.packing import Packer
from clt_lens.data.sources import check_args, iter_rows_packed, too_small
from clt_lens.data.tokenizers import resolve_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

def load_tokens(
    dataset: str = "embedded",
    *,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    context_size: int,
    split: str = "train",
    max_tokens: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    prepend_bos: bool = True,
    text_column: str = "text",
) -> torch.Tensor:
    """Packed token sequences ``[n_seq, context_size]`` (LongTensor), BOS first.

    ``max_tokens`` caps the output at ``max_tokens // context_size`` rows. With ``shuffle`` the
    documents are read in a seeded order (a shuffle buffer for streamed datasets) and the rows
    are permuted with the same seed; the same arguments always give the same tensor.
    """
    check_args(context_size, max_tokens)
    tok = resolve_tokenizer(tokenizer)
    rows_iter, packer = iter_rows_packed(
        str(dataset), tokenizer=tok, context_size=context_size, split=split, seed=seed,
        shuffle=shuffle, prepend_bos=prepend_bos, text_column=text_column,
    )
    max_rows = None if max_tokens is None else max_tokens // context_size
    rows: list[list[int]] = []
    for row in rows_iter:
        rows.append(row)
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise too_small(str(dataset), split, packer.n_tokens, context_size)
    out = torch.tensor(rows, dtype=torch.long)
    if shuffle:
        out = out[torch.randperm(len(out), generator=torch.Generator().manual_seed(seed))]
    return out


def iter_token_batches(
    dataset: str = "embedded",
    *,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    context_size: int,
    batch_size: int,
    split: str = "train",
    max_tokens: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    prepend_bos: bool = True,
    text_column: str = "text",
    shuffle_buffer: int = 4096,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Stream packed batches ``[batch_size, context_size]`` (one pass; the last may be smaller
    unless ``drop_last``). With ``shuffle``, rows pass through a seeded buffer of
    ``shuffle_buffer`` rows, so memory stays bounded for datasets of any size."""
    check_args(context_size, max_tokens, batch_size)
    tok = resolve_tokenizer(tokenizer)
    rows_iter, packer = iter_rows_packed(
        str(dataset), tokenizer=tok, context_size=context_size, split=split, seed=seed,
        shuffle=shuffle, prepend_bos=prepend_bos, text_column=text_column,
    )
    return _batches(
        rows_iter, packer, dataset=str(dataset), split=split, context_size=context_size,
        batch_size=batch_size, max_rows=None if max_tokens is None else max_tokens // context_size,
        rng=random.Random(seed) if shuffle else None, shuffle_buffer=shuffle_buffer,
        drop_last=drop_last,
    )


def _batches(
    rows_iter: Iterator[list[int]],
    packer: Packer,
    *,
    dataset: str,
    split: str,
    context_size: int,
    batch_size: int,
    max_rows: int | None,
    rng: random.Random | None,
    shuffle_buffer: int,
    drop_last: bool,
) -> Iterator[torch.Tensor]:
    def shuffled() -> Iterator[list[int]]:
        n = 0
        buf: list[list[int]] = []
        for row in rows_iter:
            if max_rows is not None and n >= max_rows:
                break
            n += 1
            if rng is None:
                yield row
                continue
            if len(buf) < shuffle_buffer:
                buf.append(row)
                continue
            i = rng.randrange(len(buf))
            yield buf[i]
            buf[i] = row
        if rng is not None:
            rng.shuffle(buf)
            yield from buf
        if n == 0:
            raise too_small(dataset, split, packer.n_tokens, context_size)

    batch: list[list[int]] = []
    for row in shuffled():
        batch.append(row)
        if len(batch) == batch_size:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
    if batch and not drop_last:
        yield torch.tensor(batch, dtype=torch.long)
