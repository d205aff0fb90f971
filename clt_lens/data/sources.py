"""Which documents or token rows a ``dataset`` string stands for (the accepted values:
``clt_lens.data``'s docstring): local files and folders, tokenized rows, the hub, the
embedded corpus."""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clt_lens.data.embedded import EMBEDDED_SPLITS, read_embedded_documents
from clt_lens.data.errors import DataLoadError
from clt_lens.data.packing import Packer, special_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIXES = (".parquet",)
TOKEN_COLUMNS = ("input_ids", "tokens")
SPLIT_PREFIXES = ("train", "test", "validation", "valid", "val", "heldout", "dev", "eval")

ACCEPTED_KINDS = (
    "'embedded' (the packaged Shakespeare corpus), a local .txt/.text/.json/.jsonl/.parquet file "
    "(optionally .gz) or a folder of them, or a Hugging Face hub dataset name"
)



def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for compression in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(compression):
            name = name[: -len(compression)]
            break
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(("/", os.sep))
        or _file_kind(Path(name)) is not None
    )


def _split_of(file: Path, root: Path) -> str:
    parts = [p.lower() for p in file.relative_to(root).parts]
    words = list(parts[:-1])
    stem = parts[-1].split(".")[0]
    words.append(stem.replace("-", "_").split("_")[0])
    for word in words:
        if word in SPLIT_PREFIXES:
            return word
    return "train"


