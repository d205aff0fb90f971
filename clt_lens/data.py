"""Text datasets -> packed token sequences ``[n_seq, context_size]`` with BOS first.

Packing rule (the same everywhere, including the embedded model's training script): tokenize each
document without special tokens, put one EOS token between consecutive documents, concatenate,
cut the stream into chunks of ``context_size - 1`` tokens and prepend BOS to each, so every row
starts with BOS. A trailing chunk shorter than that is dropped. With ``prepend_bos=False`` the
chunks are ``context_size`` tokens and carry no BOS.

Accepted ``dataset`` values:

- ``"embedded"``: the Shakespeare corpus shipped in ``clt_lens/assets/corpus`` (splits ``train``
  and ``heldout``), the text the embedded default model was trained on.
- a local file or folder: ``.txt``/``.text`` (a whole file is one document), ``.json``/``.jsonl``
  and ``.parquet`` (one document per row, text in ``text_column``), each optionally ``.gz``.
  A folder is searched recursively; files whose name starts with a split name (``train``,
  ``test``, ``validation``, ``heldout`` ...) form that split, the others form ``train``.
- rows that are already tokenized: a column ``input_ids`` or ``tokens`` of int lists is re-packed
  (each row is one document; a leading BOS on a row is dropped, since packing adds its own).
- anything else is taken as a Hugging Face hub dataset name and streamed with
  ``datasets.load_dataset(name, split=split, streaming=True)``.

Embedded corpus files: gzip'd UTF-8 text, documents (one play or poem each) separated by a line
holding only ``<|endoftext|>`` (``EMBEDDED_DOC_SEPARATOR``).
"""

from __future__ import annotations

import gzip
import os
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clt_lens.errors import CLTLensError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_CORPUS_DIR = ASSETS_DIR / "corpus"
EMBEDDED_SPLITS = ("train", "heldout")
EMBEDDED_DOC_SEPARATOR = "\n<|endoftext|>\n"

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIXES = (".parquet",)
TOKEN_COLUMNS = ("input_ids", "tokens")
SPLIT_PREFIXES = ("train", "test", "validation", "valid", "val", "heldout", "dev", "eval")

ACCEPTED_KINDS = (
    "'embedded' (the packaged Shakespeare corpus), a local .txt/.text/.json/.jsonl/.parquet file "
    "(optionally .gz) or a folder of them, or a Hugging Face hub dataset name"
)


class DataLoadError(CLTLensError, ValueError):
    """A dataset could not be turned into token sequences; the message says why and what works."""


# ----------------------------------------------------------------------------------------------
# Packing


