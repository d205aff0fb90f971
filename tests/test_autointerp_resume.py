"""Kill a real ``clt-lens autointerp`` process with SIGKILL mid-run and start it again:
finished features are skipped and the server sees no repeated request for any of them."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from autointerp_helpers import LIVE_FEATURES, feature_of_text, make_features_dir

from clt_lens.autointerp import load_explanations, run_autointerp
from clt_lens.autointerp.records import iter_records
from clt_lens.autointerp.stub_server import StubOpenAIServer

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def _complete_lines(path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def _features(requests) -> collections.Counter:
    # a request the SIGKILL cut off mid-body reaches the server without messages: skip it
    return collections.Counter(feature_of_text(r.messages[-1]["content"]) for r in requests
                               if r.messages)  # fmt: skip


def test_sigkill_then_resume_sends_nothing_for_finished_features(tmp_path):
    fdir = make_features_dir(tmp_path / "features")
    records = fdir / "autointerp.jsonl"
    # A slow server makes the run last long enough to be killed half way.
    with StubOpenAIServer(delay=0.08) as server:
        cmd = [
            sys.executable, "-c",
            "import sys; from clt_lens.cli import main; sys.exit(main(sys.argv[1:]))",
            "autointerp", str(fdir), "--model", "stub-llm", "--base-url", server.base_url,
            "--concurrency", "2", "--quiet", "--retry_base_delay", "0.01",
        ]
        env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while _complete_lines(records) < 4:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        time.sleep(0.3)  # let the server finish answering requests of the dead client

        finished = {(r["layer"], r["index"]) for r in iter_records(records.parent)}
        assert 4 <= len(finished) < len(LIVE_FEATURES)
        before = _features(server.requests)
        for feat in finished:
            assert before[feat] == 3  # explain, detection, fuzzing: once each
        assert len(server.requests) < 3 * len(LIVE_FEATURES)

        server.reset()
        summary = run_autointerp(fdir, model="stub-llm", base_url=server.base_url,
                                 concurrency=2, retry_base_delay=0.01, progress=False)
        after = _features(server.requests)

    assert not set(after) & finished  # no duplicate request for a finished feature
    assert set(after) | finished == set(LIVE_FEATURES)
    assert all(n == 3 for n in after.values())
    assert summary["features"]["already_done"] == len(finished)
    assert summary["stopped"] == "completed"
    keys = [(r["layer"], r["index"]) for r in iter_records(fdir)]
    assert sorted(keys) == LIVE_FEATURES  # exactly one record per feature
    assert sorted(load_explanations(fdir)) == LIVE_FEATURES


def test_ctrl_c_stops_cleanly_with_a_summary(tmp_path):
    fdir = make_features_dir(tmp_path / "features")
    records = fdir / "autointerp.jsonl"
    with StubOpenAIServer(delay=0.08) as server:
        cmd = [
            sys.executable, "-c",
            "import sys; from clt_lens.cli import main; sys.exit(main(sys.argv[1:]))",
            "autointerp", str(fdir), "--model", "stub-llm", "--base-url", server.base_url,
            "--concurrency", "2", "--quiet",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while _complete_lines(records) < 2:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        n_requests = len(server.requests)
    assert proc.returncode == 130, proc.communicate()
    summary = json.loads((fdir / "autointerp_summary.json").read_text())
    assert summary["stopped"] == "interrupted" and not summary["complete"]
    finished = {(r["layer"], r["index"]) for r in iter_records(fdir)}
    assert summary["features"]["ok"] == len(finished) >= 2
    assert records.read_bytes().endswith(b"\n")  # no half line: records are written whole
    assert summary["usage"]["requests"] == n_requests
