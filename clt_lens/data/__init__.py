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

Modules: ``tokens`` (``load_tokens``, ``iter_token_batches``), ``sources`` (dataset strings ->
documents or token rows), ``packing``, ``tokenizers``, ``embedded`` (the corpus files),
``errors``.
"""

from __future__ import annotations

from clt_lens.data.embedded import (
    ASSETS_DIR,
    EMBEDDED_CORPUS_DIR,
    EMBEDDED_DOC_SEPARATOR,
    EMBEDDED_SPLITS,
    read_embedded_documents,
    write_embedded_documents,
)
from clt_lens.data.errors import DataLoadError
from clt_lens.data.packing import pack_documents
from clt_lens.data.sources import ACCEPTED_KINDS
from clt_lens.data.tokenizers import load_tokenizer
from clt_lens.data.tokens import iter_token_batches, load_tokens

__all__ = [
    "ACCEPTED_KINDS", "ASSETS_DIR", "EMBEDDED_CORPUS_DIR", "EMBEDDED_DOC_SEPARATOR",
    "EMBEDDED_SPLITS", "DataLoadError", "iter_token_batches", "load_tokenizer", "load_tokens",
    "pack_documents", "read_embedded_documents", "write_embedded_documents",
]
