"""Tokenizers: ``"embedded"``, a local folder (offline) or a hub name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clt_lens.data.embedded import ASSETS_DIR
from clt_lens.data.errors import DataLoadError
from clt_lens.data.sources import looks_like_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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
        if looks_like_path(str(name_or_path)):
            raise DataLoadError(f"tokenizer folder {str(name_or_path)!r} does not exist")
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except DataLoadError:
        raise
    except Exception as e:
        raise DataLoadError(
            f"cannot load a tokenizer from {str(name_or_path)!r} ({type(e).__name__}: {e}); "
            "accepted: 'embedded', a local folder with tokenizer files, or a hub model name"
        ) from e


def resolve_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer)
    if tokenizer is None or not callable(tokenizer):
        raise DataLoadError(
            f"tokenizer must be a Hugging Face tokenizer or a name/path for load_tokenizer, "
            f"got {tokenizer!r}"
        )
    return tokenizer
