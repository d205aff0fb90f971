"""Prompt text for explaining and scoring features, and robust parsers for the answers.

Everything here is a pure function of its inputs, so a prompt is reproducible from the
features directory and the seed alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Sequence

from clt_lens.errors import InputError

MARK_OPEN, MARK_CLOSE = "<<", ">>"

EXPLAIN_METHOD = "clt-lens-explain-v1"
SCORE_METHODS = {"detection": "clt-lens-detection-v1", "fuzzing": "clt-lens-fuzzing-v1",
                 "simulation": "clt-lens-simulation-v1"}

# Each system prompt opens with a distinct sentence; prompt_kind() keys on it (the stub
# server uses it to tell the three requests apart).
_EXPLAIN_HEAD = "You are an interpretability researcher explaining one feature of a language model."
_DETECTION_HEAD = "You are checking an explanation of a language-model feature (detection)."
_FUZZING_HEAD = "You are checking an explanation of a language-model feature (highlighting)."
_SIMULATION_HEAD = "You are simulating a language-model feature from its explanation."

EXPLAIN_SYSTEM = f"""{_EXPLAIN_HEAD}
You will see text excerpts on which the feature activates. In each excerpt the tokens where it \
activates are marked {MARK_OPEN}like this{MARK_CLOSE}. Under each excerpt the marked tokens are \
listed with their activation from 0 to 10 (10 = the feature's strongest activation).
Work out what the marked tokens have in common, including what comes just before them, and \
give the feature a short explanation (a phrase of at most 15 words), for example: the word \
"river" and other bodies of water; closing parentheses in code.
You may reason briefly first. End your reply with one final line of exactly this form:
Explanation: <your explanation>"""

DETECTION_SYSTEM = f"""{_DETECTION_HEAD}
You get an explanation of the feature and numbered text excerpts. The feature activates \
somewhere in some of the excerpts and nowhere in the others. Judging only by the explanation, \
decide for each excerpt whether the feature activates in it.
Reply with a JSON list of 0s and 1s, one per excerpt in order (1 = activates), for example \
[1, 0, 0, 1], as the last line of your reply."""

FUZZING_SYSTEM = f"""{_FUZZING_HEAD}
You get an explanation of the feature and numbered text excerpts in which some tokens are \
marked {MARK_OPEN}like this{MARK_CLOSE}. In some excerpts the marks sit on the tokens where the \
feature activates; in the others they were put on random tokens. Judging only by the \
explanation, decide for each excerpt whether its marked tokens are ones the feature activates on.
Reply with a JSON list of 0s and 1s, one per excerpt in order (1 = correctly marked), for \
example [1, 0, 0, 1], as the last line of your reply."""


SIMULATION_SYSTEM = f"""{_SIMULATION_HEAD}
You get an explanation of the feature and numbered text excerpts, each given as a JSON list of \
its tokens. Judging only by the explanation, predict the feature's activation on every token, \
as an integer from 0 (does not fire) to 10 (fires as strongly as it ever does). Most tokens \
are 0.
Reply with a JSON list holding one list of integers per excerpt, in order, each as long as its \
excerpt's token list, for example [[0, 0, 7], [0, 2, 0, 0]], as the last line of your reply."""


def prompt_kind(system_prompt: str) -> str | None:
    """"explain", "detection", "fuzzing", "simulation" or None for another system prompt."""
    for kind, head in (("explain", _EXPLAIN_HEAD), ("detection", _DETECTION_HEAD),
                       ("fuzzing", _FUZZING_HEAD), ("simulation", _SIMULATION_HEAD)):
        if system_prompt.startswith(head):
            return kind
    return None


# -- rendering examples --------------------------------------------------------------------

def display_token(tok: str) -> str:
    """Keep each excerpt on one line: newlines become a visible arrow."""
    return tok.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵")


def activation_levels(acts: Sequence[float], max_act: float) -> list[int]:
    """Activations as integers 0-10 relative to the feature's maximum activation."""
    if not max_act or max_act <= 0:
        max_act = max((a for a in acts), default=0.0)
    if max_act <= 0:
        return [0] * len(acts)
    # Half-up rounding (Python's round() would send 0.5 to 0 and 2.5 to 2).
    return [min(10, max(0, math.floor(10.0 * a / max_act + 0.5))) for a in acts]


def marked_positions(example: dict, max_act: float) -> dict[int, int]:
    """Positions to mark -> level 1-10. The example's peak is always marked, so weak
    (low-quantile) examples still show where the feature fired."""
    levels = activation_levels(example["acts"], max_act)
    marks = {p: v for p, v in enumerate(levels) if v >= 1}
    peak = int(example.get("max_pos", 0))
    if 0 <= peak < len(levels) and example["acts"][peak] > 0 and peak not in marks:
        marks[peak] = max(1, levels[peak])
    return marks


def render_marked(tokens: Sequence[str], positions: Collection[int]) -> str:
    """Join tokens, wrapping runs of marked tokens in <<...>>; a run's leading and trailing
    whitespace stays outside the marks so the marked text is the word itself."""
    out: list[str] = []
    i, n = 0, len(tokens)
    while i < n:
        if i not in positions:
            out.append(display_token(tokens[i]))
            i += 1
            continue
        j = i
        while j < n and j in positions:
            j += 1
        span = "".join(display_token(t) for t in tokens[i:j])
        core = span.strip()
        if core:
            lead = span[: len(span) - len(span.lstrip())]
            trail = span[len(span.rstrip()):]
            out.append(f"{lead}{MARK_OPEN}{core}{MARK_CLOSE}{trail}")
        else:
            out.append(f"{MARK_OPEN}{span}{MARK_CLOSE}")
        i = j
    return "".join(out)


def render_plain(tokens: Sequence[str]) -> str:
    return "".join(display_token(t) for t in tokens)


def _token_label(tok: str) -> str:
    shown = display_token(tok)
    return json.dumps(shown.strip() or shown, ensure_ascii=False)


def build_explanation_messages(examples: Sequence[dict], max_act: float) -> list[dict]:
    blocks = []
    for k, ex in enumerate(examples, 1):
        marks = marked_positions(ex, max_act)
        pairs = ", ".join(f"{_token_label(ex['tokens'][p])} {v}" for p, v in sorted(marks.items()))
        blocks.append(
            f"Excerpt {k}: {render_marked(ex['tokens'], marks).strip()}\nActivations: {pairs}"
        )
    user = "\n\n".join(blocks)
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def _scoring_user(explanation: str, texts: Sequence[str]) -> str:
    items = "\n".join(f"{k}. {t.strip()}" for k, t in enumerate(texts, 1))
    return f"Explanation: {explanation}\n\nExcerpts:\n{items}"


def build_detection_messages(explanation: str, texts: Sequence[str]) -> list[dict]:
    return [
        {"role": "system", "content": DETECTION_SYSTEM},
        {"role": "user", "content": _scoring_user(explanation, texts)},
    ]


def build_fuzzing_messages(explanation: str, texts: Sequence[str]) -> list[dict]:
    return [
        {"role": "system", "content": FUZZING_SYSTEM},
        {"role": "user", "content": _scoring_user(explanation, texts)},
    ]


def build_simulation_messages(explanation: str, excerpts: Sequence[Sequence[str]]) -> list[dict]:
    items = "\n".join(
        f"{k}. " + json.dumps([display_token(t) for t in toks], ensure_ascii=False)
        for k, toks in enumerate(excerpts, 1)
    )
    user = f"Explanation: {explanation}\n\nExcerpts:\n{items}"
    return [{"role": "system", "content": SIMULATION_SYSTEM}, {"role": "user", "content": user}]


# -- parsing answers -----------------------------------------------------------------------

_THINK_RE = re.compile(r"<think>.*?</think>", re.S | re.I)
_EXPL_RE = re.compile(r"^[\s>*_#`-]*explanation[\s*_`]*[:：](.*)$", re.I)
_LIST_RE = re.compile(r"\[([^\[\]]*)\]")
_LINE_ITEM_RE = re.compile(
    r"^\s*[-*]?\s*(?:excerpt|example|item)?\s*#?\s*(\d+)\s*[:.)\]=-]+\s*\**\s*"
    r"(yes|no|true|false|1|0)\b",
    re.I,
)
_TRUTHY = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}


