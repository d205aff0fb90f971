"""Autointerp runs against a real OpenAI-compatible HTTP server on 127.0.0.1.

The stub (clt_lens.autointerp.stub_server) records every request; its default responder is
a keyword-matching "LLM" that is a perfect interpreter of the synthetic one-keyword features
built by autointerp_helpers, so explanations and scores are known in advance. Failures are
injected as HTTP answers (429 + Retry-After, 500, 401, slow replies, malformed bodies).
"""

from __future__ import annotations

import collections
import json
import re

import pytest
from autointerp_helpers import (
    CTX,
    LIVE_FEATURES,
    feature_of_text,
    keyword_of,
    make_features_dir,
)

from clt_lens.autointerp import load_explanations, run_autointerp
from clt_lens.autointerp.prompts import prompt_kind
from clt_lens.autointerp.records import RECORD_KEYS, RecordWriter, RunLocked, iter_records
from clt_lens.autointerp.stub_server import StubOpenAIServer, StubReply, keyword_oracle

FAST = {"retry_base_delay": 0.01, "retry_max_delay": 0.05, "progress": False, "timeout": 5.0}


@pytest.fixture
def server():
    with StubOpenAIServer() as s:
        yield s


@pytest.fixture
def fdir(tmp_path):
    return make_features_dir(tmp_path / "features")


def _kind(req) -> str:
    return prompt_kind(req.messages[0]["content"])


def _user(req) -> str:
    """The user message (the system prompt's examples could match a keyword)."""
    messages = req["messages"] if isinstance(req, dict) else req.messages
    return messages[-1]["content"]


def _by_feature(requests) -> dict:
    out = collections.defaultdict(list)
    for r in requests:
        out[feature_of_text(_user(r))].append(r)
    return out


def _run(fdir, server, **kw):
    return run_autointerp(fdir, model="stub-llm", base_url=server.base_url, api_key="sk-test",
                          **{**FAST, **kw})


def test_full_run_records_scores_usage_and_concurrency(fdir, tmp_path):
    with StubOpenAIServer(delay=0.03) as server:
        summary = _run(fdir, server, concurrency=3, price_per_1k_input=0.5,
                       price_per_1k_output=1.5)
        reqs = server.requests
        max_in_flight = server.max_in_flight

    records = list(iter_records(fdir))
    assert sorted((r["layer"], r["index"]) for r in records) == LIVE_FEATURES
    for r in records:
        assert list(r) == list(RECORD_KEYS)
        kw = keyword_of(r["layer"], r["index"])
        assert r["status"] == "ok" and r["error"] is None
        assert r["explanation"] == f'the word "{kw}"'
        assert r["model"] == "stub-llm" and r["method"] == "clt-lens-explain-v1"
        det, fuzz = r["scores"]["detection"], r["scores"]["fuzzing"]
        # 10 held-out activating + 8 negatives; 10 held-out for fuzzing.
        assert det == {"balanced_accuracy": 1.0, "n": 18, "method": "clt-lens-detection-v1",
                       "model": "stub-llm"}
        assert fuzz == {"balanced_accuracy": 1.0, "n": 10, "method": "clt-lens-fuzzing-v1",
                        "model": "stub-llm"}
        assert r["usage"]["requests"] == 3

    # Exactly one explanation, detection and fuzzing request per live feature, none for dead.
    per = _by_feature(reqs)
    assert sorted(per) == LIVE_FEATURES
    for feat, rs in per.items():
        assert sorted(_kind(r) for r in rs) == ["detection", "explain", "fuzzing"], feat
    assert all(r.headers["authorization"] == "Bearer sk-test" for r in reqs)
    assert all(r.body["model"] == "stub-llm" and r.body["temperature"] == 0.0 for r in reqs)
    assert all("max_tokens" not in r.body for r in reqs)

    # Accounting: the server's own usage numbers, summed independently.
    p = sum(r.usage["prompt_tokens"] for r in reqs)
    c = sum(r.usage["completion_tokens"] for r in reqs)
    u = summary["usage"]
    assert (u["requests"], u["completions"], u["retries"]) == (30, 30, 0)
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (p, c, p + c)
    assert sum(r["usage"]["prompt_tokens"] for r in records) == p
    assert summary["cost"]["total"] == pytest.approx(p / 1000 * 0.5 + c / 1000 * 1.5)
    assert summary["stopped"] == "completed" and summary["complete"] is True
    f = summary["features"]
    assert (f["ok"], f["failed"], f["dead_skipped"], f["already_done"]) == (10, 0, 2, 0)
    assert summary["scores"]["detection"] == {"mean_balanced_accuracy": 1.0, "n_features": 10}
    assert json.loads((fdir / "autointerp_summary.json").read_text()) == summary
    assert "sk-test" not in (fdir / "autointerp_summary.json").read_text()

    # Bounded concurrency, and actually concurrent.
    assert 2 <= max_in_flight <= 3

    got = load_explanations(fdir)
    assert sorted(got) == LIVE_FEATURES
    assert got[(1, 0)]["explanation"] == f'the word "{keyword_of(1, 0)}"'


