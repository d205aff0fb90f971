"""Training-step throughput: our step vs a dense-decoding reference, FLOP/s, peak memory.

    python benchmarks/train.py            # demo shape and L=12 d=256 F=2048 B=512
    python benchmarks/train.py --quick    # fewer repeats
    python benchmarks/train.py --profile  # where the L=12 step's time goes, against its floor

Activations are Gaussian; JumpReLU thresholds are set per feature so that each ``--active``
fraction (default 1%, 2% and 3%, the range trained CLTs of the field have) of the features
fire. Both steps use the trainer's optimizer (fused Adam) and global-norm clipping.

The two steps are timed interleaved on one model in one process (the machine is shared and
noisy: separate processes differ by 10-20%), in blocks of one untimed and two timed steps per
mode, since the first step after a switch is slowed by the other mode's allocations. The
matmul peak is measured in the same process. Peak RSS needs a process of its own per step,
so it comes from short separate runs.
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
REPEATS = {"demo": 12, "L12": 4}  # blocks per mode; short steps need more to settle
MODES = ("auto", "dense")  # "auto" = what training uses (sparse at these densities)


# torch.profiler op (self CPU time) -> piece of the step; anything else is "elementwise, other"
PIECES = {
    "aten::bmm": "encoder forward (one batched matmul)",
    "aten::sparse_sampled_addmm": "encoder gradient (sampled at the support)",
    "aten::addmm": "decoder matmuls (sparse rows, forward and backward)",
    "aten::mm": "decoder matmuls (sparse rows, forward and backward)",
    "aten::_fused_adam_": "Adam (fused, with clipping as grad_scale)",
    "aten::linalg_vector_norm": "gradient norm (clipping)",
    "aten::nonzero": "support building (nonzero, sort, index)",
    "aten::sort": "support building (nonzero, sort, index)",
    "aten::index": "support building (nonzero, sort, index)",
    "aten::_index_put_impl_": "support building (nonzero, sort, index)",
    "aten::gt": "support building (nonzero, sort, index)",
    "aten::copy_": "copies",
}


def profile_child(active: float, steps: int = 4) -> dict:
    """Self CPU time per piece of the L=12 step (torch.profiler), and the step's floor: the
    encoder forward at the matmul peak measured here plus the fused Adam pass as measured."""
    import torch
    from common import matmul_peak
    from torch.profiler import ProfilerActivity, profile

    L, d, F, B = SHAPES["L12"]
    _, step = _setup(L, d, F, B, active)
    for _ in range(3):
        step("auto")
    plain = sorted(step("auto")[0] for _ in range(5))[2]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step("auto")
    pieces: dict[str, float] = {}
    for ev in prof.key_averages():
        name = PIECES.get(ev.key, "elementwise, other")
        pieces[name] = pieces.get(name, 0.0) + ev.self_cpu_time_total / 1e3 / steps  # ms/step
    peak = max(matmul_peak() for _ in range(3))
    encoder_ms = 2 * L * B * d * F / peak * 1e3
    adam_ms = pieces.get("Adam (fused, with clipping as grad_scale)", 0.0)
    return {"L": L, "d": d, "F": F, "B": B, "active": active, "step_ms": plain * 1e3,
            "tokens_per_s": B / plain, "profiled_ms": sum(pieces.values()),
            "pieces_ms": dict(sorted(pieces.items(), key=lambda kv: -kv[1])),
            "matmul_peak_flops": peak, "floor_ms": encoder_ms + adam_ms,
            "floor_encoder_ms": encoder_ms, "floor_adam_ms": adam_ms,
            "torch_threads": torch.get_num_threads()}


def _print_profile(r: dict) -> None:
    from common import machine, print_table

    m = machine()
    print(f"machine: {m['cores']} cores, torch {m['torch']} ({r['torch_threads']} threads); "
          f"command: {m['command']}")
    print(f"L={r['L']} d={r['d']} F={r['F']} B={r['B']}, {r['active']:.0%} active: step "
          f"{r['step_ms']:.0f} ms ({r['tokens_per_s']:.0f} tokens/s) unprofiled; floor "
          f"{r['floor_ms']:.0f} ms (encoder forward {r['floor_encoder_ms']:.0f} ms at the "
          f"measured {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s + Adam {r['floor_adam_ms']:.0f} "
          f"ms): the step is {r['step_ms'] / r['floor_ms']:.1f}x its floor")
    tot = r["profiled_ms"]
    print_table(["piece of the step (self CPU time, profiled)", "ms / step", "share"],
                [[k, f"{v:.1f}", f"{v / tot:.0%}"] for k, v in r["pieces_ms"].items()])


def _setup(L: int, d: int, F: int, B: int, active: float, device: str = "cpu",
           autocast: str = "none", sample=None):  # fmt: skip
    """A CLT of this shape on ``device`` with thresholds giving ``active`` firing, its
    optimizer, and ``step(mode, batch=None) -> (seconds, mean L0)`` running one whole training
    step (as the trainer does) in a decode mode.

    ``sample``: an ``(x, y)`` batch to calibrate on and train on by default (Gaussian if None);
    ``step`` may be given another batch (e.g. one from a cache reader).
    """
    import contextlib

    import torch

    from clt_lens.clt import CLTConfig, CrossLayerTranscoder
    from clt_lens.training.config import TrainConfig
    from clt_lens.training.trainer import make_adam

    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(d_in=d, d_sae=F, n_layers=L, device=device))
    if sample is None:
        x = torch.randn(B, L, d, device=device)
        y = torch.randn(B, L, d, device=device)
    else:
        x, y = (t.to(device) for t in sample)
    clt.estimate_normalization(x, y)
    with torch.no_grad():  # thresholds at the (1 - active) quantile of each feature's pre-acts
        pre = clt.preacts_lbf(clt.normalize_inputs(x))  # [L, B, F]
        q = torch.quantile(pre.float().cpu(), 1 - active, dim=1).to(device)
        clt.log_threshold.copy_(q.clamp_min(1e-3).log())
        del pre
    params = list(clt.parameters())
    opt = make_adam(params, TrainConfig(lr=1e-4), torch.device(device).type)
    cuda = torch.device(device).type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)

    def step(mode: str, batch=None) -> tuple[float, float]:
        """Seconds of one full step and the mean L0 per layer it saw."""
        bx, by = (x, y) if batch is None else batch
        clt.cfg.decode = mode
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        ctx = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype
               else contextlib.nullcontext())  # fmt: skip
        with ctx:
            out = clt.training_forward(bx, by, sparsity_coeff=1e-4)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        l0 = float(out.l0_per_layer.mean())  # a sync on CUDA: the step is done
        return time.perf_counter() - t, l0

    return clt, step


def work_flops(L: int, d: int, F: int, B: int, l0: float) -> tuple[float, float]:
    """FLOPs of one step: (the work needed: encoder forward + backward and decoding of the
    active features only, the same with every feature decoded densely)."""
    pairs = L * (L + 1) // 2
    enc = 3 * 2 * B * d * F * L  # forward + two backward matmuls
    return enc + 3 * 2 * (B * L * l0) * d * (L + 1) / 2, enc + 3 * 2 * B * F * d * pairs


def _interleaved(step, repeats: int) -> tuple[dict[str, list[float]], list[float]]:
    """Time ``step(mode)`` for every mode interleaved: per block one untimed step (the first
    after a switch pays for the other mode's allocations) and two timed ones, alternating the
    order of the modes between blocks. Returns the seconds per mode and every L0 seen."""
    for mode in MODES:
        step(mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    l0s = []
    for r in range(repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            step(mode)
            for _ in range(2):
                sec, l0 = step(mode)
                times[mode].append(sec)
                l0s.append(l0)
    return times, l0s


def time_child(L: int, d: int, F: int, B: int, active: float, repeats: int) -> dict:
    from common import matmul_peak

    clt, step = _setup(L, d, F, B, active)
    peaks = [matmul_peak()]
    times, l0s = _interleaved(step, repeats)
    peaks.append(matmul_peak())
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    l0 = sorted(l0s)[len(l0s) // 2]
    n_params = sum(p.numel() for p in clt.parameters())
    needed, dense = work_flops(L, d, F, B, l0)
    return {
        "L": L, "d": d, "F": F, "B": B, "active_frac": l0 / F, "params": n_params,
        "step_s": med["auto"], "dense_step_s": med["dense"],
        "step_s_all": times["auto"], "dense_step_s_all": times["dense"],
        "flops_needed": needed, "flops_dense": dense,
        "params_plus_adam_mb": n_params * 4 * 4 / 2**20,  # weights, grads, two Adam moments
        "matmul_peak_flops": sorted(peaks)[-1],
        "matmul_peak_flops_all": peaks,
    }  # fmt: skip


def trained_child(demo: str, repeats: int) -> dict:
    """Our step against dense decoding on the demo's trained CLT and its cached activations
    (the regime the README's demo trains in), interleaved in one process as above."""
    import torch

    from clt_lens.cache import CacheReader
    from clt_lens.clt.loading import load_clt
    from clt_lens.training.config import TrainConfig
    from clt_lens.training.trainer import make_adam

    run = Path(demo) / "train" / "final"
    cfg = json.loads((run / "train_config.json").read_text())
    clt = load_clt(run).train()
    B = int(cfg["batch_size"])
    reader = CacheReader(Path(demo) / "cache", batch_size=B, shuffle=True, seed=1)
    it = iter(reader)
    batches = [next(it) for _ in range(6)]
    reader.close()
    params = list(clt.parameters())
    opt = make_adam(params, TrainConfig(lr=1e-6), "cpu")  # tiny steps: the regime stays put
    state = {"i": 0}

    def step(mode: str) -> tuple[float, float]:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        clt.cfg.decode = mode
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = clt.training_forward(x, y, sparsity_coeff=float(cfg["sparsity_coeff"]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        return time.perf_counter() - t, float(out.l0_per_layer.mean())

    times, l0s = _interleaved(step, repeats)
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    L, d, F = clt.cfg.n_layers, clt.cfg.d_in, clt.cfg.d_sae
    return {"L": L, "d": d, "F": F, "B": B, "active_frac": sorted(l0s)[len(l0s) // 2] / F,
            "step_s": med["auto"], "dense_step_s": med["dense"]}  # fmt: skip


def rss_child(L: int, d: int, F: int, B: int, active: float, mode: str) -> dict:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, step = _setup(L, d, F, B, active)
    for _ in range(2):
        step(mode)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": rss1 / 1024, "rss_growth_mb": (rss1 - rss0) / 1024}


def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       check=True)  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--active", default="0.01,0.02,0.03", help="comma-separated fractions")
    ap.add_argument("--demo", default="runs/demo",
                    help="a `clt-lens demo` output folder: also time the step on its trained "
                    "CLT and cached activations")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="profile the L=12 step at the first --active fraction and stop")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        from common import write_result

        r = profile_child(float(args.active.split(",")[0]))
        _print_profile(r)
        from common import machine

        write_result("train_profile", {"machine": machine(), **r})
        return
    if args.child and args.child.startswith("trained:"):
        print(json.dumps(trained_child(args.child.split(":", 1)[1], 4 if args.quick else 8)))
        return
    if args.child:
        kind, name, *mode = args.child.split(":")
        shape = SHAPES[name]
        if kind == "time":
            repeats = REPEATS[name] // (2 if args.quick else 1)
            out = time_child(*shape, float(args.active), repeats)
        else:
            out = rss_child(*shape, float(args.active), mode[0])
        print(json.dumps(out))
        return
    from common import machine, print_table, write_result

    rows, results = [], []
    for name in SHAPES:
        for active in (float(a) for a in args.active.split(",")):
            extra = ["--active", str(active)] + (["--quick"] if args.quick else [])
            t = _child(["--child", f"time:{name}", *extra])
            rss = {m: _child(["--child", f"rss:{name}:{m}", *extra]) for m in MODES}
            speedup = t["dense_step_s"] / t["step_s"]
            peak = t["matmul_peak_flops"]
            results.append({"shape": name, "target_active": active, **t,
                            "peak_rss_mb": rss["auto"]["peak_rss_mb"],
                            "dense_peak_rss_mb": rss["dense"]["peak_rss_mb"],
                            "speedup_vs_dense": speedup})  # fmt: skip
            rows.append([
                name, f"{t['L']}x{t['d']}x{t['F']} B{t['B']}", f"{t['active_frac']:.2%}",
                f"{t['B'] / t['step_s']:.0f}", f"{t['B'] / t['dense_step_s']:.0f}",
                f"{speedup:.2f}x", f"{t['flops_needed'] / t['step_s'] / 1e9:.1f}",
                f"{t['flops_dense'] / t['dense_step_s'] / 1e9:.1f}", f"{peak / 1e9:.0f}",
                f"{t['flops_needed'] / t['step_s'] / peak:.0%}",
                f"{rss['auto']['peak_rss_mb']:.0f} / {rss['dense']['peak_rss_mb']:.0f}",
                f"{t['params_plus_adam_mb']:.0f}",
            ])  # fmt: skip
    trained = None
    if (Path(args.demo) / "train" / "final" / "cfg.json").is_file():
        trained = _child(["--child", f"trained:{args.demo}"] + (["--quick"] if args.quick else []))
        speedup = trained["dense_step_s"] / trained["step_s"]
        results.append({"shape": "demo-trained", **trained, "speedup_vs_dense": speedup})
        rows.append(["demo, trained", f"{trained['L']}x{trained['d']}x{trained['F']} "
                     f"B{trained['B']}", f"{trained['active_frac']:.2%}",
                     f"{trained['B'] / trained['step_s']:.0f}",
                     f"{trained['B'] / trained['dense_step_s']:.0f}", f"{speedup:.2f}x",
                     "", "", "", "", "", ""])  # fmt: skip
    else:
        print(f"no trained demo CLT in {args.demo} (run `make demo`): only synthetic shapes timed")
    m = machine()
    print(f"machine: {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
          f"command: {m['command']}")
    print_table(["shape", "L x d x F, batch", "active", "ours tok/s", "dense tok/s", "speed-up",
                 "ours GFLOP/s (needed work)", "dense GFLOP/s", "matmul peak GFLOP/s",
                 "ours / peak", "peak RSS MB ours / dense", "params+grads+Adam MB"], rows)
    print(f"written {write_result('train', {'results': results})}")
    from plots import plot_result

    print(f"written {plot_result('train')}")


if __name__ == "__main__":
    main()
