"""Training metrics: JSON lines on disk, optional wandb, and a PNG of the curves."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from clt_lens.errors import InputError

PLOT_FILE = "training_curves.png"


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors to wandb if asked."""

    def __init__(
        self,
        run_dir: Path,
        *,
        use_wandb: bool = False,
        wandb_project: str = "clt-lens",
        wandb_config: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = None
        if enabled and use_wandb:
            if importlib.util.find_spec("wandb") is None:
                raise InputError(
                    "wandb=true but the wandb package is not installed (pip install wandb)"
                )
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=wandb_config or {})

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint's step by the killed run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            ln
            for ln in self.path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", -1) <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
        if self._wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            for k, v in record.items():
                if isinstance(v, list):
                    flat.update({f"{k}/{i}": x for i, x in enumerate(v)})
            self._wandb.log(flat, step=record.get("step"))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_training_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Loss terms, per-layer L0, explained variance and dead fraction against step."""
    recs = read_metrics(metrics_path)
    train = [r for r in recs if r.get("kind") == "train"]
    held = [r for r in recs if r.get("kind") == "heldout"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    steps = [r["step"] for r in train]
    ax = axes[0, 0]
    for key in ("loss", "mse", "sparsity", "preact", "auxk"):
        ys = [r.get(key) for r in train]
        if any(y is not None and y > 0 for y in ys):
            ax.plot(steps, [y if y and y > 0 else math.nan for y in ys], label=key)
    ax.set_yscale("log")
    ax.set_title("loss terms (weighted)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    n_layers = len(train[-1].get("l0_per_layer", []))
    for layer in range(n_layers):
        ax.plot(steps, [r["l0_per_layer"][layer] for r in train], label=f"layer {layer}")
    ax.set_yscale("log")
    ax.set_title("L0 per layer (train batches)")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for layer in range(n_layers):
        ax.plot(
            steps, [r["ev_per_layer"][layer] for r in train], alpha=0.5, label=f"train L{layer}"
        )
    if held:
        hs = [r["step"] for r in held]
        for layer in range(n_layers):
            ax.plot(
                hs,
                [r["ev_per_layer"][layer] for r in held],
                marker="o",
                ms=3,
                label=f"held-out L{layer}",
            )
    lows = [v for r in train + held for v in r["ev_per_layer"]]
    ax.set_ylim(max(min(lows) - 0.05, -1.0), 1.0)
    ax.set_title("explained variance")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1, 1]
    for layer in range(n_layers):
        ax.plot(steps, [r["dead_frac_per_layer"][layer] for r in train], label=f"layer {layer}")
    ax.set_title("dead feature fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png.with_name("." + out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
