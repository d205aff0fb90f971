"""A hand-built features directory for the autointerp tests (no dependency on the features
stage): every live feature fires on one keyword, so a keyword-matching stub LLM is a
perfect interpreter and every score can be predicted exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

FILLERS = [
    "the", "a", "of", "and", "to", "in", "was", "he", "she", "it", "on", "with", "as",
    "for", "his", "her", "that", "but", "not", "be", "by", "at", "from", "or", "had",
]
KEYWORDS = [
    "apple", "river", "castle", "thunder", "violin", "copper", "meadow", "lantern",
    "falcon", "harbor", "glacier", "saffron", "marble", "orchid", "compass", "velvet",
]
VOCAB = FILLERS + KEYWORDS
N_LAYERS, D_SAE, CTX = 2, 6, 16
DEAD_INDEX = 5  # in every layer: never fires


def keyword_of(layer: int, index: int) -> str | None:
    if index == DEAD_INDEX:
        return None
    return KEYWORDS[layer * (D_SAE - 1) + index]


def feature_of_text(text: str) -> tuple[int, int] | None:
    """The (layer, index) whose keyword occurs in ``text`` (each request names one)."""
    found = {
        (layer, index)
        for layer in range(N_LAYERS)
        for index in range(D_SAE)
        if (kw := keyword_of(layer, index)) and kw in text
    }
    assert len(found) <= 1, f"text names several features: {found}"
    return found.pop() if found else None


def _example(rng: random.Random, keyword: str | None, peak: float) -> dict:
    words = [rng.choice(FILLERS) for _ in range(CTX)]
    acts = [0.0] * CTX
    if keyword is not None:
        # Keyword occurrences at least 2 apart, so each is its own <<...>> span.
        first = rng.randrange(CTX - 1)
        positions = [first]
        if rng.random() < 0.3:
            others = [p for p in range(CTX - 1) if abs(p - first) >= 2]
            positions = sorted(positions + [rng.choice(others)])
        for k, p in enumerate(positions):
            words[p] = keyword
            acts[p] = peak * (1.0 if k == 0 else 0.8)
            acts[p + 1] = max(acts[p + 1], 0.02 * peak)  # weak echo: fires, not marked
    tokens = [" " + w for w in words]
    max_pos = max(range(CTX), key=lambda p: acts[p])
    return {
        "token_ids": [VOCAB.index(w) for w in words],
        "tokens": tokens,
        "acts": [round(a, 4) for a in acts],
        "max_act": round(max(acts), 4),
        "max_pos": max_pos,
    }


def make_feature(layer: int, index: int, seed: int = 0) -> dict:
    rng = random.Random(f"{seed}/{layer}/{index}")
    kw = keyword_of(layer, index)
    base = {
        "layer": layer, "index": index,
        "decoder_norms": [1.0] * (N_LAYERS - layer),
        "top_logits": [[" x", 1.0]] * 10, "bottom_logits": [[" y", -1.0]] * 10,
    }
    if kw is None:
        return {**base, "frac_nonzero": 0.0, "n_fired": 0, "max_act": 0.0, "mean_act": 0.0,
                "hist": {"edges": [0.0, 5.0, 10.0], "counts": [0, 0]},
                "top_examples": [], "quantile_examples": [],
                "negative_examples": [_example(rng, None, 0) for _ in range(4)]}
    top = [_example(rng, kw, 10.0 - 0.5 * k) for k in range(8)]
    quantiles = []
    for q, (lo, hi) in enumerate([(0.5, 2.0), (2.0, 4.0), (4.0, 6.0)]):
        exs = [_example(rng, kw, rng.uniform(lo, hi)) for _ in range(4)]
        quantiles.append({"name": f"q{q}", "lo": lo, "hi": hi, "examples": exs})
    negatives = [_example(rng, None, 0) for _ in range(8)]
    return {**base, "frac_nonzero": 0.01, "n_fired": 40, "max_act": 10.0, "mean_act": 4.0,
            "hist": {"edges": [0.0, 5.0, 10.0], "counts": [22, 18]},
            "top_examples": top, "quantile_examples": quantiles,
            "negative_examples": negatives}


def make_features_dir(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": 1, "model": "embedded", "model_id": "embedded@test",
        "checkpoint": str(path / "clt"), "n_layers": N_LAYERS, "d_sae": D_SAE,
        "n_tokens": 4096, "context_size": CTX, "input_hook": "ln2.hook_normalized",
        "output_hook": "hook_mlp_out", "dataset": "embedded", "split": "heldout", "top_k": 8,
        "n_quantiles": 3, "sourceset": "clt", "tokenizer": "embedded",
    }
    (path / "features.json").write_text(json.dumps(manifest))
    for layer in range(N_LAYERS):
        with open(path / f"layer_{layer:02d}.jsonl", "w") as f:
            for index in range(D_SAE):
                f.write(json.dumps(make_feature(layer, index, seed)) + "\n")
    return path


LIVE_FEATURES = [(lay, i) for lay in range(N_LAYERS) for i in range(D_SAE) if i != DEAD_INDEX]