def strip_reasoning(text: str) -> str:
    """Drop <think>...</think> blocks that reasoning models (vLLM, Ollama) put in the content."""
    text = _THINK_RE.sub("", text or "")
    if "</think>" in text.lower():  # opening tag stripped by the server
        text = text[text.lower().rfind("</think>") + len("</think>"):]
    elif text.lstrip().lower().startswith("<think>"):  # unterminated: no answer after it
        return ""
    return text


def _clean_explanation(s: str) -> str:
    s = " ".join(s.split())
    s = s.strip("*_` ")
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


def parse_explanation(text: str) -> str | None:
    """The text after the last ``Explanation:`` line (or on the line after an empty one)."""
    lines = strip_reasoning(text).splitlines()
    for k in range(len(lines) - 1, -1, -1):
        m = _EXPL_RE.match(lines[k])
        if not m:
            continue
        found = _clean_explanation(m.group(1))
        if not found:
            rest = [ln for ln in lines[k + 1:] if ln.strip()]
            found = _clean_explanation(rest[0]) if rest else ""
        if found:
            return found
    return None


def parse_binary_list(text: str, n: int) -> list[int] | None:
    """n 0/1 answers from a JSON-style list (the last list of the right length wins) or from
    per-item lines like ``3: yes``; None when neither yields exactly n answers."""
    body = strip_reasoning(text)
    for m in reversed(list(_LIST_RE.finditer(body))):
        parts = [p.strip().strip("\"'").lower() for p in m.group(1).split(",")]
        if len(parts) == 1 and " " in parts[0].strip():
            parts = parts[0].split()
        parts = [p for p in parts if p]
        if len(parts) == n and all(p in _TRUTHY for p in parts):
            return [_TRUTHY[p] for p in parts]
    answers: dict[int, int] = {}
    for line in body.splitlines():
        m = _LINE_ITEM_RE.match(line)
        if m:
            answers[int(m.group(1))] = _TRUTHY[m.group(2).lower()]
    if set(answers) == set(range(1, n + 1)):
        return [answers[k] for k in range(1, n + 1)]
    return None


