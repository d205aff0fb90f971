"""Feature statistics pass: tokens/s against the model's own forward pass, in one run.

    python benchmarks/features.py                   # embedded model, ~100k held-out tokens
    python benchmarks/features.py --tokens 20000    # quicker
    python benchmarks/features.py --random-model    # a random 4-layer d128 model instead

The CLT has the demo's shape (L=4, d=128, F=1024 per layer) with random weights and JumpReLU
thresholds at a per-feature quantile of the pre-activations, so ``--density`` of the
(token, feature) pairs fire. Timed over the same tokens, batch 32 x 128:

- model forward: ``model(tokens)`` (logits), the reference of the target (stats <= ~2x it);
- collect: the hooked forward that stops after the last block (what the stats pass runs);
- collect + encode: the above plus ``clt.encode`` (the floor of any statistics pass);
- stats pass: ``compute_feature_stats``'s pass (collection, encoding, every accumulator),
  and writing the features directory (JSON of every feature and its examples).

The stats pass never builds the activation tensor: it reads the CLT's pre-activations and the
firing mask (``preactivation_fn``), hence "collect + encode" (``clt.encode``, which does build
it) can cost more than the encoding inside the pass.

Stages run in rounds (``--repeats``, interleaved) and each reports its fastest round: on a
shared machine the minimum is the best estimate of the uncontended speed, and interleaving
exposes every stage to the same load. Writes benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

from clt_lens.activations import HookSpec, collect_activations  # noqa: E402

CTX = 128
BATCH = 32


def load(random_model: bool, n_tokens: int):
    """(description, model, tokens [n_seq, 128] BOS first)."""
    n_seq = math.ceil(n_tokens / (CTX - 1))
    if not random_model:  # asked for the embedded model: it loads, or the benchmark fails
        from clt_lens.data import load_tokens
        from clt_lens.models import load_model, model_id

        model = load_model("embedded")
        tokens = load_tokens("embedded", tokenizer=model.tokenizer, context_size=CTX,
                             split="heldout", max_tokens=n_seq * CTX)
        return f"embedded ({model_id(model)})", model, tokens
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    from clt_lens.data import load_tokens
    from clt_lens.models import EMBEDDED_DIR

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_DIR))
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=4, d_model=128, n_ctx=CTX, d_head=32, n_heads=4, d_mlp=512, d_vocab=len(tok),
        act_fn="gelu", normalization_type="LN", seed=0), tokenizer=tok).eval()
    tokens = load_tokens("embedded", tokenizer=tok, context_size=CTX, split="heldout",
                         max_tokens=n_seq * CTX)
    return "random 4-layer d128 (embedded tokenizer and held-out text)", model, tokens


def make_clt(model, tokens: torch.Tensor, n_features: int, density: float):
    from clt_lens.clt import CLTConfig, CrossLayerTranscoder

    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(d_in=model.cfg.d_model, d_sae=n_features,
                                         n_layers=model.cfg.n_layers))
    x, y = collect_activations(model, tokens[:16])
    clt.estimate_normalization(x, y)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
        pre = clt.preacts_lbf(clt.normalize_inputs(x))
        clt.log_threshold.copy_(torch.quantile(pre, 1 - density, dim=1).clamp(min=1e-3).log())
    return clt.eval()


@torch.no_grad()
def seconds(fn, tokens: torch.Tensor) -> float:
    fn(tokens[:BATCH])  # warm-up
    t = time.perf_counter()
    for chunk in tokens.split(BATCH):
        fn(chunk)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=1024, help="features per layer")
    ap.add_argument("--density", type=float, default=0.03)
    ap.add_argument("--repeats", type=int, default=2, help="rounds; each stage keeps its best")
    ap.add_argument("--random-model", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 gives the steadiest numbers on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from clt_lens.features.stats import compute_feature_stats

    desc, model, tokens = load(args.random_model, args.tokens)
    clt = make_clt(model, tokens, args.features, args.density)
    hooks = HookSpec(clt.cfg.input_hook, clt.cfg.output_hook)
    n_tok = tokens.shape[0] * (CTX - 1)
    print(f"model: {desc}; CLT L={clt.cfg.n_layers} d={clt.cfg.d_in} F={clt.cfg.d_sae}; "
          f"{tokens.shape[0]} sequences = {n_tok} tokens; threads {torch.get_num_threads()}")

    best: dict[str, float] = {}

    def keep(name: str, t: float) -> None:
        best[name] = min(best.get(name, math.inf), t)

    for r in range(args.repeats):
        keep("forward", seconds(lambda t: model(t), tokens))
        keep("collect", seconds(lambda t: collect_activations(model, t, hooks), tokens))
        keep("encode", seconds(lambda t: clt.encode(collect_activations(model, t, hooks)[0]),
                               tokens))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = compute_feature_stats(clt, model=model, tokens=tokens, n_tokens=n_tok,
                                        batch_size=BATCH, out_dir=tmp, progress=False)
            keep("total", time.perf_counter() - t0)
            manifest = json.loads((out / "features.json").read_text())
            keep("pass", manifest["timing"]["pass_seconds"])
            keep("write", manifest["timing"]["write_seconds"])
            size_mb = sum(p.stat().st_size for p in out.glob("layer_*.jsonl")) / 1e6
            fired = 0
            for p in out.glob("layer_*.jsonl"):
                with open(p) as f:
                    fired += sum(json.loads(line)["n_fired"] for line in f)
        print(f"round {r + 1}/{args.repeats}: forward {best['forward']:.1f}s, "
              f"pass {manifest['timing']['pass_seconds']:.1f}s")
    t_forward, t_collect, t_encode = best["forward"], best["collect"], best["encode"]
    t_total = best["total"]
    t_pass, t_write = best["pass"], best["write"]
    measured_density = fired / (n_tok * clt.cfg.n_layers * clt.cfg.d_sae)

    rows = [
        ["model forward (logits)", n_tok / t_forward, 1.0],
        ["collect (hooked, no unembed)", n_tok / t_collect, t_collect / t_forward],
        ["collect + encode", n_tok / t_encode, t_encode / t_forward],
        ["stats pass", n_tok / t_pass, t_pass / t_forward],
        ["stats pass + write", n_tok / (t_pass + t_write), (t_pass + t_write) / t_forward],
        ["compute_feature_stats total", n_tok / t_total, t_total / t_forward],
    ]
    print_table(["stage", "tokens/s", "time vs model forward"], rows)
    print(f"measured density {measured_density:.4f}; features directory {size_mb:.1f} MB")
    path = write_result("features", {
        "model": desc,
        "clt": {"n_layers": clt.cfg.n_layers, "d_in": clt.cfg.d_in, "d_sae": clt.cfg.d_sae,
                "target_density": args.density, "measured_density": measured_density},
        "n_tokens": n_tok,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "batch": [BATCH, CTX],
        "tokens_per_second": {r[0]: r[1] for r in rows},
        "time_vs_model_forward": {r[0]: r[2] for r in rows},
        "target": "stats pass <= ~2x the model forward over the same tokens",
        "stats_pass_ratio": t_pass / t_forward,
        "features_dir_mb": size_mb,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
