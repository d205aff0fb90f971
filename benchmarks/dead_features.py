"""Dead and rare features: the demo recipe against initialisation and loss options.

    python benchmarks/dead_features.py                    # every variant, 800 steps (demo.yaml)
    python benchmarks/dead_features.py --variants demo,b_enc_init --steps 200
    python benchmarks/dead_features.py --reuse runs/dead_features

Each variant trains the packaged ``demo`` config (JumpReLU CLT on the embedded model, 1024
features per layer) from one shared activation cache with the same seed and schedule, changing
only what the variant names:

- ``demo``: the demo as shipped (pre-activation loss 1e-2);
- ``preact_default``: the pre-activation loss at TrainConfig's default 3e-6;
- ``b_enc_init``: ``b_enc`` initialised from data so each feature fires on
  ``--b-enc-rate`` of the tokens at step 0 (``b_enc_init_rate``);
- ``auxk``: the auxiliary-k loss for JumpReLU's dead features too (``auxk_jumprelu``);
- ``b_enc_init+auxk``: both.

Reported per variant: the dead fraction in the trainer's last window (features that did not
fire in the last ``dead_window_tokens`` training tokens), the dead fraction over
``--density-tokens`` held-out tokens and over as many training tokens (silent on held-out text
but alive on training text means rare words, not a dead feature), the fraction firing on fewer
than 1e-4 of held-out tokens, and held-out FVU, L0 and CE recovered (``clt_lens.evals``) to
check the comparison is at equal reconstruction and sparsity.

Writes benchmarks/results/dead_features.json and dead_features.png; runs stay under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, print_table, write_result  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "demo": {},
    "preact_default": {"preact_coeff": 3e-6},
    "b_enc_init": {"b_enc_init_rate": None},  # None: --b-enc-rate
    "auxk": {"auxk_jumprelu": True},
    "b_enc_init+auxk": {"b_enc_init_rate": None, "auxk_jumprelu": True},
}
def make_cache(root: Path, n_tokens: int, model: Any) -> Path:
    from clt_lens.cache import CacheConfig, generate_cache

    out = root / f"cache_{n_tokens}"
    if not (out / "manifest.json").is_file():  # written last: a complete cache
        generate_cache(CacheConfig(out_dir=str(out), n_tokens=n_tokens, progress=False),
                       model=model)
    return out


def train_variant(name: str, root: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    from clt_lens.config import load_config
    from clt_lens.training import CLTTrainingRunner
    from clt_lens.training.cli import resolve_config_path
    from clt_lens.training.config import RENAMED_KEYS, TrainConfig, saved_train_config

    overrides = {k: (args.b_enc_rate if v is None else v) for k, v in VARIANTS[name].items()}
    run_dir = root / name.replace("+", "_")
    cfg = load_config(TrainConfig, resolve_config_path("demo"), {
        "cache_dir": str(cache), "n_steps": args.steps, "seed": args.seed,
        "sparsity_warmup_steps": max(args.steps // 4, 1),
        "eval_every": max(args.steps // 4, 1), "checkpoint_every": 0,
        "progress": args.progress, "out_dir": str(run_dir), **overrides})
    seconds = None
    if args.reuse and (run_dir / "final" / "cfg.json").is_file():
        saved = saved_train_config(json.loads((run_dir / "train_config.json").read_text()))
        asked = {"n_steps": args.steps, **overrides}
        wanted = {RENAMED_KEYS.get(k, k): v for k, v in asked.items()}
        diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        if diff:
            raise SystemExit(f"--reuse: {run_dir} was trained differently (saved, wanted): {diff}")
        print(f"[{name}] reusing {run_dir}", flush=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{name}] training {overrides or 'as the demo'} -> {run_dir}", flush=True)
        t0 = time.perf_counter()
        CLTTrainingRunner(cfg).run()
        seconds = time.perf_counter() - t0
    return {"name": name, "overrides": overrides, "run_dir": str(run_dir),
            "train_seconds": seconds}


def evaluate_variant(run: dict[str, Any], model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from clt_lens.activations import HookSpec
    from clt_lens.clt.loading import load_clt
    from clt_lens.evals import evaluate
    from clt_lens.evals.evaluate import feature_density

    final = Path(run["run_dir"]) / "final"
    res = evaluate(final, model=model, n_tokens=args.eval_tokens, single_layer_splices=False,
                   density_tokens=args.density_tokens, progress=args.progress)
    clt = load_clt(final)
    train_density = feature_density(
        clt, model, dataset="embedded", split="train", n_tokens=args.density_tokens,
        ctx=model.cfg.n_ctx, batch_size=16,
        hooks=HookSpec(res["input_hook"], res["output_hook"]), progress=args.progress)
    return {
        "fvu": res["mean"]["fvu"],
        "fvu_per_layer": res["per_layer"]["fvu"],
        "l0": res["mean"]["l0"],
        "l0_per_layer": res["per_layer"]["l0"],
        "ce_recovered": res["replacement"]["ce_recovered"],
        "kl": res["replacement"]["kl"],
        "dead_eval_window": res["mean"]["dead_fraction"],
        "eval_tokens": res["n_tokens_reconstruction"],
        "window": res.get("training_window"),
        "heldout": res["feature_density"],
        "train": train_density,
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(rows[0]["eval"]["heldout"]["dead_fraction"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        e = r["eval"]
        xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(L)]
        axes[0].bar(xs, e["heldout"]["dead_fraction"], width=width, label=r["name"])
        axes[1].bar(xs, e["window"]["dead_fraction"] if e["window"] else [0] * L, width=width,
                    label=r["name"])
    axes[0].set_title(f"dead on {rows[0]['eval']['heldout']['n_tokens']:,} held-out tokens")
    window = rows[0]["eval"]["window"] or {}
    axes[1].set_title(f"dead in the training window ({window.get('window_tokens', 0):,} tokens)")
    for ax in axes[:2]:
        ax.set_xlabel("layer")
        ax.set_xticks(range(L))
        ax.legend(fontsize=7)
    ax = axes[2]
    for r in rows:
        ax.plot(r["eval"]["l0"], r["eval"]["fvu"], "o", ms=8, label=r["name"])
    ax.set_xlabel("mean L0 per layer (held-out)")
    ax.set_ylabel("mean FVU (held-out)")
    ax.set_title("reconstruction vs sparsity")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=800, help="training steps (demo: 800)")
    ap.add_argument("--b-enc-rate", type=float, default=0.05,
                    help="firing rate of each feature at step 0 for the b_enc_init variants")
    ap.add_argument("--cache-tokens", type=int, default=262_144)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--density-tokens", type=int, default=131_072)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/dead_features")
    ap.add_argument("--reuse", metavar="DIR", default=None,
                    help="work folder whose finished runs are reused instead of retrained")
    ap.add_argument("--name", default="dead_features", help="result file name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not 0 < args.b_enc_rate < 1:
        ap.error("--b-enc-rate must be in (0, 1)")
    for k in ("steps", "cache_tokens", "eval_tokens", "density_tokens", "threads"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be positive")
    torch.set_num_threads(args.threads)
    root = Path(args.reuse or args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)

    from clt_lens.models import load_model, model_id

    t_all = time.perf_counter()
    load_start = os.getloadavg()
    model = load_model("embedded")
    cache = make_cache(root, args.cache_tokens, model)
    rows = []
    for name in names:
        run = train_variant(name, root, cache, args)
        run["eval"] = evaluate_variant(run, model, args)
        rows.append(run)

    m = machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; command: "
          f"{m['command']}\nmodel {model_id(model)}; demo config, {args.steps} steps; "
          f"held-out and train density over {args.density_tokens:,} tokens each")
    table = []
    for r in rows:
        e = r["eval"]
        w = e["window"] or {}
        table.append([r["name"], f"{w.get('mean_dead_fraction', float('nan')):.1%}",
                      f"{e['heldout']['mean_dead_fraction']:.1%}",
                      f"{e['train']['mean_dead_fraction']:.1%}",
                      f"{sum(e['heldout']['rare_fraction_1e-4']) / len(e['l0_per_layer']):.1%}",
                      e["fvu"], e["l0"], f"{e['ce_recovered']:.2%}", e["kl"]])
    print_table(["variant", "dead (train window)", "dead (held-out)", "dead (train sample)",
                 "rare < 1e-4 (held-out)", "FVU", "L0", "CE recovered", "KL"], table)
    print("\nper layer, dead on held-out / in the window:")
    for r in rows:
        e = r["eval"]
        w = (e["window"] or {}).get("dead_fraction", [])
        print(f"  {r['name']}: " + ", ".join(
            f"L{i} {h:.1%}/{x:.1%}" for i, (h, x) in enumerate(zip(e["heldout"]["dead_fraction"],
                                                                   w))))
    png = RESULTS / f"{args.name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, png, f"dead features, demo CLT (embedded 4-layer, F=1024/layer, {args.steps} "
                    "steps): variants")
    path = write_result(args.name, {
        "model": model_id(model),
        "settings": {k: getattr(args, k) for k in ("steps", "b_enc_rate", "cache_tokens",
                                                   "eval_tokens", "density_tokens", "seed")},
        "variants": rows,
        "elapsed_seconds": time.perf_counter() - t_all,
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
    })
    print(f"written {path} and {png}")


if __name__ == "__main__":
    main()
