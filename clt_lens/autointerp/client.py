"""A chat-completions client with explicit retries, a request/token budget and accounting.

The ``openai`` client is built with ``max_retries=0`` and this module retries itself, so
what happens on a 429, a 5xx or a timeout is visible, counted and testable:

- 429 (rate limit): wait for the server's Retry-After (``retry-after-ms`` / ``retry-after``,
  seconds or an HTTP date) when given, else exponential backoff; every worker pauses until
  then, so a rate limit slows the whole run rather than each thread hammering in turn.
  A 429 whose code is ``insufficient_quota`` is fatal (no retry will help).
- 408, 409, 5xx, timeouts, connection errors, malformed responses: exponential backoff with
  jitter (``base_delay * 2**attempt`` capped at ``max_delay``, then uniform in [d/2, d]);
  a 5xx's Retry-After is honoured too. When retries run out the failure is "transient".
- 401, 403, 404 (bad key, no access, unknown model): fatal for the run.
- other 4xx (e.g. prompt too long): this request fails (not transient), the run goes on.

Every attempt sent counts against the budget; the token budget reserves an estimate before
each request (prompt characters / 3 + the completion allowance), so the run stops before,
not after, crossing it.
"""

from __future__ import annotations

import email.utils
import ipaddress
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from clt_lens.errors import CLTLensError, InputError

DEFAULT_COMPLETION_ESTIMATE = 512  # tokens reserved per request when max_output_tokens is unset


class BudgetExhausted(Exception):
    """The request or token budget does not allow another request."""


class FatalAPIError(CLTLensError, RuntimeError):
    """The API refuses the whole run (credentials, access, unknown model, no quota)."""


class RunStopped(Exception):
    """The run is stopping (budget, fatal error or Ctrl-C elsewhere): send nothing more."""


class RequestFailed(Exception):
    """One request failed. ``transient``: retries ran out on errors that may go away
    (429, 5xx, timeouts, connection); otherwise the server refused this request (4xx)."""

    def __init__(self, message: str, attempts: int, *, transient: bool) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.transient = transient


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 120.0  # a longer Retry-After gives up on the request

    def backoff(self, attempt: int, rng: random.Random) -> float:
        d = min(self.max_delay, self.base_delay * (2.0**attempt))
        return d / 2.0 + rng.uniform(0.0, d / 2.0)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