def test_prompts_are_reproducible(tmp_path):
    bodies = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        d = make_features_dir(tmp_path / name)
        with StubOpenAIServer() as s:
            _run(d, s, concurrency=2, seed=seed, layers=[0])
            bodies.append(sorted(json.dumps(r.body, sort_keys=True) for r in s.requests))
    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]


def test_nontrivial_balanced_accuracy(fdir, server):
    """A scorer that also says "yes" to every even-numbered excerpt: the recorded balanced
    accuracy must equal the one computed here from the prompt's own items."""
    item_re = re.compile(r"^(\d+)\. (.*)$", re.M)

    def responder(req):
        text = keyword_oracle(req)
        if _kind_of(req) in ("detection", "fuzzing"):
            answers = json.loads(text)
            return json.dumps([1 if (k + 1) % 2 == 0 else a for k, a in enumerate(answers)])
        return text

    def _kind_of(req):
        return prompt_kind(req["messages"][0]["content"])

    server.responder = responder
    _run(fdir, server, features=[(0, 3)], concurrency=1)
    (rec,) = iter_records(fdir)
    kw = keyword_of(0, 3)
    for req in server.requests:
        kind = _kind(req)
        if kind == "explain":
            continue
        items = item_re.findall(req.messages[1]["content"])
        if kind == "detection":
            labels = [int(kw in t) for _, t in items]
        else:
            labels = [int(set(re.findall(r"<<(.*?)>>", t)) == {kw}) for _, t in items]
        # The oracle part is right on every item; even items are forced to 1.
        preds = [1 if int(k) % 2 == 0 else y for (k, _), y in zip(items, labels)]
        pos = [p for y, p in zip(labels, preds) if y == 1]
        neg = [p for y, p in zip(labels, preds) if y == 0]
        expected = (sum(pos) / len(pos) + sum(1 - p for p in neg) / len(neg)) / 2
        assert rec["scores"][kind]["balanced_accuracy"] == pytest.approx(expected)
        assert expected < 1.0


def test_retries_rate_limit_server_error_and_timeout(fdir, server):
    server.enqueue(
        StubReply(status=429, headers={"Retry-After": "0.3"}),
        StubReply(status=500),
        StubReply(content="Explanation: too late", delay=1.5),  # past the client timeout
    )
    summary = _run(fdir, server, features=["0:0"], concurrency=1, timeout=0.5)
    reqs = server.requests
    assert len(reqs) == 6  # 4 attempts for the explanation, then detection and fuzzing
    assert [_kind(r) for r in reqs] == ["explain"] * 4 + ["detection", "fuzzing"]
    gaps = [b.received - a.received for a, b in zip(reqs, reqs[1:])]
    assert gaps[0] >= 0.3  # Retry-After honoured
    assert gaps[1] < 0.25  # plain backoff is the (tiny) configured one
    assert 0.5 <= gaps[2] < 1.4  # the client gave up at its timeout, then retried
    u = summary["usage"]
    assert u["requests"] == 6 and u["retries"] == 3 and u["completions"] == 3
    assert u["errors"] == {"rate_limited": 1, "server_error": 1, "timeout": 1, "connection": 0,
                           "malformed": 0, "client_error": 0}
    answered = [r for k, r in enumerate(reqs) if k >= 3]
    assert u["prompt_tokens"] == sum(r.usage["prompt_tokens"] for r in answered)
    (rec,) = iter_records(fdir)
    assert rec["status"] == "ok" and rec["usage"]["requests"] == 6
    assert rec["explanation"] == f'the word "{keyword_of(0, 0)}"'


