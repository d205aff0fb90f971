"""``clt-lens upload`` against a real HTTP server on 127.0.0.1 that checks every request."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_features_common import build_features_dir, write_autointerp

from clt_lens.features.format import iter_features, read_manifest
from clt_lens.features.upload import UploadError, upload_features

F = 150  # > 128: every source needs two requests
KEY = "test-key-123"


class Recorder(BaseHTTPRequestHandler):
    """Records each request; answers 401 without the right key, 400 on a bad payload."""

    requests: list[dict] = []
    errors: list[str] = []
    fail_with: int | None = None

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.requests.append({"path": self.path, "key": self.headers.get("X-Api-Key"),
                                  "body": body})
        if Recorder.fail_with:
            return self._reply(Recorder.fail_with, {"error": "nope"})
        if self.headers.get("X-Api-Key") != KEY:
            return self._reply(401, {"error": "unauthorized"})
        problems = check_payload(body)
        Recorder.errors += problems
        self._reply(400 if problems else 200, {"problems": problems} if problems else {"ok": 1})


def check_payload(body: dict) -> list[str]:
    """The upload-batch schema of the neuronpedia client (FeatureRequest.upload_batch)."""
    bad = []
    if set(body) != {"modelId", "source", "features"}:
        bad.append(f"top-level keys {sorted(body)}")
    feats = body.get("features", [])
    if not 1 <= len(feats) <= 128:
        bad.append(f"{len(feats)} features in one call")
    for f in feats:
        if set(f) != {"index", "density", "activations", "explanations", "topLogits",
                      "bottomLogits"}:
            bad.append(f"feature keys {sorted(f)}")
            continue
        if not isinstance(f["index"], int) or not 0 <= f["density"] <= 1:
            bad.append(f"index/density {f['index']!r} {f['density']!r}")
        for lg in f["topLogits"] + f["bottomLogits"]:
            if set(lg) != {"token", "value"} or not isinstance(lg["token"], str):
                bad.append(f"logit {lg}")
        for a in f["activations"]:
            if set(a) != {"tokens", "values", "quantileMax", "quantileMin", "quantileFraction"}:
                bad.append(f"activation keys {sorted(a)}")
            elif len(a["tokens"]) != len(a["values"]) or not a["tokens"]:
                bad.append("tokens/values lengths")
            elif a["quantileFraction"] is not None and not 0 <= a["quantileFraction"] <= 1:
                bad.append("quantileFraction")
        for e in f["explanations"]:
            if set(e) != {"text", "methodName", "modelName"} or not e["text"]:
                bad.append(f"explanation {e}")
    return bad


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/api"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fresh_recorder(monkeypatch):
    Recorder.requests, Recorder.errors, Recorder.fail_with = [], [], None
    # requests honours proxy variables; the test server is local
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def fdir(tmp_path_factory):
    out = build_features_dir(tmp_path_factory.mktemp("up"), F, n_seq=4, top_k=3, n_negative=0)
    write_autointerp(out, [(0, 3, "ok", "apostrophes"), (2, 140, "ok", "names")])
    return out


def test_upload_sends_every_feature_in_batches_of_at_most_128(fdir, server, monkeypatch):
    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    summary = upload_features(fdir, model_id="tiny", base_url=server, progress=False)
    assert not Recorder.errors
    reqs = Recorder.requests
    assert len(reqs) == summary["requests"] == 8  # 4 sources x (128 + 22)
    assert all(r["path"] == "/api/feature/upload-batch" and r["key"] == KEY for r in reqs)
    by_source: dict[str, list[int]] = {}
    for r in reqs:
        assert r["body"]["modelId"] == "tiny"
        by_source.setdefault(r["body"]["source"], []).extend(
            f["index"] for f in r["body"]["features"])
    assert by_source == {f"{layer}-clt": list(range(F)) for layer in range(4)}
    # the payload carries our statistics
    sent = {(r["body"]["source"], f["index"]): f for r in reqs for f in r["body"]["features"]}
    for rec in iter_features(fdir, 2):
        f = sent[("2-clt", rec["index"])]
        assert f["density"] == rec["frac_nonzero"]
        assert [lg["value"] for lg in f["topLogits"]] == [v for _, v in rec["top_logits"]]
        n_acts = len(rec["top_examples"]) + sum(len(q["examples"]) for q in
                                                rec["quantile_examples"])
        assert len(f["activations"]) == n_acts
        if rec["top_examples"]:
            assert f["activations"][0]["values"] == rec["top_examples"][0]["acts"]
    assert sent[("0-clt", 3)]["explanations"] == [
        {"text": "apostrophes", "methodName": "clt-lens-explain-v1", "modelName": "stub-llm"}]
    assert sent[("2-clt", 140)]["explanations"][0]["text"] == "names"
    assert sent[("1-clt", 3)]["explanations"] == []


def test_upload_configuration_from_the_environment_and_cli(fdir, server, monkeypatch, capsys):
    from clt_lens.cli import main

    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    monkeypatch.setenv("NEURONPEDIA_BASE_URL", server)
    assert main(["upload", str(fdir), "--model-id", "tiny", "--source", "1-mine"]) == 0
    assert {r["body"]["source"] for r in Recorder.requests} == {"1-mine"}
    assert len(Recorder.requests) == 2 and not Recorder.errors
    assert "sent 150 features" in capsys.readouterr().out

    Recorder.requests = []
    assert main(["upload", str(fdir), "--layers", "3", "--batch-size", "50", "--source",
                 "res"]) == 0
    assert [len(r["body"]["features"]) for r in Recorder.requests] == [50, 50, 50]
    assert {r["body"]["source"] for r in Recorder.requests} == {"3-res"}
    assert Recorder.requests[0]["body"]["modelId"] == read_manifest(fdir)["model"]


def test_upload_errors(fdir, server, monkeypatch):
    monkeypatch.delenv("NEURONPEDIA_API_KEY", raising=False)
    with pytest.raises(ValueError, match="NEURONPEDIA_API_KEY"):
        upload_features(fdir, base_url=server, progress=False)
    assert Recorder.requests == []  # nothing sent without a key
    with pytest.raises(ValueError, match="batch_size"):
        upload_features(fdir, base_url=server, api_key=KEY, batch_size=129)
    with pytest.raises(ValueError, match=r"layers \[4\]"):
        upload_features(fdir, base_url=server, api_key=KEY, layers=[4])
    with pytest.raises(UploadError, match="batch 0 of source 0-clt"):
        upload_features(fdir, base_url=server, api_key="wrong-key", progress=False)
    assert len(Recorder.requests) == 1 and Recorder.requests[0]["key"] == "wrong-key"
    Recorder.fail_with = 500
    with pytest.raises(UploadError, match="Server error"):
        upload_features(fdir, base_url=server, api_key=KEY, progress=False)
    summary = upload_features(fdir, api_key=None, dry_run=True, progress=False)
    assert summary["features"] == 4 * F and summary["dry_run"]
