"""Autointerp building blocks without a server: prompts, parsers, example split, records."""

from __future__ import annotations

import email.utils
import json
import random
import re
import time

import pytest
from autointerp_helpers import make_feature, make_features_dir

from clt_lens.autointerp import load_explanations
from clt_lens.autointerp.client import is_loopback, parse_retry_after
from clt_lens.autointerp.examples import split_examples
from clt_lens.autointerp.prompts import (
    MARK_CLOSE,
    MARK_OPEN,
    activation_levels,
    balanced_accuracy,
    build_explanation_messages,
    marked_positions,
    parse_binary_list,
    parse_explanation,
    parse_level_lists,
    pearson,
    render_marked,
    render_plain,
)
from clt_lens.autointerp.records import RECORD_KEYS, iter_records, repair_tail
from clt_lens.autointerp.scorers import detection_set, fuzzing_set
from clt_lens.config import ConfigError

MARK_RE = re.compile(re.escape(MARK_OPEN) + "(.*?)" + re.escape(MARK_CLOSE))


def _ex(tokens, acts):
    peak = max(range(len(acts)), key=lambda p: acts[p])
    return {"token_ids": list(range(len(tokens))), "tokens": tokens, "acts": acts,
            "max_act": max(acts), "max_pos": peak}


# -- rendering ----------------------------------------------------------------------------

def test_levels_marks_and_rendering():
    ex = _ex([" the", " a", " big", " cat", " sat", " on"], [0.0, 0.2, 5.0, 10.0, 0.04, 0.0])
    # Half-up rounding of 10*a/max: 0.2 -> 0.2 -> 0, 5 -> 5, 0.04 -> 0.
    assert activation_levels(ex["acts"], 10.0) == [0, 0, 5, 10, 0, 0]
    assert activation_levels([0.25, 0.15], 2.0) == [1, 1]  # 1.25 -> 1, 0.75 -> 1
    marks = marked_positions(ex, 10.0)
    assert marks == {2: 5, 3: 10}
    # Adjacent marked tokens form one span; the span's leading space stays outside.
    assert render_marked(ex["tokens"], marks) == " the a <<big cat>> sat on"
    assert render_plain(["a\n", "b\r\n", " c"]) == "a↵b↵ c"
    # A weak example (all levels round to 0) still marks its peak, at level 1.
    weak = _ex([" x", " y", " z"], [0.0, 0.3, 0.1])
    assert marked_positions(weak, 10.0) == {1: 1}


def test_explanation_prompt_shows_marks_and_levels():
    a = _ex([" I", " like", " apples", " ."], [0.0, 0.0, 8.0, 0.0])
    b = _ex([" red", " apples", " and", " pears", "\n"], [0.0, 4.0, 0.0, 2.0, 0.0])
    msgs = build_explanation_messages([a, b], max_act=8.0)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].rstrip().endswith("Explanation: <your explanation>")
    user = msgs[1]["content"]
    assert "Excerpt 1: I like <<apples>> .\nActivations: \"apples\" 10" in user
    assert 'Excerpt 2: red <<apples>> and <<pears>>↵\nActivations: "apples" 5, "pears" 3' in user


# -- parsers ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("Looking at it.\nExplanation: the word apple", "the word apple"),
        ("**Explanation:** mentions of rivers", "mentions of rivers"),
        ("explanation: \"closing brackets\"\n", "closing brackets"),
        ("Explanation: first try\nhmm\nExplanation: second try", "second try"),
        ("Explanation:\n\n  past-tense verbs", "past-tense verbs"),
        ("<think>Explanation: not this</think>\nExplanation: this one", "this one"),
        ("reasoning...</think>Explanation: after the think", "after the think"),
        ("<think>Explanation: never finished", None),
        ("The feature is about apples.", None),
        ("Explanation:   ", None),
    ],
)
def test_parse_explanation(text, expected):
    assert parse_explanation(text) == expected


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("[1, 0, 1]", 3, [1, 0, 1]),
        ("Example [0] is odd.\nAnswer: [1,0,1]", 3, [1, 0, 1]),
        ("[1, 0, 1]\nOn reflection: [0, 0, 1]", 3, [0, 0, 1]),
        ('["yes", "no", "YES"]', 3, [1, 0, 1]),
        ("[true, false]", 2, [1, 0]),
        ("[1 0 1]", 3, [1, 0, 1]),
        ("1: yes\n2. no\n3) 1", 3, [1, 0, 1]),
        ("Excerpt 1: No\nExcerpt 2: **Yes**", 2, [0, 1]),
        ("<think>[1, 1]</think>[0, 1]", 2, [0, 1]),
        ("[1, 0]", 3, None),
        ("[1, 0, 2]", 3, None),
        ("1 0 1", 3, None),
        ("1: yes\n3: no", 3, None),
        ("", 2, None),
    ],
)
def test_parse_binary_list(text, n, expected):
    assert parse_binary_list(text, n) == expected


