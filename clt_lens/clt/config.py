"""CLTConfig: the SAELens config of a cross-layer transcoder (architecture "clt").

Every field serialises into the checkpoint's ``cfg.json``. Sizes follow SAELens: ``d_in`` is the
model width d, ``d_sae`` the number of features F *per layer*. Hook names live in
``metadata.hook_name`` (input, e.g. "ln2.hook_normalized") and ``metadata.hook_name_out``
(output, e.g. "hook_mlp_out"); both are relative to a block, as circuit-tracer expects, because a
CLT reads and writes every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from sae_lens.saes.sae import SAEConfig, SAEMetadata, TrainingSAEConfig
from sae_lens.util import filter_valid_dataclass_fields

from clt_lens.clt.activations import ACTIVATIONS, ActivationName, get_activation
from clt_lens.config import ConfigError

SPARSITY_PENALTIES = ("tanh", "l1")
DECODE_MODES = ("auto", "sparse", "dense")
DEFAULT_INPUT_HOOK = "ln2.hook_normalized"
DEFAULT_OUTPUT_HOOK = "hook_mlp_out"

# "auto" decoding goes sparse when the support (fraction of the [B, L, F] activations decoded
# and differentiated) is at most the crossover and the batch has at least SPARSE_MIN_ELEMENTS
# activations. With torch's sparse ops (CUDA; the CPU without a C compiler) the sparse step won
# below ~10-15% support at L=4/d=128/F=1024 and L=12/d=256/F=2048 (benchmarks/clt_decode.py);
# with the CPU kernels it wins at 10% active (12-13% support) at both shapes and still at 20%
# at L=12, where dense wins by 1.2x at the demo's shape (benchmarks/train.py --sweep). Below
# ~65k activations per batch Python overhead makes sparse lose.
SPARSE_MAX_DENSITY = 0.1
SPARSE_MAX_DENSITY_CPU_KERNELS = 0.2
SPARSE_MIN_ELEMENTS = 2**17


@dataclass(kw_only=True)
class CLTSpec:
    """The choices that define a CLT before a model is chosen: features per layer, variant,
    activation and loss settings. ``TrainConfig.clt`` holds one; :class:`CLTConfig` is this
    plus what the model and data decide (``d_in``, ``n_layers``, hooks, device, dtype).

    Variants are fields: ``cross_layer=False`` gives per-layer transcoders (PLT, each source
    decodes only into its own layer), ``skip=True`` adds a linear skip
    ``y_j += x_j @ W_skip[j]``, ``activation`` picks JumpReLU (trainable per-feature threshold
    with a rectangle-kernel pseudo-derivative), ReLU, TopK (k per layer per token) or BatchTopK
    (k * batch per layer while training, a running per-layer threshold at inference).
    """

    d_sae: int = 1024  # features per layer
    activation: ActivationName = "jumprelu"  # a variant of clt_lens.clt.activations
    k: int = 32  # topk / batchtopk: active features per token per layer
    cross_layer: bool = True  # False: per-layer transcoders (PLT)
    skip: bool = False  # add a linear skip connection per layer
    # JumpReLU: thresholds and bandwidth are in normalised space, where activations have
    # mean squared norm d (coordinates of order 1).
    jumprelu_init_threshold: float = 0.03
    jumprelu_bandwidth: float = 0.05  # width of the pseudo-derivative's rectangle kernel
    # False: the pseudo-derivative reaches the threshold only (DeepMind's JumpReLU);
    # True: also the pre-activation, hence the encoder (Anthropic's setup).
    jumprelu_ste_to_input: bool = False
    sparsity_penalty: Literal["tanh", "l1"] = "tanh"  # penalty on decoder-norm-scaled activations
    # The MSE sums over d (and layers), so useful values grow with d_in: on a toy d=32 CLT,
    # 0.1 -> L0 ~15 per layer at FVU 0.01, 1.0 -> L0 ~2 at FVU 0.2; the demo (d=128) uses 0.3.
    # Training warms it up over sparsity_warmup_steps.
    sparsity_coeff: float = 1e-3
    tanh_scale: float = 4.0  # c in tanh(c * |f| * ||W_dec||)
    preact_coeff: float = 3e-6  # pre-activation loss (revives dead JumpReLU/ReLU features)
    auxk_coeff: float = 1.0 / 32.0  # auxiliary-k loss weight
    # Dead features used per layer by the auxiliary-k loss (TopK/BatchTopK); None = d_in // 2.
    auxk: int | None = None
    # Also apply the auxiliary-k loss to JumpReLU (its dead features' pre-activations, relu'd,
    # decode the residual); off: JumpReLU revives dead features with the pre-activation loss.
    auxk_jumprelu: bool = False
    # Initialise b_enc from data (estimate_normalization's sample) so that each feature fires
    # on this fraction of the sample at step 0; None keeps b_enc = 0.
    b_enc_init_rate: float | None = None
    topk_threshold_lr: float = 0.01  # batchtopk: rate of the running inference threshold
    # decoding: sparse kernels when few activations fire, dense otherwise ("auto" picks)
    decode: Literal["auto", "sparse", "dense"] = "auto"
    # "auto" goes sparse at most at this fraction of active [batch, layer, feature] entries;
    # None: 0.2 where the CPU kernels decode, else 0.1 (the measured crossovers)
    sparse_max_density: float | None = None

    _label = "clt"  # how error messages name this section

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        label = self._label
        value = self.d_sae
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{label}.d_sae must be a positive integer, got {value!r}")
        _check_choice(label, "activation", self.activation, ACTIVATIONS)
        _check_choice(label, "sparsity_penalty", self.sparsity_penalty, SPARSITY_PENALTIES)
        _check_choice(label, "decode", self.decode, DECODE_MODES)
        get_activation(self.activation).validate(self)
        if self.auxk is not None and self.auxk <= 0:
            raise ConfigError(f"{label}.auxk must be positive or None, got {self.auxk}")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth", "tanh_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{label}.{name} must be a positive number, got {value!r}")
        for name in ("sparsity_coeff", "preact_coeff", "auxk_coeff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{label}.{name} must be >= 0, got {value!r}")
        if self.b_enc_init_rate is not None and not (
            isinstance(self.b_enc_init_rate, int | float) and 0 < self.b_enc_init_rate < 1
        ):
            raise ConfigError(
                f"{label}.b_enc_init_rate must be in (0, 1) or None, got {self.b_enc_init_rate!r}"
            )
        if not 0 < self.topk_threshold_lr <= 1:
            raise ConfigError(
                f"{label}.topk_threshold_lr must be in (0, 1], got {self.topk_threshold_lr}"
            )
        if self.sparse_max_density is not None and not 0 <= self.sparse_max_density <= 1:
            raise ConfigError(
                f"{label}.sparse_max_density must be in [0, 1], got {self.sparse_max_density}"
            )


def spec_fields() -> tuple[str, ...]:
    """Names of the CLTSpec fields (what ``TrainConfig.clt`` holds)."""
    return tuple(f.name for f in fields(CLTSpec))


@dataclass(kw_only=True)
class CLTConfig(CLTSpec, SAEConfig):
    """Configuration of a CrossLayerTranscoder: a :class:`CLTSpec` plus the model's sizes.

    Loss coefficients live here too; the trainer may override them per step.
    """

    n_layers: int
    apply_b_dec_to_input: bool = False
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    _label = "CLTConfig"

    @classmethod
    def architecture(cls) -> str:
        return "clt"

    def __post_init__(self) -> None:
        # SAEConfig.from_dict (used by SAE.load_from_disk) passes metadata as a plain dict
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata(**self.metadata)
        super().__post_init__()
        if self.metadata.hook_name is None:
            self.metadata.hook_name = DEFAULT_INPUT_HOOK
        if self.metadata.hook_name_out is None:
            self.metadata.hook_name_out = DEFAULT_OUTPUT_HOOK
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        for name in ("d_in", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"CLTConfig.{name} must be a positive integer, got {value!r}")
        super().validate()
        if self.apply_b_dec_to_input:
            raise ConfigError(
                "CLTConfig.apply_b_dec_to_input must be False: b_dec is [n_layers, d] and "
                "belongs to the output side"
            )
        if self.normalize_activations != "none":
            raise ConfigError(
                "CLTConfig.normalize_activations must be 'none': the CLT keeps its own per-layer "
                "scales (buffers input_scale/output_scale, see estimate_normalization)"
            )
        for key in ("hook_name", "hook_name_out"):
            hook = self.metadata[key]
            if not isinstance(hook, str) or not hook or hook.startswith("blocks."):
                raise ConfigError(
                    f"CLTConfig.metadata.{key} must be a block-relative hook name such as "
                    f"'{DEFAULT_INPUT_HOOK}' or '{DEFAULT_OUTPUT_HOOK}', got {hook!r}"
                )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> CLTConfig:
        # SAEConfig.from_dict dispatches through the registry; reading our own fields directly
        # keeps loading independent of registration order.
        return cls(**_kwargs_from_dict(config_dict, cls))

    # Hook names ---------------------------------------------------------------------------
    @property
    def input_hook(self) -> str:
        """Block-relative input hook, e.g. "ln2.hook_normalized"."""
        return self.metadata.hook_name

    @property
    def output_hook(self) -> str:
        """Block-relative output hook, e.g. "hook_mlp_out"."""
        return self.metadata.hook_name_out

    def input_hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.input_hook}"

    def output_hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.output_hook}"

    def n_targets(self, source: int) -> int:
        """How many output layers source layer ``source`` decodes into."""
        return self.n_layers - source if self.cross_layer else 1

    @property
    def auxk_per_layer(self) -> int:
        return self.auxk if self.auxk is not None else max(1, self.d_in // 2)


@dataclass(kw_only=True)
class CLTTrainingConfig(CLTConfig, TrainingSAEConfig):
    """SAELens training-registry twin of CLTConfig (same fields; ``decoder_init_norm`` unused)."""

    decoder_init_norm: float | None = None

    @classmethod
    def architecture(cls) -> str:
        return "clt"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> CLTTrainingConfig:
        return cls(**_kwargs_from_dict(config_dict, cls))


def _check_choice(label: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{label}.{name} must be one of {list(choices)}, got {value!r}")


def _kwargs_from_dict(config_dict: dict[str, Any], cls: type) -> dict[str, Any]:
    kwargs = filter_valid_dataclass_fields(config_dict, cls)
    metadata = config_dict.get("metadata")
    if isinstance(metadata, dict):
        kwargs["metadata"] = SAEMetadata(**metadata)
    return kwargs
