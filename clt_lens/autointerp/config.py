"""AutointerpConfig: every option of an autointerp run, validated before any request."""

from __future__ import annotations

from dataclasses import dataclass, field

from clt_lens.config import ConfigError

SCORERS = ("detection", "fuzzing", "simulation")
DEFAULT_SCORERS = ("detection", "fuzzing")  # simulation asks for one number per token: opt-in


@dataclass
class AutointerpConfig:
    # LLM name as the server knows it (e.g. gpt-4o-mini, meta-llama/Llama-3.1-8B-Instruct,
    # llama3.1:8b); required
    model: str = ""
    # API key; else $OPENAI_API_KEY (a local server needs none); never written to any file
    api_key: str | None = None
    # server URL, e.g. http://localhost:8000/v1 for vLLM, http://localhost:11434/v1 for Ollama;
    # else OPENAI_BASE_URL, else OpenAI
    base_url: str | None = None
    layers: list[int] | None = None  # source layers to explain (comma-separated); default: all
    features: list[str] | None = None  # "layer:index" strings, e.g. 0:12,3:7
    max_features: int | None = None  # explain at most this many (live) features
    retry_failed: bool = False  # redo features whose latest record (this model) failed
    concurrency: int = 4  # requests in flight at once
    max_requests: int | None = None  # stop cleanly after this many requests
    max_tokens_budget: int | None = None  # stop cleanly before using more tokens
    timeout: float = 30.0  # seconds per request
    max_retries: int = 5  # retries on 429/5xx/timeouts
    retry_base_delay: float = 1.0  # seconds before the first retry; doubles each time
    retry_max_delay: float = 60.0  # longest wait between retries, in seconds
    max_retry_after: float = 120.0  # a longer Retry-After (seconds) gives up on the request
    # Stop (the server looks down) after this many features in a row exhaust their retries.
    max_consecutive_failures: int = 5
    seed: int = 0  # seed for the choice of examples
    # scorers run after each explanation, from detection, fuzzing, simulation; on the command
    # line 'none' only explains
    scorers: list[str] = field(default_factory=lambda: list(DEFAULT_SCORERS))
    temperature: float | None = 0.0  # None: not sent (some reasoning models reject it)
    max_output_tokens: int | None = None  # None: not sent; else sent as max_tokens
    price_per_1k_input: float | None = None  # USD per 1000 prompt tokens, for the cost
    price_per_1k_output: float | None = None  # USD per 1000 completion tokens
    n_explain_top: int = 10  # top-activating examples shown to the explainer
    n_explain_quantile: int = 5  # examples from lower activation quantiles shown to it
    n_score_positive: int = 10  # held-out activating examples per score
    n_score_negative: int = 10  # non-activating examples per score

    def validate(self) -> None:
        if not self.model or not str(self.model).strip():
            raise ConfigError("config key 'model': name the LLM to use (e.g. --model gpt-4o-mini)")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise ConfigError(f"config key 'scorers': {bad} not among {list(SCORERS)}")
        for key, lo in (("concurrency", 1), ("max_retries", 0), ("max_consecutive_failures", 1),
                        ("n_explain_top", 0),
                        ("n_explain_quantile", 0), ("n_score_positive", 0),
                        ("n_score_negative", 0)):
            if getattr(self, key) < lo:
                raise ConfigError(f"config key '{key}': must be >= {lo}, got {getattr(self, key)}")
        if self.n_explain_top + self.n_explain_quantile < 1:
            raise ConfigError("config keys 'n_explain_top' + 'n_explain_quantile' must be >= 1")
        for key in ("max_features", "max_requests", "max_tokens_budget", "max_output_tokens"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"config key '{key}': must be >= 1 or unset, got {v}")
        for key in ("timeout", "max_retry_after"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key '{key}': must be > 0 seconds")
        for key in ("retry_base_delay", "retry_max_delay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{key}': must be >= 0 seconds")
        for key in ("price_per_1k_input", "price_per_1k_output"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(f"config key '{key}': must be >= 0")
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise ConfigError(f"config key 'layers': negative layer in {self.layers}")
        self.feature_ids()  # raises on malformed entries

    def feature_ids(self) -> list[tuple[int, int]] | None:
        if self.features is None:
            return None
        out = []
        for item in self.features:
            try:
                layer_s, index_s = str(item).split(":")
                layer, index = int(layer_s), int(index_s)
            except ValueError:
                raise ConfigError(
                    f"config key 'features': {item!r} is not 'layer:index' (e.g. 2:137)"
                ) from None
            if layer < 0 or index < 0:
                raise ConfigError(f"config key 'features': {item!r} has a negative number")
            out.append((layer, index))
        return out