@dataclass
class Tally:
    """Usage of one feature (not thread-shared: a feature's requests run in one thread)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "requests": self.requests,
        }


ERROR_KINDS = ("rate_limited", "server_error", "timeout", "connection", "malformed", "client_error")


@dataclass
class Meter:
    """Run-wide accounting, shared by the worker threads."""

    requests: int = 0  # HTTP attempts sent
    completions: int = 0  # successful responses
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    responses_without_usage: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "completions": self.completions,
                "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "responses_without_usage": self.responses_without_usage,
                "errors": dict(self.errors),
            }


class Budget:
    """Caps on requests sent and tokens used, checked atomically before each request."""

    def __init__(self, max_requests: int | None = None, max_tokens: int | None = None) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._requests = 0
        self._tokens = 0
        self._reserved = 0
        self.reason: str | None = None

    def reserve(self, est_tokens: int) -> int:
        """Count one request and hold ``est_tokens``; raise BudgetExhausted if over a cap."""
        with self._lock:
            if self.max_requests is not None and self._requests >= self.max_requests:
                self.reason = self.reason or f"max_requests={self.max_requests} reached"
                raise BudgetExhausted(self.reason)
            if self.max_tokens is not None and (
                self._tokens + self._reserved + est_tokens > self.max_tokens
            ):
                self.reason = self.reason or (
                    f"max_tokens_budget={self.max_tokens} reached "
                    f"({self._tokens} used, next request may need ~{est_tokens})"
                )
                raise BudgetExhausted(self.reason)
            self._requests += 1
            self._reserved += est_tokens
            return est_tokens

    def settle(self, reserved: int, used_tokens: int) -> None:
        with self._lock:
            self._reserved -= reserved
            self._tokens += used_tokens


def resolve_endpoint(api_key: str | None, base_url: str | None) -> tuple[str, str | None]:
    """Options first, then OPENAI_API_KEY / OPENAI_BASE_URL. A local server (any base URL)
    needs no key; OpenAI itself does."""
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
    if api_key is None:
        if base_url is None:
            raise InputError(
                "no API key: pass api_key= / --api-key or set OPENAI_API_KEY; for a local "
                "OpenAI-compatible server (vLLM, Ollama) pass base_url= / --base-url or set "
                "OPENAI_BASE_URL"
            )
        api_key = "EMPTY"  # vLLM and Ollama ignore the key but the client requires one
    return api_key, base_url


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, float(email.utils.mktime_tz(parsed) - time.time()))


class ChatClient:
    """Thread-safe: one instance serves all workers of a run."""

    def __init__(
        self,
        *,
        model: str,
        api_key: str,
        base_url: str | None,
        timeout: float,
        retry: RetryPolicy,
        budget: Budget,
        meter: Meter,
        stop: threading.Event,
        temperature: float | None = 0.0,
        max_output_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        import openai  # deferred: importing openai takes ~1 s, load_explanations needs none

        self._openai = openai
        http_client = None
        if base_url is not None and is_loopback(base_url):
            # A server on this machine is never reached through HTTP(S)_PROXY from the
            # environment (httpx would otherwise send 127.0.0.1 requests to the proxy).
            http_client = openai.DefaultHttpxClient(trust_env=False)
        self.client = openai.OpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0,
            http_client=http_client,
        )
        self.model = model
        self.retry = retry
        self.budget = budget
        self.meter = meter
        self.stop = stop
        self.temperature = temperature
        self.max_output_tokens = max_output_tokens
        self._rng = random.Random(f"clt-lens/jitter/{seed}")
        self._rng_lock = threading.Lock()
        self._pause_lock = threading.Lock()
        self._not_before = 0.0  # monotonic time before which no request is sent (rate limit)
        self._sleep = stop.wait  # a wait ends early when the run stops

    def close(self) -> None:
        self.client.close()

    def _jitter_backoff(self, attempt: int) -> float:
        with self._rng_lock:
            return self.retry.backoff(attempt, self._rng)

    def _wait_for_pause(self) -> None:
        while True:
            with self._pause_lock:
                left = self._not_before - time.monotonic()
            if left <= 0:
                return
            self._sleep(left)
            if self.stop.is_set():
                raise RunStopped()

    def _pause_all(self, seconds: float) -> None:
        with self._pause_lock:
            self._not_before = max(self._not_before, time.monotonic() + seconds)

    def _estimate(self, messages: list[dict]) -> int:
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        return chars // 3 + 1 + (self.max_output_tokens or DEFAULT_COMPLETION_ESTIMATE)

    def _count_error(self, kind: str) -> None:
        with self.meter.lock:
            self.meter.errors[kind] += 1

    def _classify(self, err: Exception) -> tuple[str, bool, float | None]:
        """(kind, retryable, server-requested wait) for an exception from the client."""
        o = self._openai
        if isinstance(err, o.APITimeoutError):
            return "timeout", True, None
        if isinstance(err, o.APIConnectionError):
            return "connection", True, None
        if isinstance(err, o.APIResponseValidationError):
            return "malformed", True, None
        if isinstance(err, o.APIStatusError):
            status = err.status_code
            if status == 429:
                if err.code == "insufficient_quota":
                    raise FatalAPIError(f"HTTP 429 insufficient_quota: {err.message}") from err
                return "rate_limited", True, parse_retry_after(err.response.headers)
            if status in (401, 403, 404):
                raise FatalAPIError(
                    f"HTTP {status} from {self.client.base_url} for model {self.model!r}: "
                    f"{err.message}"
                ) from err
            if status >= 500:
                return "server_error", True, parse_retry_after(err.response.headers)
            if status in (408, 409):
                return "client_error", True, None
            return "client_error", False, None
        return "client_error", False, None  # any other client-side error: not retried

    def complete(self, messages: list[dict], tally: Tally | None = None) -> Completion:
        """One chat completion, retried per the policy. Raises RequestFailed, BudgetExhausted,
        FatalAPIError or RunStopped."""
        o = self._openai
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.max_output_tokens is not None:
            kwargs["max_tokens"] = self.max_output_tokens
        last = "no attempt made"
        attempts = 0
        for attempt in range(self.retry.max_retries + 1):
            self._wait_for_pause()
            if self.stop.is_set():
                raise RunStopped()
            reserved = self.budget.reserve(self._estimate(messages))
            attempts += 1
            with self.meter.lock:
                self.meter.requests += 1
                self.meter.retries += attempt > 0
            if tally is not None:
                tally.requests += 1
            used = 0
            try:
                resp = self.client.chat.completions.create(**kwargs)
                if not hasattr(resp, "choices"):  # a non-JSON 200 body comes back as text
                    raise _Malformed(f"response is not a chat completion: {str(resp)[:200]!r}")
                completion = self._read(resp)
                used = completion.prompt_tokens + completion.completion_tokens
            except (_Malformed, ValueError) as err:
                # A 200 whose body is not JSON surfaces as json.JSONDecodeError (a ValueError).
                kind, retryable, wait = "malformed", True, None
                last = f"malformed response: {err}"
            except o.OpenAIError as err:
                kind, retryable, wait = self._classify(err)
                last = _describe(err)
            else:
                with self.meter.lock:
                    self.meter.completions += 1
                    self.meter.prompt_tokens += completion.prompt_tokens
                    self.meter.completion_tokens += completion.completion_tokens
                if tally is not None:
                    tally.prompt_tokens += completion.prompt_tokens
                    tally.completion_tokens += completion.completion_tokens
                return completion
            finally:
                self.budget.settle(reserved, used)
            self._count_error(kind)
            if not retryable:
                raise RequestFailed(f"{last} (not retried)", attempts, transient=False)
            if attempt == self.retry.max_retries:
                break
            delay = self._jitter_backoff(attempt)
            if wait is not None:
                if wait > self.retry.max_retry_after:
                    raise RequestFailed(
                        f"{last}; server asked to wait {wait:.0f}s > max_retry_after="
                        f"{self.retry.max_retry_after:g}s",
                        attempts,
                        transient=True,
                    )
                delay = wait
                self._pause_all(wait)
            self._sleep(delay)
            if self.stop.is_set():
                raise RunStopped()
        raise RequestFailed(
            f"gave up after {attempts} attempts; last error: {last}", attempts, transient=True
        )

    def _read(self, resp: Any) -> Completion:
        choices = getattr(resp, "choices", None) or []
        if not choices:
            raise _Malformed("response has no choices")
        choice = choices[0]
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None) or ""
        usage = getattr(resp, "usage", None)
        p = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
        c = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
        if usage is None:
            with self.meter.lock:
                self.meter.responses_without_usage += 1
        return Completion(text=text, prompt_tokens=p, completion_tokens=c,
                          finish_reason=getattr(choice, "finish_reason", None))


class _Malformed(Exception):
    pass


def _describe(err: Exception) -> str:
    status = getattr(err, "status_code", None)
    name = type(err).__name__
    msg = getattr(err, "message", None) or str(err)
    return f"{name} (HTTP {status}): {msg}" if status else f"{name}: {msg}"
