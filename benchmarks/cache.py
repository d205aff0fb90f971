"""Activation-cache codecs: size, quantisation error, write/read speed, reader vs trainer.

    python benchmarks/cache.py                 # embedded model, 32k tokens
    python benchmarks/cache.py --tokens 8192   # quicker
    python benchmarks/cache.py --random-model  # a random 4-layer d128 model instead

For every codec: bytes per token (x and y together) and the ratio against raw fp32 and fp16,
the worst per-layer quantisation FVU of x and of y, encode speed (encode + atomic write of the
shard files), decode speed (parse + decompress + dequantise), and the end-to-end CacheReader
rate (checksums, shuffle buffer, batches of 1024, background thread), all on one torch
thread. The trainer stand-in is a dense CLT-like step (encoder, all L(L+1)/2 decoder blocks,
MSE, backward, Adam) at L=4, d=128, F=1024 and 1024 tokens, timed in the same run: the reader
must outpace it.
Writes benchmarks/results/cache.json.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, print_table, timeit, write_result  # noqa: E402

from clt_lens.activations import HookSpec, collect_activations  # noqa: E402
from clt_lens.cache import CacheReader, make_codec  # noqa: E402
from clt_lens.cache.format import (  # noqa: E402
    CacheManifest,
    ShardEntry,
    encode_shard,
    parse_shard,
    write_manifest,
)
from clt_lens.cache.writer import shard_name, write_shard  # noqa: E402

VARIANTS = [
    ("fp32", {"zstd_level": 0}),
    ("fp32", {"zstd_level": 3}),
    ("fp16", {"zstd_level": 0}),
    ("fp16", {"zstd_level": 3}),
    ("bf16", {"zstd_level": 3}),
    ("int8", {"zstd_level": 0}),
    ("int8", {"zstd_level": 3}),
    ("errbound", {"zstd_level": 3, "target_fvu": 1e-3, "allocation": "layer", "predict": False}),
    ("errbound", {"zstd_level": 3, "target_fvu": 1e-3, "allocation": "channel", "predict": True}),
    ("errbound", {"zstd_level": 3, "target_fvu": 1e-3, "allocation": "layer", "predict": True}),
    ("errbound", {"zstd_level": 1, "target_fvu": 1e-3, "allocation": "layer", "predict": True}),
    ("errbound", {"zstd_level": 3, "target_fvu": 1e-4, "allocation": "layer", "predict": True}),
]


def load(random_model: bool, n_tokens: int, hooks: HookSpec):
    """(model description, x, y, tokens/s of collection)."""
    model = tokens = None
    if not random_model:
        try:
            from clt_lens.data import iter_token_batches
            from clt_lens.models import load_model, model_id

            model = load_model("embedded")
            ctx = model.cfg.n_ctx
            n_seq = math.ceil(n_tokens / (ctx - 1))
            tokens = torch.cat(list(iter_token_batches(
                "embedded", tokenizer=model.tokenizer, context_size=ctx, batch_size=64,
                max_tokens=n_seq * ctx)))[:n_seq]
            desc = f"embedded ({model_id(model)})"
        except Exception as e:  # the asset may not be built yet
            print(f"embedded model unavailable ({type(e).__name__}: {e}); using a random model")
            model = None
    if model is None:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(
            n_layers=4, d_model=128, n_ctx=128, d_head=32, n_heads=4, d_mlp=512, d_vocab=4096,
            act_fn="gelu", normalization_type="LN", seed=0)).eval()
        n_seq = math.ceil(n_tokens / 127)
        tokens = torch.randint(1, 4096, (n_seq, 128), generator=torch.Generator().manual_seed(0))
        tokens[:, 0] = 0
        desc = "random 4-layer d128 (near-Gaussian activations: a pessimistic case)"
    t0 = time.perf_counter()
    xs, ys = [], []
    for chunk in tokens.split(32):
        x, y = collect_activations(model, chunk, hooks, bos_token_id=0)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs)[:n_tokens], torch.cat(ys)[:n_tokens]
    rate = x.shape[0] / (time.perf_counter() - t0)
    return desc, x, y, rate


def layer_fvus(ref: torch.Tensor, approx: torch.Tensor) -> list[float]:
    ref = ref.double()
    err = (approx.double() - ref).pow(2).sum((0, 2))
    dev = (ref - ref.mean(0)).pow(2).sum((0, 2))
    return (err / dev).tolist()


def trainer_standin(L: int = 4, d: int = 128, F: int = 1024, B: int = 1024) -> float:
    """Seconds per dense CLT-like training step (forward, backward, Adam)."""
    torch.manual_seed(0)
    w_enc = torch.nn.Parameter(torch.randn(L, d, F) / d**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(L, F))
    w_dec = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.randn(F, L - i, d) / F**0.5) for i in range(L)])
    opt = torch.optim.Adam([w_enc, b_enc, *w_dec], lr=1e-4)
    x, y = torch.randn(B, L, d), torch.randn(B, L, d)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z = torch.relu(torch.einsum("bld,ldf->lbf", x, w_enc) + b_enc[:, None])
        outs = [0.0] * L
        for i in range(L):
            contrib = (z[i] @ w_dec[i].reshape(F, -1)).reshape(B, L - i, d).unbind(1)
            for k, c in enumerate(contrib):
                outs[i + k] = outs[i + k] + c
        loss = (torch.stack(outs, 1) - y).pow(2).mean() + 1e-4 * z.abs().mean()
        loss.backward()
        opt.step()

    return timeit(step, repeats=7, warmup=2)


def run_variant(name, params, x, y, shard_tokens, workdir: Path) -> dict:
    codec = make_codec(name, **params)
    n, L, d = x.shape
    out = workdir / f"{name}-{'-'.join(f'{k}{v}' for k, v in params.items())}"
    out.mkdir()
    fp32_bytes = n * L * d * 4 * 2
    # encode + write
    t0 = time.perf_counter()
    entries, blobs = [], []
    for k, lo in enumerate(range(0, n, shard_tokens)):
        chunks = encode_shard(x[lo : lo + shard_tokens], y[lo : lo + shard_tokens], codec)
        nbytes, digest = write_shard(out / shard_name(k), chunks)
        entries.append(ShardEntry(shard_name(k), min(shard_tokens, n - lo), nbytes, digest))
        blobs.append(b"".join(chunks))
    t_write = time.perf_counter() - t0
    total = sum(e.nbytes for e in entries)
    # decode, one thread, from memory
    def decode_all():
        return [parse_shard(b, "mem").decode() for b in blobs]

    t_read = timeit(decode_all, repeats=3, warmup=1)
    decoded = decode_all()
    xd = torch.cat([a for a, _ in decoded])
    yd = torch.cat([b for _, b in decoded])
    write_manifest(out, CacheManifest(
        model_id="bench", model_name="bench", hooks=HookSpec(), n_layers=L, d_model=d,
        context_size=0, dataset="bench", split="train", seed=0, codec=codec.config(),
        shards=entries, config_hash="bench"))
    # end-to-end reader (sha256, shuffle buffer, batching, thread)
    def read_epoch():
        with CacheReader(out, batch_size=1024, loop=False, buffer_tokens=shard_tokens * 2) as r:
            return sum(len(b[0]) for b in r)

    t_reader = timeit(read_epoch, repeats=3, warmup=1)
    shutil.rmtree(out)
    fx, fy = layer_fvus(x, xd), layer_fvus(y, yd)
    return {
        "codec": name, **params,
        "bytes_per_token": total / n,
        "ratio_vs_fp32": fp32_bytes / total,
        "ratio_vs_fp16": fp32_bytes / 2 / total,
        "fvu_x": fx, "fvu_y": fy, "max_fvu": max(fx + fy),
        "write_MBps": fp32_bytes / t_write / 1e6, "write_tok_s": n / t_write,
        "decode_MBps": fp32_bytes / t_read / 1e6, "decode_tok_s": n / t_read,
        "reader_tok_s": n / t_reader,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--shard-tokens", type=int, default=8192)
    ap.add_argument("--random-model", action="store_true")
    ap.add_argument("--input-hook", default="ln2.hook_normalized")
    args = ap.parse_args()
    hooks = HookSpec(args.input_hook)
    desc, x, y, collect_rate = load(args.random_model, args.tokens, hooks)
    n, L, d = x.shape
    step = trainer_standin()
    trainer_rate = 1024 / step
    rows, results = [], []
    # Codec timings on one thread: the reader decodes in one background thread next to the
    # trainer, and on a shared machine multi-threaded timings of small ops are mostly noise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in VARIANTS:
            r = run_variant(name, params, x, y, args.shard_tokens, Path(tmp))
            results.append(r)
            label = name + "".join(f" {k}={v}" for k, v in params.items()
                                   if k != "allocation" or name == "errbound")
            rows.append([label, f"{r['bytes_per_token']:.0f}", f"{r['ratio_vs_fp32']:.2f}",
                         f"{r['ratio_vs_fp16']:.2f}", f"{r['max_fvu']:.2e}",
                         f"{r['write_MBps']:.0f}", f"{r['decode_MBps']:.0f}",
                         f"{r['reader_tok_s'] / 1e3:.0f}k",
                         f"{r['reader_tok_s'] / trainer_rate:.0f}x"])
    torch.set_num_threads(threads)
    m = machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
          f"({m['torch_threads']} threads); command: {m['command']}")
    print(f"model: {desc}; hooks {hooks.input_hook} -> {hooks.output_hook}; "
          f"{n} tokens, L={L}, d={d}; shards of {args.shard_tokens} tokens")
    print(f"collection (forward + hooks): {collect_rate:,.0f} tokens/s; trainer stand-in "
          f"(dense CLT step L=4 d=128 F=1024 B=1024, {threads} threads): {step * 1e3:.0f} ms = "
          f"{trainer_rate:,.0f} tokens/s; codec and reader timings on 1 thread\n")
    print_table(["codec", "B/token", "vs fp32", "vs fp16", "max FVU", "write MB/s",
                 "decode MB/s", "reader tok/s", "reader/trainer"], rows)
    print("\nper-layer quantisation FVU (x | y):")
    for r in results:
        if r["max_fvu"] > 0:
            print(f"  {r['codec']:<8} {r.get('target_fvu', ''):<7} "
                  + " ".join(f"{v:.1e}" for v in r["fvu_x"]) + " | "
                  + " ".join(f"{v:.1e}" for v in r["fvu_y"]))
    path = write_result("cache", {
        "model": desc, "hooks": hooks.to_dict(), "n_tokens": n, "n_layers": L, "d_model": d,
        "shard_tokens": args.shard_tokens, "collect_tok_s": collect_rate,
        "trainer_standin": {"shape": {"L": 4, "d": 128, "F": 1024, "B": 1024},
                            "step_s": step, "tok_s": trainer_rate},
        "codecs": results,
    })
    print(f"\nwrote {path}")
    from plots import plot_result

    print(f"written {plot_result('cache')}")


if __name__ == "__main__":
    main()