def test_exhausted_retries_leave_feature_unfinished_and_the_run_goes_on(fdir, server):
    bad_kw = keyword_of(0, 2)

    def responder(req):
        if bad_kw in _user(req):
            return StubReply(status=503, headers={"Retry-After": "0"})
        return keyword_oracle(req)

    server.responder = responder
    summary = _run(fdir, server, layers=[0], concurrency=2, max_retries=2)
    recs = {(r["layer"], r["index"]): r for r in iter_records(fdir)}
    # Retries ran out on a server error: no verdict on the feature, so no record.
    assert sorted(recs) == [(0, 0), (0, 1), (0, 3), (0, 4)]
    assert all(r["status"] == "ok" for r in recs.values())
    assert len(_by_feature(server.requests)[(0, 2)]) == 3
    f = summary["features"]
    assert (f["ok"], f["failed"], f["gave_up"]) == (4, 0, 1)
    assert summary["usage"]["errors"]["server_error"] == 3
    assert summary["stopped"] == "completed"
    # The next run tries it again, and only it.
    server.reset()
    server.responder = keyword_oracle
    _run(fdir, server, layers=[0])
    assert set(_by_feature(server.requests)) == {(0, 2)} and len(server.requests) == 3
    assert set(load_explanations(fdir)) == {(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)}


def test_refused_request_is_a_recorded_failure(fdir, server):
    server.enqueue(StubReply(status=400, body={"error": {"message": "prompt is too long"}}))
    summary = _run(fdir, server, features=["0:0", "0:1"], concurrency=1)
    recs = {(r["layer"], r["index"]): r for r in iter_records(fdir)}
    assert recs[(0, 0)]["status"] == "failed" and "prompt is too long" in recs[(0, 0)]["error"]
    assert recs[(0, 0)]["usage"]["requests"] == 1  # a 400 is not retried
    assert recs[(0, 1)]["status"] == "ok"
    assert summary["usage"]["errors"]["client_error"] == 1 and len(server.requests) == 4


def test_unreachable_server_stops_the_run(fdir):
    with StubOpenAIServer() as s:
        dead_url = s.base_url  # the port is closed once the server stops
    summary = run_autointerp(fdir, model="m", base_url=dead_url, concurrency=1,
                             max_retries=1, max_consecutive_failures=2, **FAST)
    assert summary["stopped"] == "unavailable" and "2 features in a row" in summary["stop_reason"]
    assert summary["usage"]["errors"]["connection"] == 4  # 2 features x 2 attempts
    assert summary["features"]["gave_up"] == 2 and list(iter_records(fdir)) == []


def test_rate_limit_pauses_every_worker(fdir):
    with StubOpenAIServer(delay=0.02) as server:
        server.enqueue(StubReply(status=429, headers={"retry-after-ms": "400"}))
        _run(fdir, server, concurrency=3, layers=[0])
        reqs = server.requests
    t0 = reqs[0].received
    # Requests already in flight when the 429 came back may land just after it; then no
    # worker sends anything until the server's 0.4 s have passed.
    quiet = [r for r in reqs if t0 + 0.1 < r.received < t0 + 0.39]
    assert quiet == []
    assert len(reqs) == 16


def test_malformed_answers_are_recorded_not_raised(fdir, server):
    kw_a, kw_b, kw_c, kw_d = (keyword_of(0, i) for i in range(4))
    served_junk_body = []

    def responder(req):
        text = _user(req)
        kind = prompt_kind(req["messages"][0]["content"])
        if kw_a in text:
            return "I believe this feature is about fruit, honestly."
        if kw_b in text and kind == "detection":
            return "Most of them, I think: 1, maybe 3."
        if kw_c in text and kind == "explain" and not served_junk_body:
            served_junk_body.append(1)
            return StubReply(body="<html>bad gateway</html>")
        if kw_d in text and kind == "fuzzing":
            return StubReply(content=keyword_oracle(req), include_usage=False)
        return keyword_oracle(req)

    server.responder = responder
    summary = _run(fdir, server, features=["0:0", "0:1", "0:2", "0:3"], concurrency=2)
    recs = {(r["layer"], r["index"]): r for r in iter_records(fdir)}
    a, b, c, d = (recs[(0, i)] for i in range(4))
    assert a["status"] == "failed" and "honestly" in a["error"] and a["explanation"] is None
    assert a["usage"]["requests"] == 1  # no scoring without an explanation
    assert b["status"] == "ok" and "detection" not in b["scores"] and "fuzzing" in b["scores"]
    assert "detection: unparseable answer" in b["error"] and "maybe 3" in b["error"]
    assert c["status"] == "ok" and c["usage"]["requests"] == 4  # junk body retried once
    assert d["status"] == "ok" and set(d["scores"]) == {"detection", "fuzzing"}
    u = summary["usage"]
    assert u["errors"]["malformed"] == 1 and u["responses_without_usage"] == 1
    assert set(load_explanations(fdir)) == {(0, 1), (0, 2), (0, 3)}


