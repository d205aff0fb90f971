"""The packaged Shakespeare corpus the embedded models were trained on (file format:
``clt_lens.data``'s docstring)."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

from clt_lens.data.errors import DataLoadError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_CORPUS_DIR = ASSETS_DIR / "corpus"
EMBEDDED_SPLITS = ("train", "heldout")
EMBEDDED_DOC_SEPARATOR = "\n<|endoftext|>\n"


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
