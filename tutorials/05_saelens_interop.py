"""Tutorial 5: a CLT inside the SAELens ecosystem.

A clt_lens CLT *is* a SAELens SAE (architecture "clt", registered when clt_lens is
imported), so SAELens tools that take an SAE object or folder mostly just work:

1. ``sae_lens.SAE.load_from_disk(folder)`` loads it (cfg.json + safetensors);
2. ``clt.layer_transcoder(l)`` views source layer l as an ordinary SAELens
   ``JumpReLUTranscoder``: same encoder (normalisation folded in, same threshold), decoder =
   the layer's write into its *own* layer. It plugs into ``HookedSAETransformer``, which
   reads the input hook, runs the transcoder and splices its output at the output hook;
3. that view is what sae-dashboard renders (``clt_lens.features.write_dashboard``).

What the per-layer view does not carry: a CLT feature of layer l also writes to layers
l+1 ... L-1. To replace the MLPs by the *whole* CLT, use ``clt_lens.run_with_clt`` (or
circuit-tracer, tutorial 3); to see a feature's writes to every layer, use the feature
statistics (tutorial 4: decoder norms per target layer, logit effects of the total write).

Run it::

    python tutorials/05_saelens_interop.py             # uses tutorial 1's CLT if present
    python tutorials/05_saelens_interop.py --small     # seconds (the test suite)

sae-dashboard is an optional extra (``make install``, or ``pip install --no-deps
sae-dashboard==0.8.0 && pip install dataclasses-json eindex-callum``); without it step 4
prints how to install it and is skipped.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from _common import base_parser, get_clt

SIZES = {
    "full": dict(sequences=16, dashboard_sequences=64, dashboard_features=6),
    "small": dict(sequences=2, dashboard_sequences=4, dashboard_features=2),
}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, "05")
    p.add_argument("--layer", type=int, default=1, help="the source layer to look at")
    args = p.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import sae_lens

    import clt_lens
    from clt_lens.data import load_tokens
    from clt_lens.features import to_hooked_sae_transformer

    model = clt_lens.load_model("embedded", device=args.device)
    checkpoint = get_clt(args, model, out)
    layer = args.layer
    tokens = load_tokens("embedded", tokenizer=model.tokenizer, context_size=model.cfg.n_ctx,
                         split="heldout", max_tokens=size["sequences"] * model.cfg.n_ctx,
                         shuffle=False).to(args.device)

    # ------------------------------------------------------------------------------------
    # 1. Loading through SAELens. The config is a SAELens SAEConfig subclass; metadata
    #    records the model and hooks it was trained on.
    # ------------------------------------------------------------------------------------
    print("\n== 1. SAE.load_from_disk ==")
    clt = sae_lens.SAE.load_from_disk(str(checkpoint), device=args.device)
    cfg = clt.cfg
    print(f"{type(clt).__module__}.{type(clt).__name__}, architecture {cfg.architecture()!r}")
    print(f"d_in {cfg.d_in}, d_sae {cfg.d_sae} per layer x {cfg.n_layers} layers, "
          f"activation {cfg.activation}, cross_layer {cfg.cross_layer}")
    print(f"trained on {cfg.metadata.model_name!r}: reads {cfg.input_hook_name(layer)}, "
          f"writes {cfg.output_hook_name(layer)} (layer {layer})")
    if not 0 <= layer < cfg.n_layers:
        raise SystemExit(f"--layer {layer}: the CLT has layers 0..{cfg.n_layers - 1}")

    # ------------------------------------------------------------------------------------
    # 2. One source layer as a SAELens transcoder. It is a plain JumpReLUTranscoder:
    #    save it and anyone can load it with SAELens alone, no clt_lens needed.
    # ------------------------------------------------------------------------------------
    print(f"\n== 2. clt.layer_transcoder({layer}) ==")
    tc = clt.layer_transcoder(layer)
    md = tc.cfg.metadata
    print(f"{type(tc).__name__}: {md.hook_name} -> {md.hook_name_out}, d_sae {tc.cfg.d_sae}")
    tc.save_model(str(out / f"layer_{layer}_transcoder"))
    again = sae_lens.SAE.load_from_disk(str(out / f"layer_{layer}_transcoder"),
                                        device=args.device)
    print(f"saved to and reloaded from {out / f'layer_{layer}_transcoder'}: "
          f"{type(again).__name__}")

    # ------------------------------------------------------------------------------------
    # 3. HookedSAETransformer. SAELens's model class runs SAEs/transcoders inside the
    #    forward pass. to_hooked_sae_transformer copies our unprocessed model into one
    #    (HookedSAETransformer.from_pretrained would fetch and *process* it from the hub).
    #    With use_error_term=True the transcoder's error is added back, so the logits are
    #    the model's own and the cache simply exposes the feature activations under
    #    "<output hook>.hook_sae_acts_post".
    # ------------------------------------------------------------------------------------
    print("\n== 3. HookedSAETransformer ==")
    hsae = to_hooked_sae_transformer(model)
    with torch.no_grad():
        logits, cache = hsae.run_with_cache_with_saes(tokens, saes=[tc], use_error_term=True)
        base_logits, base_cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(
            cfg.input_hook))
    sae_acts = cache[f"{md.hook_name_out}.hook_sae_acts_post"]      # [batch, pos, d_sae]
    print(f"cache[{md.hook_name_out + '.hook_sae_acts_post'!r}]: {tuple(sae_acts.shape)}; "
          f"logits change {float((logits - base_logits).abs().max()):.1e} (error term on)")

    # The same activations from the CLT itself: encode takes x [tokens, layers, d_model].
    x = torch.stack([base_cache[cfg.input_hook_name(l)] for l in range(cfg.n_layers)], dim=2)
    with torch.no_grad():
        clt_acts = clt.encode(x.flatten(0, 1)).unflatten(0, x.shape[:2])[:, :, layer]
    diff = float((sae_acts - clt_acts).abs().max())
    # Not bit-identical: the transcoder applies folded raw-space weights, the CLT normalises
    # first and then multiplies; float32 rounding differs by ~1e-6.
    torch.testing.assert_close(sae_acts, clt_acts, rtol=1e-4, atol=1e-4)
    active = (clt_acts > 0).float().sum(-1).mean().item()
    print(f"equals clt.encode(x)[:, {layer}]: max difference {diff:.1e}; "
          f"{active:.1f} features active per token")

    # Without the error term the transcoder's output *replaces* MLP `layer`'s output. That
    # is the layer's own-layer write only. For layer 0 nothing earlier writes into it, so it
    # equals the CLT's reconstruction (run_with_clt); for later layers the CLT also adds
    # the writes of earlier layers' features, and the splices differ.
    def ce(lg: torch.Tensor) -> float:
        lp = lg[:, :-1].log_softmax(-1)
        return -lp.gather(-1, tokens[:, 1:, None]).mean().item()

    print(f"next-token loss: model {ce(base_logits):.4f}")
    with torch.no_grad():
        for l in sorted({0, layer}):
            own = hsae.run_with_saes(tokens, saes=[clt.layer_transcoder(l)],
                                     use_error_term=False)
            full = clt_lens.run_with_clt(model, clt, tokens, layers=[l])
            print(f"  MLP {l} replaced: by layer_transcoder({l}) {ce(own):.4f}, "
                  f"by the CLT's reconstruction {ce(full):.4f}")
            if l == 0:
                torch.testing.assert_close(own, full, rtol=1e-3, atol=1e-3)

    # ------------------------------------------------------------------------------------
    # 4. SAE-Dashboard. write_dashboard hands the layer transcoder to sae-dashboard's own
    #    runner (feature-centric HTML: activation histogram, top contexts, logit table).
    #    Its logit table uses only the own-layer decoder; the Neuronpedia export of
    #    tutorial 4 has the CLT-wide logit effects. The page inlines d3 and plotly, so it
    #    opens offline; 'clt-lens serve --install-js' fetches them once (else: skipped).
    # ------------------------------------------------------------------------------------
    print("\n== 4. SAE-Dashboard ==")
    from clt_lens.features import DashboardUnavailableError, write_dashboard

    # The most frequently firing features of this layer on the prompts above.
    firing = (clt_acts > 0).float().flatten(0, 1).mean(0)
    chosen = firing.topk(size["dashboard_features"]).indices.tolist()
    dash_tokens = load_tokens("embedded", tokenizer=model.tokenizer,
                              context_size=model.cfg.n_ctx, split="heldout",
                              max_tokens=size["dashboard_sequences"] * model.cfg.n_ctx,
                              shuffle=False)
    try:
        with warnings.catch_warnings():  # sae-dashboard's eindex dependency warns on new torch
            warnings.filterwarnings("ignore", category=UserWarning, module="eindex")
            html = write_dashboard(clt, layer, chosen, model=model, tokens=dash_tokens,
                                   out_html=out / f"dashboard_layer_{layer}.html")
    except DashboardUnavailableError as e:
        print(f"skipped: {e}")
    else:
        print(f"features {chosen} of layer {layer}: {html} ({html.stat().st_size:,} bytes); "
              "open it in a browser")
    print(f"\ndone. Outputs under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
