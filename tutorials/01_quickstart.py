"""Tutorial 1: quickstart. Train and evaluate a cross-layer transcoder on the embedded model.

A cross-layer transcoder (CLT) reads the residual stream just before each MLP (the input
hook, ``ln2.hook_normalized``) and learns sparse features that, through per-target-layer
decoders, reproduce what that MLP *and every later MLP* write (the output hook,
``hook_mlp_out``). This script walks through the whole basic loop on the small model that
ships with clt_lens (4 layers, d_model 128, trained on Shakespeare), so it runs offline on
a laptop CPU:

1. load the model as a TransformerLens ``HookedTransformer``;
2. look at the activations a CLT is trained on (``collect_activations``);
3. train a CLT, streaming activations from the model as it goes (no disk cache);
4. evaluate it: reconstruction, sparsity, and what happens to the model's loss when the
   CLT replaces its MLPs;
5. save it and load it back through SAELens (``sae_lens.SAE.load_from_disk``).

Run it::

    python tutorials/01_quickstart.py                 # a few minutes on a laptop CPU
    python tutorials/01_quickstart.py --small         # seconds; what the test suite runs
    CLT_LENS_TUTORIAL_SMALL=1 python tutorials/01_quickstart.py   # same as --small

Everything is written under ``--out`` (default ``runs/tutorials/01``). The same steps exist
as commands: ``clt-lens train demo``, ``clt-lens eval RUN_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

# Two settings: "full" gives a CLT worth looking at in a couple of minutes, "small" only
# proves that every step runs (the test suite uses it; its numbers mean nothing).
SIZES = {
    "full": dict(d_sae=512, n_steps=400, batch_size=1024, eval_tokens=4096,
                 heldout_tokens=4096, normalization_tokens=4096, refill_sequences=32,
                 sparsity_warmup_steps=150, peek_sequences=8),
    "small": dict(d_sae=64, n_steps=20, batch_size=128, eval_tokens=127,
                  heldout_tokens=256, normalization_tokens=512, refill_sequences=8,
                  sparsity_warmup_steps=5, peek_sequences=2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true",
                   default=os.environ.get("CLT_LENS_TUTORIAL_SMALL") == "1",
                   help="tiny sizes (also: CLT_LENS_TUTORIAL_SMALL=1)")
    p.add_argument("--out", default="runs/tutorials/01", help="output directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Importing clt_lens registers the "clt" architecture with SAELens; from then on
    # SAE.load_from_disk understands CLT folders.
    import sae_lens

    import clt_lens
    from clt_lens.activations import HookSpec, collect_activations
    from clt_lens.data import load_tokens
    from clt_lens.evals import evaluate, markdown_table
    from clt_lens.training import CLTSpec, CLTTrainingRunner, SourceConfig, TrainConfig

    # ------------------------------------------------------------------------------------
    # 1. The model. load_model returns an *unprocessed* HookedTransformer: LayerNorm weights
    #    are not folded and writing weights are not centred, because circuit-tracer (tutorial
    #    3) needs the model exactly as trained. "embedded" is packaged with clt_lens; the
    #    same call takes a Hugging Face folder or a TransformerLens name (tutorial 2).
    # ------------------------------------------------------------------------------------
    print("== 1. model ==")
    model = clt_lens.load_model("embedded", device=args.device)
    cfg = model.cfg
    print(f"{cfg.model_name}: {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"vocab {cfg.d_vocab}, context {cfg.n_ctx}")
    # model_id is a stable "name@hash" string; caches and checkpoints record it so that a
    # CLT is never silently used with a different model.
    print(f"model_id: {clt_lens.model_id(model)}")

    # ------------------------------------------------------------------------------------
    # 2. The training data of a CLT: pairs (x, y) per token, for every layer at once.
    #    HookSpec names the hooks block-relatively, as circuit-tracer does:
    #    x[:, l] = blocks.l.ln2.hook_normalized (the MLP's input),
    #    y[:, l] = blocks.l.hook_mlp_out        (the MLP's output).
    #    The BOS position is dropped: its activations are huge outliers that no feature
    #    should spend capacity on.
    # ------------------------------------------------------------------------------------
    print("\n== 2. activations ==")
    hooks = HookSpec()
    print("input hooks: ", hooks.input_names(cfg.n_layers))
    print("output hooks:", hooks.output_names(cfg.n_layers))
    tokens = load_tokens("embedded", tokenizer=model.tokenizer, context_size=cfg.n_ctx,
                         split="train", max_tokens=size["peek_sequences"] * cfg.n_ctx)
    x, y = collect_activations(model, tokens, hooks)
    print(f"tokens {tuple(tokens.shape)} -> x {tuple(x.shape)}, y {tuple(y.shape)}  "
          "([tokens without BOS, layers, d_model])")
    print("per-layer RMS of x:", [round(v, 2) for v in x.pow(2).mean((0, 2)).sqrt().tolist()])
    print("per-layer RMS of y:", [round(v, 2) for v in y.pow(2).mean((0, 2)).sqrt().tolist()])
    # x is read after LayerNorm's normalisation (before its weight), so its RMS is 1 by
    # construction; the MLP outputs y differ a lot in scale between layers. The CLT scales
    # each layer's input and output to unit RMS internally (buffers input_scale and
    # output_scale, estimated from `normalization_tokens` tokens before training), so
    # every layer's reconstruction loss counts alike. Inputs and outputs of encode/decode
    # stay in the model's raw units.

    # ------------------------------------------------------------------------------------
    # 3. Training. TrainConfig holds every option (see clt_lens/training/config.py); the
    #    same fields are YAML keys in `clt-lens train CONFIG.yaml --field value`.
    #    Without cache_dir the trainer *streams*: it runs the model on batches of packed
    #    sequences, shuffles the tokens of each refill, and trains on them. That is the
    #    simplest setup; tutorial 2 shows the disk cache, which pays off when you train
    #    several CLTs on the same activations.
    # ------------------------------------------------------------------------------------
    print("\n== 3. training (streamed activations) ==")
    train_cfg = TrainConfig(
        source=SourceConfig(model="embedded", dataset="embedded"),  # what the CLT reads
        clt=CLTSpec(                         # the CLT itself
            d_sae=size["d_sae"],             # features per layer
            activation="jumprelu",           # or "relu", "topk", "batchtopk"
            cross_layer=True,                # False trains per-layer transcoders instead
            sparsity_penalty="tanh",         # Anthropic's tanh(c * |f| * ||W_dec||) penalty
            sparsity_coeff=0.3,
        ),
        sparsity_warmup_steps=size["sparsity_warmup_steps"],
        batch_size=size["batch_size"],       # tokens per optimizer step
        n_steps=size["n_steps"],
        lr=1e-3,
        lr_warmup_steps=min(50, size["n_steps"] // 5),
        normalization_tokens=size["normalization_tokens"],
        heldout_tokens=size["heldout_tokens"],
        eval_every=max(1, size["n_steps"] // 4),  # held-out EV / L0 lines in metrics.jsonl
        stream_sequences_per_refill=size["refill_sequences"],  # sequences per model run
        device=args.device,
        out_dir=str(out / "train"),
    )
    # override_model hands the already loaded model to the trainer (otherwise it would
    # load cfg.source.model itself). The run directory gets metrics.jsonl, training_curves.png,
    # checkpoints/ and final/ (a SAELens folder).
    clt = CLTTrainingRunner(train_cfg, override_model=model).run()
    final = out / "train" / "final"
    heldout = [json.loads(line) for line in (out / "train" / "metrics.jsonl").open()
               if '"heldout"' in line]
    last = heldout[-1]
    print(f"held-out after {last['step']} steps: explained variance {last['ev']:.3f}, "
          f"L0 {last['l0']:.1f} active features per token per layer")
    print(f"checkpoint: {final}   curves: {out / 'train' / 'training_curves.png'}")

    # ------------------------------------------------------------------------------------
    # 4. Evaluation on held-out text. Per layer: MSE, FVU (fraction of variance
    #    unexplained), EV = 1 - FVU, L0, dead/dense features, and the CE increase when only
    #    that layer's MLP output is replaced by the CLT (a "splice"). Then the replacement
    #    model with *all* MLPs replaced: CE recovered compares it to zero-ablating the MLPs
    #    (100% = as good as the real MLPs, 0% = as bad as no MLPs at all).
    # ------------------------------------------------------------------------------------
    print("\n== 4. evaluation ==")
    result = evaluate(final, model=model, n_tokens=size["eval_tokens"], device=args.device,
                      out_dir=out / "eval")
    print(markdown_table(result))
    print(f"(also in {out / 'eval'}: eval.json, eval.md, eval_layers.png, density.png)")

    # ------------------------------------------------------------------------------------
    # 5. Saving and loading. A CLT is a SAELens SAE subclass (architecture "clt"); its
    #    folder holds cfg.json + sae_weights.safetensors, nothing pickled. save_model works
    #    on any CLT object; load_from_disk gives back a CrossLayerTranscoder.
    # ------------------------------------------------------------------------------------
    print("\n== 5. save / load through SAELens ==")
    saved = out / "my_clt"
    clt.save_model(str(saved))
    loaded = sae_lens.SAE.load_from_disk(str(saved), device=args.device)
    print(f"{saved}: {sorted(p.name for p in saved.iterdir())}")
    print(f"loaded a {type(loaded).__name__}: d_in {loaded.cfg.d_in}, d_sae {loaded.cfg.d_sae} "
          f"per layer, {loaded.cfg.n_layers} layers, activation {loaded.cfg.activation}")
    with torch.no_grad():
        acts = loaded.encode(x)            # [tokens, layers, d_sae]
        same = torch.equal(acts, clt.encode(x))
        y_hat = loaded.decode(acts)        # [tokens, layers, d_model], in raw model units
    fvu = ((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
    print(f"encode identical after the round trip: {same}; "
          f"FVU on the step-2 tokens: {fvu:.3f}")
    if not same:
        raise SystemExit("the reloaded CLT encodes differently: please report this")

    # The feature activations are ordinary tensors: the most active features of layer 0
    # on the first token are one line away.
    top = acts[0, 0].topk(3)
    print("token 0, layer 0: top features", top.indices.tolist(),
          "with activations", [round(v, 3) for v in top.values.tolist()])
    print(f"\ndone. Everything is under {out}/. Next: tutorials/02_your_own_model.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