@pytest.mark.parametrize("concurrency", [1, 3])
def test_request_budget_stops_cleanly_then_resume(fdir, server, concurrency):
    summary = _run(fdir, server, concurrency=concurrency, max_requests=7)
    assert len(server.requests) == 7  # never one more than the budget
    assert summary["stopped"] == "budget" and not summary["complete"]
    assert "max_requests=7" in summary["stop_reason"]
    recs = list(iter_records(fdir))
    assert 1 <= len(recs) <= 2
    per = _by_feature(server.requests)
    for r in recs:
        assert len(per[(r["layer"], r["index"])]) == 3 and r["status"] == "ok"
    assert summary["features"]["ok"] == len(recs) and summary["features"]["abandoned"] >= 1

    first = {(r["layer"], r["index"]) for r in recs}
    server.reset()
    summary2 = _run(fdir, server, concurrency=concurrency)
    assert summary2["stopped"] == "completed"
    assert summary2["features"]["already_done"] == len(first)
    again = set(_by_feature(server.requests))
    assert not again & first  # nothing re-sent for finished features
    assert again | first == set(LIVE_FEATURES)
    assert sorted(load_explanations(fdir)) == LIVE_FEATURES
    assert len(list(iter_records(fdir))) == 10  # one record per feature


def test_token_budget(fdir, server):
    summary = _run(fdir, server, concurrency=2, max_tokens_budget=4000, max_output_tokens=50)
    u = summary["usage"]
    assert summary["stopped"] == "budget" and "max_tokens_budget=4000" in summary["stop_reason"]
    assert u["total_tokens"] <= 4000
    assert 1 <= summary["features"]["ok"] < 10
    assert all(r.body["max_tokens"] == 50 for r in server.requests)


@pytest.mark.parametrize(
    "reply, needle",
    [
        (StubReply(status=401), "HTTP 401"),
        (StubReply(status=404), "HTTP 404"),
        (StubReply(status=429, body={"error": {"message": "You exceeded your quota",
                                               "type": "insufficient_quota",
                                               "code": "insufficient_quota"}}),
         "insufficient_quota"),
    ],
)
def test_fatal_errors_stop_the_run(fdir, server, reply, needle):
    server.enqueue(reply)
    summary = _run(fdir, server, concurrency=1)
    assert summary["stopped"] == "fatal_error" and needle in summary["stop_reason"]
    assert len(server.requests) == 1
    assert list(iter_records(fdir)) == []


def test_resume_repairs_half_line_and_skips_finished(fdir, server):
    _run(fdir, server, max_features=4, concurrency=2)
    first = {(r["layer"], r["index"]) for r in iter_records(fdir)}
    assert first == set(LIVE_FEATURES[:4])
    # Same options again: the same 4 features are targeted, all done, nothing sent.
    server.reset()
    s = _run(fdir, server, max_features=4)
    assert server.requests == [] and s["features"]["already_done"] == 4
    with open(fdir / "autointerp.jsonl", "a") as f:
        f.write('{"layer": 1, "index": 2, "status": "ok", "explanation": "half')
    server.reset()
    _run(fdir, server, concurrency=2)
    assert not set(_by_feature(server.requests)) & first
    lines = (fdir / "autointerp.jsonl").read_text().splitlines()
    assert len(lines) == 10 and all(json.loads(x)["status"] == "ok" for x in lines)


