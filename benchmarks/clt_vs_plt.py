"""Cross-layer transcoder vs per-layer transcoders at matched L0, in the circuit-tracing metrics.

    python benchmarks/clt_vs_plt.py --model embedded-deep --steps 1000   # 8 layers (README)
    python benchmarks/clt_vs_plt.py                                       # the 4-layer model
    python benchmarks/clt_vs_plt.py --model embedded-deep --reuse runs/clt_vs_plt_embedded-deep

The comparison the CLT papers make: a CLT (each feature reads one layer and writes to it and
every later layer) and a set of per-layer transcoders (PLT: each feature writes only to its
own layer), same features per layer, trained on the same stream with the same schedule and the
same number of tokens and steps from the packaged ``demo`` config, at matched held-out mean L0.
The CLT is trained at ``--clt-coeff``; the PLT at ``--plt-coeff``, and if its held-out L0 (the
trainer's last held-out evaluation) is more than ``--l0-tol`` away from the CLT's, it is
retrained at a corrected coefficient (log-log secant on the attempts so far; with one attempt,
the assumed elasticity ``--elasticity`` of L0 to the coefficient) up to ``--max-attempts``
times; the attempt closest in L0 is used and all attempts are recorded.

Both are evaluated by ``clt_lens.evals.evaluate`` on ``--eval-tokens`` held-out tokens
(per-layer FVU, L0, single-layer splice CE; replacement-model CE recovered, KL, top-1), with
the dead fraction over ``--density-tokens`` held-out tokens next to the training window's; and
by ``clt_lens.evals.graph_metrics.evaluate_graphs`` on ``--prompts`` held-out prompts (lines of
the held-out plays): circuit-tracer's replacement and completeness scores of the unpruned graph,
the input-to-logit path length in the pruned graph, the feature nodes needed for completeness
0.8 / 0.9 / 0.95, and the Spearman correlation between each sampled feature's attributed
influence and the measured effect of ablating it. Every graph metric is also compared prompt
by prompt (the same prompts through both): median paired difference, the prompts on which the
CLT does better, and a two-sided sign test.

Writes benchmarks/results/<name>.json and <name>.png (``clt_vs_plt`` for the embedded model,
``clt_vs_plt_<model>`` otherwise); checkpoints and evaluation outputs stay under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, print_table, write_result  # noqa: E402

KINDS = ("clt", "plt")
# graph metrics compared prompt by prompt: key -> (label, True if higher is better)
PAIRED = {
    "replacement": ("replacement score (unpruned)", True),
    "completeness": ("completeness (unpruned)", True),
    "path_length_mean": ("mean path length (pruned)", False),
    "pruned_feature_nodes": ("feature nodes after pruning (0.8/0.98)", False),
    "size_at_completeness_0.8": ("feature nodes for completeness 0.8", False),
    "size_at_completeness_0.9": ("feature nodes for completeness 0.9", False),
    "size_at_completeness_0.95": ("feature nodes for completeness 0.95", False),
    "faithfulness_spearman": ("influence vs ablation Spearman", True),
    "faithfulness_spearman_top": ("same, strongest features only", True),
    "active_features": ("active features on the prompt", False),
}


# ---- training -----------------------------------------------------------------------------
def train_config(kind: str, coeff: float, run_dir: Path, args: argparse.Namespace):
    """The packaged demo config with this benchmark's schedule, for a CLT or a PLT."""
    from clt_lens.config import load_config
    from clt_lens.training.cli import resolve_config_path
    from clt_lens.training.config import TrainConfig

    overrides = {
        "source": {"model": args.model},
        "clt": {"cross_layer": kind == "clt", "sparsity_coeff": coeff, "d_sae": args.d_sae},
        "n_steps": args.steps,
        "batch_size": args.batch_size,
        # the demo's warm-up fractions (the coefficient reaches its value a third of the way)
        "sparsity_warmup_steps": max(args.steps // 3, 1),
        "lr_warmup_steps": min(50, max(args.steps // 10, 1)),
        "eval_every": max(args.steps // 4, 1),
        "heldout_tokens": args.heldout_tokens,
        "checkpoint_every": 0,
        "seed": args.seed,
        "progress": args.progress,
        "out_dir": str(run_dir),
    }
    return load_config(TrainConfig, resolve_config_path("demo"), overrides)


def read_log(run_dir: Path) -> dict[str, Any]:
    """The run's last held-out and train records and its throughput."""
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    heldout = [r for r in recs if r.get("kind") == "heldout"]
    train = [r for r in recs if r.get("kind") == "train"]
    if not heldout:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'} has no held-out evaluation")
    h = heldout[-1]
    return {
        "step": h["step"],
        "heldout_l0": h["l0"],
        "heldout_ev": h["ev"],
        "heldout_l0_per_layer": h["l0_per_layer"],
        "heldout_ev_per_layer": h["ev_per_layer"],
        "train_tokens_per_s": train[-1].get("tokens_per_s") if train else None,
    }


def train_or_reuse(kind: str, coeff: float, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from clt_lens.training import CLTTrainingRunner
    from clt_lens.training.config import dotted, saved_train_config

    run_dir = root / f"{kind}_c{coeff:.4g}"
    cfg = train_config(kind, coeff, run_dir, args)
    final = run_dir / "final"
    seconds = None
    if args.reuse and (final / "cfg.json").is_file():
        saved = saved_train_config(json.loads((run_dir / "train_config.json").read_text()))
        here = dotted(asdict(cfg))
        mismatch = {k: (saved.get(k), here[k]) for k in
                    ("source.model", "clt.cross_layer", "clt.sparsity_coeff", "clt.d_sae",
                     "n_steps", "batch_size", "seed")
                    if saved.get(k) != here[k]}
        if mismatch:
            raise SystemExit(f"--reuse: {run_dir} was trained with a different config "
                             f"(saved, wanted): {mismatch}; drop --reuse or pick another --out")
        print(f"[{kind}] reusing {final}", flush=True)
    else:
        # a fresh run: the metrics log appends, so an old run in the same folder must go
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{kind}] training sparsity_coeff={coeff:.4g} for {args.steps} steps -> {run_dir}",
              flush=True)
        t0 = time.perf_counter()
        CLTTrainingRunner(cfg).run()
        seconds = time.perf_counter() - t0
        (run_dir / "bench_seconds.json").write_text(json.dumps({"train_seconds": seconds}))
    if seconds is None and (run_dir / "bench_seconds.json").is_file():
        seconds = json.loads((run_dir / "bench_seconds.json").read_text())["train_seconds"]
    log = read_log(run_dir)
    print(f"[{kind}] coeff {coeff:.4g}: held-out L0 {log['heldout_l0']:.2f}, "
          f"EV {log['heldout_ev']:.4f}, {seconds or float('nan'):.0f} s", flush=True)
    return {"kind": kind, "sparsity_coeff": coeff, "run_dir": str(run_dir),
            "checkpoint": str(final), "train_seconds": seconds, **log}


def next_coeff(attempts: list[dict[str, Any]], target_l0: float, elasticity: float) -> float:
    """The coefficient predicted to give ``target_l0``, with L0 ~ coeff^(-elasticity) locally."""
    pts = sorted(attempts, key=lambda a: abs(math.log(a["heldout_l0"] / target_l0)))[:2]
    a = pts[0]
    if len(pts) == 2 and pts[0]["sparsity_coeff"] != pts[1]["sparsity_coeff"]:
        b = pts[1]
        slope = (math.log(a["heldout_l0"]) - math.log(b["heldout_l0"])) / (
            math.log(a["sparsity_coeff"]) - math.log(b["sparsity_coeff"]))
        if slope < -0.05:  # only trust a secant that says "more penalty, fewer features"
            elasticity = -slope
    return a["sparsity_coeff"] * (a["heldout_l0"] / target_l0) ** (1 / elasticity)


def train_matched(root: Path, args: argparse.Namespace) -> tuple[dict, dict, list[dict]]:
    clt = train_or_reuse("clt", args.clt_coeff, root, args)
    target = clt["heldout_l0"]
    attempts = [train_or_reuse("plt", args.plt_coeff, root, args)]
    while (abs(attempts[-1]["heldout_l0"] / target - 1) > args.l0_tol
           and len(attempts) < args.max_attempts):
        coeff = float(f"{next_coeff(attempts, target, args.elasticity):.3g}")
        if any(a["sparsity_coeff"] == coeff for a in attempts):
            break
        print(f"[plt] held-out L0 {attempts[-1]['heldout_l0']:.2f} vs CLT {target:.2f}: "
              f"retraining at sparsity_coeff {coeff:.4g}", flush=True)
        attempts.append(train_or_reuse("plt", coeff, root, args))
    plt_run = min(attempts, key=lambda a: abs(math.log(a["heldout_l0"] / target)))
    return clt, plt_run, attempts


# ---- evaluation ------------------------------------------------------------------------------
def evaluate_both(runs: dict[str, dict], model: Any, root: Path, args: argparse.Namespace):
    from clt_lens.evals import evaluate

    out = {}
    for kind in KINDS:
        t0 = time.perf_counter()
        res = evaluate(runs[kind]["checkpoint"], model=model, n_tokens=args.eval_tokens,
                       density_tokens=args.density_tokens, out_dir=root / f"eval_{kind}",
                       progress=args.progress)
        res.pop("density_histogram", None)
        res["eval_seconds"] = time.perf_counter() - t0
        out[kind] = res
        print(f"[{kind}] evaluated in {res['eval_seconds']:.0f} s", flush=True)
    return out


def graphs_both(runs: dict[str, dict], model: Any, prompts: list[str],
                args: argparse.Namespace) -> dict[str, Any]:
    from clt_lens.evals.graph_metrics import evaluate_graphs

    out = {}
    for kind in KINDS:
        t0 = time.perf_counter()
        out[kind] = evaluate_graphs(runs[kind]["checkpoint"], prompts, model=model,
                                    max_feature_nodes=args.max_nodes, n_ablate=args.ablate,
                                    batch_size=args.attr_batch_size, progress=args.progress)
        out[kind]["seconds"] = time.perf_counter() - t0
        print(f"[{kind}] {len(prompts)} graphs in {out[kind]['seconds']:.0f} s", flush=True)
    return out


def prompt_value(row: dict[str, Any], key: str) -> float | None:
    if key.startswith("size_at_completeness_"):
        return row["size_at_completeness"][key.rsplit("_", 1)[1]]
    from clt_lens.evals.graph_metrics import SUMMARY_KEYS

    return SUMMARY_KEYS[key](row)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided p-value of ``wins`` against ``losses`` under a fair coin (ties dropped)."""
    n = wins + losses
    if n == 0:
        return float("nan")
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(graphs: dict[str, Any]) -> dict[str, Any]:
    """CLT minus PLT prompt by prompt for every PAIRED metric."""
    out = {}
    for key, (label, higher_better) in PAIRED.items():
        diffs, wins, losses, ties = [], 0, 0, 0
        for c, p in zip(graphs["clt"]["prompts"], graphs["plt"]["prompts"]):
            vc, vp = prompt_value(c, key), prompt_value(p, key)
            if vc is None or vp is None or vc != vc or vp != vp:
                continue
            d = vc - vp
            diffs.append(d)
            better = d > 0 if higher_better else d < 0
            if d == 0:
                ties += 1
            elif better:
                wins += 1
            else:
                losses += 1
        out[key] = {"label": label, "higher_is_better": higher_better, "n": len(diffs),
                    "median_diff": statistics.median(diffs) if diffs else float("nan"),
                    "mean_diff": sum(diffs) / len(diffs) if diffs else float("nan"),
                    "clt_better": wins, "plt_better": losses, "ties": ties,
                    "sign_test_p": sign_test(wins, losses)}
    return out


def n_params(checkpoint: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint) / "sae_weights.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ---- reporting -------------------------------------------------------------------------------
def _q(summary: dict[str, Any], fmt: str) -> str:
    if not summary.get("n"):
        return f"not reached ({summary.get('missing', 0)})"
    miss = f", {summary['missing']} not reached" if summary.get("missing") else ""
    return (f"{summary['median']:{fmt}} [{summary['q1']:{fmt}}-{summary['q3']:{fmt}}]{miss}")


def print_tables(runs, evals, graphs, pairs) -> None:
    clt_e, plt_e = evals["clt"], evals["plt"]
    L = clt_e["n_layers"]
    print("\nReconstruction per layer (held-out, evaluate):")
    splice = {k: {s["layer"]: s for s in evals[k].get("single_layer_splices", [])} for k in KINDS}
    rows = []
    for l in range(L):
        rows.append([l, clt_e["per_layer"]["fvu"][l], plt_e["per_layer"]["fvu"][l],
                     clt_e["per_layer"]["l0"][l], plt_e["per_layer"]["l0"][l],
                     *(f"{evals[k]['feature_density']['dead_fraction'][l]:.1%}" for k in KINDS),
                     *(f"{splice[k][l]['ce_increase']:+.4f}" if l in splice[k] else "-"
                       for k in KINDS)])
    rows.append(["mean", clt_e["mean"]["fvu"], plt_e["mean"]["fvu"], clt_e["mean"]["l0"],
                 plt_e["mean"]["l0"],
                 *(f"{evals[k]['feature_density']['mean_dead_fraction']:.1%}" for k in KINDS),
                 "", ""])
    print_table(["layer", "FVU CLT", "FVU PLT", "L0 CLT", "L0 PLT", "dead CLT", "dead PLT",
                 "splice dCE CLT", "splice dCE PLT"], rows)

    print("\nReplacement model (all MLP outputs replaced) and training:")
    rc, rp = clt_e["replacement"], plt_e["replacement"]
    win = {k: evals[k].get("training_window") or {} for k in KINDS}
    summary = [
        ["sparsity_coeff", runs["clt"]["sparsity_coeff"], runs["plt"]["sparsity_coeff"]],
        ["parameters", runs["clt"]["n_params"], runs["plt"]["n_params"]],
        ["train seconds", fmt_s(runs["clt"]["train_seconds"]), fmt_s(runs["plt"]["train_seconds"])],
        ["mean L0 (eval)", clt_e["mean"]["l0"], plt_e["mean"]["l0"]],
        ["mean FVU", clt_e["mean"]["fvu"], plt_e["mean"]["fvu"]],
        ["CE original", rc["ce_original"], rp["ce_original"]],
        ["CE replacement", rc["ce_replacement"], rp["ce_replacement"]],
        ["CE zero-ablation", rc["ce_zero_ablation"], rp["ce_zero_ablation"]],
        ["CE recovered", f"{rc['ce_recovered']:.2%}", f"{rp['ce_recovered']:.2%}"],
        ["KL(orig || repl)", rc["kl"], rp["kl"]],
        ["top-1 agreement", f"{rc['top1_agreement']:.2%}", f"{rp['top1_agreement']:.2%}"],
        ["dead, held-out density sample",
         *(f"{evals[k]['feature_density']['mean_dead_fraction']:.1%}" for k in KINDS)],
        ["dead, last training window",
         *(f"{win[k].get('mean_dead_fraction', float('nan')):.1%}" for k in KINDS)],
    ]
    print_table(["metric", "CLT", "PLT"], summary)

    n = graphs["clt"]["settings"]["n_prompts"]
    print(f"\nAttribution graphs over {n} held-out prompts (median [quartiles]):")
    rows = []
    for key, (label, _) in PAIRED.items():
        fmt = ".3f" if key in ("replacement", "completeness") or "spearman" in key else (
            ".2f" if key == "path_length_mean" else ".0f")
        rows.append([label, *(_q(graphs[k]["summary"][key], fmt) for k in KINDS)])
    for name, key in (("pooled influence vs ablation Spearman", "spearman_influence"),
                      ("pooled, strongest features only", "spearman_top"),
                      ("pooled signed prediction vs ablation Spearman", "spearman_signed")):
        rows.append([name, *(f"{graphs[k]['pooled_faithfulness'][key]:.3f} "
                             f"(n={graphs[k]['pooled_faithfulness']['n']})"
                             if graphs[k]["pooled_faithfulness"] else "-" for k in KINDS)])
    rows.append(["path length distribution (mean over prompts)",
                 *(" / ".join(f"{p:.2f}" for p in graphs[k]["path_length_distribution"])
                   for k in KINDS)])
    print_table(["metric", "CLT", "PLT"], rows)

    print("\nPaired over the same prompts (CLT - PLT):")
    print_table(["metric", "median diff", "CLT better", "PLT better", "ties", "sign test p"],
                [[v["label"], v["median_diff"], v["clt_better"], v["plt_better"], v["ties"],
                  v["sign_test_p"]] for v in pairs.values()])


def fmt_s(seconds: float | None) -> str:
    return "reused (unknown)" if seconds is None else f"{seconds:.0f}"


def plot(evals, graphs, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"clt": "tab:blue", "plt": "tab:orange"}
    L = evals["clt"]["n_layers"]
    layers = list(range(L))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0, 0]
    for i, kind in enumerate(KINDS):
        ax.bar([x + (i - 0.5) * 0.4 for x in layers], evals[kind]["per_layer"]["fvu"], width=0.4,
               color=colors[kind], label=f"{kind.upper()} (mean {evals[kind]['mean']['fvu']:.3g},"
               f" L0 {evals[kind]['mean']['l0']:.1f})")
    ax.set_title("held-out FVU per layer (lower is better)")
    ax.set_xlabel("layer")
    ax.set_xticks(layers)
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    keys = ("replacement", "completeness")
    for j, key in enumerate(keys):
        vals = {k: [r[key] for r in graphs[k]["prompts"]] for k in KINDS}
        for a, b in zip(vals["clt"], vals["plt"]):
            ax.plot([2 * j, 2 * j + 1], [a, b], color="0.75", lw=0.7)
        bp = ax.boxplot([vals["clt"], vals["plt"]], positions=[2 * j, 2 * j + 1], widths=0.5,
                        showfliers=False, patch_artist=True)
        for patch, kind in zip(bp["boxes"], KINDS):
            patch.set_facecolor(colors[kind])
            patch.set_alpha(0.5)
    ax.set_xticks([0, 1, 2, 3], ["CLT", "PLT", "CLT", "PLT"])
    ax.set_title("replacement (left) and completeness (right) per prompt,\nunpruned graphs; "
                 "grey lines pair the same prompt", fontsize=10)

    ax = axes[0, 2]
    for i, kind in enumerate(KINDS):
        dist = graphs[kind]["path_length_distribution"]
        mean = graphs[kind]["summary"]["path_length_mean"].get("median", float("nan"))
        ax.bar([k + 1 + (i - 0.5) * 0.4 for k in range(len(dist))], dist, width=0.4,
               color=colors[kind], label=f"{kind.upper()} (median of means {mean:.2f})")
    ax.set_title("input-to-logit path length in the pruned graph\n(share of influence, mean over "
                 "prompts)", fontsize=10)
    ax.set_xlabel("edges on the path")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    levels = graphs["clt"]["settings"]["levels"]
    for i, kind in enumerate(KINDS):
        sm = [graphs[kind]["summary"][f"size_at_completeness_{c}"] for c in levels]
        med = [s.get("median", float("nan")) for s in sm]
        err = [[m - s.get("q1", m) for m, s in zip(med, sm)],
               [s.get("q3", m) - m for m, s in zip(med, sm)]]
        ax.bar([j + (i - 0.5) * 0.4 for j in range(len(levels))], med, width=0.4, yerr=err,
               capsize=3, color=colors[kind], label=kind.upper())
    ax.set_xticks(range(len(levels)), [str(c) for c in levels])
    ax.set_xlabel("completeness reached")
    ax.set_title("feature nodes needed (median, quartiles; fewer is better)", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for kind in KINDS:
        feats = [f for r in graphs[kind]["prompts"] for f in r.get("faithfulness", {}).get(
            "features", [])]
        pooled = graphs[kind]["pooled_faithfulness"].get("spearman_influence", float("nan"))
        per_prompt = graphs[kind]["summary"]["faithfulness_spearman"].get("median", float("nan"))
        ax.scatter([max(f["influence"], 1e-8) for f in feats],
                   [max(abs(f["measured"]), 1e-8) for f in feats], s=8, alpha=0.5,
                   color=colors[kind], label=f"{kind.upper()} Spearman {pooled:.2f} (pooled), "
                   f"{per_prompt:.2f} (median per prompt)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("attributed influence")
    ax.set_ylabel("|measured ablation effect| on the target logits")
    ax.set_title("faithfulness: influence vs ablation effect", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[1, 2]
    for i, kind in enumerate(KINDS):
        fd = evals[kind]["feature_density"]
        ax.bar([x + (i - 0.5) * 0.4 for x in layers], fd["dead_fraction"], width=0.4,
               color=colors[kind], label=f"{kind.upper()} held-out ({fd['n_tokens']:,} tokens)")
        win = (evals[kind].get("training_window") or {}).get("dead_fraction")
        if win:
            ax.plot([x + (i - 0.5) * 0.4 for x in layers], win, "k_", ms=12, mew=2)
    ax.set_title("dead features per layer (bars: held-out sample;\nblack ticks: last training "
                 "window)", fontsize=10)
    ax.set_xlabel("layer")
    ax.set_xticks(layers)
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------
def result_name(model: str) -> str:
    return "clt_vs_plt" if model == "embedded" else "clt_vs_plt_" + re.sub(r"\W+", "_", model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded",
                    help="load_model name or folder (embedded, embedded-deep, ...)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of each transcoder")
    ap.add_argument("--d-sae", type=int, default=1024, help="features per layer (both)")
    ap.add_argument("--batch-size", type=int, default=1024, help="tokens per training step")
    ap.add_argument("--clt-coeff", type=float, default=0.3, help="CLT sparsity_coeff")
    # 0.37 and 0.63: from 200-step pilots on the 4-layer model (CLT 0.3 -> L0 30.8; PLT 0.3 ->
    # 35.1, 0.1 -> 70.2)
    ap.add_argument("--plt-coeff", type=float, default=0.37,
                    help="first PLT sparsity_coeff tried")
    ap.add_argument("--l0-tol", type=float, default=0.10,
                    help="relative held-out L0 difference accepted as matched")
    ap.add_argument("--max-attempts", type=int, default=2, help="PLT trainings at most")
    ap.add_argument("--elasticity", type=float, default=0.63,
                    help="assumed -dlog(L0)/dlog(coeff) for the first correction")
    ap.add_argument("--heldout-tokens", type=int, default=8192,
                    help="held-out tokens of the trainer's evaluation (used for matching)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--density-tokens", type=int, default=131072,
                    help="held-out tokens over which dead features are counted")
    ap.add_argument("--prompts", type=int, default=24, help="held-out prompts attributed")
    ap.add_argument("--max-nodes", type=int, default=None,
                    help="circuit-tracer max_feature_nodes (default: every active feature)")
    ap.add_argument("--ablate", type=int, default=24,
                    help="features ablated per graph for the faithfulness score")
    ap.add_argument("--attr-batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="work folder: checkpoints, eval outputs (default runs/<result name>)")
    ap.add_argument("--reuse", metavar="DIR", default=None,
                    help="work folder whose finished runs are reused instead of retrained")
    ap.add_argument("--name", default=None, help="result file name (default from --model)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    for name in ("steps", "d_sae", "batch_size", "max_attempts", "eval_tokens", "prompts",
                 "heldout_tokens", "threads", "attr_batch_size", "density_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.ablate < 0 or (args.max_nodes is not None and args.max_nodes < 1):
        ap.error("--ablate must be >= 0 and --max-nodes positive")
    if not 0 < args.l0_tol < 1 or args.elasticity <= 0:
        ap.error("--l0-tol must be in (0, 1) and --elasticity positive")
    name = args.name or result_name(args.model)
    root = Path(args.reuse or args.out or f"runs/{name}").resolve()
    if args.reuse and not root.is_dir():
        ap.error(f"--reuse {args.reuse}: no such folder")
    torch.set_num_threads(args.threads)

    from clt_lens.evals.graph_metrics import heldout_prompts
    from clt_lens.models import load_model, model_id

    model = load_model(args.model)  # fails here, before any training, if it cannot load
    prompts = heldout_prompts(args.prompts, tokenizer=model.tokenizer)
    t_all = time.perf_counter()
    load_start = os.getloadavg()  # the machine is shared: timings are only as clean as this
    clt_run, plt_run, attempts = train_matched(root, args)
    runs = {"clt": clt_run, "plt": plt_run}
    for r in runs.values():
        r["n_params"] = n_params(r["checkpoint"])
    evals = evaluate_both(runs, model, root, args)
    t0 = time.perf_counter()
    graphs = graphs_both(runs, model, prompts, args)
    graph_seconds = time.perf_counter() - t0
    pairs = paired(graphs)
    elapsed = time.perf_counter() - t_all

    m = machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
          f"({m['torch_threads']} threads); command: {m['command']}")
    l0_c, l0_p = evals["clt"]["mean"]["l0"], evals["plt"]["mean"]["l0"]
    print(f"model {model_id(model)} ({model.cfg.n_layers} layers); d_sae {args.d_sae}/layer; "
          f"{args.steps} steps x {args.batch_size} tokens each; eval "
          f"{evals['clt']['n_tokens_reconstruction']} held-out tokens; mean L0 CLT {l0_c:.2f} vs "
          f"PLT {l0_p:.2f} ({l0_p / l0_c - 1:+.1%}); PLT attempts: "
          + ", ".join(f"coeff {a['sparsity_coeff']:.4g} -> L0 {a['heldout_l0']:.2f}"
                      for a in attempts))
    print_tables(runs, evals, graphs, pairs)
    print(f"\ntotal {elapsed:.0f} s (graphs {graph_seconds:.0f} s)")

    png = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(evals, graphs, png,
         f"CLT vs per-layer transcoders, {args.model} ({model.cfg.n_layers} layers), "
         f"F={args.d_sae}/layer, {args.steps} steps x {args.batch_size} tokens; mean L0 "
         f"{l0_c:.1f} vs {l0_p:.1f}; {len(prompts)} held-out prompts")
    for kind in KINDS:  # per-feature rows stay in the work folder; the result keeps summaries
        (root / f"graphs_{kind}.json").write_text(json.dumps(graphs[kind], indent=1))
    path = write_result(name, {
        "model": model_id(model),
        "n_layers": model.cfg.n_layers,
        "settings": {k: getattr(args, k) for k in (
            "model", "steps", "d_sae", "batch_size", "clt_coeff", "plt_coeff", "l0_tol",
            "max_attempts", "elasticity", "heldout_tokens", "eval_tokens", "density_tokens",
            "prompts", "max_nodes", "ablate", "attr_batch_size", "seed", "threads")},
        "work_dir": str(root),
        "train_configs": {k: json.loads((Path(runs[k]["run_dir"]) / "train_config.json")
                                        .read_text()) for k in KINDS},
        "runs": runs,
        "plt_attempts": attempts,
        "l0_ratio_plt_over_clt": l0_p / l0_c,
        "eval": evals,
        "prompts": prompts,
        "graphs": {k: {**{kk: v for kk, v in graphs[k].items() if kk != "prompts"},
                       "per_prompt": [{kk: v for kk, v in r.items() if kk != "faithfulness"}
                                      | {"faithfulness": {
                                          kk: v for kk, v in r.get("faithfulness", {}).items()
                                          if kk != "features"}}
                                      for r in graphs[k]["prompts"]]} for k in KINDS},
        "paired": pairs,
        "elapsed_seconds": elapsed,
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        "note": ("train_seconds is wall time on a shared 2-core machine; graph metrics per "
                 "prompt under graphs.*.per_prompt, per-feature ablation rows in "
                 "work_dir/graphs_*.json"),
    })
    print(f"written {path} and {png}")


if __name__ == "__main__":
    main()
