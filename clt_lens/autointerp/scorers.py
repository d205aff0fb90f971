"""Detection and fuzzing scores of an explanation, on held-out examples only.

- detection: held-out activating contexts mixed with negative contexts, shuffled; the LLM
  says which activate. Balanced accuracy over (activating, negative).
- fuzzing: held-out activating contexts, about half with the true activating tokens marked,
  the rest with the same number of marks on random tokens where the feature did not fire;
  the LLM says which are correctly marked. Balanced accuracy over (correct, wrong).
- simulation (opt-in): held-out activating contexts and negative contexts; the LLM predicts
  every token's activation 0-10 from the explanation alone. Pearson correlation of predicted
  and true levels over all tokens (the "all at once" correlation of Bills et al. 2023, asked
  for as JSON instead of read from logprobs, so any chat API serves).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from clt_lens.autointerp.client import ChatClient, RequestFailed, Tally
from clt_lens.autointerp.examples import ExampleSplit, feature_rng
from clt_lens.autointerp.explainer import truncate_raw
from clt_lens.autointerp.prompts import (
    SCORE_METHODS,
    activation_levels,
    balanced_accuracy,
    build_detection_messages,
    build_fuzzing_messages,
    build_simulation_messages,
    marked_positions,
    parse_binary_list,
    parse_level_lists,
    pearson,
    render_marked,
    render_plain,
)
from clt_lens.errors import InputError

# the number each scorer reports (runner summaries average it)
SCORE_KEYS = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy",
              "simulation": "correlation"}


@dataclass
class ScoringSet:
    texts: list[str]
    labels: list[int]  # 1 = activating (detection) / correctly marked (fuzzing)


def detection_set(split: ExampleSplit, rng: random.Random) -> ScoringSet | str:
    """The items, or the reason they cannot be built."""
    if not split.heldout:
        return "no held-out activating examples (too few examples)"
    if not split.negatives:
        return "no negative examples"
    items = [(render_plain(ex["tokens"]), 1) for ex in split.heldout]
    items += [(render_plain(ex["tokens"]), 0) for ex in split.negatives]
    rng.shuffle(items)
    return ScoringSet([t for t, _ in items], [y for _, y in items])


def wrong_marks(example: dict, true_marks: set[int], rng: random.Random) -> set[int]:
    """As many random positions as there are true marks, where the feature did not fire
    (falling back to unmarked weakly-firing positions); empty if there is no such token."""
    acts = example["acts"]
    silent = [p for p in range(len(acts)) if p not in true_marks and acts[p] <= 0]
    weak = [p for p in range(len(acts)) if p not in true_marks and acts[p] > 0]
    k = max(1, len(true_marks))
    chosen = rng.sample(silent, min(k, len(silent)))
    if len(chosen) < k and weak:
        chosen += rng.sample(weak, min(k - len(chosen), len(weak)))
    return set(chosen)


def fuzzing_set(split: ExampleSplit, max_act: float, rng: random.Random) -> ScoringSet | str:
    if len(split.heldout) < 2:
        return "fewer than 2 held-out activating examples"
    order = list(range(len(split.heldout)))
    rng.shuffle(order)
    make_wrong = set(order[: len(order) // 2])
    items = []
    for k, ex in enumerate(split.heldout):
        true = set(marked_positions(ex, max_act))
        wrong = wrong_marks(ex, true, rng) if k in make_wrong else set()
        if wrong:
            items.append((render_marked(ex["tokens"], wrong), 0))
        else:
            items.append((render_marked(ex["tokens"], true), 1))
    if not any(y == 0 for _, y in items) or not any(y == 1 for _, y in items):
        return "could not build both correctly and wrongly marked examples"
    rng.shuffle(items)
    return ScoringSet([t for t, _ in items], [y for _, y in items])


@dataclass
class SimulationSet:
    excerpts: list[list[str]]
    levels: list[list[int]]  # true activations as 0-10 levels, one per token


def simulation_set(split: ExampleSplit, max_act: float, rng: random.Random) -> SimulationSet | str:
    if not split.heldout:
        return "no held-out activating examples (too few examples)"
    items = [(list(ex["tokens"]), activation_levels(ex["acts"], max_act))
             for ex in [*split.heldout, *split.negatives]]  # fmt: skip
    if len({v for _, levels in items for v in levels}) < 2:
        return "the held-out activations all round to one level (nothing to correlate with)"
    rng.shuffle(items)
    return SimulationSet([t for t, _ in items], [lv for _, lv in items])


def _simulate(
    explanation: str, built: SimulationSet, chat: ChatClient, tally: Tally
) -> tuple[dict | None, str | None]:
    try:
        completion = chat.complete(build_simulation_messages(explanation, built.excerpts), tally)
    except RequestFailed as e:
        if e.transient:
            raise
        return None, f"simulation: request refused: {e}"
    lengths = [len(t) for t in built.excerpts]
    predicted = parse_level_lists(completion.text, lengths)
    if predicted is None:
        return None, (
            f"simulation: unparseable answer (expected {len(lengths)} lists of 0-10 integers "
            f"of lengths {lengths}): {truncate_raw(completion.text)}"
        )
    flat_true = [v for row in built.levels for v in row]
    flat_pred = [v for row in predicted for v in row]
    r = pearson(flat_pred, flat_true)
    return {
        # a constant prediction carries no information about where the feature fires
        "correlation": 0.0 if r is None else r,
        "n": len(flat_true),
        "method": SCORE_METHODS["simulation"],
        "model": chat.model,
    }, None


def score_feature(
    name: str,
    explanation: str,
    feature: dict,
    split: ExampleSplit,
    chat: ChatClient,
    tally: Tally,
    *,
    seed: int,
) -> tuple[dict | None, str | None]:
    """(score record, None) or (None, why no score). Unparseable answers and refused (4xx)
    requests are reported, not raised; a transient RequestFailed, BudgetExhausted,
    FatalAPIError and RunStopped pass through."""
    rng = feature_rng(seed, int(feature["layer"]), int(feature["index"]), name)
    if name == "detection":
        built = detection_set(split, rng)
        build_messages = build_detection_messages
    elif name == "fuzzing":
        built = fuzzing_set(split, float(feature.get("max_act") or 0.0), rng)
        build_messages = build_fuzzing_messages
    elif name == "simulation":
        sim = simulation_set(split, float(feature.get("max_act") or 0.0), rng)
        if isinstance(sim, str):
            return None, f"simulation: skipped, {sim}"
        return _simulate(explanation, sim, chat, tally)
    else:
        raise InputError(f"unknown scorer {name!r}")
    if isinstance(built, str):
        return None, f"{name}: skipped, {built}"
    try:
        completion = chat.complete(build_messages(explanation, built.texts), tally)
    except RequestFailed as e:
        if e.transient:
            raise  # the feature is retried as a whole on the next run
        return None, f"{name}: request refused: {e}"
    predictions = parse_binary_list(completion.text, len(built.texts))
    if predictions is None:
        return None, (
            f"{name}: unparseable answer (expected a list of {len(built.texts)} 0/1 values): "
            f"{truncate_raw(completion.text)}"
        )
    return {
        "balanced_accuracy": balanced_accuracy(built.labels, predictions),
        "n": len(built.texts),
        "method": SCORE_METHODS[name],
        "model": chat.model,
    }, None
