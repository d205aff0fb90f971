"""Training-step throughput: our step vs a dense-decoding reference, FLOP/s, peak memory.

    python benchmarks/train.py            # demo shape and L=12 d=256 F=2048 B=512
    python benchmarks/train.py --quick    # smaller repeats

Each shape runs in a fresh subprocess so its peak RSS is its own. Activations are Gaussian;
JumpReLU thresholds are set per feature so that ``--active`` (default 2%) of the features
fire, the sparsity the trained CLTs of the field have.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"demo": (4, 128, 1024, 1024), "L12": (12, 256, 2048, 512)}


def one_shape(L: int, d: int, F: int, B: int, decode: str, active: float, repeats: int) -> dict:
    import torch
    from common import matmul_peak

    from clt_lens.clt import CLTConfig, CrossLayerTranscoder

    torch.manual_seed(0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clt = CrossLayerTranscoder(CLTConfig(d_in=d, d_sae=F, n_layers=L, decode=decode))
    x = torch.randn(B, L, d)
    y = torch.randn(B, L, d)
    clt.estimate_normalization(x, y)
    with torch.no_grad():  # thresholds at the (1 - active) quantile of each feature's pre-acts
        pre = clt.preacts_lbf(clt.normalize_inputs(x))  # [L, B, F]
        q = torch.quantile(pre, 1 - active, dim=1)
        clt.log_threshold.copy_(q.clamp_min(1e-3).log())
    opt = torch.optim.Adam(clt.parameters(), lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = clt.training_forward(x, y, sparsity_coeff=1e-4)
        out.loss.backward()
        opt.step()
        return float(out.l0_per_layer.mean())

    for _ in range(2):
        l0 = step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        l0 = step()
        times.append(time.perf_counter() - t)
    times.sort()
    sec = times[len(times) // 2]
    n_params = sum(p.numel() for p in clt.parameters())
    pairs = L * (L + 1) // 2
    enc_flops = 3 * 2 * B * d * F * L  # forward + two backward matmuls
    dense_dec = 3 * 2 * B * F * d * pairs
    sparse_dec = 3 * 2 * (B * F * L * (l0 / F)) * d * (L + 1) / 2  # active features x targets
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "L": L, "d": d, "F": F, "B": B, "decode": decode, "active_frac": l0 / F,
        "step_s": sec, "tokens_per_s": B / sec, "params": n_params,
        "flops_needed": enc_flops + sparse_dec, "flops_dense": enc_flops + dense_dec,
        "peak_rss_mb": rss1 / 1024, "rss_growth_mb": (rss1 - rss0) / 1024,
        "params_plus_adam_mb": n_params * 4 * 4 / 2**20,  # weights, grads, two Adam moments
        "matmul_peak_flops": matmul_peak(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--active", type=float, default=0.02)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    if args.child:
        name, decode = args.child.split(":")
        print(json.dumps(one_shape(*SHAPES[name], decode, args.active, repeats)))
        return
    from common import machine, print_table, write_result

    rows, results = [], []
    for name in SHAPES:
        per = {}
        for decode in ("auto", "dense"):
            r = subprocess.run([sys.executable, __file__, "--child", f"{name}:{decode}",
                                "--active", str(args.active)] + (["--quick"] if args.quick else []),
                               capture_output=True, text=True, check=True)
            per[decode] = json.loads(r.stdout.strip().splitlines()[-1])
        ours, dense = per["auto"], per["dense"]
        peak = ours["matmul_peak_flops"]
        results.append({"shape": name, "ours": ours, "dense_reference": dense,
                        "speedup_vs_dense": dense["step_s"] / ours["step_s"]})
        rows.append([name, f"{ours['L']}x{ours['d']}x{ours['F']} B{ours['B']}",
                     f"{ours['active_frac']:.2%}", f"{ours['tokens_per_s']:.0f}",
                     f"{dense['tokens_per_s']:.0f}", f"{dense['step_s'] / ours['step_s']:.2f}x",
                     f"{ours['flops_needed'] / ours['step_s'] / 1e9:.1f}",
                     f"{dense['flops_dense'] / dense['step_s'] / 1e9:.1f}",
                     f"{peak / 1e9:.0f}",
                     f"{ours['flops_needed'] / ours['step_s'] / peak:.0%}",
                     f"{ours['peak_rss_mb']:.0f}", f"{ours['params_plus_adam_mb']:.0f}"])
    m = machine()
    print(f"machine: {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
          f"command: {m['command']}")
    print_table(["shape", "L x d x F, batch", "active", "ours tok/s", "dense tok/s", "speed-up",
                 "ours GFLOP/s (needed work)", "dense GFLOP/s", "matmul peak GFLOP/s",
                 "ours / peak", "peak RSS MB", "params+grads+Adam MB"], rows)
    print(f"written {write_result('train', {'results': results})}")


if __name__ == "__main__":
    main()
