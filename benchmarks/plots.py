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


def _codec_label(c: dict[str, Any]) -> str:
    label = c["codec"] + (f"+zstd{c['zstd_level']}" if c["zstd_level"] else "")
    if c["codec"] == "errbound":
        label += f" {c.get('allocation', '')}{' pred' if c.get('predict') else ''}"
        label += f" {c.get('target_fvu', '')}"
    return label


def plot_cache(data: dict[str, Any]) -> Path:
    """Size against quantisation error, and decode speed against size, per codec."""
    plt = _pyplot()
    codecs = data["codecs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    floor = 1e-9  # lossless codecs have FVU 0: drawn at the floor of the log axis
    for c in codecs:
        label = _codec_label(c)
        axes[0].scatter(max(c["max_fvu"], floor), c["ratio_vs_fp16"])
        axes[0].annotate(label, (max(c["max_fvu"], floor), c["ratio_vs_fp16"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")  # fmt: skip
        axes[1].scatter(c["ratio_vs_fp16"], c["reader_tok_s"])
        axes[1].annotate(label, (c["ratio_vs_fp16"], c["reader_tok_s"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")  # fmt: skip
    axes[0].set_xscale("log")
    axes[0].axvline(1e-3, color="0.5", ls=":", lw=1)
    axes[0].set_xlabel("worst per-layer quantisation FVU (lossless drawn at 1e-9)")
    axes[0].set_ylabel("compression vs fp16 (x)")
    axes[0].set_title("cache size vs error")
    trainer = data.get("trainer_standin", {}).get("tok_s")
    if trainer:
        axes[1].axhline(trainer, color="C3", ls="--", lw=1, label="trainer consumes (demo shape)")
        axes[1].legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("compression vs fp16 (x)")
    axes[1].set_ylabel("reader tokens/s (1 thread)")
    axes[1].set_title("read speed vs size")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, "cache", data)


def plot_train(data: dict[str, Any]) -> Path:
    """Whole-step speed-up over the dense reference against the active fraction."""
    plt = _pyplot()
    rows = data["results"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        r0 = mine[0]
        label = f"{shape}: L={r0['L']} d={r0['d']} F={r0['F']} B={r0['B']}"
        xs = [100 * r["active_frac"] for r in mine]
        axes[0].plot(xs, [r["speedup_vs_dense"] for r in mine], "o-", label=label)
        axes[1].plot(xs, [r["B"] / r["step_s"] for r in mine], "o-", label=f"{shape} ours")
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
        ax.legend(fontsize=8)
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
