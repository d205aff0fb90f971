"""Dense vs sparse CLT training step (forward + backward), printed as a table.

    python benchmarks/clt_decode.py [--reps 3] [--threads N] [--no-sweep]

A JumpReLU CLT whose thresholds sit at each layer's (1 - density) pre-activation quantile;
one step = ``training_forward`` + ``loss.backward()`` (encoder, activation, decode, MSE, tanh
penalty; no optimizer). The sparse step also differentiates JumpReLU positions inside the
kernel window below the threshold, so its support is a little denser than the active set
(both are printed). The density sweep locates the crossover used by ``decode="auto"``
(``clt_lens.clt.config.SPARSE_MAX_DENSITY``). Writes benchmarks/results/clt_decode.json.
On a busy machine ``--threads 1`` gives steadier numbers (OpenMP threads wait on each other).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, timeit, write_result  # noqa: E402

from clt_lens.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402

MAIN_CASES = [(12, 256, 2048, 512, 0.02), (4, 128, 1024, 512, 0.02)]
SWEEP = [(4, 128, 1024, 512, p) for p in (0.05, 0.1, 0.15, 0.2, 0.3)] + [
    (12, 256, 2048, 512, p) for p in (0.05, 0.1, 0.2)
]


def build(n_layers: int, d: int, n_feat: int, batch: int, density: float, seed: int = 0):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(d_in=d, d_sae=n_feat, n_layers=n_layers))
    x = torch.randn(batch, n_layers, d)
    y = torch.randn(batch, n_layers, d)
    clt.estimate_normalization(x, y)
    with torch.no_grad():
        pre = clt.preacts_lbf(clt.normalize_inputs(x)).reshape(n_layers, -1)
        theta = pre.kthvalue(int(pre.shape[1] * (1 - density)), dim=1).values
        clt.log_threshold.copy_(theta.clamp(min=1e-4).log().unsqueeze(1).expand(-1, n_feat))
    return clt, x, y


def step_time(clt: CrossLayerTranscoder, mode: str, x, y, reps: int):
    clt.cfg = dataclasses.replace(clt.cfg, decode=mode)
    last = {}

    def step() -> None:
        clt.zero_grad(set_to_none=True)
        out = clt.training_forward(x, y)
        out.loss.backward()
        last["out"] = out

    return timeit(step, repeats=reps, warmup=1), last["out"]


def run_case(n_layers, d, n_feat, batch, density, reps):
    clt, x, y = build(n_layers, d, n_feat, batch, density)
    dense_t, dense_out = step_time(clt, "dense", x, y, reps)
    sparse_t, sparse_out = step_time(clt, "sparse", x, y, reps)
    return {
        "L": n_layers,
        "d": d,
        "F": n_feat,
        "B": batch,
        "active_density": float(dense_out.l0_per_layer.sum()) / (n_layers * n_feat),
        "support_density": sparse_out.support_density,
        "dense_ms": dense_t * 1e3,
        "sparse_ms": sparse_t * 1e3,
        "speedup": dense_t / sparse_t,
        "sparse_tokens_per_s": batch / sparse_t,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-sweep", action="store_true", help="skip the density sweep")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, fp32, median of {args.reps}")
    cases = MAIN_CASES + ([] if args.no_sweep else SWEEP)
    rows = []
    for case in cases:
        rows.append(run_case(*case, reps=args.reps))
        r = rows[-1]
        print(
            f"  L={r['L']} d={r['d']} F={r['F']} B={r['B']} support={r['support_density']:.3f}: "
            f"dense {r['dense_ms']:.0f} ms, sparse {r['sparse_ms']:.0f} ms",
            flush=True,
        )
    headers = ["L", "d", "F", "B", "active", "support", "dense ms", "sparse ms", "speedup",
               "sparse tok/s"]  # fmt: skip
    table = [
        [r["L"], r["d"], r["F"], r["B"], r["active_density"], r["support_density"],
         r["dense_ms"], r["sparse_ms"], r["speedup"], r["sparse_tokens_per_s"]]
        for r in rows
    ]  # fmt: skip
    print_table(headers, table)
    print(f"wrote {write_result('clt_decode', {'rows': rows})}")


if __name__ == "__main__":
    main()
