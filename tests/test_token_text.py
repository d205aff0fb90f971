"""Tokens shown on pages as the text they stand for (clt_lens.features.token_text)."""

from __future__ import annotations

from test_features_common import model

from clt_lens.features.token_text import token_text_fn, visible


def test_byte_level_tokens_as_text():
    tok = model().tokenizer  # the embedded 4096-token byte-level BPE
    text = token_text_fn(tok)
    ids = tok.encode("a − b\ncafé\t<x>")
    shown = [text(i) for i in ids]
    # every non-ASCII character is split into byte tokens here: each shows its byte
    assert shown == ["a", "\u00a0", "\\xe2", "\\x88", "\\x92", " b", "↵", "c", "a", "f",
                     "\\xc3", "\\xa9", "⇥", "<", "x", ">"], shown
    assert text(tok.bos_token_id) == "<|endoftext|>"
    # no BPE stand-in characters leak through
    assert not any(c in "".join(shown) for c in "ĠĊĉÃâ")


class _SentencePieceLike:
    """The few tokenizer methods token_text uses, with SentencePiece-style pieces."""

    pieces = ["<s>", "▁the", "▁", "<0x0A>", "<0xE2>", "é", "▁naïve"]
    all_special_ids = [0]
    sp_model = None  # what marks a slow SentencePiece tokenizer

    def convert_ids_to_tokens(self, i):
        return self.pieces[i]

    def get_added_vocab(self):
        return {}

    def decode(self, ids):
        raise AssertionError("not needed for these pieces")


def test_sentencepiece_pieces_as_text():
    text = token_text_fn(_SentencePieceLike())
    assert [text(i) for i in range(7)] == ["<s>", " the", "\u00a0", "↵", "\\xe2", "é", " naïve"]


def test_visible():
    assert visible("a\r\nb\rc\td\x00e") == "a↵b↵c⇥d\\x00e"
    assert visible("   ") == "\u00a0" * 3 and visible(" x ") == " x "