def test_balanced_accuracy_by_hand():
    # 3 positives, 2 right -> TPR 2/3; 2 negatives, 1 right -> TNR 1/2.
    assert balanced_accuracy([1, 1, 1, 0, 0], [1, 0, 1, 0, 1]) == pytest.approx(7 / 12)
    assert balanced_accuracy([1, 0], [1, 1]) == 0.5
    assert balanced_accuracy([1, 0, 0, 0], [1, 0, 0, 0]) == 1.0
    with pytest.raises(ValueError, match="both"):
        balanced_accuracy([1, 1], [1, 1])


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "150", "retry-after": "9"}) == 0.15
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"retry-after": future}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_is_loopback():
    assert is_loopback("http://127.0.0.1:8000/v1") and is_loopback("http://localhost:11434/v1")
    assert is_loopback("http://[::1]:8000/v1") and is_loopback("http://127.3.4.5/v1")
    assert not is_loopback("https://api.openai.com/v1")
    assert not is_loopback("http://10.0.0.7:8000/v1")


# -- example split and scoring sets -------------------------------------------------------

def _key(ex):
    return tuple(ex["token_ids"])


def test_split_is_seeded_and_never_shows_heldout():
    feat = make_feature(0, 1)
    a = split_examples(feat, seed=0, n_explain_top=6, n_explain_quantile=3)
    b = split_examples(feat, seed=0, n_explain_top=6, n_explain_quantile=3)
    c = split_examples(feat, seed=1, n_explain_top=6, n_explain_quantile=3)
    assert a == b
    assert [_key(e) for e in a.heldout] != [_key(e) for e in c.heldout]
    shown, held = {_key(e) for e in a.shown}, {_key(e) for e in a.heldout}
    assert not shown & held
    # 8 top + 12 quantile examples: half-capped hold-out of 10, spread round-robin over
    # the top set and the 3 quantiles (2-3 from each).
    assert len(a.heldout) == 10
    top_keys = {_key(e) for e in feat["top_examples"]}
    per_group = [len(held & top_keys)] + [
        len(held & {_key(e) for e in q["examples"]}) for q in feat["quantile_examples"]
    ]
    assert sorted(per_group) == [2, 2, 3, 3]
    # Shown: the (up to) 6 strongest remaining top examples + 3 remaining quantile examples.
    top_left = sorted((e for e in feat["top_examples"] if _key(e) not in held),
                      key=lambda e: -e["max_act"])
    assert len(top_left) == 8 - per_group[0]
    assert {_key(e) for e in top_left[:6]} <= shown
    assert len(a.shown) == min(6, len(top_left)) + 3
    assert len(shown - top_keys) == 3
    assert [e["max_act"] for e in a.shown] == sorted((e["max_act"] for e in a.shown), reverse=True)
    # The explanation prompt holds no held-out context.
    prompt = build_explanation_messages(a.shown, 10.0)[1]["content"]
    plain_prompt = prompt.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")
    for ex in a.heldout:
        assert render_plain(ex["tokens"]).strip() not in plain_prompt
    for ex in a.shown:
        assert render_plain(ex["tokens"]).strip() in plain_prompt
    assert len(a.negatives) == 8


def test_split_with_few_examples():
    feat = make_feature(0, 0)
    feat["top_examples"] = feat["top_examples"][:3]
    feat["quantile_examples"] = []
    s = split_examples(feat, seed=0)
    assert len(s.heldout) == 1 and len(s.shown) == 2
    feat["top_examples"] = feat["top_examples"][:1]
    s = split_examples(feat, seed=0)
    assert s.heldout == [] and len(s.shown) == 1
    assert isinstance(detection_set(s, random.Random(0)), str)  # reason, not a set


def test_scoring_sets_labels_and_marks():
    feat = make_feature(1, 2)
    split = split_examples(feat, seed=0)
    det = detection_set(split, random.Random(0))
    assert sorted(det.labels) == [0] * len(split.negatives) + [1] * len(split.heldout)
    assert not any(MARK_OPEN in t for t in det.texts)
    fuzz = fuzzing_set(split, 10.0, random.Random(0))
    assert sum(fuzz.labels) == len(split.heldout) - len(split.heldout) // 2
    by_text = {render_plain(e["tokens"]).strip(): e for e in split.heldout}
    for text, label in zip(fuzz.texts, fuzz.labels):
        ex = by_text[text.replace(MARK_OPEN, "").replace(MARK_CLOSE, "").strip()]
        spans = MARK_RE.findall(text)
        true = marked_positions(ex, 10.0)
        # Wrong marks: as many as the true ones, each on a token where the feature is silent.
        assert len(spans) == len(true)
        silent_words = {ex["tokens"][p].strip() for p, a in enumerate(ex["acts"]) if a <= 0}
        fired_words = {ex["tokens"][p].strip() for p in true}
        if label == 1:
            assert set(spans) == fired_words
        else:
            assert set(spans) <= silent_words and not set(spans) & fired_words


