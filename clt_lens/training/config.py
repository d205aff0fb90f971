"""TrainConfig: everything a training run needs, validated before any work starts.

Two sections are shared with the rest of the library instead of copied: ``source`` (a
:class:`~clt_lens.source_config.SourceConfig`: model, dataset, split, context size, hooks) and
``clt`` (a :class:`~clt_lens.clt.config.CLTSpec`: the CLT's own settings, which the runner
completes into the checkpoint's CLTConfig). YAML files and overrides written with the old flat
keys (``d_sae: 512``, ``--model gpt2``, ``sparsity_c``) still work (:data:`RENAMED_KEYS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from clt_lens.clt.config import CLTSpec, spec_fields
from clt_lens.config import ConfigError, upgrade_keys
from clt_lens.source_config import SOURCE_RENAMES, SourceConfig

LR_DECAYS = ("cosine", "linear", "constant")

# Old flat spellings (YAML files, --overrides and train_config.json written before the CLT and
# source settings became sections) -> where the field lives now.
RENAMED_KEYS: dict[str, str] = {
    **SOURCE_RENAMES,
    **{name: f"clt.{name}" for name in spec_fields()},
    "sparsity_c": "clt.tanh_scale",
}


@dataclass
class TrainConfig:
    # where activations come from (model, dataset, split, context_size, hooks); the resolved
    # hook names are what checkpoints and train_config.json record
    source: SourceConfig = field(default_factory=SourceConfig)
    # the CLT to train: features per layer, activation, variant and loss settings
    clt: CLTSpec = field(default_factory=CLTSpec)
    heldout_split: str = "heldout"  # dataset split of the held-out evaluation
    cache_dir: str | None = None  # read a clt-lens activation cache instead of streaming
    heldout_cache_dir: str | None = None  # held-out activations from a cache instead
    stream_sequences_per_refill: int = 64  # streaming: sequences per model forward + shuffle
    stream_model_batch_size: int = 16  # streaming: sequences per model forward pass
    normalization_tokens: int = 8192  # tokens used to estimate the per-layer scales
    # --- optimisation ----------------------------------------------------------------------
    batch_size: int = 1024  # tokens per optimizer step (split over grad_accum micro-batches)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    n_steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # Adam learning rate (peak, after warm-up)
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.999  # Adam beta2
    adam_fused: bool = True  # torch's fused Adam kernel on CPU/CUDA: ~4x faster step on CPU
    lr_warmup_steps: int = 50  # linear learning-rate warm-up from 0
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"  # schedule after warm-up
    lr_decay_start: float = 0.5  # fraction of training after which decay begins
    lr_end_factor: float = 0.1  # the lr decays to lr * lr_end_factor
    sparsity_warmup_steps: int = 200  # clt.sparsity_coeff ramps up linearly over these steps
    grad_clip: float = 1.0  # global norm; <= 0 disables
    autocast: Literal["none", "bf16", "fp16"] = "none"  # bf16/fp16: CUDA; fp32 is fastest on CPU
    l0_target: float | None = None  # mean L0 per layer; reached -> l0_target_action
    # on reaching l0_target: write a checkpoint and go on, or stop the run there
    l0_target_action: Literal["checkpoint", "stop"] = "checkpoint"
    seed: int = 0  # seeds the CLT's initialisation and the data order
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...; torchrun ranks take their local GPU
    # CPU: keep freed memory in the process (glibc) instead of page-faulting the step's large
    # buffers back in every step (~25% faster step at L=12; see training/host_memory.py)
    retain_host_memory: bool = True
    # --- feature health ----------------------------------------------------------------------
    dead_window_tokens: int = 100_000  # a feature silent this many tokens counts as dead
    # --- logging / evaluation / checkpoints ----------------------------------------------
    out_dir: str = "runs/train"  # run folder: metrics, checkpoints/, final/
    log_every: int = 10  # steps between training records
    eval_every: int = 100  # steps between held-out evaluations
    heldout_tokens: int = 8192  # held-out tokens per evaluation
    checkpoint_every: int = 0  # steps; 0 = only the final checkpoint
    keep_checkpoints: int = 2  # the newest checkpoints kept (older ones are deleted)
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "clt-lens"  # Weights & Biases project
    progress: bool = True  # tqdm progress bar
    # --- distribution (torchrun) -------------------------------------------------------------
    # under torchrun: ddp splits the batch, feature the features, 2d both
    distributed: Literal["none", "ddp", "feature", "2d"] = "none"
    feature_parallel_size: int = 1  # ranks per feature group ("feature": world size; "2d": set)
    # How data-parallel ranks split the data: "shards" (each reads its own cache shards / stream
    # refills: no duplicated I/O) or "slice" (each reads the global batch and keeps its slice:
    # the run equals a one-process run with the same batch exactly, at W x the read cost).
    data_parallel_reads: Literal["shards", "slice"] = "shards"
    extra: dict = field(default_factory=dict)  # free-form notes stored with the checkpoint

    renamed_keys: ClassVar[dict[str, str]] = RENAMED_KEYS

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        self.source.validate()
        self.clt.validate()
        for name, choices in (("lr_decay", LR_DECAYS), ("autocast", ("none", "bf16", "fp16")),
                              ("distributed", ("none", "ddp", "feature", "2d")),
                              ("l0_target_action", ("checkpoint", "stop")),
                              ("data_parallel_reads", ("shards", "slice"))):  # fmt: skip
            value = getattr(self, name)
            need(value in choices, f"{name} {value!r}: use one of {list(choices)}")
        for name in (
            "batch_size",
            "grad_accum",
            "n_steps",
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
        for name in ("lr_warmup_steps", "sparsity_warmup_steps", "checkpoint_every"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(
            0 <= self.lr_decay_start <= 1,
            f"lr_decay_start must be in [0, 1], got {self.lr_decay_start}",
        )
        need(
            self.batch_size % self.grad_accum == 0,
            f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}",
        )
        if self.l0_target is not None:
            need(self.l0_target > 0, f"l0_target must be positive, got {self.l0_target}")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


# Keys that fix the shape/meaning of the weights: a resume must agree on these.
STRUCTURAL_KEYS = (
    "source.model",
    "source.input_hook",
    "source.output_hook",
    "source.dataset",
    "source.split",
    "clt.d_sae",
    "clt.activation",
    "clt.k",
    "clt.cross_layer",
    "clt.skip",
    "clt.sparsity_penalty",
    "batch_size",
    "grad_accum",
    "seed",
    "cache_dir",
)


def dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"clt": {"d_sae": 8}}`` -> ``{"clt.d_sae": 8}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "extra":
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def saved_train_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A train_config.json as dotted keys, whether written before or after the sections
    existed (old flat keys are moved to their sections first)."""
    return dotted(upgrade_keys(TrainConfig, data))
