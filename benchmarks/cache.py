"""Activation cache on real-LM statistics: codec size and error, reader vs the real step, memory.

    python benchmarks/cache.py                  # everything
    python benchmarks/cache.py --quick          # fewer tokens and repeats
    python benchmarks/cache.py --parts codecs,reader,memory,gpu

Data: the embedded model's real activations (ln2.hook_normalized -> hook_mlp_out, BOS positions
dropped as the cache does by default), as they are ("plain"), with the statistics of real
language models injected by ``clt_lens.cache.lm_stats`` ("outliers": three channels 30-300x,
heavy-tailed token norms and spikes), and with the BOS rows kept at 20x as well ("+BOS"). The
model must load: there is no fallback.

1. codecs: bytes per token (x and y); size against fp16, fp16 + zstd and int8 + zstd (absmax
   per channel, CLT-Forge's kind of default); the worst layer's and the worst channel's
   quantisation FVU, measured here in float64 against the originals; encode and decode speed on
   one thread.
2. reader vs the real training step: the step of ``benchmarks/train.py`` (training_forward +
   backward + clip + fused Adam, 1% of the features active; "sparse" = decode auto, "dense" =
   decode dense) at the demo shape (L=4 d=128 F=1024 B=1024) and at L=12 d=256 F=2048 B=512,
   against the CacheReader of a default-codec cache of the outlier data (for L=12 the same
   data laid out by ``lm_stats.reshape_activations``) with 1 and 2 decode threads. Blocks of
   reader batches and of steps alternate in one process; medians. Also the step fed by the
   reader (reading concurrently) against the same step on one fixed batch.
3. memory: peak RSS growth of a child process reading a cache several times its buffer.
4. GPU: with CUDA, the reader dequantising on the GPU (codes over PCIe); otherwise recorded as
   not measured.

Writes benchmarks/results/cache.json and cache.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, print_table, timeit, write_result  # noqa: E402

from clt_lens.cache import CacheReader, make_codec, write_cache  # noqa: E402
from clt_lens.cache.format import (  # noqa: E402
    CacheManifest,
    encode_shard,
    parse_shard,
    write_manifest,
)
from clt_lens.cache.lm_stats import (  # noqa: E402
    inject_lm_outliers,
    lm_like_activations,
    reshape_activations,
)
from clt_lens.cache.storage import Store  # noqa: E402
from clt_lens.cache.writer import shard_name, write_shard  # noqa: E402

VARIANTS = [
    ("fp16", {"zstd_level": 0}),
    ("fp16", {"zstd_level": 3}),
    ("int8", {"zstd_level": 3}),
    ("errbound", {"allocation": "layer"}),
    ("errbound", {"allocation": "channel", "predict": False}),
    ("errbound", {}),  # the default: channel bound, prediction
    ("errbound", {"target_fvu": 1e-4}),
]
SHAPES = {"demo": (4, 128, 1024, 1024), "L12": (12, 256, 2048, 512)}
ALL_PARTS = {"codecs", "reader", "memory", "gpu"}
RESULTS_FILE = Path(__file__).resolve().parent / "results" / "cache.json"


def label(name: str, params: dict) -> str:
    if name != "errbound":
        return name + (" + zstd" if params.get("zstd_level", 3) else "")
    c = make_codec(name, **params)
    return (f"errbound {c.allocation}{'' if c.predict else ' no-pred'} {c.target_fvu:g}"
            + (" (default)" if not params else ""))


def fvus(ref: torch.Tensor, approx: torch.Tensor) -> tuple[float, float, float]:
    """(worst layer FVU, worst channel FVU, median channel FVU) over layers of [N, L, d]."""
    ref, approx = ref.double(), approx.double()
    err = (approx - ref).pow(2).sum(0)  # [L, d]
    dev = (ref - ref.mean(0)).pow(2).sum(0)
    layer = (err.sum(1) / dev.sum(1)).max()
    chan = torch.where(dev > 0, err / dev.clamp_min(1e-300), torch.zeros_like(err))
    return float(layer), float(chan.max()), float(chan.median())


# ---- 1. codecs --------------------------------------------------------------------------------


def codec_rows(datasets: dict[str, tuple[torch.Tensor, torch.Tensor]], shard_tokens: int
               ) -> list[dict]:
    rows = []
    for dname, (x, y) in datasets.items():
        n, L, d = x.shape
        fp32 = n * L * d * 4 * 2
        sizes = {}
        for name, params in VARIANTS:
            codec = make_codec(name, **params)
            t0 = time.perf_counter()
            blobs = [b"".join(encode_shard(x[lo : lo + shard_tokens], y[lo : lo + shard_tokens],
                                           codec))
                     for lo in range(0, n, shard_tokens)]
            t_enc = time.perf_counter() - t0
            total = sum(len(b) for b in blobs)

            def decode_all(blobs=blobs):
                return [parse_shard(b, "mem").decode() for b in blobs]

            t_dec = timeit(decode_all, repeats=3, warmup=1)
            dec = decode_all()
            xd = torch.cat([a for a, _ in dec])
            yd = torch.cat([b for _, b in dec])
            fx, fy = fvus(x, xd), fvus(y, yd)
            lab = label(name, params)
            sizes[lab] = total
            rows.append({
                "data": dname, "codec": name, **params, "label": lab,
                "bytes_per_token": total / n, "ratio_vs_fp16": fp32 / 2 / total,
                "worst_layer_fvu": max(fx[0], fy[0]), "worst_channel_fvu": max(fx[1], fy[1]),
                "median_channel_fvu": max(fx[2], fy[2]),
                "encode_MBps": fp32 / t_enc / 1e6, "decode_MBps": fp32 / t_dec / 1e6,
            })
            print(f"  {dname:<9} {lab:<34} {fp32 / 2 / total:5.2f}x fp16  worst layer "
                  f"{rows[-1]['worst_layer_fvu']:.2e}  worst channel "
                  f"{rows[-1]['worst_channel_fvu']:.2e}", flush=True)
        for r in rows:
            if r["data"] == dname:
                r["ratio_vs_fp16_zstd"] = sizes["fp16 + zstd"] / (r["bytes_per_token"] * n)
                r["ratio_vs_int8_zstd"] = sizes["int8 + zstd"] / (r["bytes_per_token"] * n)
    return rows


# ---- 2. reader vs the real training step ------------------------------------------------------


def reader_block(path: Path, batch: int, state: dict | None, tokens: int, threads: int,
                 **kw) -> tuple[float, dict]:
    """Seconds to read ``tokens`` from a fresh reader resumed at ``state`` (cold start: the
    first window is decoded inside the block), and the state after."""
    with CacheReader(path, batch_size=batch, decode_threads=threads, **kw) as r:
        if state is not None:
            r.load_state_dict(state)
        t = time.perf_counter()
        got = 0
        for bx, _ in r:
            got += bx.shape[0]
            if got >= tokens:
                break
        if bx.device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        return sec * tokens / got, r.state_dict()


def reader_vs_step(name: str, x: torch.Tensor, y: torch.Tensor, workdir: Path, repeats: int
                   ) -> dict:
    from train import _setup

    L, d, F, B = SHAPES[name]
    path = workdir / f"reader-{name}"
    t0 = time.perf_counter()
    m = write_cache(path, x, y, shard_tokens=8192)
    print(f"  {name}: wrote {m.n_tokens:,} tokens in {len(m.shards)} shards "
          f"({m.nbytes / 2**20:.1f} MiB, {time.perf_counter() - t0:.0f} s)", flush=True)
    probe = CacheReader(path, batch_size=B)
    window = probe.buffer_tokens
    probe.close()
    block = max(4 * min(window, m.n_tokens), 16 * B)
    _, sparse_step = _setup(L, d, F, B, 0.01)
    times: dict[str, list[float]] = {"sparse": [], "dense": [], "reader1": [], "reader2": []}
    states: dict[int, dict | None] = {1: None, 2: None}
    l0s = []
    for mode in ("auto", "dense"):
        sparse_step(mode)
    for threads in (1, 2):
        reader_block(path, B, None, B, threads)
    for rep in range(repeats):
        for threads in ((1, 2) if rep % 2 == 0 else (2, 1)):
            sec, states[threads] = reader_block(path, B, states[threads], block, threads)
            times[f"reader{threads}"].append(block / sec)
        for mode, key in ((("auto", "sparse"), ("dense", "dense")) if rep % 2 == 0
                          else (("dense", "dense"), ("auto", "sparse"))):
            sparse_step(mode)  # untimed: the first step after a switch pays for the other's
            for _ in range(2):
                sec, l0 = sparse_step(mode)
                times[key].append(B / sec)
                if mode == "auto":
                    l0s.append(l0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    gbs = {k: med[k] * L * d * 4 * 2 / 1e9 for k in ("reader1", "reader2")}
    fed = fed_step(path, L, d, F, B, repeats)
    return {
        "shape": {"L": L, "d": d, "F": F, "B": B}, "cache_tokens": m.n_tokens,
        "cache_MiB": m.nbytes / 2**20, "buffer_tokens": window, "block_tokens": block,
        "step_active_frac": sorted(l0s)[len(l0s) // 2] / F,
        "tok_s": med, "tok_s_all": times, "reader_GBps_fp32": gbs,
        "reader2_vs_sparse": med["reader2"] / med["sparse"],
        "reader2_vs_dense": med["reader2"] / med["dense"],
        "reader1_vs_sparse": med["reader1"] / med["sparse"],
        **fed,
    }


def fed_step(path: Path, L: int, d: int, F: int, B: int, repeats: int) -> dict:
    """The sparse step on batches from the reader (reading concurrently, 2 threads) against
    the same step on one fixed batch from that cache; thresholds calibrated on it (1%)."""
    from train import _setup

    with CacheReader(path, batch_size=B, decode_threads=2, seed=5) as r:
        it = iter(r)
        sample = next(it)
        _, step = _setup(L, d, F, B, 0.01, sample=sample)
        for _ in range(2):
            step("auto")
            step("auto", next(it))
        fixed, fed = [], []
        n = max(4, 2 * repeats)
        for _ in range(n):
            t = time.perf_counter()
            batch = next(it)
            step("auto", batch)
            fed.append(time.perf_counter() - t)
            fixed.append(step("auto")[0])
    fixed_s, fed_s = sorted(fixed)[n // 2], sorted(fed)[n // 2]
    return {"fixed_batch_step_s": fixed_s, "fed_step_s": fed_s,
            "reading_overhead": fed_s / fixed_s - 1}


# ---- 3. memory --------------------------------------------------------------------------------

RSS_CHILD = """
import json, resource, sys, time, torch
from clt_lens.cache import CacheReader
torch.zeros(1) + 1
def kb(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the resident set now
before = kb("VmRSS:")
buffer = None if sys.argv[2] == "default" else int(sys.argv[2])
t = time.perf_counter()
with CacheReader(sys.argv[1], batch_size=1024, loop=False, buffer_tokens=buffer) as r:
    n = sum(len(b[0]) for b in r)
    buf = r.buffer_tokens
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t, "buffer_tokens": buf,
                  "rss_before_kb": before, "peak_kb": kb("VmHWM:")}))
