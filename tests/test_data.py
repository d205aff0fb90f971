"""load_tokens / iter_token_batches: packing rule, embedded corpus, local files, bad input."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clt_lens.data import (
    EMBEDDED_DOC_SEPARATOR,
    DataLoadError,
    iter_token_batches,
    load_tokenizer,
    load_tokens,
    pack_documents,
    read_embedded_documents,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def _reference_pack(docs: list[list[int]], ctx: int, bos: int, eos: int) -> torch.Tensor:
    """The packing rule written out the long way, as an independent reference."""
    stream: list[int] = []
    for i, d in enumerate(docs):
        if i:
            stream.append(eos)
        stream += d
    n = len(stream) // (ctx - 1)
    return torch.tensor([[bos] + stream[i * (ctx - 1):(i + 1) * (ctx - 1)] for i in range(n)])


def test_pack_documents_rule():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    out = pack_documents(docs, 4, bos_id=0, eos_id=99)
    assert out.tolist() == [[0, 1, 2, 3], [0, 99, 4, 5], [0, 99, 6, 7]]
    out = pack_documents(docs, 4, bos_id=0, eos_id=99, prepend_bos=False)
    assert out.tolist() == [[1, 2, 3, 99], [4, 5, 99, 6]]
    assert pack_documents(docs, 4, bos_id=0, eos_id=99, max_rows=1).shape == (1, 4)


# ----------------------------------------------------------------------------------------------
# The embedded corpus


def test_embedded_corpus_splits_are_disjoint_plays():
    train, heldout = read_embedded_documents("train"), read_embedded_documents("heldout")
    assert len(heldout) >= 2 and len(train) > 30
    held_chars = sum(map(len, heldout))
    assert 0.05 < held_chars / (held_chars + sum(map(len, train))) < 0.12
    titles = {d.split("\n", 1)[0] for d in train}
    assert not titles & {d.split("\n", 1)[0] for d in heldout}
    assert all(EMBEDDED_DOC_SEPARATOR.strip() not in d for d in train + heldout)
    assert "Project Gutenberg" not in "".join(heldout)


def test_embedded_heldout_packing_matches_reference(tok):
    out = load_tokens("embedded", tokenizer=tok, context_size=128, split="heldout",
                      shuffle=False)
    docs = [_ids(tok, d) for d in read_embedded_documents("heldout")]
    ref = _reference_pack(docs, 128, tok.bos_token_id, tok.eos_token_id)
    assert out.dtype == torch.long and out.shape == ref.shape
    assert torch.equal(out, ref)
    assert (out[:, 0] == tok.bos_token_id).all()


def test_embedded_seeded_shuffle(tok):
    kw = dict(tokenizer=tok, context_size=64, max_tokens=64 * 40)
    a = load_tokens("embedded", seed=0, **kw)
    assert a.shape == (40, 64)
    assert (a[:, 0] == tok.bos_token_id).all()
    assert torch.equal(a, load_tokens("embedded", seed=0, **kw))
    b = load_tokens("embedded", seed=1, **kw)
    assert not torch.equal(a, b)
    # Passing the tokenizer by name gives the same rows.
    assert torch.equal(a, load_tokens("embedded", seed=0, **{**kw, "tokenizer": "embedded"}))
    # Without shuffling the rows follow the file order: first row = BOS + start of document 0.
    first = load_tokens("embedded", tokenizer=tok, context_size=64, max_tokens=64,
                        shuffle=False)
    doc0 = _ids(tok, read_embedded_documents("train")[0][:2000])
    assert first[0].tolist() == [tok.bos_token_id] + doc0[:63]


def test_iter_token_batches_covers_the_same_rows(tok):
    full = load_tokens("embedded", tokenizer=tok, context_size=128, split="heldout",
                       shuffle=False)
    plain = list(iter_token_batches("embedded", tokenizer=tok, context_size=128, batch_size=100,
                                    split="heldout", shuffle=False))
    assert [b.shape[0] for b in plain[:-1]] == [100] * (len(plain) - 1)
    assert torch.equal(torch.cat(plain), full)
    kw = dict(tokenizer=tok, context_size=128, batch_size=100, split="heldout",
              shuffle_buffer=300, seed=3)
    shuffled = torch.cat(list(iter_token_batches("embedded", **kw)))
    again = torch.cat(list(iter_token_batches("embedded", **kw)))
    assert torch.equal(shuffled, again)
    assert shuffled.shape == full.shape and not torch.equal(shuffled, full)
    # Same seeded document order as load_tokens, so the same rows, in another order.
    rows = load_tokens("embedded", tokenizer=tok, context_size=128, split="heldout", seed=3)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, rows.tolist()))
    dropped = list(iter_token_batches("embedded", **kw, drop_last=True, max_tokens=128 * 250))
    assert [b.shape[0] for b in dropped] == [100, 100]


# ----------------------------------------------------------------------------------------------
# Local files


TEXTS = [
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 3,
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.",
    "Sometime too hot the eye of heaven shines,\nAnd often is his gold complexion dimm'd;\n" * 2,
]


def test_local_text_folder(tok, tmp_path):
    for i, t in enumerate(TEXTS):
        (tmp_path / f"doc{i}.txt").write_text(t)
    with gzip.open(tmp_path / "doc3.txt.gz", "wt") as f:
        f.write(TEXTS[0])
    out = load_tokens(str(tmp_path), tokenizer=tok, context_size=16, shuffle=False)
    docs = [_ids(tok, t) for t in TEXTS + TEXTS[:1]]
    assert torch.equal(out, _reference_pack(docs, 16, tok.bos_token_id, tok.eos_token_id))
    one = load_tokens(str(tmp_path / "doc0.txt"), tokenizer=tok, context_size=16, shuffle=False)
    assert torch.equal(one, _reference_pack(docs[:1], 16, tok.bos_token_id, tok.eos_token_id))
    a = load_tokens(str(tmp_path), tokenizer=tok, context_size=16, seed=0)
    assert torch.equal(a, load_tokens(str(tmp_path), tokenizer=tok, context_size=16, seed=0))


def test_local_jsonl_splits_and_columns(tok, tmp_path):
    folder = tmp_path / "js"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    (folder / "heldout.jsonl").write_text(json.dumps({"body": TEXTS[1]}) + "\n")
    out = load_tokens(str(folder), tokenizer=tok, context_size=16, shuffle=False,
                      text_column="body")
    ref = _reference_pack([_ids(tok, t) for t in TEXTS], 16, tok.bos_token_id, tok.eos_token_id)
    assert torch.equal(out, ref)
    held = load_tokens(str(folder), tokenizer=tok, context_size=16, split="heldout",
                       text_column="body", shuffle=False)
    assert torch.equal(held, _reference_pack([_ids(tok, TEXTS[1])], 16, 0, 0))
    with pytest.raises(DataLoadError, match=r"unknown split 'validation'.*\['heldout', 'train'\]"):
        load_tokens(str(folder), tokenizer=tok, context_size=16, split="validation")
    with pytest.raises(DataLoadError, match=r"no text column 'text'.*columns: \['body'\]"):
        load_tokens(str(folder), tokenizer=tok, context_size=16)


def test_pretokenized_parquet_is_repacked(tok, tmp_path):
    docs = [_ids(tok, t) for t in TEXTS]
    bos = tok.bos_token_id
    # Rows that already start with BOS (as many pre-tokenized sets do) must not get a second one.
    table = pa.table({"input_ids": [[bos] + docs[0], docs[1], [bos] + docs[2]]})
    pq.write_table(table, tmp_path / "tokens.parquet")
    out = load_tokens(str(tmp_path / "tokens.parquet"), tokenizer=tok, context_size=32,
                      shuffle=False)
    assert torch.equal(out, _reference_pack(docs, 32, bos, tok.eos_token_id))
    pq.write_table(pa.table({"tokens": [[1, 2, 99999]]}), tmp_path / "bad.parquet")
    with pytest.raises(DataLoadError, match="99999.*vocab size 4096"):
        load_tokens(str(tmp_path / "bad.parquet"), tokenizer=tok, context_size=2)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_paths_splits_and_sizes(tok, tmp_path):
    for missing in (str(tmp_path / "nope.jsonl"), "./no/such/dir", "/no/such/corpus"):
        with pytest.raises(DataLoadError, match=r"does not exist.*'embedded'.*jsonl.*parquet"):
            load_tokens(missing, tokenizer=tok, context_size=16)
    with pytest.raises(DataLoadError, match=r"unknown split 'test'.*\['train', 'heldout'\]"):
        load_tokens("embedded", tokenizer=tok, context_size=16, split="test")
    with pytest.raises(DataLoadError, match="unknown split"):
        iter_token_batches("embedded", tokenizer=tok, context_size=16, batch_size=2, split="x")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataLoadError, match="unsupported data file"):
        load_tokens(str(tmp_path / "data.csv"), tokenizer=tok, context_size=16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataLoadError, match="holds no data files"):
        load_tokens(str(empty), tokenizer=tok, context_size=16)
    (tmp_path / "tiny.txt").write_text("Hi.")
    with pytest.raises(DataLoadError, match=r"has \d+ tokens, fewer than one sequence"):
        load_tokens(str(tmp_path / "tiny.txt"), tokenizer=tok, context_size=64)
    with pytest.raises(DataLoadError, match="fewer than one sequence"):
        list(iter_token_batches(str(tmp_path / "tiny.txt"), tokenizer=tok, context_size=64,
                                batch_size=4))
    with pytest.raises(DataLoadError, match="max_tokens=10 is smaller than one sequence"):
        load_tokens("embedded", tokenizer=tok, context_size=16, max_tokens=10)
    with pytest.raises(DataLoadError, match="context_size"):
        load_tokens("embedded", tokenizer=tok, context_size=1)
