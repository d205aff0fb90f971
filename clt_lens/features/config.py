"""``FeaturesConfig``: the settings of ``clt-lens features`` (``compute_feature_stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from clt_lens.config import ConfigError
from clt_lens.features.format import DEFAULT_SOURCESET


@dataclass
class FeaturesConfig:
    """Settings of ``clt-lens features`` (every field is also a ``--key value`` override)."""

    checkpoint: str = ""
    # load_model name or folder; None = the checkpoint's metadata.model_name, else "embedded"
    model: str | None = None
    dataset: str = "embedded"
    split: str = "heldout"
    n_tokens: int = 100_000
    batch_size: int = 32  # sequences per forward pass
    context_size: int | None = None  # None: the checkpoint's, else the model's n_ctx
    top_k: int = 20
    n_quantiles: int = 5
    examples_per_quantile: int = 5
    n_negative: int = 10
    window: int = 32  # tokens per example context
    hist_bins: int = 64  # power of two; the written histogram keeps 1/2..1 of them
    n_logits: int = 10
    logits_hist_bins: int = 40
    layers: list[int] | None = None  # source layers to describe; None = all
    sourceset: str = DEFAULT_SOURCESET
    text_column: str = "text"
    seed: int = 0
    device: str | None = None  # None: the model's device
    out: str | None = None
    dashboard: list[str] = field(default_factory=list)  # "LAYER:F1,F2" -> dashboard HTML
    dashboard_sequences: int = 64
    neuronpedia: bool = False

    def validate(self) -> None:
        for name in ("n_tokens", "batch_size", "top_k", "window", "n_logits", "logits_hist_bins",
                     "examples_per_quantile", "dashboard_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"features config: {name} must be >= 1, got "
                                  f"{getattr(self, name)}")
        for name in ("n_quantiles", "n_negative"):
            if getattr(self, name) < 0:
                raise ConfigError(f"features config: {name} must be >= 0, got "
                                  f"{getattr(self, name)}")
        if self.hist_bins < 2 or self.hist_bins & (self.hist_bins - 1):
            raise ConfigError(f"features config: hist_bins must be a power of two >= 2, got "
                              f"{self.hist_bins}")
        if self.context_size is not None and self.context_size < 2:
            raise ConfigError(f"features config: context_size must be >= 2, got "
                              f"{self.context_size}")
        if not self.sourceset or "/" in self.sourceset:
            raise ConfigError(f"features config: sourceset {self.sourceset!r} must be a non-empty "
                              "name without '/'")