"""


def memory(x: torch.Tensor, y: torch.Tensor, workdir: Path, copies: int) -> list[dict]:
    n = min(16384, x.shape[0])
    parts = encode_shard(x[:n], y[:n], make_codec("errbound"))
    store = Store(workdir / "big")
    store.makedirs()
    entries = [write_shard(store, shard_name(k), parts) for k in range(copies)]
    L, d = x.shape[1], x.shape[2]
    write_manifest(store, CacheManifest(
        model_id="bench", model_name="bench", hooks=__import__("clt_lens").activations.HookSpec(),
        n_layers=L, d_model=d, context_size=0, dataset="bench", split="train", seed=0,
        codec=make_codec("errbound").config(), shards=entries, config_hash="bench-big"))
    decoded = copies * n * L * d * 8
    rows = []
    for buffer in ("default", "8192"):
        r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(workdir / "big"), buffer],
                           capture_output=True, text=True, check=True)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        window = out["buffer_tokens"] * L * d * 8
        rows.append({**out, "cache_tokens": copies * n, "cache_decoded_MiB": decoded / 2**20,
                     "cache_MiB": sum(e.nbytes for e in entries) / 2**20,
                     "window_MiB": window / 2**20,
                     "rss_growth_MiB": (out["peak_kb"] - out["rss_before_kb"]) / 1024,
                     "peak_rss_MiB": out["peak_kb"] / 1024})
        print(f"  buffer {buffer}: {rows[-1]['cache_decoded_MiB']:.0f} MiB decoded cache, "
              f"window {rows[-1]['window_MiB']:.0f} MiB -> RSS growth "
              f"{rows[-1]['rss_growth_MiB']:.0f} MiB (peak {rows[-1]['peak_rss_MiB']:.0f} MiB)",
              flush=True)
    return rows


# ---- 4. GPU -----------------------------------------------------------------------------------


def gpu(path: Path, B: int, tokens: int) -> dict:
    if not torch.cuda.is_available():
        return {"measured": False, "note": "no CUDA device on this machine"}
    out = {"measured": True, "device": torch.cuda.get_device_name(0)}
    for where in ("cuda", "cpu"):
        secs = [reader_block(path, B, None, tokens, 4, device="cuda", decode_device=where)[0]
                for _ in range(3)]
        out[f"decode_on_{where}_tok_s"] = tokens / sorted(secs)[1]
    return out


def _load() -> list[str]:
    p = Path("/proc/loadavg")
    return p.read_text().split()[:3] if p.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--shard-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="codecs,reader,memory,gpu")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats = 8192, 3
    parts = set(args.parts.split(","))
    load0 = _load()
    from clt_lens.models import load_model, model_id

    model = load_model("embedded")  # no fallback: a benchmark of the wrong model is no result
    t0 = time.perf_counter()
    xp, yp, _ = lm_like_activations(args.tokens, model=model, outliers=False)
    xo, yo = inject_lm_outliers(xp, yp)
    xb, yb, bos = lm_like_activations(args.tokens, model=model, include_bos=True)
    collect_s = time.perf_counter() - t0
    data = {"plain": (xp, yp), "outliers": (xo, yo), "outliers+BOS": (xb, yb)}
    result: dict = {"model": f"embedded ({model_id(model)})", "n_tokens": args.tokens,
                    "bos_rows_in_bos_set": int(bos.sum()), "shard_tokens": args.shard_tokens,
                    "collect_s": collect_s}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "codecs" in parts:
            print("codecs (1 thread):", flush=True)
            torch.set_num_threads(1)
            result["codecs"] = codec_rows(data, args.shard_tokens)
            torch.set_num_threads(threads)
        if "reader" in parts:
            print(f"reader vs training step ({threads} threads):", flush=True)
            result["reader"] = {"demo": reader_vs_step("demo", xo, yo, work, args.repeats)}
            L, d = SHAPES["L12"][:2]
            x12, y12 = reshape_activations(xo, L, d), reshape_activations(yo, L, d)
            result["reader"]["L12"] = reader_vs_step("L12", x12, y12, work, args.repeats)
        if "memory" in parts:
            print("memory (child process):", flush=True)
            result["memory"] = memory(xo, yo, work, copies=4 if args.quick else 16)
        if "gpu" in parts:
            path = work / "reader-demo"
            if not path.exists():
                write_cache(path, xo, yo, shard_tokens=args.shard_tokens)
            result["gpu"] = gpu(path, 1024, 4 * args.tokens)
            shutil.rmtree(path, ignore_errors=True)
    m = machine()
    load = _load()
    for part in ("codecs", "reader", "memory", "gpu"):
        if part in result:
            result.setdefault("conditions", {})[part] = {
                "load_average_start": load0, "load_average_end": load, "command": m["command"]}
    previous = RESULTS_FILE.is_file() and json.loads(RESULTS_FILE.read_text())
    if previous and parts != ALL_PARTS:  # a partial run keeps the other parts' results
        for part in ALL_PARTS - parts:
            if part in previous:
                result[part] = previous[part]
                cond = previous.get("conditions", {}).get(part)
                if cond:
                    result.setdefault("conditions", {})[part] = cond
    result["peak_rss_MiB_this_process"] = resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load now {load}; "
          f"command: {m['command']}")
    print(f"data: {result['model']}, {args.tokens:,} tokens, L=4 d=128 (collection "
          f"{collect_s:.0f} s)\n")
    if "codecs" in result:
        rows = [[r["data"], r["label"], f"{r['bytes_per_token']:.0f}",
                 f"{r['ratio_vs_fp16']:.2f}", f"{r['ratio_vs_fp16_zstd']:.2f}",
                 f"{r['ratio_vs_int8_zstd']:.2f}", f"{r['worst_layer_fvu']:.1e}",
                 f"{r['worst_channel_fvu']:.1e}", f"{r['encode_MBps']:.0f}",
                 f"{r['decode_MBps']:.0f}"] for r in result["codecs"]]
        print_table(["data", "codec", "B/token", "vs fp16", "vs fp16+zstd", "vs int8+zstd",
                     "worst layer FVU", "worst channel FVU", "encode MB/s", "decode MB/s"], rows)
    if "reader" in result:
        rows = []
        for name, r in result["reader"].items():
            t = r["tok_s"]
            rows.append([name, f"{t['sparse']:,.0f}", f"{t['dense']:,.0f}",
                         f"{t['reader1']:,.0f} ({r['reader_GBps_fp32']['reader1']:.2f})",
                         f"{t['reader2']:,.0f} ({r['reader_GBps_fp32']['reader2']:.2f})",
                         f"{r['reader2_vs_sparse']:.1f}x", f"{r['reader2_vs_dense']:.1f}x",
                         f"{r['reading_overhead']:+.0%}"])
        print()
        print_table(["shape", "sparse step tok/s", "dense step tok/s",
                     "reader 1 thr tok/s (GB/s)", "reader 2 thr tok/s (GB/s)",
                     "reader/sparse", "reader/dense", "step fed by reader"], rows)
    if "gpu" in result:
        print(f"\nGPU decode: {result['gpu']}")
    path = write_result("cache", result)
    print(f"\nwrote {path}")
    from plots import plot_result

    print(f"written {plot_result('cache')}")


if __name__ == "__main__":
    main()