def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Mean of the true-positive and true-negative rates; both classes must be present."""
    if len(labels) != len(predictions):
        raise InputError(f"{len(labels)} labels but {len(predictions)} predictions")
    pos = [p for y, p in zip(labels, predictions) if y == 1]
    neg = [p for y, p in zip(labels, predictions) if y == 0]
    if not pos or not neg:
        raise InputError("balanced accuracy needs both positive and negative labels")
    tpr = sum(1 for p in pos if p == 1) / len(pos)
    tnr = sum(1 for p in neg if p == 0) / len(neg)
    return (tpr + tnr) / 2.0


_NESTED_START_RE = re.compile(r"\[\s*\[")


def parse_level_lists(text: str, lengths: Sequence[int]) -> list[list[int]] | None:
    """One list of 0-10 integers per excerpt, with the given lengths, from the last nested
    JSON list in the reply that fits (values are clamped to 0-10); None if none fits."""
    body = strip_reasoning(text)
    decoder = json.JSONDecoder()
    for m in reversed(list(_NESTED_START_RE.finditer(body))):
        try:
            value, _ = decoder.raw_decode(body, m.start())
        except ValueError:
            continue
        shape = [len(v) if isinstance(v, list) else -1 for v in value]
        if shape != list(lengths):
            continue
        try:
            return [[min(10, max(0, round(float(x)))) for x in row] for row in value]
        except (TypeError, ValueError):
            continue
    return None


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant (no correlation is defined)."""
    if len(xs) != len(ys):
        raise InputError(f"{len(xs)} values against {len(ys)}")
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)
