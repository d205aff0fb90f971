"""Automatic interpretability: explain CLT features with an LLM and score the explanations.

``run_autointerp(features_dir, model=...)`` (or ``clt-lens autointerp FEATURES_DIR``) talks
to any OpenAI-compatible chat-completions server and appends one record per feature to
``features_dir/autointerp.jsonl``; ``load_explanations(features_dir)`` reads them back.
``run_autointerp`` is imported lazily so reading explanations does not import ``openai``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clt_lens.autointerp.records import iter_records, latest_records, load_explanations

if TYPE_CHECKING:
    from clt_lens.autointerp.runner import run_autointerp

__all__ = ["iter_records", "latest_records", "load_explanations", "run_autointerp"]


def __getattr__(name: str) -> Any:
    if name == "run_autointerp":
        from clt_lens.autointerp.runner import run_autointerp

        return run_autointerp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
