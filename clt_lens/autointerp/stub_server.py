"""A local OpenAI-compatible chat-completions server for tests and offline tutorials.

``StubOpenAIServer`` listens on 127.0.0.1 (a free port by default), answers
``POST /v1/chat/completions`` with scripted replies that carry ``usage``, and records every
request so a test can count retries and check what was sent. Failures are injected with
``enqueue(StubReply(status=429, headers={"Retry-After": "0.1"}), ...)``: queued replies are
served first, in arrival order; after that the ``responder`` answers.

The default responder, ``keyword_oracle``, plays a deliberately simple "LLM": it explains a
feature as the token most often marked ``<<...>>``, and in scoring prompts answers 1 for the
excerpts containing (detection) or marking (fuzzing) that word, and in simulation prompts
predicts 10 on that word's tokens and 0 elsewhere. On features that fire on one word that is
a perfect interpreter, which makes end-to-end numbers checkable.

Run ``python -m clt_lens.autointerp.stub_server`` to serve it until Ctrl-C (handy for trying
``clt-lens autointerp --base-url http://127.0.0.1:PORT/v1`` without an API).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from clt_lens.autointerp import prompts


@dataclass
class StubReply:
    """One scripted answer. ``body`` (bytes/str/dict) replaces the completion JSON entirely."""

    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: bytes | str | dict | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"
    include_usage: bool = True


@dataclass
class RecordedRequest:
    index: int
    path: str
    body: dict | None
    headers: dict[str, str]
    received: float  # time.monotonic() when the request arrived
    status: int | None = None  # what the stub answered (None if the client hung up first)
    usage: dict | None = None  # usage the stub reported in a 200 answer

    @property
    def messages(self) -> list[dict]:
        return list((self.body or {}).get("messages") or [])

    @property
    def text(self) -> str:
        """All message contents joined: what a test searches for feature markers."""
        return "\n".join(str(m.get("content") or "") for m in self.messages)


Responder = Callable[[dict], "StubReply | str"]


def count_tokens(text: str) -> int:
    """The stub's stand-in tokenizer: one token per 4 characters (deterministic)."""
    return max(1, len(text) // 4)


class StubOpenAIServer:
    """Threaded HTTP server speaking enough of the OpenAI chat-completions API for the client."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        model_name: str | None = None,
    ) -> None:
        self.responder = responder or keyword_oracle
        self.delay = delay  # added to every reply: lets tests observe concurrency
        self.model_name = model_name
        self._lock = threading.Lock()
        self._queue: collections.deque[StubReply] = collections.deque()
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self.max_in_flight = 0
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> StubOpenAIServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> StubOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting and inspection ----------------------------------------------------------
    def enqueue(self, *replies: StubReply | str) -> None:
        with self._lock:
            for r in replies:
                self._queue.append(StubReply(content=r) if isinstance(r, str) else r)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._queue.clear()
            self.max_in_flight = 0

    # -- serving ---------------------------------------------------------------------------
    def _next_reply(self, body: dict) -> StubReply:
        with self._lock:
            queued = self._queue.popleft() if self._queue else None
        if queued is not None:
            return queued
        reply = self.responder(body)
        return StubReply(content=reply) if isinstance(reply, str) else reply

    def _completion_json(self, reply: StubReply, body: dict, index: int) -> dict:
        content = reply.content or ""
        prompt_text = "\n".join(str(m.get("content") or "") for m in body.get("messages") or [])
        out: dict[str, Any] = {
            "id": f"chatcmpl-stub-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name or body.get("model") or "stub",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content},
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if reply.include_usage:
            p = reply.prompt_tokens
            p = count_tokens(prompt_text) if p is None else p
            c = reply.completion_tokens
            c = count_tokens(content) if c is None else c
            out["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        return out

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep test output clean

            def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                if not any(k.lower() == "content-type" for k in headers):
                    self.send_header("Content-Type", "application/json")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    data = {"object": "list", "data": [{"id": server.model_name or "stub",
                                                        "object": "model"}]}
                    self._send(200, json.dumps(data).encode(), {})
                else:
                    self._send(404, b'{"error": {"message": "not found"}}', {})

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = None
                with server._lock:
                    rec = RecordedRequest(
                        index=len(server._requests),
                        path=self.path,
                        body=body,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        received=time.monotonic(),
                    )
                    server._requests.append(rec)
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    self._answer(rec, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test): nothing to answer
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _answer(self, rec: RecordedRequest, body: dict | None) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    rec.status = 404
                    self._send(404, b'{"error": {"message": "unknown path"}}', {})
                    return
                if body is None:
                    rec.status = 400
                    self._send(400, b'{"error": {"message": "body is not JSON"}}', {})
                    return
                reply = server._next_reply(body)
                wait = reply.delay + server.delay
                if wait > 0:
                    time.sleep(wait)
                if reply.body is not None:
                    payload = reply.body
                    if isinstance(payload, dict):
                        payload = json.dumps(payload)
                    if isinstance(payload, str):
                        payload = payload.encode()
                    rec.status = reply.status
                    self._send(reply.status, payload, reply.headers)
                    return
                if reply.status != 200:
                    err = {"error": {"message": f"stub error {reply.status}",
                                     "type": "stub_error", "code": None}}
                    rec.status = reply.status
                    self._send(reply.status, json.dumps(err).encode(), reply.headers)
                    return
                data = server._completion_json(reply, body, rec.index)
                # Record before sending: a test may read usage as soon as the client returns.
                rec.usage = data.get("usage")
                rec.status = 200
                self._send(200, json.dumps(data).encode(), reply.headers)

        return Handler


# -- the default responder -----------------------------------------------------------------

_MARK_RE = re.compile(re.escape(prompts.MARK_OPEN) + r"(.*?)" + re.escape(prompts.MARK_CLOSE))
_ITEM_RE = re.compile(r"^(\d+)\. (.*)$", re.M)
_QUOTED_RE = re.compile(r'"([^"]+)"')


def _explained_word(user: str) -> str:
    line = next((ln for ln in user.splitlines() if ln.startswith("Explanation:")), "")
    m = _QUOTED_RE.search(line)
    return m.group(1).lower() if m else ""


def keyword_oracle(request: dict) -> str:
    """Answer explanation and scoring prompts as a one-word-feature interpreter."""
    messages = request.get("messages") or []
    system = next((str(m.get("content")) for m in messages if m.get("role") == "system"), "")
    user = "\n".join(str(m.get("content")) for m in messages if m.get("role") == "user")
    kind = prompts.prompt_kind(system)
    if kind == "explain":
        marked = [m.strip().lower() for m in _MARK_RE.findall(user)]
        if not marked:
            return "I cannot tell.\nExplanation: nothing in particular"
        word = collections.Counter(marked).most_common(1)[0][0]
        return f'The marked tokens are mostly "{word}".\nExplanation: the word "{word}"'
    if kind in ("detection", "fuzzing"):
        word = _explained_word(user)
        answers = []
        for _, item in _ITEM_RE.findall(user):
            if kind == "detection":
                hit = bool(word) and word in item.lower()
            else:
                spans = [s.strip().lower() for s in _MARK_RE.findall(item)]
                hit = bool(spans) and all(s == word for s in spans)
            answers.append(int(hit))
        return json.dumps(answers)
    if kind == "simulation":
        word = _explained_word(user)
        levels = [[10 if word and tok.strip().lower() == word else 0 for tok in json.loads(item)]
                  for _, item in _ITEM_RE.findall(user)]  # fmt: skip
        return "Predicted activations:\n" + json.dumps(levels)
    return "Explanation: unrecognised prompt"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve a stub OpenAI chat-completions API locally.")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="seconds added to every reply")
    args = p.parse_args(argv)
    server = StubOpenAIServer(port=args.port, delay=args.delay).start()
    print(f"stub OpenAI server at {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
