"""Run a HookedTransformer with its MLP outputs replaced by the CLT's reconstruction.

The forward pass goes layer by layer: at each input hook (e.g. ``blocks.i.ln2.hook_normalized``)
the CLT's layer-i features are computed from the *current* activations, so later layers see
the spliced residual stream; at each output hook (``blocks.j.hook_mlp_out``) the output is
replaced by ``y_j = sum_{i<=j} decode_i->j + b_dec[j] + skip_j``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from transformer_lens import HookedTransformer

from clt_lens.clt.loading import check_fits
from clt_lens.clt.model import CrossLayerTranscoder
from clt_lens.errors import InputError


def check_model_matches(model: HookedTransformer, clt: CrossLayerTranscoder) -> None:
    """Raise InputError unless ``clt`` fits ``model`` (layers, width, hooks)."""
    check_fits(model, clt.n_layers, clt.d_model, hooks=(clt.cfg.input_hook, clt.cfg.output_hook),
               error=InputError)


def run_with_clt(
    model: HookedTransformer,
    clt: CrossLayerTranscoder,
    tokens: Tensor,
    *,
    error_term: bool = False,
    layers: Sequence[int] | None = None,
    return_type: str | None = "logits",
    **forward_kwargs: Any,
) -> Any:
    """``model(tokens)`` with the outputs of ``layers`` (default: all) replaced by the CLT.

    With ``error_term=True`` each replaced output becomes ``recon + (true - recon)`` with the
    error detached, so the values equal the original model's (up to rounding) while gradients
    flow through the reconstruction, as in a replacement model with error nodes. Layers not in
    ``layers`` keep the true MLP output (their CLT features are still computed, since later
    layers' reconstructions read them).
    """
    check_model_matches(model, clt)
    n_layers = clt.n_layers
    replaced = set(range(n_layers)) if layers is None else set(layers)
    bad = sorted(j for j in replaced if not (isinstance(j, int) and 0 <= j < n_layers))
    if bad:
        raise InputError(f"layers {bad} out of range for a model with {n_layers} layers")
    if not replaced:
        return model(tokens, return_type=return_type, **forward_kwargs)
    last = max(replaced)
    acts: dict[int, Tensor] = {}
    inputs: dict[int, Tensor] = {}

    def make_input_hook(layer: int):
        def hook(x: Tensor, hook: Any) -> None:
            inputs[layer] = x
            acts[layer] = clt.encode_layer(x, layer)

        return hook

    def make_output_hook(layer: int):
        def hook(y: Tensor, hook: Any) -> Tensor:
            sources = range(layer + 1) if clt.cfg.cross_layer else [layer]
            missing = [i for i in sources if i not in acts]
            if missing:
                raise InputError(
                    f"input hook(s) of layer(s) {missing} did not run before "
                    f"{clt.cfg.output_hook_name(layer)}; check the CLT's hook names"
                )
            by_source = [acts.get(i) for i in range(layer + 1)]
            recon = clt.decode_layer(by_source, layer, inputs.get(layer)).to(y.dtype)
            if error_term:
                return recon + (y - recon).detach()
            return recon

        return hook

    # sources beyond the last replaced layer are never read
    fwd_hooks = [
        (clt.cfg.input_hook_name(i), make_input_hook(i))
        for i in range(last + 1)
        if clt.cfg.cross_layer or i in replaced
    ]
    fwd_hooks += [(clt.cfg.output_hook_name(j), make_output_hook(j)) for j in sorted(replaced)]
    try:
        return model.run_with_hooks(
            tokens, return_type=return_type, fwd_hooks=fwd_hooks, **forward_kwargs
        )
    finally:
        acts.clear()
        inputs.clear()
