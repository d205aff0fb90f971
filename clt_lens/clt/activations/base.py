"""The interface every CLT activation variant implements (one object per variant).

A variant owns everything that differs between activations: the parameters or buffers it adds to
a CLT, its inference rule, its training rule on dense tensors and on the sparse support, which
auxiliary losses apply, whether feature rescaling keeps it unchanged, what circuit-tracer and
SAELens can run of it, and how a TopK-like variant converts to JumpReLU. Call sites ask the
object (``clt.act``) instead of comparing ``cfg.activation`` strings; the registry lives in
``clt_lens.clt.activations``.

Methods take the CLT (``clt``) or its config (``cfg``) as an argument: the objects are
stateless singletons, so one serves every CLT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from clt_lens.clt.comm import FeatureComm
from clt_lens.clt.sparse import Support
from clt_lens.errors import InputError

if TYPE_CHECKING:  # annotations only: the model imports this package
    from clt_lens.clt.config import CLTConfig
    from clt_lens.clt.model import CrossLayerTranscoder


class Activation:
    """Base class: a ReLU-like variant without extra state. Subclasses override what differs."""

    #: the ``cfg.activation`` string (and the name in cfg.json)
    name: ClassVar[str]
    #: how messages spell it ("JumpReLU")
    label: ClassVar[str]
    #: parameters/buffers the variant adds to a CLT (names in the checkpoint)
    state_names: ClassVar[tuple[str, ...]] = ()
    #: inference is ``pre * (pre > theta)`` (or relu) feature by feature, never looking at the
    #: rest of the batch or the other features; what SAELens and circuit-tracer can run
    elementwise: ClassVar[bool] = True
    #: the ``activation`` circuit-tracer runs it as ("jumprelu" or "relu"); None: not exportable
    circuit_tracer_activation: ClassVar[str | None] = None
    #: rescaling a feature (encoder * s, decoder / s) leaves the CLT's function unchanged
    #: (false for top-k rules: it changes which features win)
    rescalable: ClassVar[bool] = True
    #: training keeps a running per-layer inference threshold (fed the smallest kept
    #: activation of each step through ``update_running_threshold_``)
    running_threshold: ClassVar[bool] = False
    #: ``clt_lens.clt.convert_topk_to_jumprelu`` accepts it
    converts_to_jumprelu: ClassVar[bool] = False
    #: ``set_firing_level_`` is implemented (synthetic CLTs)
    has_firing_level: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<activation {self.name!r}>"

    # Config and state ---------------------------------------------------------------------
    def validate(self, cfg: CLTConfig) -> None:
        """Raise ConfigError for config fields this variant needs and that are bad."""

    def create_state(self, clt: CrossLayerTranscoder, kw: dict[str, Any]) -> None:
        """Create the variant's parameters/buffers on a CLT being built (``kw``: dtype, device)."""

    def reset_state_(self, clt: CrossLayerTranscoder) -> None:
        """Re-initialise the variant's parameters (``clt_lens.clt.init.init_clt_``)."""

    # Thresholds ---------------------------------------------------------------------------
    def threshold(self, clt: CrossLayerTranscoder) -> Tensor | None:
        """The trainable threshold [L, F] of the training rule (differentiable), if any."""
        return None

    def inference_threshold(self, clt: CrossLayerTranscoder) -> Tensor | None:
        """[L, F] threshold of the inference rule ``a = pre * (pre > theta)``; None: the rule
        is not a per-feature threshold (ReLU, which is theta = 0, and TopK)."""
        return None

    def export_threshold(self, weights: Any, cfg: CLTConfig, layer: int) -> Tensor | None:
        """Inference threshold [F] of source layer ``layer`` read through ``weights`` (an object
        with ``whole(name)`` and ``layer(name, i)``: a CLT's tensors or a checkpoint's files)."""
        return None

    # Inference ----------------------------------------------------------------------------
    def activate(self, clt: CrossLayerTranscoder, pre: Tensor, layer: int | None) -> Tensor:
        """Inference activation of pre-activations [L, B, F] (or [..., F] of one ``layer``)."""
        return pre.relu()

    # Training -----------------------------------------------------------------------------
    def known_density(self, cfg: CLTConfig, n_slices: int) -> float | None:
        """Support density known before the step (top-k rules), else None."""
        return None

    def training_support(
        self,
        clt: CrossLayerTranscoder,
        pre_nobias: Tensor,
        bias: Tensor,
        theta: Tensor | None,
        comm: FeatureComm,
    ) -> tuple[Support, Tensor]:
        """Positions [L, B, F] whose dL/da the training step needs, from the pre-activations
        without ``b_enc`` (``bias`` [L, 1, F], detached; no grad), and ``pre_nobias`` there."""
        return Support.above(pre_nobias, -bias.squeeze(1))

    def activate_support(
        self, clt: CrossLayerTranscoder, pre_s: Tensor, theta: Tensor | None, support: Support
    ) -> Tensor:
        """Training activation of the pre-activations gathered on ``support``."""
        return pre_s.relu()

    def activate_dense(
        self, clt: CrossLayerTranscoder, pre: Tensor, theta: Tensor | None, comm: FeatureComm
    ) -> Tensor:
        """Training activation of pre-activations [L, B, F] (differentiable)."""
        return pre.relu()

    def uses_auxk(self, cfg: CLTConfig) -> bool:
        """Whether the auxiliary-k loss (dead features decode the residual) applies."""
        return False

    def update_running_threshold_(self, clt: CrossLayerTranscoder, min_positive: Tensor) -> None:
        """Feed the step's smallest positive activation per layer [L] (``running_threshold``)."""

    # Rescaling, calibration, conversion ---------------------------------------------------
    def rescale_features_(self, clt: CrossLayerTranscoder, norms: Tensor) -> None:
        """Follow ``W_enc *= norms`` (``fold_W_dec_norm``, only if ``rescalable``): rescale the
        variant's own state."""

    def set_firing_level_(self, clt: CrossLayerTranscoder, level: Tensor) -> None:
        """Make each feature [L, F] fire where its pre-activation exceeds ``level``."""
        raise InputError(f"activation '{self.name}' has no per-feature firing level")

    def sample_win_counts(
        self,
        clt: CrossLayerTranscoder,
        pres: list[Tensor],
        pre_all: Tensor,
        layer_thresholds: Callable[[int], Tensor],
    ) -> Tensor:
        """[L, F] int64: how often each feature is active on a sample whose pre-activations are
        ``pre_all`` [L, N, F] (``pres``: the same in chunks of tokens); ``layer_thresholds(n)``
        gives per-layer thresholds keeping the n largest of the sample. For conversion."""
        raise InputError(f"activation '{self.name}' is not a top-k rule")


def threshold_rule(pre: Tensor, theta: Tensor, layer: int | None) -> Tensor:
    """``pre * (pre > theta)`` with ``theta`` [L, F] against [L, B, F] or one layer's [..., F]."""
    theta = theta.unsqueeze(1) if layer is None else theta[layer]
    return pre * (pre > theta)


def topk_scatter(pre: Tensor, idx: Tensor) -> Tensor:
    """Zeros but relu(pre) at ``idx`` along the last dim."""
    return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
