"""Ask the LLM for one feature's explanation."""

from __future__ import annotations

from clt_lens.autointerp.client import ChatClient, Tally
from clt_lens.autointerp.examples import ExampleSplit
from clt_lens.autointerp.prompts import build_explanation_messages, parse_explanation

MAX_RAW_IN_ERROR = 4000  # characters of an unparseable answer kept in the record


def explain_feature(
    feature: dict, split: ExampleSplit, chat: ChatClient, tally: Tally
) -> tuple[str | None, str]:
    """(explanation or None if the answer has no parseable ``Explanation:`` line, raw answer).

    RequestFailed, BudgetExhausted, FatalAPIError and RunStopped pass through.
    """
    messages = build_explanation_messages(split.shown, float(feature.get("max_act") or 0.0))
    completion = chat.complete(messages, tally)
    return parse_explanation(completion.text), completion.text


def truncate_raw(text: str, limit: int = MAX_RAW_IN_ERROR) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"
