"""PNG figures of the benchmark results, drawn from benchmarks/results/*.json.

Each benchmark script calls its plot after writing its JSON; ``python benchmarks/plots.py``
redraws every figure whose JSON exists (no benchmark is rerun).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, name: str, data: dict[str, Any]) -> Path:
    m = data.get("machine", {})
    fig.text(0.01, 0.005, f"{m.get('cores', '?')} cores, torch {m.get('torch', '?')}; "
             f"{m.get('command', '')}", fontsize=7, color="0.4")  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_attribution(data: dict[str, Any]) -> Path:
    """Attribution time and graph size against the node cap, one line per transcoder."""
    plt = _pyplot()
    rows = data["rows"]
    caps = [c for c in data["caps"] if c is not None]
    uncapped_x = max(caps) * 2  # "all active features" drawn one step right of the largest cap
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in data["transcoders"]:
        mine = [r for r in rows if r["transcoder"] == name]
        xs = [uncapped_x if r["cap"] is None else r["cap"] for r in mine]
        axes[0].plot(xs, [r["seconds"] for r in mine], "o-", label=name)
        axes[1].plot(xs, [r["nodes"] for r in mine], "o-", label=f"{name} nodes")
        axes[1].plot(xs, [r["edges"] / 10 for r in mine], "s--", label=f"{name} edges / 10")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([*caps, uncapped_x], [*map(str, caps), "all"])
        ax.set_xlabel("node cap (features attributed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("circuit-tracer attribute() seconds (median over prompts)")
    axes[1].set_ylabel("pruned graph size")
    axes[0].set_title("attribution time vs node cap")
    axes[1].set_title("graph size after pruning")
    return _save(fig, "attribution", data)


def plot_cache(data: dict[str, Any]) -> Path:
    """Size against the worst channel's quantisation error per codec and data set, and the
    reader's speed against the real training step's."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    floor = 1e-9  # lossless codecs have FVU 0: drawn at the floor of the log axis
    markers = {"plain": "o", "outliers": "s", "outliers+BOS": "^"}
    labels = list(dict.fromkeys(c["label"] for c in data.get("codecs", [])))
    for c in data.get("codecs", []):
        color = f"C{labels.index(c['label']) % 10}"
        fvu = max(c["worst_channel_fvu"], floor)
        axes[0].scatter(fvu, c["ratio_vs_fp16"], marker=markers.get(c["data"], "o"),
                        color=color, label=c["label"] if c["data"] == "plain" else None)
    for name, m in markers.items():
        axes[0].scatter([], [], marker=m, color="0.4", label=f"data: {name}")
    axes[0].set_xscale("log")
    axes[0].axvline(1e-3, color="0.5", ls=":", lw=1)
    axes[0].axhline(3, color="0.5", ls=":", lw=1)
    axes[0].set_xlabel("worst channel's quantisation FVU (lossless drawn at 1e-9)")
    axes[0].set_ylabel("compression vs fp16 (x)")
    axes[0].set_title("cache size vs error where a CLT reads it")
    axes[0].legend(fontsize=7)
    reader = data.get("reader", {})
    keys = [("sparse", "sparse step"), ("dense", "dense step"), ("reader1", "reader, 1 thread"),
            ("reader2", "reader, 2 threads")]
    for i, (key, lab) in enumerate(keys):
        xs = [j + 0.2 * i for j in range(len(reader))]
        axes[1].bar(xs, [r["tok_s"][key] for r in reader.values()], width=0.2, label=lab,
                    color=f"C{i}")
    axes[1].set_xticks([j + 0.3 for j in range(len(reader))])
    axes[1].set_xticklabels([f"{n}: L={r['shape']['L']} d={r['shape']['d']} "
                             f"F={r['shape']['F']} B={r['shape']['B']}"
                             for n, r in reader.items()], fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("tokens/s")
    axes[1].set_title("reader vs the real training step (CPU)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, "cache", data)


def plot_train(data: dict[str, Any]) -> Path:
    """Whole-step speed-up over the dense reference against the active fraction."""
    plt = _pyplot()
    rows = data["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        r0 = mine[0]
        label = f"{shape}: L={r0['L']} d={r0['d']} F={r0['F']} B={r0['B']}"
        xs = [100 * r["active_frac"] for r in mine]
        axes[0].plot(xs, [r["speedup_vs_dense"] for r in mine], "o-", label=label)
        axes[1].plot(xs, [r["B"] / r["step_s"] for r in mine], "o-", label=f"{shape} ours")
        if all("torch_ops_step_s" in r for r in mine):  # results from before the C kernels lack it
            axes[1].plot(xs, [r["B"] / r["torch_ops_step_s"] for r in mine], "^:",
                         label=f"{shape} ours, torch's sparse ops")  # fmt: skip
        axes[1].plot(xs, [r["B"] / r["dense_step_s"] for r in mine], "s--",
                     label=f"{shape} dense reference")  # fmt: skip
    axes[0].axhline(3, color="0.5", ls=":", lw=1, label="3x target")
    axes[0].set_ylabel("dense step time / our step time")
    axes[0].set_title("training step speed-up")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("tokens / s (whole step incl. Adam)")
    axes[1].set_title("throughput")
    for ax in axes:
        ax.set_xlabel("active features (% of F per layer)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the data
    fig.tight_layout()
    return _save(fig, "train", data)


PLOTS = {"attribution": plot_attribution, "cache": plot_cache, "train": plot_train}


def plot_result(name: str) -> Path:
    return PLOTS[name](json.loads((RESULTS / f"{name}.json").read_text()))


def main() -> None:
    names = sys.argv[1:] or [n for n in PLOTS if (RESULTS / f"{n}.json").exists()]
    for name in names:
        print(f"written {plot_result(name)}")


if __name__ == "__main__":
    main()
