"""SAE-Dashboard HTML for CLT features, through sae-dashboard's own ``SaeVisRunner``.

Each source layer of a CLT is presented as a SAELens transcoder (``clt.layer_transcoder(l)``):
its encoder is exactly the CLT's encoder of layer l on raw activations, its decoder the
layer's write into its own layer. sae-dashboard therefore shows the right activations, top
contexts and histograms; its logit table uses only the own-layer decoder, and it has no notion
of writes to later layers. Those CLT-only facts (decoder norms per target layer, logit effects
of the total write) are in our statistics and the Neuronpedia export.

sae-dashboard is an optional extra (its pins conflict with circuit-tracer), installed with
``make install`` or ``pip install --no-deps sae-dashboard==0.8.0 && pip install
dataclasses-json eindex-callum``.

Pages are written to open offline, alone (``dashboard_page``): UTF-8, with d3 v6 and plotly
inlined from the pinned copies that ``clt-lens serve --install-js`` puts in the user cache.
Without those scripts ``write_dashboard`` raises DashboardUnavailableError, before any work,
saying how to install them, rather than write a page that is blank without a network.
Tokens are shown as the text they stand for (``token_text``), not as BPE vocabulary strings.
"""

from __future__ import annotations

import copy
import html
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clt_lens.errors import CLTLensError, InputError
from clt_lens.features.dashboard_page import offline_page
from clt_lens.features.token_text import token_text_fn
from clt_lens.fsutil import atomic_write_text

INSTALL_HINT = (
    "sae-dashboard is not installed. It is an optional extra whose pins conflict with "
    "circuit-tracer, so it goes in without its dependencies: run 'make install', or "
    "'pip install --no-deps sae-dashboard==0.8.0 && pip install dataclasses-json eindex-callum'"
)


class DashboardUnavailableError(CLTLensError, ValueError):
    """sae-dashboard (an optional extra) is missing; the message says how to install it."""


def require_sae_dashboard() -> None:
    """Raise DashboardUnavailableError (with install instructions) unless sae-dashboard imports."""
    for module in ("sae_dashboard", "dataclasses_json", "eindex"):
        if importlib.util.find_spec(module) is None:
            raise DashboardUnavailableError(f"{INSTALL_HINT} (module {module!r} not found)")
    try:
        import sae_dashboard.sae_vis_runner  # noqa: F401
    except ImportError as e:
        raise DashboardUnavailableError(f"{INSTALL_HINT} (import failed: {e})") from e


def require_dashboard_scripts(js_dir: str | Path | None = None) -> dict[str, str]:
    """The page scripts to inline (d3 v6, plotly); DashboardUnavailableError, saying how to
    install them, when they are missing or altered."""
    from clt_lens.features.dashboard_page import dashboard_scripts

    try:
        return dashboard_scripts(js_dir)
    except ValueError as e:  # OfflinePageError, ScriptsError
        raise DashboardUnavailableError(str(e)) from None


