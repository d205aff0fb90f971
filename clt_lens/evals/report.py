"""Evaluation outputs: eval.json, PNG plots, and the tables as markdown or HTML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clt_lens.evals.metrics import DENSE_THRESHOLD


def eval_tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation as tables: ``{"header", "align" ("l"/"r" per column), "rows" (formatted
    strings), "note"}``; ``markdown_table`` and ``html_tables`` render the same cells."""
    pl = result["per_layer"]
    splices = {s["layer"]: s for s in result.get("single_layer_splices", [])}
    rows = []
    for l in range(result["n_layers"]):
        s = splices.get(l)
        tail = [f"{s['ce_increase']:+.4f}", f"{s['kl']:.4f}"] if s else ["–", "–"]
        rows.append([
            str(l), f"{pl['mse'][l]:.4g}", f"{pl['fvu'][l]:.4f}",
            f"{pl['explained_variance'][l]:.4f}", f"{pl['l0'][l]:.1f}",
            f"{pl['dead_fraction'][l]:.1%}", f"{pl['dense_fraction'][l]:.1%}", *tail,
        ])
    n = result.get("n_tokens_reconstruction")
    note = (f"dead: no activation in these {n:,} tokens (rare features count too); "
            f"dense: firing on more than {DENSE_THRESHOLD:.0%} of them.") if n else ""
    r = result["replacement"]
    return [
        {"header": ["layer", "MSE", "FVU", "EV", "L0", "dead", "dense", "CE +Δ (splice)",
                    "KL (splice)"],
         "align": ["r"] * 9, "rows": rows, "note": note},
        {"header": ["replacement model", "value"], "align": ["l", "r"], "note": "", "rows": [
            ["CE original", f"{r['ce_original']:.4f}"],
            ["CE replacement (all MLPs)", f"{r['ce_replacement']:.4f}"],
            ["CE all MLPs zero-ablated", f"{r['ce_zero_ablation']:.4f}"],
            ["CE recovered", f"{r['ce_recovered']:.1%}"],
            ["KL(original ‖ replacement)", f"{r['kl']:.4f}"],
            ["top-1 agreement", f"{r['top1_agreement']:.1%}"],
        ]},
        *_density_tables(result), *_graph_tables(result),
    ]


def _pct(values: list[float]) -> str:
    return " / ".join(f"{v:.1%}" for v in values)


def _density_tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    fd, tw = result.get("feature_density"), result.get("training_window")
    rows = []
    if fd:
        rows.append([f"dead on {fd['n_tokens']:,} {result.get('split', 'held-out')} tokens",
                     _pct(fd["dead_fraction"]), f"{fd['mean_dead_fraction']:.1%}"])
        rows.append(["firing on fewer than 1e-4 of them", _pct(fd["rare_fraction_1e-4"]), ""])
    if tw:
        rows.append([f"dead in the training window ({tw['window_tokens']:,} tokens, step "
                     f"{tw['step']})", _pct(tw["dead_fraction"]),
                     f"{tw['mean_dead_fraction']:.1%}"])
    if not rows:
        return []
    return [{"header": ["feature density", "per layer", "mean"], "align": ["l", "r", "r"],
             "rows": rows, "note": ""}]


def _graph_tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    g = result.get("graphs")
    if not g:
        return []
    sm, st = g["summary"], g["settings"]

    def cell(key: str, fmt: str = ".3f") -> str:
        v = sm.get(key, {})
        if not v.get("n"):
            return f"not reached on {v['missing']} of {v['missing']}" if v.get("missing") else "–"
        return (f"{v['median']:{fmt}} [{v['q1']:{fmt}}, {v['q3']:{fmt}}]"
                + (f" (not reached on {v['missing']})" if v.get("missing") else ""))

    cap = st["max_feature_nodes"] or "all"
    rows = [
        ["replacement score (unpruned)", cell("replacement")],
        ["completeness (unpruned)", cell("completeness")],
        ["mean path length, input to logit (pruned)", cell("path_length_mean", ".2f")],
        ["feature nodes after pruning", cell("pruned_feature_nodes", ".0f")],
    ]
    rows += [[f"feature nodes for completeness {c}", cell(f"size_at_completeness_{c}", ".0f")]
             for c in st["levels"]]
    if st.get("n_ablate"):
        rows.append(["influence vs ablation effect, Spearman (per prompt)",
                     cell("faithfulness_spearman")])
        rows.append(["same, strongest features only (per prompt)",
                     cell("faithfulness_spearman_top")])
        pooled = g.get("pooled_faithfulness", {})
        if pooled:
            rows.append([f"same, pooled over {pooled['n']} features (strongest only)",
                         f"{pooled['spearman_influence']:.3f} ({pooled['spearman_top']:.3f})"])
    header = (f"attribution graphs ({st['n_prompts']} prompts, {cap} feature nodes; "
              "median [quartiles])")
    return [{"header": [header, "value"], "align": ["l", "r"], "rows": rows, "note": ""}]


