"""TrainConfig: everything a training run needs, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from clt_lens.config import ConfigError

ACTIVATIONS = ("jumprelu", "relu", "topk", "batchtopk")
PENALTIES = ("tanh", "l1")
LR_DECAYS = ("cosine", "linear", "constant")
AUTOCASTS = ("none", "bf16", "fp16")
DISTRIBUTED = ("none", "ddp", "feature", "2d")


@dataclass
class TrainConfig:
    # --- where activations come from -------------------------------------------------------
    model: str = "embedded"  # "embedded", a local HF folder, or a TransformerLens name
    dataset: str = "embedded"
    split: str = "train"
    heldout_split: str = "heldout"
    context_size: int | None = None  # default: the model's n_ctx
    # Block-relative hook names; "auto" = the model family's default (clt_lens.models.SUPPORTED:
    # ln2.hook_normalized / hook_mlp_out for every supported family), or a cache's own hooks.
    # The resolved names are what checkpoints and train_config.json record.
    input_hook: str = "auto"
    output_hook: str = "auto"
    cache_dir: str | None = None  # read a clt-lens activation cache instead of streaming
    heldout_cache_dir: str | None = None
    stream_sequences_per_refill: int = 64  # streaming: sequences per model forward + shuffle
    stream_model_batch_size: int = 16
    # --- the CLT ---------------------------------------------------------------------------
    d_sae: int = 1024  # features per layer
    activation: str = "jumprelu"
    k: int = 32  # topk / batchtopk: active features per token per layer
    cross_layer: bool = True  # False: per-layer transcoders (PLT)
    skip: bool = False
    sparsity_penalty: str = "tanh"
    sparsity_coeff: float = 1e-3
    sparsity_c: float = 4.0
    preact_coeff: float = 3e-6
    auxk_coeff: float = 1 / 32
    auxk_jumprelu: bool = False  # the aux-k loss for JumpReLU too (CLTConfig.auxk_jumprelu)
    b_enc_init_rate: float | None = None  # b_enc from data: each feature fires on this fraction
    jumprelu_bandwidth: float = 0.05
    jumprelu_ste_to_input: bool = False
    jumprelu_init_threshold: float = 0.03
    decode: str = "auto"  # "auto" | "sparse" | "dense"
    normalization_tokens: int = 8192
    # --- optimisation ----------------------------------------------------------------------
    batch_size: int = 1024  # tokens per optimizer step (split over grad_accum micro-batches)
    grad_accum: int = 1
    n_steps: int = 1000
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_fused: bool = True  # torch's fused Adam kernel on CPU/CUDA: ~4x faster step on CPU
    lr_warmup_steps: int = 50
    lr_decay: str = "cosine"
    lr_decay_start: float = 0.5  # fraction of training after which decay begins
    lr_end_factor: float = 0.1
    sparsity_warmup_steps: int = 200
    grad_clip: float = 1.0  # global norm; <= 0 disables
    autocast: str = "none"  # bf16/fp16 are for CUDA; fp32 is fastest on CPU
    l0_target: float | None = None  # mean L0 per layer; reached -> l0_target_action
    l0_target_action: str = "checkpoint"  # "checkpoint" | "stop"
    seed: int = 0
    device: str = "cpu"
    # --- feature health ----------------------------------------------------------------------
    dead_window_tokens: int = 100_000
    # --- logging / evaluation / checkpoints ----------------------------------------------
    out_dir: str = "runs/train"
    log_every: int = 10
    eval_every: int = 100
    heldout_tokens: int = 8192
    checkpoint_every: int = 0  # steps; 0 = only the final checkpoint
    keep_checkpoints: int = 2
    wandb: bool = False
    wandb_project: str = "clt-lens"
    progress: bool = True
    # --- distribution (torchrun) -------------------------------------------------------------
    distributed: str = "none"  # "none" | "ddp" | "feature" | "2d"
    feature_parallel_size: int = 1  # ranks per feature group ("feature": world size; "2d": set)
    # How data-parallel ranks split the data: "shards" (each reads its own cache shards / stream
    # refills: no duplicated I/O) or "slice" (each reads the global batch and keeps its slice:
    # the run equals a one-process run with the same batch exactly, at W x the read cost).
    data_parallel_reads: str = "shards"
    extra: dict = field(default_factory=dict)  # free-form notes stored with the checkpoint

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(
            self.activation in ACTIVATIONS,
            f"activation {self.activation!r}: use one of {ACTIVATIONS}",
        )
        need(
            self.sparsity_penalty in PENALTIES,
            f"sparsity_penalty {self.sparsity_penalty!r}: use one of {PENALTIES}",
        )
        need(self.lr_decay in LR_DECAYS, f"lr_decay {self.lr_decay!r}: use one of {LR_DECAYS}")
        need(self.autocast in AUTOCASTS, f"autocast {self.autocast!r}: use one of {AUTOCASTS}")
        need(
            self.distributed in DISTRIBUTED,
            f"distributed {self.distributed!r}: use one of {DISTRIBUTED}",
        )
        need(
            self.decode in ("auto", "sparse", "dense"), f"decode {self.decode!r}: auto|sparse|dense"
        )
        need(
            self.l0_target_action in ("checkpoint", "stop"),
            f"l0_target_action {self.l0_target_action!r}: checkpoint|stop",
        )
        for name in (
            "d_sae",
            "batch_size",
            "grad_accum",
            "n_steps",
            "k",
            "normalization_tokens",
            "heldout_tokens",
            "dead_window_tokens",
            "log_every",
            "eval_every",
            "stream_sequences_per_refill",
            "stream_model_batch_size",
            "feature_parallel_size",
            "keep_checkpoints",
        ):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "lr_end_factor"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "sparsity_coeff",
            "preact_coeff",
            "auxk_coeff",
            "lr_warmup_steps",
            "sparsity_warmup_steps",
            "checkpoint_every",
        ):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(
            0 <= self.lr_decay_start <= 1,
            f"lr_decay_start must be in [0, 1], got {self.lr_decay_start}",
        )
        need(
            self.batch_size % self.grad_accum == 0,
            f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}",
        )
        need(
            self.activation not in ("topk", "batchtopk") or self.k <= self.d_sae,
            f"k={self.k} exceeds d_sae={self.d_sae}",
        )
        need(
            self.context_size is None or self.context_size > 1,
            f"context_size must be > 1, got {self.context_size}",
        )
        need(
            self.b_enc_init_rate is None or 0 < self.b_enc_init_rate < 1,
            f"b_enc_init_rate must be in (0, 1) or null, got {self.b_enc_init_rate}",
        )
        if self.l0_target is not None:
            need(self.l0_target > 0, f"l0_target must be positive, got {self.l0_target}")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


# Keys that fix the shape/meaning of the weights: a resume must agree on these.
STRUCTURAL_KEYS = (
    "model",
    "input_hook",
    "output_hook",
    "d_sae",
    "activation",
    "k",
    "cross_layer",
    "skip",
    "sparsity_penalty",
    "batch_size",
    "grad_accum",
    "seed",
    "cache_dir",
    "dataset",
    "split",
)