def to_hooked_sae_transformer(model: Any) -> Any:
    """A ``sae_lens.HookedSAETransformer`` with ``model``'s config, weights and tokenizer.

    Built offline from the config and state dict (``from_pretrained`` would ask the hub);
    the weights are loaded as they are, with no LayerNorm folding or centring.
    """
    from sae_lens import HookedSAETransformer

    if isinstance(model, HookedSAETransformer):
        return model
    if model.tokenizer is None:
        raise InputError("the model has no tokenizer: SAE-Dashboard needs one to render tokens")
    device = next(model.parameters()).device
    cfg = copy.deepcopy(model.cfg)
    hsae = HookedSAETransformer(cfg, tokenizer=model.tokenizer, move_to_device=False)
    missing, unexpected = hsae.load_state_dict(model.state_dict(), strict=False)
    # HookedSAETransformer adds no parameters; anything else means the models differ.
    if [k for k in missing if not k.endswith(("IGNORE", "mask"))] or unexpected:
        raise InputError(
            f"cannot copy the model into a HookedSAETransformer: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return hsae.to(device).eval()


def _check_features(features: list[int], n_features: int) -> list[int]:
    if not features:
        raise InputError("features: give at least one feature index")
    out = [int(f) for f in features]
    bad = [f for f in out if not 0 <= f < n_features]
    if bad:
        raise InputError(f"feature indices {bad} out of range [0, {n_features - 1}]")
    return out


def write_dashboard(
    clt: Any,
    layer: int,
    features: list[int],
    *,
    model: Any,
    tokens: Tensor,
    out_html: str | Path,
    minibatch_size_tokens: int = 16,
    minibatch_size_features: int = 64,
    js_dir: str | Path | None = None,
) -> Path:
    """Render SAE-Dashboard's feature-centric HTML for ``features`` of source layer ``layer``.

    ``tokens`` [batch, seq] are the prompts sae-dashboard gathers its statistics from; a
    leading BOS column is ignored, as in ``compute_feature_stats``. The page is one
    self-contained UTF-8 file; ``out_html#feature=N`` opens it at feature N. ``js_dir`` holds
    the pinned page scripts (default: ``$CLT_LENS_VIEWER_JS`` or the user cache).
    """
    require_sae_dashboard()
    from clt_lens.clt.loading import check_compatible

    if not 0 <= layer < clt.cfg.n_layers:
        raise InputError(f"layer {layer} out of range [0, {clt.cfg.n_layers - 1}]")
    features = _check_features(features, clt.cfg.d_sae)
    check_compatible(clt, model)
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise InputError(
            f"tokens must be an integer tensor [batch, seq], got {tuple(tokens.shape)}"
        )
    scripts = require_dashboard_scripts(js_dir)
    transcoder = clt.layer_transcoder(layer)  # ValueError for TopK (no per-layer rule)
    hook_point = transcoder.cfg.metadata.hook_name
    hsae = to_hooked_sae_transformer(model)
    if hook_point not in hsae.hook_dict:
        raise InputError(
            f"SAE-Dashboard reads the CLT input at {hook_point!r}, which is not a TransformerLens "
            "hook point of this model (module hooks such as mlp.hook_in are not supported here)"
        )
    # SaeVisRunner calls fold_W_dec_norm(), which rescales activations by the decoder norm.
    # A CLT feature's decoder spans several layers, so the own-layer norm is not its scale:
    # keep raw activations, as sae-dashboard itself does for its CLT wrapper.
    transcoder.fold_W_dec_norm = lambda: None

    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    device = next(model.parameters()).device
    bos = getattr(model.tokenizer, "bos_token_id", None)
    # Like our statistics, leave out a leading BOS (not BOS/EOS tokens inside the text).
    skip_first = bos is not None and bool((tokens[:, 0] == bos).all())
    vis_cfg = SaeVisConfig(
        hook_point=hook_point,
        features=features,
        minibatch_size_features=minibatch_size_features,
        minibatch_size_tokens=minibatch_size_tokens,
        device=str(device),
        dtype="float32",
        ignore_positions=[0] if skip_first else [],
        verbose=False,
    )
    data = SaeVisRunner(vis_cfg).run(encoder=transcoder, model=hsae, tokens=tokens.to(device))
    fragment = _feature_centric_html(data, features, token_text_fn(hsae.tokenizer))
    name = getattr(model.cfg, "model_name", "model")
    header = (f"<b>CLT source layer {layer}</b> of {html.escape(str(name))}: "
              f"{len(features)} feature{'s' if len(features) != 1 else ''}, encoder input "
              f"<code>{html.escape(hook_point)}</code>. Logit tables use this layer's own "
              "decoder only; effects through later layers are in the feature records.")
    page = offline_page(fragment, scripts, title=f"CLT layer {layer} features ({name})",
                        header_html=header)
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_html, page)
    return out_html


def _feature_centric_html(data: Any, features: list[int], token_text: Any) -> str:
    """sae-dashboard's feature-centric page (``save_feature_centric_vis``, one file for all
    features) with our token strings instead of its raw vocabulary strings."""
    from sae_dashboard.html_fns import HTML

    def decode(token_id: Any) -> Any:
        if isinstance(token_id, int):
            return token_text(token_id)
        if isinstance(token_id, torch.Tensor):
            token_id = token_id.tolist()
        return [decode(t) for t in token_id]

    layout = data.cfg.feature_centric_layout
    page = HTML()
    first = str(features[0])
    for feature, feature_data in data.feature_data_dict.items():
        part = feature_data._get_html_data_feature_centric(layout, decode)
        page.js_data[str(feature)] = copy.deepcopy(part.js_data)
        if str(feature) == first:
            page.html_data = copy.deepcopy(part.html_data)
    page.js_data = {"AGGDATA": data.feature_stats.aggdata, "DASHBOARD_DATA": page.js_data}
    with tempfile.TemporaryDirectory(prefix="clt-lens-dash-") as tmp:
        path = Path(tmp) / "page.html"
        page.get_html(layout_columns=layout.columns, layout_height=layout.height,
                      filename=path, first_key=first)
        return path.read_text()  # written by sae-dashboard in the locale's encoding