# -- records ------------------------------------------------------------------------------

def _rec(layer, index, status="ok", explanation="x", model="m"):
    return {"layer": layer, "index": index, "status": status, "explanation": explanation,
            "method": "clt-lens-explain-v1", "model": model, "scores": {},
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "requests": 1},
            "error": None if status == "ok" else "boom"}


def test_load_explanations_latest_ok_and_partial_line(tmp_path):
    d = make_features_dir(tmp_path / "f")
    assert load_explanations(d) == {}
    lines = [
        _rec(0, 1, explanation="first"),
        _rec(0, 1, status="failed", explanation=None),  # a later failure keeps the ok one
        _rec(0, 2, explanation="old"),
        _rec(0, 2, explanation="new"),
        _rec(1, 0, explanation="other model", model="m2"),
        _rec(1, 3, status="failed", explanation=None),
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    text += '{"layer": 1, "index": 4, "status": "ok", "explan'  # killed mid-write
    (d / "autointerp.jsonl").write_text(text)
    got = load_explanations(d)
    assert {k: v["explanation"] for k, v in got.items()} == {
        (0, 1): "first", (0, 2): "new", (1, 0): "other model"}
    assert set(got[(0, 1)]) == set(RECORD_KEYS)
    assert set(load_explanations(d, model="m")) == {(0, 1), (0, 2)}
    assert len(list(iter_records(d))) == 6
    removed = repair_tail(d / "autointerp.jsonl")
    assert removed == len('{"layer": 1, "index": 4, "status": "ok", "explan')
    assert (d / "autointerp.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in lines)
    assert repair_tail(d / "autointerp.jsonl") == 0
    with pytest.raises(FileNotFoundError):
        load_explanations(tmp_path / "nope")


# -- bad input is refused before any request ----------------------------------------------

def test_bad_options_raise_before_work(tmp_path, monkeypatch):
    from clt_lens.autointerp import run_autointerp

    d = make_features_dir(tmp_path / "f")
    base = {"model": "m", "base_url": "http://127.0.0.1:9/v1", "progress": False}
    with pytest.raises(ConfigError, match="concurrency"):
        run_autointerp(d, **{**base, "concurrency": 0})
    with pytest.raises(ConfigError, match="scorers"):
        run_autointerp(d, **{**base, "scorers": ["detection", "logprob-simulation"]})
    with pytest.raises(ConfigError, match="features"):
        run_autointerp(d, **{**base, "features": ["7"]})
    with pytest.raises(ConfigError, match="model"):
        run_autointerp(d, **{**base, "model": ""})
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        run_autointerp(d, **{**base, "layers": [5]})
    with pytest.raises(ValueError, match="0:99 is out of range"):
        run_autointerp(d, **{**base, "features": [(0, 99)]})
    with pytest.raises(FileNotFoundError, match="features.json"):
        run_autointerp(tmp_path, **base)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        run_autointerp(d, model="m", progress=False)
    (d / "layer_01.jsonl").write_text('{"layer": 0, "index": 0}\n')
    with pytest.raises(ValueError, match="layer_01.jsonl:1"):
        run_autointerp(d, **base)
    assert not (d / "autointerp.jsonl").exists()


def test_parse_level_lists_takes_the_last_list_of_the_right_shape():
    reply = "For instance [[0, 0, 7], [0, 2, 0, 0]].\nAnswer:\n[[1, 12, -3], [0, 2.6]]"
    assert parse_level_lists(reply, [3, 2]) == [[1, 10, 0], [0, 3]]  # clamped and rounded
    assert parse_level_lists(reply, [3, 4]) == [[0, 0, 7], [0, 2, 0, 0]]
    assert parse_level_lists(reply, [2, 2]) is None
    assert parse_level_lists("<think>[[1]]</think> no list", [1]) is None
    assert parse_level_lists('[["a", 1]]', [2]) is None


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([0, 0, 0], [1, 2, 3]) is None  # a constant side has no correlation
    with pytest.raises(ValueError):
        pearson([1, 2], [1])
