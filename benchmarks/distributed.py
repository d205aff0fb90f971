"""Feature-sharded training: per-rank parameter + optimizer memory and throughput, 1 vs N ranks.

    python benchmarks/distributed.py                 # 1 process and torchrun with 2 (gloo, CPU)
    python benchmarks/distributed.py --nproc 4

Each run trains a CLT (L=12, d=256, F=2048 per layer by default) on synthetic activations for
a few steps through the real Trainer, then every rank reports the bytes of its parameters,
gradients and Adam state and its peak RSS. On a 2-core CPU the 2-process throughput says
little (the two ranks share the cores); the memory split is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(args: argparse.Namespace) -> None:
    import torch

    from clt_lens.training import TrainConfig, Trainer
    from clt_lens.training.sources import SyntheticSource

    L, d, F, B = args.L, args.d, args.F, args.batch
    # init threshold 0.5: ~1% of features fire from the first step, as in a trained CLT
    cfg = TrainConfig(d_sae=F, batch_size=B, n_steps=args.steps, eval_every=10**9,
                      log_every=1, normalization_tokens=B, progress=False,
                      out_dir=args.out, distributed="feature" if args.dist else "none",
                      sparsity_coeff=0.1, jumprelu_init_threshold=0.5)
    src = SyntheticSource(B, L, d)
    tr = Trainer(cfg, source=src, heldout=src.next())
    t = time.perf_counter()
    tr.train()
    sec = time.perf_counter() - t
    params = sum(p.numel() * p.element_size() for p in tr.clt.parameters())
    opt = sum(v.numel() * v.element_size() for st in tr.opt.state.values()
              for v in st.values() if torch.is_tensor(v))
    rec = {"rank": tr.par.rank, "world": tr.par.world_size, "param_mb": params / 2**20,
           "grad_mb": params / 2**20, "adam_mb": opt / 2**20,
           "total_mb": (2 * params + opt) / 2**20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "seconds": sec, "tokens_per_s": B * args.steps / sec}
    if tr.par.is_main:  # steady state: median logged step rate, the first step left out
        logs = [json.loads(ln) for ln in Path(args.out, "metrics.jsonl").read_text().splitlines()]
        rates = sorted(r["tokens_per_s"] for r in logs if r["kind"] == "train" and r["step"] > 1)
        rec["step_tokens_per_s"] = rates[len(rates) // 2]
        rec["l0"] = [r["l0"] for r in logs if r["kind"] == "train"][-1]
    Path(args.out, f"rank{tr.par.rank}.json").write_text(json.dumps(rec))
    tr.par.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--L", type=int, default=12)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--F", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if os.environ.get("CLT_BENCH_CHILD"):  # torchrun would misparse our flags: they come by env
        child(argparse.Namespace(**json.loads(os.environ["CLT_BENCH_CHILD"])))
        return
    from common import machine, print_table, write_result

    shape = {k: getattr(args, k) for k in ("L", "d", "F", "batch", "steps")}
    runs = {}
    threads = str(max(1, (os.cpu_count() or 2) // args.nproc))
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp, "one")
        one.mkdir()
        spec = json.dumps({**shape, "out": str(one), "dist": False})
        subprocess.run([sys.executable, __file__], check=True,
                       env={**os.environ, "CLT_BENCH_CHILD": spec})
        runs[1] = [json.loads(p.read_text()) for p in sorted(one.glob("rank*.json"))]
        many = Path(tmp, "many")
        many.mkdir()
        spec = json.dumps({**shape, "out": str(many), "dist": True})
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                        str(args.nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                        "127.0.0.1:0", __file__], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": threads, "CLT_BENCH_CHILD": spec})
        runs[args.nproc] = [json.loads(p.read_text()) for p in sorted(many.glob("rank*.json"))]
    rows = []
    base = runs[1][0]["total_mb"]
    for world, recs in runs.items():
        for r in recs:
            rows.append([world, r["rank"], f"{r['param_mb']:.1f}", f"{r['adam_mb']:.1f}",
                         f"{r['total_mb']:.1f}", f"{r['total_mb'] / base:.2f}",
                         f"{r['peak_rss_mb']:.0f}",
                         f"{r['step_tokens_per_s']:.0f}" if "step_tokens_per_s" in r else "",
                         f"{r['tokens_per_s']:.0f}"])
    m = machine()
    print(f"machine: {m['cores']} cores, torch {m['torch']}; command: {m['command']}")
    print(f"shape: L={args.L} d={args.d} F={args.F} per layer, batch {args.batch}, feature-sharded")
    print_table(["world", "rank", "params MB", "Adam MB", "params+grads+Adam MB",
                 "vs 1 process", "peak RSS MB", "step tokens/s (steady)",
                 "tokens/s incl. setup + checkpoint"], rows)
    print(f"written {write_result('distributed', {'runs': runs, 'shape': vars(args)})}")


if __name__ == "__main__":
    main()
