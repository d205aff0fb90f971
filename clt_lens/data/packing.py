"""The packing rule (``clt_lens.data``'s docstring): documents' token ids -> rows that start
with BOS."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from clt_lens.data.errors import DataLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Packer:
    """Streams documents' token ids into fixed-size rows (see the module docstring for the rule)."""

    def __init__(
        self, context_size: int, *, bos_id: int | None, eos_id: int | None, prepend_bos: bool
    ) -> None:
        if context_size < 2:
            raise DataLoadError(f"context_size must be >= 2, got {context_size}")
        if prepend_bos and bos_id is None:
            raise DataLoadError("prepend_bos=True needs a tokenizer with a BOS (or EOS) token")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.prepend_bos = prepend_bos
        self.chunk = context_size - 1 if prepend_bos else context_size
        self._buf: list[int] = []
        self._n_docs = 0
        self.n_tokens = 0  # document tokens seen, for "too small" errors

    def add(self, ids: Sequence[int]) -> Iterator[list[int]]:
        if self._n_docs > 0 and self.eos_id is not None:
            self._buf.append(self.eos_id)
        self._n_docs += 1
        self._buf.extend(ids)
        while len(self._buf) >= self.chunk:
            body, self._buf = self._buf[: self.chunk], self._buf[self.chunk :]
            yield [self.bos_id, *body] if self.prepend_bos else body


def pack_documents(
    docs: Iterable[Sequence[int]],
    context_size: int,
    *,
    bos_id: int | None,
    eos_id: int | None,
    prepend_bos: bool = True,
    max_rows: int | None = None,
) -> torch.Tensor:
    """Pack token-id documents into a LongTensor ``[n_seq, context_size]`` (rule: module doc)."""
    packer = Packer(context_size, bos_id=bos_id, eos_id=eos_id, prepend_bos=prepend_bos)
    rows: list[list[int]] = []
    for ids in docs:
        for row in packer.add(ids):
            rows.append(row)
            if max_rows is not None and len(rows) >= max_rows:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        return torch.empty((0, context_size), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    # GPT-2-style vocabularies have one <|endoftext|> serving as both, like TransformerLens assumes.
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos if bos is not None else eos), (eos if eos is not None else bos)
