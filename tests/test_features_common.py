"""Shared helpers of the tests/test_features*.py modules (no tests here).

No trained CLT is needed: a CrossLayerTranscoder on the embedded model's shapes (L=4, d=128)
with random weights, thresholds set at a per-feature quantile of the pre-activations so that
a few percent of (token, feature) pairs fire.
"""

from __future__ import annotations

import functools

import torch

CONTEXT = 128


@functools.lru_cache(maxsize=1)
def model():
    """The embedded model; a random model of the same shapes while its weights are missing."""
    from clt_lens.models import ModelLoadError, load_model

    try:
        return load_model("embedded")
    except (ModelLoadError, FileNotFoundError, OSError):
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformers import AutoTokenizer

        from clt_lens.models import EMBEDDED_DIR

        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(str(EMBEDDED_DIR))
        cfg = HookedTransformerConfig(
            n_layers=4, d_model=128, d_head=32, n_heads=4, d_mlp=512, d_vocab=len(tok),
            n_ctx=CONTEXT, act_fn="gelu_new", normalization_type="LN",
            model_name="random-embedded-shape",
        )
        m = HookedTransformer(cfg, tokenizer=tok)
        return m.eval()


@functools.lru_cache(maxsize=2)
def model_on(device: str):
    """``model()`` on ``device`` (itself on the CPU)."""
    if torch.device(device).type == "cpu":
        return model()
    import copy

    return copy.deepcopy(model()).to(device, print_details=False)


@functools.lru_cache(maxsize=4)
def heldout_tokens(n_seq: int) -> torch.Tensor:
    from clt_lens.data import load_tokens

    return load_tokens("embedded", tokenizer=model().tokenizer, context_size=CONTEXT,
                       split="heldout", max_tokens=n_seq * CONTEXT, shuffle=False)


def random_clt(n_features: int = 64, *, frac: float = 0.03, activation: str = "jumprelu",
               cross_layer: bool = True, seed: int = 0):
    from clt_lens.activations import collect_activations
    from clt_lens.clt import CLTConfig, CrossLayerTranscoder

    m = model()
    torch.manual_seed(seed)
    cfg = CLTConfig(d_in=m.cfg.d_model, d_sae=n_features, n_layers=m.cfg.n_layers,
                    activation=activation, cross_layer=cross_layer, k=4)
    clt = CrossLayerTranscoder(cfg)
    x, y = collect_activations(m, heldout_tokens(8))
    clt.estimate_normalization(x, y)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
        if activation == "jumprelu":
            pre = clt.preacts_lbf(clt.normalize_inputs(x))  # [L, N, F]
            clt.log_threshold.copy_(torch.quantile(pre, 1 - frac, dim=1).clamp(min=1e-3).log())
        elif activation == "relu":
            clt.b_enc.sub_(1.5)  # mostly silent
    return clt.eval()


@torch.no_grad()
def full_acts(clt, tokens: torch.Tensor) -> torch.Tensor:
    """Reference: the whole activation matrix [n_seq, positions (BOS dropped), L, F]."""
    from clt_lens.activations import HookSpec, collect_activations

    x, _ = collect_activations(model(), tokens, HookSpec(clt.cfg.input_hook, clt.cfg.output_hook))
    acts = clt.encode(x)
    return acts.view(tokens.shape[0], tokens.shape[1] - 1, clt.cfg.n_layers, clt.cfg.d_sae)


def build_features_dir(out, n_features: int = 32, *, n_seq: int = 6, seed: int = 0, **kw):
    """A small features directory of a random CLT (stats over ``n_seq`` held-out sequences)."""
    from clt_lens.features.stats import compute_feature_stats

    clt = random_clt(n_features, frac=0.05, seed=seed)
    opts = dict(top_k=4, n_quantiles=3, examples_per_quantile=2, n_negative=2, window=16)
    opts.update(kw)
    compute_feature_stats(clt, model=model(), tokens=heldout_tokens(n_seq), n_tokens=n_seq * 127,
                          batch_size=4, out_dir=out, progress=False, **opts)
    return out


def write_autointerp(features_dir, records) -> None:
    """Append autointerp records (the format of features_dir/autointerp.jsonl)."""
    import json

    with open(features_dir / "autointerp.jsonl", "a", encoding="utf-8") as f:
        for layer, index, status, text in records:
            f.write(json.dumps({
                "layer": layer, "index": index, "status": status, "explanation": text,
                "method": "clt-lens-explain-v1", "model": "stub-llm",
                "scores": {"detection": {"balanced_accuracy": 0.75, "n": 8, "method": "m",
                                         "model": "stub-llm"}} if status == "ok" else {},
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "requests": 1},
                "error": None if status == "ok" else "boom",
            }) + "\n")
