"""How one token is shown on a page: the text it stands for, with the invisible made visible.

A byte-level BPE vocabulary (GPT-2 style) stores tokens as stand-in characters ("Ġ" for a
space, "Ċ" for a newline, "Ã©" for the two bytes of "é"); SentencePiece uses "▁" for a space
and "<0xE2>" for raw bytes. A page must show the text: the token's bytes decoded as UTF-8.
Bytes that are only part of a character (a multi-byte character split over tokens) are shown
as ``\\xe2`` escapes rather than as "�", so the reader can still tell the tokens apart. Newlines
and tabs, which would vanish in running text, become "↵" and "⇥"; a token of spaces only
keeps its width as no-break spaces.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _decoder_style(tokenizer: Any) -> str:
    """"bytes" (GPT-2-style byte-level BPE), "metaspace" (SentencePiece: "▁" and <0xNN>
    pieces) or "other"."""
    if hasattr(tokenizer, "byte_decoder"):  # slow GPT-2-style tokenizers
        return "bytes"
    if hasattr(tokenizer, "sp_model"):  # slow SentencePiece tokenizers
        return "metaspace"
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return "other"
    spec = decoder.__getstate__().decode("utf-8")  # its JSON, without the vocabulary
    if '"ByteLevel"' in spec:
        return "bytes"
    if '"Metaspace"' in spec or "▁" in spec or '"ByteFallback"' in spec:
        return "metaspace"
    return "other"


def visible(text: str) -> str:
    """``text`` with newlines, tabs and other control characters made visible."""
    text = text.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if text and not text.strip(" "):
        text = text.replace(" ", "\u00a0")
    return text


def token_text_fn(tokenizer: Any) -> Callable[[int], str]:
    """A function from token id to the string a page shows for it (cached per id)."""
    style = _decoder_style(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = set(getattr(tokenizer, "get_added_vocab", dict)().values())
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        token_id = int(token_id)
        if token_id in cache:
            return cache[token_id]
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            out = f"<unknown id {token_id}>"
        elif token_id in special or token_id in added:
            out = piece
        elif style == "bytes" and all(c in _BYTE_DECODER for c in piece):
            out = bytes(_BYTE_DECODER[c] for c in piece).decode("utf-8", "backslashreplace")
        elif style == "metaspace" and (m := _BYTE_TOKEN.fullmatch(piece)):
            out = bytes([int(m.group(1), 16)]).decode("utf-8", "backslashreplace")
        elif style == "metaspace":
            out = piece.replace("▁", " ")
        else:
            out = tokenizer.decode([token_id])
        cache[token_id] = out = visible(out)
        return out

    return text
