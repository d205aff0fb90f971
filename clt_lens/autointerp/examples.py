"""Which of a feature's examples are shown to the explainer and which are held out for scoring.

The split is a seeded function of (seed, layer, index), so a run's prompts are reproducible
and a resumed run sends exactly the prompts the killed one would have sent. Held-out
activating examples are never shown to the explainer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from clt_lens.errors import InputError


def feature_rng(seed: int, layer: int, index: int, purpose: str) -> random.Random:
    """An independent stream per (feature, purpose): adding a scorer leaves the others'
    choices unchanged. String seeds hash with SHA-512, so this is stable across processes."""
    return random.Random(f"clt-lens/{seed}/{layer}/{index}/{purpose}")


@dataclass(frozen=True)
class ExampleSplit:
    shown: list[dict]  # activating examples for the explanation prompt, strongest first
    heldout: list[dict]  # activating examples reserved for scoring
    negatives: list[dict]  # non-activating contexts for detection


def check_example(ex: object, where: str) -> None:
    """Raise ValueError naming ``where`` if ``ex`` is not a well-formed Example."""
    if not isinstance(ex, dict):
        raise InputError(f"{where}: example is not an object")
    for key in ("tokens", "acts", "max_act", "max_pos"):
        if key not in ex:
            raise InputError(f"{where}: example lacks {key!r}")
    tokens, acts = ex["tokens"], ex["acts"]
    if not isinstance(tokens, list) or not isinstance(acts, list) or len(tokens) != len(acts):
        raise InputError(f"{where}: example needs lists 'tokens' and 'acts' of equal length")
    if not tokens:
        raise InputError(f"{where}: example has no tokens")
    if not isinstance(ex["max_pos"], int) or not 0 <= ex["max_pos"] < len(tokens):
        raise InputError(f"{where}: example max_pos {ex['max_pos']!r} is outside its tokens")


def activating_groups(feature: dict) -> list[list[dict]]:
    """[top examples, quantile 1 examples, ...] with repeated contexts removed (a quantile
    sample can coincide with a top example) and never-firing examples dropped."""
    where = f"feature ({feature.get('layer')}, {feature.get('index')})"
    seen: set[tuple] = set()
    groups: list[list[dict]] = []
    raw_groups = [feature.get("top_examples") or []]
    raw_groups += [q.get("examples") or [] for q in feature.get("quantile_examples") or []]
    for g, group in enumerate(raw_groups):
        kept = []
        for k, ex in enumerate(group):
            check_example(ex, f"{where} example group {g} #{k}")
            key = tuple(ex.get("token_ids") or ex["tokens"])
            if key in seen or not ex["max_act"] > 0:
                continue
            seen.add(key)
            kept.append(ex)
        groups.append(kept)
    return groups


def split_examples(
    feature: dict,
    *,
    seed: int,
    n_explain_top: int = 10,
    n_explain_quantile: int = 5,
    n_score_positive: int = 10,
    n_score_negative: int = 10,
) -> ExampleSplit:
    """Hold out up to ``n_score_positive`` activating examples (at most half of them, drawn
    round-robin across the top set and each quantile so scores cover weak activations too),
    then show the strongest remaining top examples plus a seeded sample of the remaining
    quantile examples. Negatives are a seeded sample of the feature's negative examples."""
    layer, index = int(feature["layer"]), int(feature["index"])
    rng = feature_rng(seed, layer, index, "split")
    groups = activating_groups(feature)
    total = sum(len(g) for g in groups)
    n_hold = min(n_score_positive, total // 2)

    pools = []
    for g in groups:
        order = list(range(len(g)))
        rng.shuffle(order)
        pools.append(order)
    held: list[set[int]] = [set() for _ in groups]
    while sum(len(h) for h in held) < n_hold:
        for g, order in enumerate(pools):
            if order and sum(len(h) for h in held) < n_hold:
                held[g].add(order.pop())

    heldout = [ex for g, group in enumerate(groups) for k, ex in enumerate(group) if k in held[g]]
    top_left = [ex for k, ex in enumerate(groups[0]) if k not in held[0]]
    top_left.sort(key=lambda ex: -float(ex["max_act"]))
    quant_left = [
        ex
        for g, group in enumerate(groups[1:], 1)
        for k, ex in enumerate(group)
        if k not in held[g]
    ]
    shown = top_left[:n_explain_top]
    extra = rng.sample(quant_left, min(n_explain_quantile, len(quant_left)))
    shown = sorted(shown + extra, key=lambda ex: -float(ex["max_act"]))

    negatives = list(feature.get("negative_examples") or [])
    for k, ex in enumerate(negatives):
        check_example(ex, f"feature ({layer}, {index}) negative example #{k}")
    negatives = rng.sample(negatives, min(n_score_negative, len(negatives)))
    return ExampleSplit(shown=shown, heldout=heldout, negatives=negatives)
