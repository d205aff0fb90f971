"""CrossLayerTranscoder: a SAELens SAE that reads every layer's MLP input and writes every
layer's MLP output.

Layout (L layers, width d, F features per layer), all in *normalised* space:
- ``W_enc`` [L, d, F], ``b_enc`` [L, F]; JumpReLU ``log_threshold`` [L, F].
- ``W_dec[i]`` [F, L - i, d] decodes source layer i into targets j = i..L-1 (PLT: [F, 1, d]).
- ``b_dec`` [L, d]; optional ``W_skip`` [L, d, d] (``y_j += x_j @ W_skip[j]``).
- buffers ``input_scale`` / ``output_scale`` [L]: ``x_norm = x_raw * input_scale`` and
  ``y_raw = y_norm / output_scale``; BatchTopK keeps ``topk_threshold`` [L].
The public ``encode``/``decode``/``forward`` take and return raw activations; feature
activations are the same numbers in both spaces. ``folded_weights`` gives raw-space weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from sae_lens.saes.sae import SAE
from torch import Tensor, nn

from clt_lens.clt import cpu_kernels
from clt_lens.clt.activations import Activation, get_activation
from clt_lens.clt.comm import FeatureComm
from clt_lens.clt.config import (
    SPARSE_MAX_DENSITY,
    SPARSE_MAX_DENSITY_CPU_KERNELS,
    SPARSE_MIN_ELEMENTS,
    CLTConfig,
)
from clt_lens.clt.losses import CLTStepOutput, ReduceFn, training_forward
from clt_lens.clt.sparse import Support, dense_decode, sparse_decode
from clt_lens.clt.transcoder_view import layer_transcoder
from clt_lens.errors import InputError


class CrossLayerTranscoder(SAE[CLTConfig]):
    """Cross-layer transcoder (architecture "clt"); see the module docstring for the layout."""

    cfg: CLTConfig
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.ParameterList  # type: ignore[assignment]
    b_dec: nn.Parameter
    input_scale: Tensor
    output_scale: Tensor

    def __init__(self, cfg: CLTConfig, use_error_term: bool = False):
        if not isinstance(cfg, CLTConfig):
            raise TypeError(f"CrossLayerTranscoder needs a CLTConfig, got {type(cfg).__name__}")
        cfg.validate()
        super().__init__(cfg, use_error_term)
        # "auto" decoding uses the previous step's support density (None: not measured yet)
        self._density_hint: float | None = None

    # Construction --------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Create every parameter and buffer with the names saved in sae_weights.safetensors.

        Init follows Anthropic's CLT recipe: W_enc ~ U(+-1/sqrt(F)), W_dec ~ U(+-1/sqrt(T d))
        with T the number of layers a target receives from (L cross-layer, 1 per-layer).
        """
        cfg = self.cfg
        n_layers, d, n_feat = cfg.n_layers, cfg.d_in, cfg.d_sae
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        enc_bound = 1.0 / math.sqrt(n_feat)
        dec_bound = 1.0 / math.sqrt((n_layers if cfg.cross_layer else 1) * d)
        self.W_enc = nn.Parameter(
            torch.empty(n_layers, d, n_feat, **kw).uniform_(-enc_bound, enc_bound)
        )
        self.b_enc = nn.Parameter(torch.zeros(n_layers, n_feat, **kw))
        self.W_dec = nn.ParameterList(
            nn.Parameter(
                torch.empty(n_feat, cfg.n_targets(i), d, **kw).uniform_(-dec_bound, dec_bound)
            )
            for i in range(n_layers)
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d, **kw))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(n_layers, d, d, **kw))
        self.act.create_state(self, kw)
        self.register_buffer("input_scale", torch.ones(n_layers, **kw))
        self.register_buffer("output_scale", torch.ones(n_layers, **kw))

    # Sizes and derived tensors ------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.cfg.d_in

    @property
    def n_features(self) -> int:
        return self.cfg.d_sae

    @property
    def act(self) -> Activation:
        """The activation variant (``cfg.activation``'s object in ``clt_lens.clt.activations``)."""
        return get_activation(self.cfg.activation)

    @property
    def threshold(self) -> Tensor | None:
        """Trainable thresholds [L, F] (JumpReLU; normalised space = raw space), else None."""
        return self.act.threshold(self)

    def decoder_norms(self) -> Tensor:
        """[L, F]: each feature's decoder norm over all its target layers (differentiable)."""
        return torch.stack([w.flatten(1).norm(dim=1) for w in self.W_dec])

    @torch.no_grad()
    def get_W_dec_norm(self) -> Tensor:
        return self.decoder_norms().clamp(min=1e-8)

    def inference_threshold(self) -> Tensor | None:
        """[L, F] threshold of the inference rule ``a = pre * (pre > theta)``, if any
        (JumpReLU's; BatchTopK's running per-layer one, clamped at 0)."""
        return self.act.inference_threshold(self)

    # Input checks -------------------------------------------------------------------------
    def check_activations(self, x: Tensor, name: str = "x") -> None:
        """Raise ValueError unless ``x`` is [B, L, d] for this CLT."""
        expected = (self.n_layers, self.d_model)
        if not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"{name} must be [batch, n_layers={expected[0]}, d_model={expected[1]}], "
                f"got {shape}"
            )

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise InputError(f"layer {layer} out of range for a CLT with {self.n_layers} layers")

    # Normalisation ------------------------------------------------------------------------
    @torch.no_grad()
    def estimate_normalization(self, x_raw: Tensor, y_raw: Tensor) -> tuple[Tensor, Tensor]:
        """Set per-layer scales so scaled activations have mean squared norm d.

        Like SAELens's ``expected_average_only_in``, one scalar per layer and side.
        Returns (input_scale, output_scale).
        """
        self.check_activations(x_raw, "x_raw")
        self.check_activations(y_raw, "y_raw")
        scales = []
        for name, t in (("x_raw", x_raw), ("y_raw", y_raw)):
            msq = t.double().pow(2).sum(-1).mean(0)
            if not torch.isfinite(msq).all() or (msq <= 0).any():
                raise InputError(f"{name}: every layer needs finite, non-zero activations")
            scales.append((self.d_model / msq).sqrt())
        self.input_scale.copy_(scales[0].to(self.input_scale))
        self.output_scale.copy_(scales[1].to(self.output_scale))
        if self.cfg.b_enc_init_rate is not None:
            # the trainer calls this once, on a fresh CLT, with its data sample
            self.init_b_enc_from_data(x_raw, self.cfg.b_enc_init_rate)
        return self.input_scale.clone(), self.output_scale.clone()

    @torch.no_grad()
    def init_b_enc_from_data(self, x_raw: Tensor, rate: float) -> Tensor:
        """Set ``b_enc`` so that each feature fires on ``rate`` of the tokens of ``x_raw``.

        A feature fires when its pre-activation exceeds its threshold (JumpReLU), 0 (ReLU) or
        the rest of the batch (TopK, where only the ordering of b_enc matters); this puts the
        (1 - rate) quantile of ``x @ W_enc`` at that level, per feature, so that
        ``floor(rate * B)`` of the B tokens fire. Each feature needs only
        its own encoder column, so a feature slice gets the same values as the whole CLT.
        Returns the new ``b_enc`` [L, F].
        """
        self.check_activations(x_raw, "x_raw")
        if not 0 < rate < 1:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        n_tokens = x_raw.shape[0]
        if n_tokens < 2:
            raise ValueError("init_b_enc_from_data needs at least 2 tokens")
        n_fire = min(max(math.floor(rate * n_tokens), 1), n_tokens - 1)
        x_lbd = self.normalize_inputs(x_raw)
        level = self.threshold
        for layer in range(self.n_layers):
            pre = x_lbd[layer] @ self.W_enc[layer]  # [B, F]
            top = pre.topk(n_fire + 1, dim=0).values  # descending
            # midway between the n_fire-th and the next value: no token sits on the threshold
            q = (top[n_fire - 1] + top[n_fire]) / 2
            target = level[layer] if level is not None else torch.zeros_like(q)
            self.b_enc[layer].copy_(target - q)
        return self.b_enc.detach().clone()

    def normalize_inputs(self, x_raw: Tensor) -> Tensor:
        """[B, L, d] raw -> [L, B, d] normalised (contiguous, the encoder's layout)."""
        return (x_raw.to(self.dtype) * self.input_scale[:, None]).transpose(0, 1).contiguous()

    def normalize_outputs(self, y_raw: Tensor) -> Tensor:
        """[B, L, d] raw -> [B, L, d] normalised."""
        return y_raw.to(self.dtype) * self.output_scale[:, None]

    # Encoder ------------------------------------------------------------------------------
    def preacts_lbf(self, x_lbd: Tensor) -> Tensor:
        """Normalised inputs [L, B, d] -> pre-activations [L, B, F]."""
        return torch.baddbmm(self.b_enc.unsqueeze(1), x_lbd, self.W_enc)

    def activate(self, pre: Tensor, layer: int | None = None) -> Tensor:
        """Inference activation of pre-activations [L, B, F] (or [..., F] of one ``layer``).

        JumpReLU and BatchTopK use ``pre * (pre > theta)`` (BatchTopK with its running
        per-layer threshold), so encoding never depends on the rest of the batch.
        """
        return self.act.activate(self, pre, layer)

    def encode(self, x: Tensor) -> Tensor:
        """Raw inputs [B, L, d] -> feature activations [B, L, F]."""
        self.check_activations(x)
        x = self.hook_sae_input(x)
        pre = self.hook_sae_acts_pre(self.preacts_lbf(self.normalize_inputs(x)).transpose(0, 1))
        acts = self.activate(pre.transpose(0, 1)).transpose(0, 1)
        return self.hook_sae_acts_post(acts.contiguous())

    def encode_layer(self, x_layer: Tensor, layer: int) -> Tensor:
        """Raw input of one layer [..., d] -> that layer's activations [..., F]."""
        self._check_layer(layer)
        if x_layer.shape[-1] != self.d_model:
            raise InputError(
                f"x_layer must end in d_model={self.d_model}, got {tuple(x_layer.shape)}"
            )
        x_n = x_layer.to(self.dtype) * self.input_scale[layer]
        pre = x_n @ self.W_enc[layer] + self.b_enc[layer]
        return self.activate(pre, layer)

    # Decoder ------------------------------------------------------------------------------
    def use_sparse(self, n_elements: int, density: float | None) -> bool:
        """Whether to decode sparsely a batch of ``n_elements`` activations (``cfg.decode``).

        ``density`` is the support's (None: unknown, so dense under "auto").
        """
        mode = self.cfg.decode
        if mode != "auto":
            return mode == "sparse"
        if density is None or n_elements < SPARSE_MIN_ELEMENTS:
            return False
        return density <= self.sparse_max_density()

    def sparse_max_density(self) -> float:
        """The support density up to which "auto" decodes sparsely: the config's, else the
        crossover measured for the decode path this CLT's decoders take."""
        if self.cfg.sparse_max_density is not None:
            return self.cfg.sparse_max_density
        if cpu_kernels.applies(self.W_dec[0]):
            return SPARSE_MAX_DENSITY_CPU_KERNELS
        return SPARSE_MAX_DENSITY

    def decode_partial(self, acts_lbf: Tensor, reduce_fn: ReduceFn | None = None) -> Tensor:
        """Feature activations [L, B, F] -> ``reduce_fn(sum_i decode_i)`` [B, L, d] (normalised,
        without b_dec and skip), sparse or dense per ``cfg.decode``."""
        w_dec = list(self.W_dec)
        density = None
        if self.cfg.decode == "auto":
            density = float(torch.count_nonzero(acts_lbf)) / max(acts_lbf.numel(), 1)
        if self.use_sparse(acts_lbf.numel(), density):
            mask = acts_lbf != 0
            support = Support.from_mask(mask)
            partial = sparse_decode(support, acts_lbf.reshape(-1)[support.flat], w_dec)
        else:
            partial = dense_decode(acts_lbf, w_dec)
        return reduce_fn(partial) if reduce_fn is not None else partial

    def finish_decode(self, partial: Tensor, x_lbd: Tensor | None) -> Tensor:
        """Normalised partial [B, L, d] -> normalised reconstruction (+ b_dec, + skip)."""
        out = partial + self.b_dec
        if self.cfg.skip:
            if x_lbd is None:
                raise InputError("this CLT has a skip connection: decode needs x_raw")
            out = out + torch.bmm(x_lbd, self.W_skip).transpose(0, 1)
        return out

    def decode(self, feature_acts: Tensor, x_raw: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Feature activations [B, L, F] -> raw reconstruction [B, L, d].

        ``x_raw`` (the raw inputs [B, L, d]) is needed only with a skip connection.
        """
        expected = (self.n_layers, self.n_features)
        if feature_acts.dim() != 3 or tuple(feature_acts.shape[1:]) != expected:
            raise InputError(
                f"feature_acts must be [batch, n_layers={expected[0]}, d_sae={expected[1]}], "
                f"got {tuple(feature_acts.shape)}"
            )
        x_lbd = None
        if x_raw is not None:
            self.check_activations(x_raw, "x_raw")
            if x_raw.shape[0] != feature_acts.shape[0]:
                raise InputError(
                    f"x_raw has {x_raw.shape[0]} rows but feature_acts has {feature_acts.shape[0]}"
                )
            x_lbd = self.normalize_inputs(x_raw)
        acts_lbf = feature_acts.to(self.dtype).transpose(0, 1).contiguous()
        y_n = self.finish_decode(self.decode_partial(acts_lbf), x_lbd)
        return self.hook_sae_recons(y_n / self.output_scale[:, None])

    def decode_layer(
        self, acts_by_source: Sequence[Tensor], target: int, x_target: Tensor | None = None
    ) -> Tensor:
        """Raw reconstruction [..., d] of output layer ``target``.

        ``acts_by_source[i]`` [..., F] are the activations of source layers i = 0..target
        (only ``acts_by_source[target]`` is used by a per-layer transcoder); ``x_target`` is
        the raw input of layer ``target`` (needed with a skip connection).
        """
        self._check_layer(target)
        if len(acts_by_source) < target + 1:
            raise InputError(
                f"decode_layer({target}) needs activations of sources 0..{target}, "
                f"got {len(acts_by_source)}"
            )
        sources = range(target + 1) if self.cfg.cross_layer else [target]
        out = self.b_dec[target]
        for i in sources:
            w = self.W_dec[i][:, target - i if self.cfg.cross_layer else 0]
            out = out + acts_by_source[i].to(self.dtype) @ w
        if self.cfg.skip:
            if x_target is None:
                raise InputError("this CLT has a skip connection: decode_layer needs x_target")
            x_n = x_target.to(self.dtype) * self.input_scale[target]
            out = out + x_n @ self.W_skip[target]
        return out / self.output_scale[target]

    def forward(self, x: Tensor) -> Tensor:
        """Raw inputs [B, L, d] -> raw reconstruction of the outputs [B, L, d]."""
        return self.hook_sae_output(self.decode(self.encode(x), x))

    # Training -----------------------------------------------------------------------------
    def training_forward(
        self,
        x_raw: Tensor,
        y_raw: Tensor,
        *,
        sparsity_coeff: float | None = None,
        preact_coeff: float | None = None,
        auxk_coeff: float | None = None,
        dead_mask: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
        comm: FeatureComm | None = None,
    ) -> CLTStepOutput:
        """One training step's losses (see ``clt_lens.clt.losses.training_forward``)."""
        return training_forward(
            self,
            x_raw,
            y_raw,
            sparsity_coeff=sparsity_coeff,
            preact_coeff=preact_coeff,
            auxk_coeff=auxk_coeff,
            dead_mask=dead_mask,
            reduce_fn=reduce_fn,
            comm=comm,
        )

    # Folding and export -------------------------------------------------------------------
    @torch.no_grad()
    def folded_weights(self) -> dict[str, Any]:
        """Raw-space weights (scales folded in), detached copies.

        Keys: "W_enc" [L,d,F], "b_enc" [L,F], "threshold" [L,F] or None (the inference
        threshold: JumpReLU's, or BatchTopK's running one per layer), "W_dec" list of
        [F, L-i, d] (PLT [F, 1, d]), "b_dec" [L,d], "W_skip" [L,d,d] or None, where
        ``a = pre * (pre > threshold)`` (or relu) of ``x_raw @ W_enc + b_enc`` and
        ``y_raw_j = sum_i a_i @ W_dec[i][:, j-i] + b_dec[j] + x_raw_j @ W_skip[j]``.
        """
        s_in, s_out = self.input_scale, self.output_scale
        w_dec = []
        for i, w in enumerate(self.W_dec):
            targets = torch.arange(i, i + w.shape[1], device=w.device)
            w_dec.append((w / s_out[targets][None, :, None]).clone())
        theta = self.inference_threshold()
        return {
            "W_enc": (self.W_enc * s_in[:, None, None]).clone(),
            "b_enc": self.b_enc.detach().clone(),
            "threshold": None if theta is None else theta.detach().clone(),
            "W_dec": w_dec,
            "b_dec": (self.b_dec / s_out[:, None]).clone(),
            "W_skip": (
                (self.W_skip * (s_in / s_out)[:, None, None]).clone() if self.cfg.skip else None
            ),
        }

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Rescale features so every decoder has unit norm (not for top-k rules, where the
        scale decides which features win: ``act.rescalable``)."""
        act = self.act
        if not act.rescalable:
            raise InputError(
                f"fold_W_dec_norm changes which features win a top-k; not valid for "
                f"activation '{act.name}'"
            )
        norms = self.get_W_dec_norm()
        self.W_enc.mul_(norms.unsqueeze(1))
        self.b_enc.mul_(norms)
        for i, w in enumerate(self.W_dec):
            w.div_(norms[i][:, None, None])
        act.rescale_features_(self, norms)

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        raise NotImplementedError(
            "CrossLayerTranscoder keeps per-layer scales in input_scale/output_scale; "
            "use folded_weights() for raw-space weights"
        )

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            if isinstance(value, Tensor) and not value.is_contiguous():
                state_dict[key] = value.contiguous()

    def layer_transcoder(self, layer: int) -> Any:
        """A SAELens transcoder for source layer ``layer`` (see ``transcoder_view``)."""
        return layer_transcoder(self, layer)