def _local_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """The builder kind and ``{split: files}`` of a local file or folder."""
    if path.is_file():
        kind = _file_kind(path)
        if kind is None:
            raise DataLoadError(f"unsupported data file {str(path)!r}; {ACCEPTED_KINDS}")
        return kind, {"train": [str(path)]}
    files = sorted(
        f for f in path.rglob("*")
        if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
        and _file_kind(f) is not None
    )
    if not files:
        raise DataLoadError(f"folder {str(path)!r} holds no data files; {ACCEPTED_KINDS}")
    kinds = {_file_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataLoadError(
            f"folder {str(path)!r} mixes file kinds {sorted(kinds)}; use one kind per folder"
        )
    splits: dict[str, list[str]] = {}
    for f in files:
        splits.setdefault(_split_of(f, path), []).append(str(f))
    return kinds.pop(), splits


def _open_rows(
    dataset: str, split: str, *, seed: int, shuffle: bool, buffer: int = 10_000
) -> Iterable[Any]:
    """Rows (dicts) of a local or hub dataset, in a seeded order when ``shuffle``."""
    import datasets

    path = Path(dataset).expanduser()
    if path.exists():
        kind, splits = _local_files(path)
        if split not in splits:
            raise DataLoadError(
                f"unknown split {split!r} for {str(path)!r}; splits: {sorted(splits)}"
            )
        extra = {"sample_by": "document"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(
                kind, data_files={split: splits[split]}, split=split, streaming=True, **extra
            )
        except Exception as e:
            raise DataLoadError(f"cannot read {str(path)!r} as {kind}: {e}") from e
    elif looks_like_path(dataset):
        raise DataLoadError(f"data path {dataset!r} does not exist; accepted: {ACCEPTED_KINDS}")
    else:
        try:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
        except ValueError as e:  # datasets reports an unknown split as a ValueError
            raise DataLoadError(f"hub dataset {dataset!r}: {e}") from e
        except Exception as e:
            raise DataLoadError(
                f"{dataset!r} is not a local path and could not be loaded from the Hugging Face "
                f"hub ({type(e).__name__}: {e}); accepted: {ACCEPTED_KINDS}"
            ) from e
    if shuffle:
        ds = ds.shuffle(seed=seed, buffer_size=buffer)
    return ds


def _iter_documents(
    rows: Iterable[Any], *, text_column: str, where: str
) -> Iterator[str | list[int]]:
    """Texts, or token-id lists for pre-tokenized rows (detected on the first row)."""
    token_column: str | None = None
    iterator = iter(rows)
    first = True
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except DataLoadError:
            raise
        except Exception as e:  # malformed JSON/parquet surfaces only while streaming
            raise DataLoadError(f"reading {where} failed: {type(e).__name__}: {e}") from e
        if first:
            first = False
            if text_column not in row:
                token_column = next((c for c in TOKEN_COLUMNS if c in row), None)
                if token_column is None:
                    raise DataLoadError(
                        f"{where} has no text column {text_column!r} and no pre-tokenized column "
                        f"{list(TOKEN_COLUMNS)}; columns: {sorted(row)} (set text_column=...)"
                    )
        value = row[token_column] if token_column else row[text_column]
        if token_column:
            yield list(value)
        elif value:
            yield value


# Embedded-corpus documents are tokenized on first use and kept per process and tokenizer
# (int32 arrays: ~4 bytes per token), so a small max_tokens only pays for the plays it reads.
_EMBEDDED_TOKEN_CACHE: dict[tuple[str, str, int, str], list[array | None]] = {}


def _embedded_token_docs(
    tokenizer: PreTrainedTokenizerBase, split: str, *, seed: int, shuffle: bool
) -> Iterator[array]:
    key = (type(tokenizer).__name__, str(tokenizer.name_or_path), len(tokenizer), split)
    docs = read_embedded_documents(split)
    cache = _EMBEDDED_TOKEN_CACHE.setdefault(key, [None] * len(docs))
    order = list(range(len(docs)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in order:
        if cache[i] is None:
            ids = tokenizer(docs[i], add_special_tokens=False, verbose=False)["input_ids"]
            cache[i] = array("i", ids)
        yield cache[i]


def _iter_token_docs(
    docs: Iterable[str | list[int]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    bos_id: int | None,
    where: str,
    batch: int = 256,
    max_chars: int = 1_000_000,
) -> Iterator[list[int]]:
    vocab = len(tokenizer)
    pending: list[str] = []
    pending_chars = 0

    def flush() -> Iterator[list[int]]:
        nonlocal pending_chars
        if pending:
            yield from tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
            pending.clear()
            pending_chars = 0

    for doc in docs:
        if isinstance(doc, str):
            pending.append(doc)
            pending_chars += len(doc)
            # A character budget too, so a small max_tokens does not tokenize many long documents.
            if len(pending) >= batch or pending_chars >= max_chars:
                yield from flush()
            continue
        yield from flush()
        if doc and not all(isinstance(t, int) and 0 <= t < vocab for t in doc):
            bad = next(t for t in doc if not (isinstance(t, int) and 0 <= t < vocab))
            raise DataLoadError(
                f"{where}: pre-tokenized row holds {bad!r}, not a token id of this tokenizer "
                f"(vocab size {vocab})"
            )
        # Packing adds its own BOS, so one already at the start of a row would be doubled.
        yield doc[1:] if doc and bos_id is not None and doc[0] == bos_id else doc
    yield from flush()


def iter_rows_packed(
    dataset: str,
    *,
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    split: str,
    seed: int,
    shuffle: bool,
    prepend_bos: bool,
    text_column: str,
) -> tuple[Iterator[list[int]], Packer]:
    bos_id, eos_id = special_ids(tokenizer)
    packer = Packer(context_size, bos_id=bos_id, eos_id=eos_id, prepend_bos=prepend_bos)
    where = f"dataset {dataset!r} (split {split!r})"
    # Opened before the generator starts, so a bad path or split fails at the call.
    rows = None if dataset == "embedded" else _open_rows(dataset, split, seed=seed, shuffle=shuffle)
    if dataset == "embedded" and split not in EMBEDDED_SPLITS:
        read_embedded_documents(split)  # raises the unknown-split error

    def gen() -> Iterator[list[int]]:
        if dataset == "embedded":
            token_docs: Iterable[Sequence[int]] = _embedded_token_docs(
                tokenizer, split, seed=seed, shuffle=shuffle
            )
        else:
            docs = _iter_documents(rows, text_column=text_column, where=where)
            token_docs = _iter_token_docs(docs, tokenizer, bos_id=bos_id, where=where)
        for ids in token_docs:
            packer.n_tokens += len(ids)
            yield from packer.add(ids)

    return gen(), packer


def check_args(context_size: int, max_tokens: int | None, batch_size: int | None = None) -> None:
    if not isinstance(context_size, int) or context_size < 2:
        raise DataLoadError(f"context_size must be an int >= 2, got {context_size!r}")
    if max_tokens is not None and max_tokens < context_size:
        raise DataLoadError(
            f"max_tokens={max_tokens} is smaller than one sequence (context_size={context_size})"
        )
    if batch_size is not None and batch_size < 1:
        raise DataLoadError(f"batch_size must be >= 1, got {batch_size}")


def too_small(dataset: str, split: str, n_tokens: int, context_size: int) -> DataLoadError:
    return DataLoadError(
        f"dataset {dataset!r} (split {split!r}) has {n_tokens} tokens, fewer than one sequence "
        f"of context_size={context_size}"
    )
