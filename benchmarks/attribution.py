"""Attribution graphs with circuit-tracer: time and graph size against the feature-node cap.

    python benchmarks/attribution.py                          # random calibrated CLT, F=1024
    python benchmarks/attribution.py --clt runs/demo/final    # a trained CLT
    python benchmarks/attribution.py --clt CLT --plt PLT      # CLT vs per-layer transcoders
    python benchmarks/attribution.py --plt random             # the same, both untrained
    python benchmarks/attribution.py --caps 50,200 --prompts 1

Each transcoder is exported once as a circuit-tracer set; every (prompt, cap) then runs
``attribute_prompt`` (circuit-tracer ``attribute`` + pruning + graph files). Reported per
transcoder and cap, as medians over the prompts: ``attribute`` seconds (fastest of
``--repeats``), active features, the
features attributed, nodes and edges left after pruning (node 0.8 / edge 0.98), and
circuit-tracer's replacement and completeness scores; plus each transcoder's L0 (active
features per token per layer on the prompts, BOS excluded) so a CLT/PLT comparison can be read
at matched L0. Without ``--clt`` the CLT is untrained (random encoder with calibrated thresholds,
decoders fitted by ridge regression: ``clt_lens.circuits.synthetic.random_clt``): its timings
are meaningful, its scores are not.

Writes benchmarks/results/attribution.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

PROMPTS = [
    "To be, or not to be, that is the question",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar",
    "Now is the winter of our discontent made glorious summer by this sun of York",
]


def parse_caps(text: str) -> list[int | None]:
    caps: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        caps.append(None if part in ("none", "all", "") else int(part))
    return caps


def load_transcoder(model: Any, path: str | None, *, cross_layer: bool, d_sae: int,
                    seed: int) -> tuple[Any, str]:
    from clt_lens.circuits import load_clt
    from clt_lens.circuits.synthetic import random_clt

    if path is not None and path != "random":
        return load_clt(path), str(path)
    clt = random_clt(model, d_sae=d_sae, cross_layer=cross_layer, seed=seed)
    kind = "CLT" if cross_layer else "PLT"
    return clt, f"random calibrated {kind} (untrained), F={d_sae}"


def bench_transcoder(name: str, transcoder: Any, model: Any, prompts: list[str],
                     caps: list[int | None], batch_size: int, work: Path,
                     repeats: int = 1) -> list[dict[str, Any]]:
    from clt_lens.circuits import attribute_prompt, write_circuit_tracer_set

    set_dir = write_circuit_tracer_set(transcoder, work / f"{name}-set")
    rows = []
    for cap in caps:
        runs = []
        for k, prompt in enumerate(prompts):
            # the fastest of the repeats: other processes only ever add time
            res = min((attribute_prompt(set_dir, prompt, model=model, max_feature_nodes=cap,
                                        batch_size=batch_size, out_dir=work / "graphs",
                                        slug=f"{name}-{cap}-{k}") for _ in range(repeats)),
                      key=lambda r: r.attribution_seconds)
            n_positions = res.n_tokens - 1  # circuit-tracer zeroes the BOS position
            runs.append({
                "seconds": res.attribution_seconds,
                "total_seconds": res.total_seconds,
                "active": res.n_active_features,
                "attributed": res.n_feature_nodes,
                "nodes": res.n_nodes,
                "edges": res.n_edges,
                "replacement": res.replacement_score,
                "completeness": res.completeness_score,
                "l0": res.n_active_features / (n_positions * model.cfg.n_layers),
            })
            print(f"  {name} cap={cap} prompt {k}: {res.attribution_seconds:.2f}s, "
                  f"{res.n_feature_nodes}/{res.n_active_features} features, "
                  f"{res.n_nodes} nodes, {res.n_edges} edges", flush=True)
        row: dict[str, Any] = {"transcoder": name, "cap": cap}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        row["runs"] = runs
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--clt", default=None, help="CLT checkpoint (default or 'random': an "
                    "untrained one)")
    ap.add_argument("--plt", default=None,
                    help="per-layer transcoder checkpoint to compare with the CLT ('random': "
                    "an untrained one)")
    ap.add_argument("--caps", default="50,100,200,400,none",
                    help="max_feature_nodes values, 'none' = uncapped")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many prompts (1-3)")
    ap.add_argument("--d-sae", type=int, default=1024, help="features per layer (random CLT)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1,
                    help="attribute each (prompt, cap) this often; the fastest time counts")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from clt_lens.models import load_model, model_id

    model = load_model(args.model)
    prompts = PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]
    caps = parse_caps(args.caps)
    transcoders = [("clt", *load_transcoder(model, args.clt, cross_layer=True,
                                            d_sae=args.d_sae, seed=0))]
    if args.plt is not None:
        transcoders.append(("plt", *load_transcoder(model, args.plt, cross_layer=False,
                                                    d_sae=args.d_sae, seed=1)))
    print(f"model {model_id(model)}; {len(prompts)} prompts; caps {caps}")
    for name, _, desc in transcoders:
        print(f"{name}: {desc}")

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clt-lens-bench-attr-") as tmp:
        for name, transcoder, _ in transcoders:
            rows += bench_transcoder(name, transcoder, model, prompts, caps, args.batch_size,
                                     Path(tmp), args.repeats)
    elapsed = time.perf_counter() - t0

    headers = ["transcoder", "cap", "attribute s", "active", "attributed", "nodes", "edges",
               "replacement", "completeness", "L0/layer"]
    print()
    print_table(headers, [
        [r["transcoder"], "all" if r["cap"] is None else r["cap"], r["seconds"], r["active"],
         r["attributed"], r["nodes"], r["edges"], r["replacement"], r["completeness"], r["l0"]]
        for r in rows
    ])
    path = write_result("attribution", {
        "model": model_id(model),
        "prompts": prompts,
        "caps": caps,
        "transcoders": {name: desc for name, _, desc in transcoders},
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "rows": rows,
        "elapsed_seconds": elapsed,
        "note": "medians over prompts; 'attribute s' is circuit-tracer's attribute() only",
    })
    print(f"\nwritten {path}")
    from plots import plot_result

    print(f"written {plot_result('attribution')}")


if __name__ == "__main__":
    main()
