"""What the cache's quantisation error costs a CLT: the demo CLT trained on the default cache
and on an fp32 cache of the same tokens, compared on held-out FVU and L0.

    python benchmarks/cache_fidelity.py                   # demo: 262,144 tokens, 800 steps
    python benchmarks/cache_fidelity.py --tokens 65536 --steps 200  # quicker

1. An fp32 cache of the embedded model's activations, generated as the demo does
   (``generate_cache``, BOS dropped).
2. The same shards re-encoded with the default codec (errbound: every channel's quantisation
   FVU <= 1e-3), with the same manifest otherwise: exactly what ``generate_cache`` with the
   default codec writes for these tokens.
3. The demo config (clt_lens/configs/demo.yaml) trained on each, same seed; and once more on
   the fp32 cache with another seed, to show how far two runs drift apart with no
   quantisation at all.
4. Held-out FVU (1 - explained variance, per layer and mean, on the trainer's held-out tokens,
   collected from the model in fp32) and L0 of each final CLT.

Target: held-out FVU within 2% (relative) between the default and the fp32 cache.
Writes benchmarks/results/cache_fidelity.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, print_table, write_result  # noqa: E402

from clt_lens.cache import CacheConfig, generate_cache, make_codec, read_manifest  # noqa: E402
from clt_lens.cache.format import encode_shard, read_shard_file, write_manifest  # noqa: E402
from clt_lens.cache.storage import Store  # noqa: E402
from clt_lens.cache.writer import write_shard  # noqa: E402


def reencode(src: Path, dst: Path) -> None:
    """``src``'s shards re-encoded with the default codec into ``dst`` (same tokens, order)."""
    m = read_manifest(src)
    codec = make_codec("errbound")
    store = Store(dst)
    store.makedirs()
    entries = []
    for s in m.shards:
        view = read_shard_file(src / s.file, nbytes=s.nbytes, sha256=s.sha256)
        x, y = view.decode()
        parts = encode_shard(x, y, codec, view.header["info"],
                             chunk_tokens=view.header.get("chunk_tokens"))
        entries.append(write_shard(store, s.file, parts, seq_start=s.seq_start,
                                   seq_end=s.seq_end))
    write_manifest(store, replace(m, codec=codec.config(), shards=entries,
                                  config_hash=m.config_hash + "-errbound"))


def train(cache: Path, out: Path, steps: int | None, seed: int, model) -> dict:
    from clt_lens.config import load_config
    from clt_lens.training import TrainConfig
    from clt_lens.training.cli import resolve_config_path
    from clt_lens.training.trainer import Trainer

    overrides = {"cache_dir": str(cache), "out_dir": str(out), "seed": seed, "progress": False}
    if steps:
        overrides["n_steps"] = steps
    cfg = load_config(TrainConfig, resolve_config_path("demo"), overrides)
    t0 = time.perf_counter()
    tr = Trainer(cfg, model=model)
    tr.train()
    res = tr.evaluate_heldout()
    return {"fvu": 1 - res["ev"], "fvu_per_layer": [1 - v for v in res["ev_per_layer"]],
            "l0": res["l0"], "l0_per_layer": res["l0_per_layer"], "steps": cfg.n_steps,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=262_144, help="cached tokens (demo: 262,144)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (demo: 800)")
    args = ap.parse_args()
    from clt_lens.models import load_model

    model = load_model("embedded")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        generate_cache(CacheConfig(out_dir=str(work / "fp32"), n_tokens=args.tokens,
                                   codec="fp32", progress=False), model=model)
        reencode(work / "fp32", work / "default")
        prep = time.perf_counter() - t0
        sizes = {k: read_manifest(work / k).nbytes for k in ("fp32", "default")}
        worst = read_manifest(work / "default").worst_channel()
        runs = {}
        for name, cache, seed in (("default", "default", 0), ("fp32", "fp32", 0),
                                  ("fp32, seed 1", "fp32", 1)):
            print(f"training on the {name} cache ...", flush=True)
            runs[name] = train(work / cache, work / f"run-{name}", args.steps, seed, model)
            print(f"  held-out FVU {runs[name]['fvu']:.5f}, L0 {runs[name]['l0']:.2f} "
                  f"({runs[name]['seconds']:.0f} s)", flush=True)
    ref = runs["fp32"]
    rel = {k: r["fvu"] / ref["fvu"] - 1 for k, r in runs.items()}
    m = machine()
    print(f"\nmachine: {m['cores']} cores, torch {m['torch']}; command: {m['command']}")
    print(f"{args.tokens:,} cached tokens (fp32 {sizes['fp32'] / 2**20:.0f} MiB, default "
          f"{sizes['default'] / 2**20:.0f} MiB; worst channel FVU of the default cache "
          f"{worst['fvu']:.2e}); demo config, {ref['steps']} steps\n")
    print_table(["cache", "seed", "held-out FVU", "vs fp32 (rel.)", "FVU per layer", "L0",
                 "L0 per layer"],
                [[k.split(",")[0], "1" if "seed 1" in k else "0", f"{r['fvu']:.5f}",
                  f"{rel[k]:+.2%}", " ".join(f"{v:.4f}" for v in r["fvu_per_layer"]),
                  f"{r['l0']:.2f}", " ".join(f"{v:.1f}" for v in r["l0_per_layer"])]
                 for k, r in runs.items()])
    path = write_result("cache_fidelity", {
        "tokens": args.tokens, "prepare_s": prep, "cache_bytes": sizes,
        "default_worst_channel": worst, "runs": runs, "fvu_rel_vs_fp32": rel,
        "target_rel": 0.02, "met": abs(rel["default"]) < 0.02,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
