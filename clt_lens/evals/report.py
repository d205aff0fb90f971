"""Evaluation outputs: eval.json, PNG plots and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clt_lens.evals.metrics import DENSE_THRESHOLD


def markdown_table(result: dict[str, Any]) -> str:
    pl = result["per_layer"]
    splices = {s["layer"]: s for s in result.get("single_layer_splices", [])}
    lines = [
        "| layer | MSE | FVU | EV | L0 | dead | dense | CE +Δ (splice) | KL (splice) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for l in range(result["n_layers"]):
        s = splices.get(l)
        tail = f"{s['ce_increase']:+.4f} | {s['kl']:.4f}" if s else "– | –"
        lines.append(
            f"| {l} | {pl['mse'][l]:.4g} | {pl['fvu'][l]:.4f} | {pl['explained_variance'][l]:.4f} "
            f"| {pl['l0'][l]:.1f} | {pl['dead_fraction'][l]:.1%} | {pl['dense_fraction'][l]:.1%} "
            f"| {tail} |"
        )
    n = result.get("n_tokens_reconstruction")
    if n:
        lines += ["", f"dead: no activation in these {n:,} tokens (rare features count too); "
                  f"dense: firing on more than {DENSE_THRESHOLD:.0%} of them."]
    r = result["replacement"]
    lines += [
        "",
        "| replacement model | value |",
        "|---|---:|",
        f"| CE original | {r['ce_original']:.4f} |",
        f"| CE replacement (all MLPs) | {r['ce_replacement']:.4f} |",
        f"| CE all MLPs zero-ablated | {r['ce_zero_ablation']:.4f} |",
        f"| CE recovered | {r['ce_recovered']:.1%} |",
        f"| KL(original ‖ replacement) | {r['kl']:.4f} |",
        f"| top-1 agreement | {r['top1_agreement']:.1%} |",
    ]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "eval.json",
        "table": out_dir / "eval.md",
        "layers_png": out_dir / "eval_layers.png",
        "density_png": out_dir / "density.png",
    }
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["table"].write_text(markdown_table(result) + "\n")
    pl, L = result["per_layer"], result["n_layers"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    layers = list(range(L))
    axes[0].bar(layers, pl["fvu"], color="tab:red")
    axes[0].set_title("fraction of variance unexplained")
    axes[1].bar(layers, pl["l0"], color="tab:blue")
    axes[1].set_title("L0 (active features per token)")
    axes[2].bar([x - 0.2 for x in layers], pl["dead_fraction"], width=0.4, label="dead")
    axes[2].bar([x + 0.2 for x in layers], pl["dense_fraction"], width=0.4, label="dense (>10%)")
    axes[2].set_title("dead / dense feature fraction")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["layers_png"], dpi=90)
    plt.close(fig)
    h = result["density_histogram"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    edges = h["log10_freq_edges"]
    ax.bar(
        edges[:-1], h["counts"], width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge"
    )
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"feature density ({h['dead']} dead not shown)")
    fig.tight_layout()
    fig.savefig(paths["density_png"], dpi=90)
    plt.close(fig)
    return paths