class _Packer:
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
    packer = _Packer(context_size, bos_id=bos_id, eos_id=eos_id, prepend_bos=prepend_bos)
    rows: list[list[int]] = []
    for ids in docs:
        for row in packer.add(ids):
            rows.append(row)
            if max_rows is not None and len(rows) >= max_rows:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        return torch.empty((0, context_size), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# The embedded corpus


def read_embedded_documents(split: str = "train") -> list[str]:
    """The documents (plays/poems) of one split of the packaged Shakespeare corpus."""
    if split not in EMBEDDED_SPLITS:
        raise DataLoadError(
            f"unknown split {split!r} for dataset 'embedded'; splits: {list(EMBEDDED_SPLITS)}"
        )
    path = EMBEDDED_CORPUS_DIR / f"{split}.txt.gz"
    if not path.is_file():
        raise DataLoadError(
            f"embedded corpus file {path} is missing; rebuild it with "
            "scripts/build_embedded_model.py"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return [d for d in text.split(EMBEDDED_DOC_SEPARATOR) if d.strip()]


def write_embedded_documents(docs: Sequence[str], path: Path) -> None:
    """Write documents in the embedded corpus format (byte-reproducible gzip: no mtime/name)."""
    for d in docs:
        if EMBEDDED_DOC_SEPARATOR.strip() in d:
            raise DataLoadError("a document contains the separator token string")
    data = EMBEDDED_DOC_SEPARATOR.join(docs).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9
    ) as gz:
        gz.write(data)


# ----------------------------------------------------------------------------------------------
# Tokenizers

_EMBEDDED_MODEL_DIR = ASSETS_DIR / "embedded"  # == clt_lens.models.EMBEDDED_DIR, without TL import


def load_tokenizer(name_or_path: str | Path = "embedded") -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer: ``"embedded"``, a local folder (offline), or a hub name."""
    from transformers import AutoTokenizer

    if str(name_or_path) == "embedded":
        name_or_path = _EMBEDDED_MODEL_DIR
    local = Path(name_or_path).expanduser()
    try:
        if local.is_dir():
            return AutoTokenizer.from_pretrained(local, local_files_only=True)
        if _looks_like_path(str(name_or_path)):
            raise DataLoadError(f"tokenizer folder {str(name_or_path)!r} does not exist")
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except DataLoadError:
        raise
    except Exception as e:
        raise DataLoadError(
            f"cannot load a tokenizer from {str(name_or_path)!r} ({type(e).__name__}: {e}); "
            "accepted: 'embedded', a local folder with tokenizer files, or a hub model name"
        ) from e


def _resolve_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer)
    if tokenizer is None or not callable(tokenizer):
        raise DataLoadError(
            f"tokenizer must be a Hugging Face tokenizer or a name/path for load_tokenizer, "
            f"got {tokenizer!r}"
        )
    return tokenizer


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    # GPT-2-style vocabularies have one <|endoftext|> serving as both, like TransformerLens assumes.
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos if bos is not None else eos), (eos if eos is not None else bos)


# ----------------------------------------------------------------------------------------------
# Sources: which rows/documents a dataset string stands for


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


def _looks_like_path(name: str) -> bool:
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
    elif _looks_like_path(dataset):
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


def _iter_rows_packed(
    dataset: str,
    *,
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    split: str,
    seed: int,
    shuffle: bool,
    prepend_bos: bool,
    text_column: str,
) -> tuple[Iterator[list[int]], _Packer]:
    bos_id, eos_id = _special_ids(tokenizer)
    packer = _Packer(context_size, bos_id=bos_id, eos_id=eos_id, prepend_bos=prepend_bos)
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


def _check_args(context_size: int, max_tokens: int | None, batch_size: int | None = None) -> None:
    if not isinstance(context_size, int) or context_size < 2:
        raise DataLoadError(f"context_size must be an int >= 2, got {context_size!r}")
    if max_tokens is not None and max_tokens < context_size:
        raise DataLoadError(
            f"max_tokens={max_tokens} is smaller than one sequence (context_size={context_size})"
        )
    if batch_size is not None and batch_size < 1:
        raise DataLoadError(f"batch_size must be >= 1, got {batch_size}")


def _too_small(dataset: str, split: str, n_tokens: int, context_size: int) -> DataLoadError:
    return DataLoadError(
        f"dataset {dataset!r} (split {split!r}) has {n_tokens} tokens, fewer than one sequence "
        f"of context_size={context_size}"
    )


# ----------------------------------------------------------------------------------------------
# Public entry points


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
    _check_args(context_size, max_tokens)
    tok = _resolve_tokenizer(tokenizer)
    rows_iter, packer = _iter_rows_packed(
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
        raise _too_small(str(dataset), split, packer.n_tokens, context_size)
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
    _check_args(context_size, max_tokens, batch_size)
    tok = _resolve_tokenizer(tokenizer)
    rows_iter, packer = _iter_rows_packed(
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
    packer: _Packer,
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
            raise _too_small(dataset, split, packer.n_tokens, context_size)

    batch: list[list[int]] = []
    for row in shuffled():
        batch.append(row)
        if len(batch) == batch_size:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
    if batch and not drop_last:
        yield torch.tensor(batch, dtype=torch.long)


__all__ = [
    "EMBEDDED_DOC_SEPARATOR",
    "EMBEDDED_SPLITS",
    "DataLoadError",
    "iter_token_batches",
    "load_tokenizer",
    "load_tokens",
    "pack_documents",
    "read_embedded_documents",
    "write_embedded_documents",
]
