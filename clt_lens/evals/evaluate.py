"""``evaluate``: how good a CLT is, in the numbers the field reports.

Per layer: MSE, fraction of variance unexplained, explained variance, L0, dead and dense
feature fractions, and the feature-density histogram. For the replacement model (every MLP
output replaced by the CLT's reconstruction): the cross-entropy next to the original model's
and the all-MLPs-zero-ablated model's, the fraction of CE recovered, KL(original || replacement)
and next-token top-1 agreement; the same for each single-layer splice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clt_lens.clt.loading import check_compatible, load_clt, model_for, training_dataset
from clt_lens.errors import CLTLensError
from clt_lens.evals.metrics import CEStats, LayerStats, ce_recovered, kl_div, token_ce
from clt_lens.source_config import CheckpointSourceConfig


class EvalError(CLTLensError, ValueError):
    """The checkpoint, model or data cannot be evaluated together."""


@torch.no_grad()
def evaluate(
    clt: Any,
    *,
    model: Any = None,
    dataset: str | None = None,
    split: str = "heldout",
    context_size: int | None = None,
    input_hook: str = "auto",
    output_hook: str = "auto",
    n_tokens: int = 16384,
    batch_size: int = 16,
    single_layer_splices: bool = True,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    progress: bool = True,
    density_tokens: int = 0,
    graph_prompts: int | Sequence[str] = 0,
    graph_max_feature_nodes: int | None = None,
    graph_ablate: int = 24,
) -> dict[str, Any]:
    """Evaluate a CLT on held-out tokens; write eval.json + plots to ``out_dir`` if given.

    ``model``, ``dataset``, ``split``, ``context_size``, ``input_hook``, ``output_hook``: the
    fields of :class:`~clt_lens.source_config.CheckpointSourceConfig` (the ``source`` section of
    ``clt-lens eval``); ``model`` may also be a HookedTransformer. Unset, they are what the CLT
    was trained on; hooks other than the CLT's own are refused before the model is loaded.
    ``density_tokens`` > 0: also count feature firing over that many tokens of ``split`` (at
    most what the split has): ``feature_density``. ``graph_prompts``: a number of held-out
    prompts (``heldout_prompts``) or a list of prompts to attribute: ``graphs``, with
    ``graph_max_feature_nodes`` (circuit-tracer's cap; None = every active feature) and
    ``graph_ablate`` features ablated per graph for the faithfulness score.
    """
    from clt_lens.activations import collect_activations
    from clt_lens.clt.splice import run_with_clt
    from clt_lens.data import load_tokens

    source = CheckpointSourceConfig(
        model=None if model is None or not isinstance(model, str | Path) else str(model),
        dataset=dataset, split=split, context_size=context_size, input_hook=input_hook,
        output_hook=output_hook,
    )
    source.validate()
    dataset = dataset or training_dataset(clt) or "embedded"
    clt_path = clt if isinstance(clt, (str, Path)) else None
    clt = load_clt(clt, device=device)
    hooks = source.trained_hooks(*_hook_names(clt))  # before the model is loaded
    by_name = model is None or isinstance(model, str | Path)
    model, model_name = model_for(clt, model, device)
    check_compatible(clt, model, model_name if by_name else None)
    if n_tokens <= 0:
        raise EvalError(f"n_tokens must be positive, got {n_tokens}")
    if density_tokens < 0:
        raise EvalError(f"density_tokens must be >= 0, got {density_tokens}")
    if isinstance(graph_prompts, int) and graph_prompts < 0:
        raise EvalError(f"graph_prompts must be >= 0 or a list of prompts, got {graph_prompts}")
    if graph_ablate < 0 or (graph_max_feature_nodes is not None and graph_max_feature_nodes < 1):
        raise EvalError("graph_ablate must be >= 0 and graph_max_feature_nodes positive or None")
    window = training_window_deadness(clt_path)
    if context_size is not None and context_size > model.cfg.n_ctx:
        raise EvalError(f"source.context_size {context_size} exceeds the model's "
                        f"n_ctx={model.cfg.n_ctx}")
    ctx = int(context_size or getattr(clt.cfg.metadata, "context_size", None) or model.cfg.n_ctx)
    ctx = min(ctx, model.cfg.n_ctx)
    n_seq = -(-n_tokens // ctx)
    tokens = load_tokens(
        dataset,
        tokenizer=model.tokenizer,
        context_size=ctx,
        split=split,
        max_tokens=n_seq * ctx,
        shuffle=False,
    )
    if tokens.numel() == 0:
        raise EvalError(f"dataset {dataset!r} split {split!r} is empty")
    if tokens.shape[0] < n_seq:
        raise EvalError(
            f"dataset {dataset!r} split {split!r} has {tokens.numel()} tokens, fewer than the "
            f"{n_seq * ctx} requested; ask for at most {tokens.numel()} tokens"
        )
    L, F, d = clt.cfg.n_layers, clt.cfg.d_sae, clt.cfg.d_in
    layer_stats = LayerStats(L, F, d)
    ce = CEStats()
    zero_hooks = [
        (f"blocks.{l}.{hooks.output_hook}", lambda t, hook: torch.zeros_like(t)) for l in range(L)
    ]
    model.eval()
    clt.eval()
    batches = tokens.split(batch_size)
    for toks in tqdm(batches, desc="eval", disable=not progress, unit="batch"):
        toks = toks.to(device)
        logits = model(toks)
        x, y = collect_activations(model, toks, hooks)
        acts = clt.encode(x)
        y_hat = clt.decode(acts, x)
        layer_stats.update(y, y_hat, acts)
        repl = run_with_clt(model, clt, toks)
        zero = model.run_with_hooks(toks, fwd_hooks=zero_hooks)
        ce.n += toks.shape[0] * (toks.shape[1] - 1)
        ce.add("ce_original", token_ce(logits, toks))
        ce.add("ce_replacement", token_ce(repl, toks))
        ce.add("ce_zero_ablation", token_ce(zero, toks))
        ce.add("kl", kl_div(logits, repl))
        ce.add("top1_agreement", (logits[:, :-1].argmax(-1) == repl[:, :-1].argmax(-1)).double())
        if single_layer_splices:
            for l in range(L):
                one = run_with_clt(model, clt, toks, layers=[l])
                ce.add(f"ce_splice_{l}", token_ce(one, toks))
                ce.add(f"kl_splice_{l}", kl_div(logits, one))
    c = ce.summary()
    per_layer = layer_stats.summary()
    result: dict[str, Any] = {
        "model": model_name,
        "dataset": dataset,
        "split": split,
        "context_size": ctx,
        "n_tokens_ce": ce.n,
        "n_tokens_reconstruction": layer_stats.n_tokens,
        "n_layers": L,
        "d_sae": F,
        "input_hook": hooks.input_hook,
        "output_hook": hooks.output_hook,
        "per_layer": per_layer,
        "mean": {k: sum(v) / L for k, v in per_layer.items()},
        "replacement": {
            "ce_original": c["ce_original"],
            "ce_replacement": c["ce_replacement"],
            "ce_zero_ablation": c["ce_zero_ablation"],
            "ce_recovered": ce_recovered(
                c["ce_original"], c["ce_replacement"], c["ce_zero_ablation"]
            ),
            "kl": c["kl"],
            "top1_agreement": c["top1_agreement"],
        },
        "density_histogram": layer_stats.density_histogram(),
    }
    if single_layer_splices:
        result["single_layer_splices"] = [
            {
                "layer": l,
                "ce": c[f"ce_splice_{l}"],
                "kl": c[f"kl_splice_{l}"],
                "ce_increase": c[f"ce_splice_{l}"] - c["ce_original"],
            }
            for l in range(L)
        ]
    if density_tokens:
        result["feature_density"] = feature_density(
            clt, model, dataset=dataset, split=split, n_tokens=density_tokens, ctx=ctx,
            batch_size=batch_size, hooks=hooks, device=device, progress=progress)
    if window is not None:
        result["training_window"] = window
    if graph_prompts:
        from clt_lens.evals.graph_metrics import evaluate_graphs, heldout_prompts

        prompts = (heldout_prompts(graph_prompts, tokenizer=model.tokenizer, split=split)
                   if isinstance(graph_prompts, int) else list(graph_prompts))
        graphs = evaluate_graphs(clt, prompts, model=model, device=device,
                                 max_feature_nodes=graph_max_feature_nodes,
                                 n_ablate=graph_ablate, progress=progress)
        result["graphs"] = graphs
    if out_dir is not None:
        from clt_lens.evals.report import write_outputs

        write_outputs(result, Path(out_dir))
    return result


def _hook_names(clt: Any) -> tuple[str, str]:
    meta = clt.cfg.metadata
    hook_in = getattr(clt.cfg, "input_hook", None) or _block_relative(meta.hook_name)
    hook_out = getattr(clt.cfg, "output_hook", None) or _block_relative(
        getattr(meta, "hook_name_out", None) or "hook_mlp_out"
    )
    return hook_in, hook_out


def _block_relative(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        return ".".join(parts[2:])
    return name


@torch.no_grad()
def feature_density(
    clt: Any, model: Any, *, dataset: str, split: str, n_tokens: int, ctx: int,
    batch_size: int, hooks: Any, device: str = "cpu", progress: bool = True,
) -> dict[str, Any]:
    """How often each feature fires over up to ``n_tokens`` tokens of ``split`` (encoder only):
    per layer the fraction that never fires (dead), that fires on fewer than 1 in 10^4 tokens
    and that fires at most 10 times."""
    from clt_lens.activations import collect_activations
    from clt_lens.data import load_tokens

    tokens = load_tokens(dataset, tokenizer=model.tokenizer, context_size=ctx, split=split,
                         max_tokens=-(-n_tokens // ctx) * ctx, shuffle=False)
    L, F = clt.cfg.n_layers, clt.cfg.d_sae
    counts = torch.zeros(L, F, dtype=torch.long)
    seen = 0
    for toks in tqdm(tokens.split(batch_size), desc="density", disable=not progress,
                     unit="batch"):
        x, _ = collect_activations(model, toks.to(device), hooks)
        counts += (clt.encode(x) != 0).sum(0).cpu()
        seen += x.shape[0]
    freq = counts.double() / max(seen, 1)
    return {
        "n_tokens": seen,
        "dead_fraction": (counts == 0).double().mean(-1).tolist(),
        "rare_fraction_1e-4": ((counts > 0) & (freq < 1e-4)).double().mean(-1).tolist(),
        "fires_at_most_10_times": ((counts > 0) & (counts <= 10)).double().mean(-1).tolist(),
        "mean_dead_fraction": float((counts == 0).double().mean()),
    }


def training_window_deadness(path: Any) -> dict[str, Any] | None:
    """The last training record's dead fraction per layer (features silent over the trainer's
    ``dead_window_tokens``), if ``path`` is a training run or its ``final`` folder."""
    if not isinstance(path, (str, Path)):
        return None
    p = Path(path)
    for run in (p, p.parent):
        log, cfg = run / "metrics.jsonl", run / "train_config.json"
        if log.is_file() and cfg.is_file():
            last = None
            for line in log.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("kind") == "train" and "dead_frac_per_layer" in rec:
                        last = rec
            if last is None:
                return None
            window = json.loads(cfg.read_text()).get("dead_window_tokens")
            dead = last["dead_frac_per_layer"]
            return {"step": last["step"], "tokens": last.get("tokens"),
                    "window_tokens": window, "dead_fraction": dead,
                    "mean_dead_fraction": sum(dead) / len(dead)}
    return None