def markdown_table(result: dict[str, Any]) -> str:
    lines: list[str] = []
    for table in eval_tables(result):
        if lines:
            lines.append("")
        lines.append("| " + " | ".join(table["header"]) + " |")
        lines.append("|" + "|".join("---:" if a == "r" else "---" for a in table["align"]) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
        if table["note"]:
            lines += ["", table["note"]]
    return "\n".join(lines)


def html_tables(result: dict[str, Any]) -> str:
    """The evaluation tables as HTML ``<table>`` elements (cells escaped)."""
    import html

    out = []
    for table in eval_tables(result):
        style = ['' if a == "l" else ' class="num"' for a in table["align"]]
        head = "".join(f"<th{c}>{html.escape(h)}</th>" for h, c in zip(table["header"], style))
        body = "".join(
            "<tr>" + "".join(f"<td{c}>{html.escape(v)}</td>" for v, c in zip(row, style)) + "</tr>"
            for row in table["rows"]
        )
        out.append(f'<table class="eval"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                   "</table>")
        if table["note"]:
            out.append(f'<p class="note">{html.escape(table["note"])}</p>')
    return "\n".join(out)


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
    if result.get("graphs"):
        paths["graphs_png"] = out_dir / "graphs.png"
        plot_graphs({"": result["graphs"]}, paths["graphs_png"])
    return paths


def plot_graphs(graphs: dict[str, dict[str, Any]], path: Path, title: str = "") -> None:
    """Per-prompt graph metrics of one or more transcoder sets (``evaluate_graphs`` results,
    keyed by label): replacement, completeness, mean path length, the path-length distribution
    and the graph size at each completeness level; one point per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(graphs)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.9))
    panels = (("replacement", "replacement score (unpruned)"),
              ("completeness", "completeness (unpruned)"),
              ("path_length_mean", "mean path length (pruned)"))
    for ax, (key, name) in zip(axes, panels):
        data = [[v for v in (_prompt_value(r, key) for r in graphs[k]["prompts"])
                 if v is not None and v == v] for k in labels]
        ax.boxplot(data, showfliers=False)
        for i, vals in enumerate(data):
            jitter = [i + 1 + 0.08 * ((j % 5) - 2) for j in range(len(vals))]
            ax.plot(jitter, vals, "o", ms=3, alpha=0.6)
        ax.set_xticks(range(1, len(labels) + 1), [k or "all" for k in labels])
        ax.set_title(name, fontsize=10)
    ax = axes[3]
    levels = graphs[labels[0]]["settings"]["levels"]
    width = 0.8 / max(len(labels), 1)
    for i, k in enumerate(labels):
        sm = graphs[k]["summary"]
        med = [sm.get(f"size_at_completeness_{c}", {}).get("median", float("nan")) for c in levels]
        ax.bar([j + (i - (len(labels) - 1) / 2) * width for j in range(len(levels))], med,
               width=width, label=k or None)
    ax.set_xticks(range(len(levels)), [str(c) for c in levels])
    ax.set_xlabel("completeness")
    ax.set_title("feature nodes needed (median)", fontsize=10)
    if any(labels):
        ax.legend(fontsize=8)
    for a in axes:
        a.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _prompt_value(row: dict[str, Any], key: str) -> float | None:
    if key == "path_length_mean":
        return row["path_length"]["mean"]
    return row.get(key)
