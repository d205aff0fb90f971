"""Cross-layer transcoder vs per-layer transcoders at matched L0 on the embedded model.

    python benchmarks/clt_vs_plt.py                         # train both (~5 min each), compare
    python benchmarks/clt_vs_plt.py --reuse runs/clt_vs_plt # reuse the trained checkpoints
    python benchmarks/clt_vs_plt.py --steps 300 --prompts 2 --caps 200

The comparison the CLT papers make: a CLT (each feature reads one layer and writes to it and
every later layer) and a set of per-layer transcoders (PLT: each feature writes only to its
own layer), same features per layer, trained on the same stream with the same schedule from
the packaged ``demo`` config, at matched held-out mean L0. The CLT is trained at
``--clt-coeff``; the PLT at ``--plt-coeff``, and if its held-out L0 (the trainer's last
held-out evaluation) is more than ``--l0-tol`` away from the CLT's, it is retrained at a
corrected coefficient (log-log secant on the attempts so far; with one attempt, the assumed
elasticity ``--elasticity`` of L0 to the coefficient) up to ``--max-attempts`` times; the
attempt closest in L0 is used and all attempts are recorded.

Then both are evaluated by ``clt_lens.evals.evaluate`` on ``--eval-tokens`` held-out tokens
(per-layer FVU, L0, dead features, single-layer splice CE; replacement-model CE recovered, KL,
top-1 agreement), and the same prompts are attributed with circuit-tracer through both at each
``--caps`` max_feature_nodes (nodes and edges left after pruning, replacement and completeness
scores, attribution time).

Writes benchmarks/results/clt_vs_plt.json and clt_vs_plt.png; checkpoints, eval outputs and the
graphs (viewable with ``clt-lens serve``) stay under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution import PROMPTS as BASE_PROMPTS  # noqa: E402
from attribution import bench_transcoder, parse_caps  # noqa: E402
from common import RESULTS, machine, print_table, write_result  # noqa: E402

PROMPTS = [
    *BASE_PROMPTS,
    "O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy",
    "All the world's a stage, and all the men and women merely",
]
KINDS = ("clt", "plt")


# ---- training -----------------------------------------------------------------------------
def train_config(kind: str, coeff: float, run_dir: Path, args: argparse.Namespace):
    """The packaged demo config with this benchmark's schedule, for a CLT or a PLT."""
    from clt_lens.config import load_config
    from clt_lens.training.cli import resolve_config_path
    from clt_lens.training.config import TrainConfig

    overrides = {
        "cross_layer": kind == "clt",
        "sparsity_coeff": coeff,
        "d_sae": args.d_sae,
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

    run_dir = root / f"{kind}_c{coeff:.4g}"
    cfg = train_config(kind, coeff, run_dir, args)
    final = run_dir / "final"
    seconds = None
    if args.reuse and (final / "cfg.json").is_file():
        saved = json.loads((run_dir / "train_config.json").read_text())
        mismatch = {k: (saved.get(k), getattr(cfg, k)) for k in
                    ("cross_layer", "sparsity_coeff", "d_sae", "n_steps", "batch_size", "seed")
                    if saved.get(k) != getattr(cfg, k)}
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


# ---- evaluation and attribution ------------------------------------------------------------
def evaluate_both(runs: dict[str, dict], model: Any, root: Path, args: argparse.Namespace):
    from clt_lens.evals import evaluate

    out = {}
    for kind in KINDS:
        t0 = time.perf_counter()
        res = evaluate(runs[kind]["checkpoint"], model=model, n_tokens=args.eval_tokens,
                       out_dir=root / f"eval_{kind}", progress=args.progress)
        res.pop("density_histogram", None)
        res["eval_seconds"] = time.perf_counter() - t0
        out[kind] = res
        print(f"[{kind}] evaluated in {res['eval_seconds']:.0f} s", flush=True)
    return out


def attribute_both(runs: dict[str, dict], model: Any, prompts: list[str],
                   caps: list[int | None], root: Path, args: argparse.Namespace):
    graphs = root / "graphs"
    graphs.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        rows += bench_transcoder(kind, runs[kind]["checkpoint"], model, prompts, caps,
                                 args.attr_batch_size, graphs, repeats=args.repeats)
    return rows


def n_params(checkpoint: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint) / "sae_weights.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ---- reporting ---------------------------------------------------------------------------
def print_tables(runs, evals, attr_rows, prompts) -> None:
    clt_e, plt_e = evals["clt"], evals["plt"]
    L = clt_e["n_layers"]
    print("\nReconstruction per layer (held-out, evaluate):")
    splice = {k: {s["layer"]: s for s in evals[k].get("single_layer_splices", [])} for k in KINDS}
    rows = []
    for l in range(L):
        rows.append([l, clt_e["per_layer"]["fvu"][l], plt_e["per_layer"]["fvu"][l],
                     clt_e["per_layer"]["l0"][l], plt_e["per_layer"]["l0"][l],
                     f"{clt_e['per_layer']['dead_fraction'][l]:.1%}",
                     f"{plt_e['per_layer']['dead_fraction'][l]:.1%}",
                     *(f"{splice[k][l]['ce_increase']:+.4f}" if l in splice[k] else "-"
                       for k in KINDS)])
    rows.append(["mean", clt_e["mean"]["fvu"], plt_e["mean"]["fvu"], clt_e["mean"]["l0"],
                 plt_e["mean"]["l0"], f"{clt_e['mean']['dead_fraction']:.1%}",
                 f"{plt_e['mean']['dead_fraction']:.1%}", "", ""])
    print_table(["layer", "FVU CLT", "FVU PLT", "L0 CLT", "L0 PLT", "dead CLT", "dead PLT",
                 "splice dCE CLT", "splice dCE PLT"], rows)

    print("\nReplacement model (all MLP outputs replaced) and training:")
    rc, rp = clt_e["replacement"], plt_e["replacement"]
    summary = [
        ["sparsity_coeff", runs["clt"]["sparsity_coeff"], runs["plt"]["sparsity_coeff"]],
        ["parameters", runs["clt"]["n_params"], runs["plt"]["n_params"]],
        ["train seconds", fmt_s(runs["clt"]["train_seconds"]), fmt_s(runs["plt"]["train_seconds"])],
        ["mean L0 (eval)", clt_e["mean"]["l0"], plt_e["mean"]["l0"]],
        ["mean FVU", clt_e["mean"]["fvu"], plt_e["mean"]["fvu"]],
        ["mean explained variance", clt_e["mean"]["explained_variance"],
         plt_e["mean"]["explained_variance"]],
        ["CE original", rc["ce_original"], rp["ce_original"]],
        ["CE replacement", rc["ce_replacement"], rp["ce_replacement"]],
        ["CE zero-ablation", rc["ce_zero_ablation"], rp["ce_zero_ablation"]],
        ["CE recovered", f"{rc['ce_recovered']:.2%}", f"{rp['ce_recovered']:.2%}"],
        ["KL(orig || repl)", rc["kl"], rp["kl"]],
        ["top-1 agreement", f"{rc['top1_agreement']:.2%}", f"{rp['top1_agreement']:.2%}"],
    ]
    print_table(["metric", "CLT", "PLT"], summary)

    print("\nAttribution graphs (circuit-tracer; medians over prompts; pruned at node 0.8 / "
          "edge 0.98; attribute s = fastest of --repeats):")
    by = {(r["transcoder"], r["cap"]): r for r in attr_rows}
    caps = list(dict.fromkeys(r["cap"] for r in attr_rows))
    rows = []
    for cap in caps:
        for kind in KINDS:
            r = by[(kind, cap)]
            rows.append(["all" if cap is None else cap, kind.upper(), r["active"], r["attributed"],
                         r["nodes"], r["edges"], r["replacement"], r["completeness"],
                         r["seconds"], r["l0"]])
    print_table(["cap", "transcoder", "active", "attributed", "nodes", "edges", "replacement",
                 "completeness", "attribute s", "L0 on prompt"], rows)

    print("\nPer prompt (CLT / PLT):")
    rows = []
    for cap in caps:
        for k, prompt in enumerate(prompts):
            c, p = by[("clt", cap)]["runs"][k], by[("plt", cap)]["runs"][k]
            rows.append(["all" if cap is None else cap, f"{k}: {prompt[:24]}",
                         f"{c['active']} / {p['active']}", f"{c['nodes']} / {p['nodes']}",
                         f"{c['edges']} / {p['edges']}",
                         f"{c['replacement']:.3f} / {p['replacement']:.3f}",
                         f"{c['completeness']:.3f} / {p['completeness']:.3f}",
                         f"{c['seconds']:.2f} / {p['seconds']:.2f}"])
    print_table(["cap", "prompt", "active", "nodes", "edges", "replacement", "completeness",
                 "attribute s"], rows)


def fmt_s(seconds: float | None) -> str:
    return "reused (unknown)" if seconds is None else f"{seconds:.0f}"


def plot(evals, attr_rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"clt": "tab:blue", "plt": "tab:orange"}
    L = evals["clt"]["n_layers"]
    layers = list(range(L))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, key, label in ((axes[0, 0], "fvu", "FVU per layer (lower is better)"),
                           (axes[0, 1], "l0", "L0 per layer (active features / token)")):
        for i, kind in enumerate(KINDS):
            vals = evals[kind]["per_layer"][key]
            mean = evals[kind]["mean"][key]
            ax.bar([x + (i - 0.5) * 0.4 for x in layers], vals, width=0.4, color=colors[kind],
                   label=f"{kind.upper()} (mean {mean:.3g})")
        ax.set_title(label)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.legend()
    ax = axes[0, 2]
    for i, kind in enumerate(KINDS):
        sp = evals[kind].get("single_layer_splices", [])
        ax.bar([s["layer"] + (i - 0.5) * 0.4 for s in sp], [s["ce_increase"] for s in sp],
               width=0.4, color=colors[kind], label=kind.upper())
    rc = {k: evals[k]["replacement"] for k in KINDS}
    ax.set_title("CE increase, one layer spliced (nats)\nall layers: "
                 + ", ".join(f"{k.upper()} {rc[k]['ce_replacement'] - rc[k]['ce_original']:+.3f}"
                             for k in KINDS), fontsize=10)
    ax.set_xlabel("layer")
    ax.set_xticks(layers)
    ax.legend()
    caps = list(dict.fromkeys(r["cap"] for r in attr_rows))
    xs = list(range(len(caps)))
    by = {(r["transcoder"], r["cap"]): r for r in attr_rows}
    for ax, key, label in ((axes[1, 0], "nodes", "graph nodes after pruning (median)"),
                           (axes[1, 1], "edges", "graph edges after pruning (median)")):
        for i, kind in enumerate(KINDS):
            ax.bar([x + (i - 0.5) * 0.4 for x in xs], [by[(kind, c)][key] for c in caps],
                   width=0.4, color=colors[kind], label=kind.upper())
        ax.set_title(label)
        ax.set_xlabel("max_feature_nodes")
        ax.set_xticks(xs, ["all" if c is None else str(c) for c in caps])
        ax.legend()
    ax = axes[1, 2]
    for kind in KINDS:
        for key, style in (("replacement", "o-"), ("completeness", "s--")):
            ax.plot(xs, [by[(kind, c)][key] for c in caps], style, color=colors[kind],
                    label=f"{kind.upper()} {key}")
    ax.set_title("graph scores (median)")
    ax.set_xlabel("max_feature_nodes")
    ax.set_xticks(xs, ["all" if c is None else str(c) for c in caps])
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps of each transcoder")
    ap.add_argument("--d-sae", type=int, default=1024, help="features per layer (both)")
    ap.add_argument("--batch-size", type=int, default=1024, help="tokens per training step")
    ap.add_argument("--clt-coeff", type=float, default=0.3, help="CLT sparsity_coeff")
    # 0.37 and 0.63: from 200-step pilots (CLT 0.3 -> L0 30.8; PLT 0.3 -> 35.1, 0.1 -> 70.2)
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
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"1-{len(PROMPTS)}")
    ap.add_argument("--caps", default="200,none", help="max_feature_nodes values; none = all")
    ap.add_argument("--attr-batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3,
                    help="attribute each (prompt, cap) this often; the fastest time counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/clt_vs_plt",
                    help="work folder: checkpoints, eval outputs, graphs")
    ap.add_argument("--reuse", metavar="DIR", default=None,
                    help="work folder whose finished runs are reused instead of retrained")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    for name in ("steps", "d_sae", "batch_size", "max_attempts", "eval_tokens", "prompts",
                 "heldout_tokens", "threads", "attr_batch_size", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 < args.l0_tol < 1 or args.elasticity <= 0:
        ap.error("--l0-tol must be in (0, 1) and --elasticity positive")
    caps = parse_caps(args.caps)
    prompts = PROMPTS[: min(args.prompts, len(PROMPTS))]
    root = Path(args.reuse or args.out).resolve()
    if args.reuse and not root.is_dir():
        ap.error(f"--reuse {args.reuse}: no such folder")
    torch.set_num_threads(args.threads)

    from clt_lens.models import load_model, model_id

    t_all = time.perf_counter()
    load_start = os.getloadavg()  # the machine is shared: timings are only as clean as this
    clt_run, plt_run, attempts = train_matched(root, args)
    runs = {"clt": clt_run, "plt": plt_run}
    for r in runs.values():
        r["n_params"] = n_params(r["checkpoint"])
    model = load_model("embedded")
    evals = evaluate_both(runs, model, root, args)
    t0 = time.perf_counter()
    attr_rows = attribute_both(runs, model, prompts, caps, root, args)
    attr_seconds = time.perf_counter() - t0
    elapsed = time.perf_counter() - t_all

    m = machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
          f"({m['torch_threads']} threads); command: {m['command']}")
    l0_c, l0_p = evals["clt"]["mean"]["l0"], evals["plt"]["mean"]["l0"]
    print(f"model {model_id(model)}; d_sae {args.d_sae}/layer; {args.steps} steps x "
          f"{args.batch_size} tokens each; eval {evals['clt']['n_tokens_reconstruction']} "
          f"held-out tokens; mean L0 CLT {l0_c:.2f} vs PLT {l0_p:.2f} "
          f"({l0_p / l0_c - 1:+.1%}); PLT attempts: "
          + ", ".join(f"coeff {a['sparsity_coeff']:.4g} -> L0 {a['heldout_l0']:.2f}"
                      for a in attempts))
    print_tables(runs, evals, attr_rows, prompts)
    print(f"\ntotal {elapsed:.0f} s (attribution {attr_seconds:.0f} s)")

    png = RESULTS / "clt_vs_plt.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(evals, attr_rows, png,
         f"CLT vs per-layer transcoders, embedded 4-layer model, F={args.d_sae}/layer, "
         f"{args.steps} steps; mean L0 {l0_c:.1f} vs {l0_p:.1f}")
    path = write_result("clt_vs_plt", {
        "model": model_id(model),
        "settings": {k: getattr(args, k) for k in (
            "steps", "d_sae", "batch_size", "clt_coeff", "plt_coeff", "l0_tol", "max_attempts",
            "elasticity", "heldout_tokens", "eval_tokens", "attr_batch_size", "repeats", "seed",
            "threads")},
        "work_dir": str(root),
        "train_configs": {k: json.loads((Path(runs[k]["run_dir"]) / "train_config.json")
                                        .read_text()) for k in KINDS},
        "runs": runs,
        "plt_attempts": attempts,
        "l0_ratio_plt_over_clt": l0_p / l0_c,
        "eval": evals,
        "prompts": prompts,
        "caps": caps,
        "attribution": attr_rows,
        "attribution_medians": {
            kind: {str(r["cap"]): {k: r[k] for k in ("nodes", "edges", "replacement",
                                                      "completeness", "seconds", "active")}
                   for r in attr_rows if r["transcoder"] == kind} for kind in KINDS},
        "elapsed_seconds": elapsed,
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        "note": ("train_seconds is wall time on a shared 2-core machine; attribution rows are "
                 "medians over prompts, 'seconds' is circuit-tracer attribute() only, fastest of "
                 "'repeats'"),
    })
    print(f"written {path} and {png}")


if __name__ == "__main__":
    main()