def test_retry_failed_redoes_only_failed(fdir, server):
    kw = keyword_of(1, 1)
    server.responder = lambda req: (
        "no idea" if kw in _user(req) else keyword_oracle(req))
    _run(fdir, server, layers=[1])
    assert load_explanations(fdir).keys() == {(1, 0), (1, 2), (1, 3), (1, 4)}
    server.reset()
    server.responder = keyword_oracle
    _run(fdir, server, layers=[1])
    assert server.requests == []  # failed features are finished unless asked
    s = _run(fdir, server, layers=[1], retry_failed=True)
    assert set(_by_feature(server.requests)) == {(1, 1)} and len(server.requests) == 3
    assert s["features"]["already_done"] == 4
    assert load_explanations(fdir)[(1, 1)]["explanation"] == f'the word "{kw}"'
    # A different model is a different set of explanations: all redone.
    server.reset()
    run_autointerp(fdir, model="other-llm", base_url=server.base_url, layers=[1], **FAST)
    assert len(server.requests) == 15
    assert load_explanations(fdir, model="stub-llm")[(1, 1)]["model"] == "stub-llm"


def test_cli_env_and_lock(fdir, server, monkeypatch, capsys):
    from clt_lens.cli import main

    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # A proxy in the environment must not capture requests to a server on this machine.
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    code = main(["autointerp", str(fdir), "--model", "stub-llm", "--max-features", "1",
                 "--scorers", "detection", "--retry_base_delay", "0.01"])
    assert code == 0
    out = capsys.readouterr().out
    assert "1 ok, 0 failed" in out and "detection 1.000" in out
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer EMPTY"] * 2
    assert [_kind(r) for r in server.requests] == ["explain", "detection"]

    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    server.reset()
    assert main(["autointerp", str(fdir), "--model", "stub-llm", "--features", "1:4",
                 "--scorers", "none", "--quiet"]) == 0
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer sk-from-env"]
    rec = load_explanations(fdir)[(1, 4)]
    assert rec["scores"] == {} and rec["error"] is None

    assert main(["autointerp", str(fdir), "--model", "m", "--concurrency", "0"]) == 2
    assert "concurrency" in capsys.readouterr().err

    with RecordWriter(fdir):
        with pytest.raises(RunLocked):
            _run(fdir, server)
        assert main(["autointerp", str(fdir), "--model", "m", "--quiet"]) == 1


def _shifted_simulation(request: dict) -> str:
    """keyword_oracle, except that simulation predictions sit one token late."""
    answer = keyword_oracle(request)
    if prompt_kind(request["messages"][0]["content"]) != "simulation":
        return answer
    rows = json.loads(answer.splitlines()[-1])
    return json.dumps([[0, *row[:-1]] for row in rows])


def test_simulation_scores_correlate_predicted_and_true_activations(fdir):
    with StubOpenAIServer() as server:
        summary = _run(fdir, server, scorers=["simulation"])
        kinds = collections.Counter(_kind(r) for r in server.requests)
    assert kinds == {"explain": 10, "simulation": 10}
    good = {(r["layer"], r["index"]): r["scores"]["simulation"] for r in iter_records(fdir)}
    assert sorted(good) == LIVE_FEATURES
    for s in good.values():
        # 10 held-out activating + 8 negative excerpts, every token scored
        assert s["n"] == 18 * CTX and s["method"] == "clt-lens-simulation-v1"
        assert 0.6 < s["correlation"] <= 1.0  # right tokens; levels differ across examples
    assert summary["scores"]["simulation"]["n_features"] == 10
    assert summary["scores"]["simulation"]["mean_correlation"] > 0.6

    shifted_dir = make_features_dir(fdir.parent / "shifted")
    with StubOpenAIServer(responder=_shifted_simulation) as server:
        _run(shifted_dir, server, scorers=["simulation"])
    for r in iter_records(shifted_dir):
        assert r["scores"]["simulation"]["correlation"] < 0.2  # the wrong tokens score low


def test_simulation_answer_of_the_wrong_shape_is_reported(fdir):
    def short_rows(request: dict) -> str:
        if prompt_kind(request["messages"][0]["content"]) == "simulation":
            return "[[0, 1], [2]]"
        return keyword_oracle(request)

    with StubOpenAIServer(responder=short_rows) as server:
        _run(fdir, server, scorers=["simulation"])
    for r in iter_records(fdir):
        assert r["status"] == "ok" and "simulation" not in r["scores"]
        assert "simulation: unparseable answer" in r["error"]
