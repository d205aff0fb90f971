"""Training-step throughput: our step vs a dense-decoding reference, FLOP/s, peak memory.

    python benchmarks/train.py            # demo shape and L=12 d=256 F=2048 B=512
    python benchmarks/train.py --quick    # fewer repeats
    python benchmarks/train.py --profile  # where the L=12 step's time goes, against its floor

Every step timed is the trainer's own (``Trainer._train_step``, built by the real runner:
losses, backward, global-norm clipping folded into fused Adam, the metrics it logs).
Activations are Gaussian; JumpReLU thresholds are set per feature so that each ``--active``
fraction (default 1%, 2% and 3%, the range trained CLTs of the field have) of the features
fire. ``--demo`` also times the step on the demo's trained CLT with its cached activations.

Three steps are timed interleaved on one model in one process (the machine is shared and
noisy: separate processes differ by 10-20%): ours (on the CPU, sparse decoding through the C
kernels of ``clt_lens/clt/cpu_kernels.c``), the same sparse step with torch's sparse ops
instead of the kernels, and dense decoding; in blocks of one untimed and two timed steps per
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
# "auto" = what training uses (sparse at these densities; on the CPU through the C decode
# kernels), "torch-ops" = the same sparse step with torch's sparse ops instead of the kernels
MODES = ("auto", "torch-ops", "dense")


# Where a profiled op's self time goes: by the custom autograd function (or optimizer call)
# it runs under, then by the op itself.
_UNDER = {
    "_SparseDecode": {"aten::_embedding_bag": "decoder forward (gather-and-sum of W_dec rows)",
                      "aten::embedding_bag": "decoder forward (gather-and-sum of W_dec rows)",
                      "aten::linalg_vector_norm": "decoder norms (forward)",
                      "*": "decoder forward: other (value gathers, output buffer)"},
    "_SparseDecodeBackward": {
        "aten::sparse_sampled_addmm": "decoder backward: dL/da at the support (sampled_addmm)",
        "aten::addmm": "decoder backward: dL/dW_dec (CSR^T @ grad)",
        "aten::sort": "support transposition (sort)",
        "*": "decoder backward: other (norm-gradient scale, dL/da reorder)"},
    "_EncoderGradGatherBackward": {"aten::sort": "support transposition (sort)",
                                   "*": "encoder backward: torch ops (CSR^T @ x, bias, gathers)"},
    "Optimizer.step#Adam.step": {"*": "Adam (fused, clipping folded in as grad_scale)"},
    "aten::_foreach_norm": {"*": "gradient norm (clipping)"},
}
_TOP = {
    "aten::bmm": "encoder forward (one batched matmul)",
    "aten::nonzero": "support building: torch ops (compare, nonzero, index)",
    "aten::gt": "support building: torch ops (compare, nonzero, index)",
    "aten::index": "support building: torch ops (compare, nonzero, index)",
    "aten::sort": "support transposition (sort)",
    "clt_lens::decode_forward": "decoder forward and norms (C kernel)",
    "clt_lens::decode_backward": "decoder backward: dL/da, dL/dW_dec, norm gradient (C kernel)",
    "clt_lens::encoder_grad": "encoder backward (C kernel: dL/dW_enc, dL/db_enc)",
    "clt_lens::support_above": "support building (C kernel: compare, positions, values)",
}
_OTHER = "elementwise and small ops (activation, losses, metrics)"


def _piece(ev) -> str:
    if ev.name.startswith("clt_lens::"):  # our kernels' ranges
        return _TOP[ev.name]
    parent = ev.cpu_parent
    while parent is not None:
        table = _UNDER.get(parent.name)
        if table is not None:
            return table.get(ev.name, table["*"])
        parent = parent.cpu_parent
    return _TOP.get(ev.name, _OTHER)


def profile_child(active: float, steps: int = 4) -> dict:
    """Self CPU time per piece of the L=12 training step (torch.profiler), and the step's
    floor: the encoder forward at the matmul peak measured here plus the fused Adam pass as
    measured."""
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
    for ev in prof.events():
        if ev.name.startswith(("aten::", "_fused", "clt_lens::")) or \
                ev.name == "Optimizer.step#Adam.step":
            name = _piece(ev)
            pieces[name] = pieces.get(name, 0.0) + ev.self_cpu_time_total / 1e3 / steps
    peak = max(matmul_peak() for _ in range(3))
    encoder_ms = 2 * L * B * d * F / peak * 1e3
    adam_ms = pieces.get("Adam (fused, clipping folded in as grad_scale)", 0.0)
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


class _FixedSource:
    """A training source that hands out one settable batch (``batch``) every step."""

    def __init__(self, x, y, context_size: int = 128) -> None:
        from clt_lens.training.sources import SourceInfo

        self.batch = (x, y)
        _, n_layers, d = x.shape
        self.info = SourceInfo("bench@0", "bench", "ln2.hook_normalized", "hook_mlp_out",
                               n_layers, d, context_size, "bench")  # fmt: skip

    def next(self):
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def real_trainer(cfg, source):
    """The Trainer a run of ``cfg`` on ``source`` loops over, built by the real runner; its
    ``_train_step()`` is the step ``clt-lens train`` runs (clipping, Adam, metrics and all)."""
    from clt_lens.training.runner import CLTTrainingRunner
    from clt_lens.training.trainer import Trainer

    class _Built(Trainer):
        def train(self):  # hand the built trainer back instead of looping
            return self

    runner = CLTTrainingRunner(cfg, override_source=source, override_heldout=source.next())
    runner.trainer_cls = _Built
    return runner.run()


def _timed_step(trainer, source, device: str):
    """``step(mode, batch=None) -> (seconds, mean L0 per layer)``: one real training step in
    decode mode ``mode`` (a "-torch-ops" suffix: without the C kernels; "torch-ops" alone:
    "auto" without them) on ``batch`` (default: the source's own batch)."""
    import torch

    from clt_lens.clt import cpu_kernels

    default = source.batch
    cuda = torch.device(device).type == "cuda"

    def step(mode: str, batch=None) -> tuple[float, float]:
        source.batch = default if batch is None else tuple(t.to(device) for t in batch)
        trainer.clt.cfg.decode = mode.replace("torch-ops", "").strip("-") or "auto"
        cpu_kernels.set_enabled("torch-ops" not in mode)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        rec = trainer._train_step()  # reads its metrics back: the step is done on CUDA too
        return time.perf_counter() - t, float(rec["l0"])

    return step


def _setup(L: int, d: int, F: int, B: int, active: float, device: str = "cpu",
           autocast: str = "none", sample=None):  # fmt: skip
    """The real trainer for a CLT of this shape on ``device`` with thresholds giving
    ``active`` firing, and ``step(mode, batch=None) -> (seconds, mean L0)`` running one of its
    training steps in a decode mode.

    ``sample``: an ``(x, y)`` batch to calibrate on and train on by default (Gaussian if None);
    ``step`` may be given another batch (e.g. one from a cache reader).
    """
    import tempfile

    import torch

    from clt_lens.clt.config import CLTSpec
    from clt_lens.training.config import TrainConfig

    torch.manual_seed(0)
    if sample is None:
        x = torch.randn(B, L, d, device=device)
        y = torch.randn(B, L, d, device=device)
    else:
        x, y = (t.to(device) for t in sample)
    source = _FixedSource(x, y)
    cfg = TrainConfig(
        clt=CLTSpec(d_sae=F), batch_size=B, lr=1e-4, lr_warmup_steps=0, sparsity_warmup_steps=0,
        eval_every=10**9, normalization_tokens=B, progress=False, device=device,
        autocast=autocast, out_dir=tempfile.mkdtemp(prefix="clt-bench-"),
    )  # fmt: skip
    trainer = real_trainer(cfg, source)
    clt = trainer.clt
    with torch.no_grad():  # thresholds at the (1 - active) quantile of each feature's pre-acts
        pre = clt.preacts_lbf(clt.normalize_inputs(x))  # [L, B, F]
        q = torch.quantile(pre.float().cpu(), 1 - active, dim=1).to(device)
        clt.log_threshold.copy_(q.clamp_min(1e-3).log())
        del pre
    return clt, _timed_step(trainer, source, device)


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
        "torch_ops_step_s": med["torch-ops"],
        "step_s_all": times["auto"], "dense_step_s_all": times["dense"],
        "torch_ops_step_s_all": times["torch-ops"],
        "flops_needed": needed, "flops_dense": dense,
        "params_plus_adam_mb": n_params * 4 * 4 / 2**20,  # weights, grads, two Adam moments
        "matmul_peak_flops": sorted(peaks)[-1],
        "matmul_peak_flops_all": peaks,
    }  # fmt: skip


def trained_child(demo: str, repeats: int) -> dict:
    """Our step against dense decoding on the demo's trained CLT and its cached activations
    (the regime the README's demo trains in), with the demo's training config, through the
    real trainer, interleaved in one process as above."""
    import tempfile

    import torch

    from clt_lens.cache import CacheReader
    from clt_lens.clt.loading import load_clt
    from clt_lens.config import build_config, upgrade_keys
    from clt_lens.training.config import TrainConfig

    run = Path(demo) / "train" / "final"
    saved = upgrade_keys(TrainConfig, json.loads((run / "train_config.json").read_text()))
    saved.update(lr=1e-6, lr_warmup_steps=0, sparsity_warmup_steps=0, eval_every=10**9,
                 progress=False, wandb=False, cache_dir=None, heldout_cache_dir=None,
                 distributed="none", out_dir=tempfile.mkdtemp(prefix="clt-bench-"))  # fmt: skip
    cfg = build_config(TrainConfig, saved)  # lr 1e-6: tiny steps, the regime stays put
    B = cfg.micro_batch_size
    reader = CacheReader(Path(demo) / "cache", batch_size=B, shuffle=True, seed=1)
    it = iter(reader)
    batches = [next(it) for _ in range(6)]
    reader.close()
    source = _FixedSource(*batches[0])
    trainer = real_trainer(cfg, source)
    with torch.no_grad():
        trainer.clt.load_state_dict(load_clt(run).state_dict())
    run_step = _timed_step(trainer, source, "cpu")
    state = {"i": 0}

    def step(mode: str) -> tuple[float, float]:
        state["i"] += 1
        return run_step(mode, batches[state["i"] % len(batches)])

    times, l0s = _interleaved(step, repeats)
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    clt = trainer.clt
    L, d, F = clt.cfg.n_layers, clt.cfg.d_in, clt.cfg.d_sae
    return {"L": L, "d": d, "F": F, "B": B, "active_frac": sorted(l0s)[len(l0s) // 2] / F,
            "step_s": med["auto"], "dense_step_s": med["dense"],
            "torch_ops_step_s": med["torch-ops"]}  # fmt: skip


SWEEP_MODES = ("sparse", "sparse-torch-ops", "dense")


def sweep_child(L: int, d: int, F: int, B: int, active: float) -> dict:
    """Sparse (with and without the C kernels) against dense decoding at one density, decode
    forced, interleaved in one process (medians of 3), and what ``decode: auto`` picks."""
    from clt_lens.clt.comm import FeatureComm
    from clt_lens.clt.losses import _choose_sparse

    clt, step = _setup(L, d, F, B, active)
    times: dict[str, list[float]] = {m: [] for m in SWEEP_MODES}
    l0s = []
    for r in range(3):
        for mode in SWEEP_MODES if r % 2 == 0 else SWEEP_MODES[::-1]:
            step(mode)
            sec, l0 = step(mode)
            times[mode].append(sec)
            l0s.append(l0)
    step("auto")
    auto = "sparse" if _choose_sparse(clt, B, FeatureComm()) else "dense"
    support = clt._density_hint  # the support's density (JumpReLU's window included)
    med = {m: sorted(v)[1] for m, v in times.items()}
    return {"L": L, "d": d, "F": F, "B": B, "target_active": active,
            "active_frac": sorted(l0s)[len(l0s) // 2] / F, "support_frac": support,
            "auto_chose": auto, "auto_max_density": clt.sparse_max_density(),
            **{f"{m}_step_s": v for m, v in med.items()}}  # fmt: skip


def _sweep(densities: list[float]) -> None:
    from common import machine, print_table, write_result

    rows, results = [], []
    for name in SHAPES:
        for active in densities:
            r = _child(["--child", f"sweep:{name}", "--active", str(active)])
            results.append({"shape": name, **r})
            rows.append([name, f"{active:.0%}", f"{r['active_frac']:.1%}",
                         f"{r['support_frac']:.1%}",
                         *(f"{r[f'{m}_step_s'] * 1e3:.0f}" for m in SWEEP_MODES),
                         f"{r['auto_chose']} (<= {r['auto_max_density']:.0%})"])  # fmt: skip
    print(f"machine: {machine()['cores']} cores; command: {machine()['command']}")
    print_table(["shape", "target", "active", "support", "sparse, kernels ms",
                 "sparse, torch ops ms", "dense ms", "auto chose"], rows)  # fmt: skip
    write_result("train_density_sweep", {"machine": machine(), "results": results})


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
    ap.add_argument("--sweep", action="store_true",
                    help="time sparse (with and without the C kernels) against dense decoding "
                    "at 5%%, 10%% and 20%% active (or --active) and stop")  # fmt: skip
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sweep:
        spec = args.active if args.active != ap.get_default("active") else "0.05,0.1,0.2"
        _sweep([float(a) for a in spec.split(",")])
        return
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
        if kind == "sweep":
            out = sweep_child(*shape, float(args.active))
        elif kind == "time":
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
            rss = {m: _child(["--child", f"rss:{name}:{m}", *extra]) for m in ("auto", "dense")}
            speedup = t["dense_step_s"] / t["step_s"]
            peak = t["matmul_peak_flops"]
            results.append({"shape": name, "target_active": active, **t,
                            "peak_rss_mb": rss["auto"]["peak_rss_mb"],
                            "dense_peak_rss_mb": rss["dense"]["peak_rss_mb"],
                            "speedup_vs_dense": speedup})  # fmt: skip
            rows.append([
                name, f"{t['L']}x{t['d']}x{t['F']} B{t['B']}", f"{t['active_frac']:.2%}",
                f"{t['B'] / t['step_s']:.0f}", f"{t['B'] / t['torch_ops_step_s']:.0f}",
                f"{t['B'] / t['dense_step_s']:.0f}", f"{speedup:.2f}x",
                f"{t['flops_needed'] / t['step_s'] / 1e9:.1f}",
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
                     f"{trained['B'] / trained['torch_ops_step_s']:.0f}",
                     f"{trained['B'] / trained['dense_step_s']:.0f}", f"{speedup:.2f}x",
                     "", "", "", "", "", ""])  # fmt: skip
    else:
        print(f"no trained demo CLT in {args.demo} (run `make demo`): only synthetic shapes timed")
    m = machine()
    print(f"machine: {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
          f"command: {m['command']}")
    print_table(["shape", "L x d x F, batch", "active", "ours tok/s",
                 "ours, torch ops tok/s", "dense tok/s", "speed-up vs dense",
                 "ours GFLOP/s (needed work)", "dense GFLOP/s", "matmul peak GFLOP/s",
                 "ours / peak", "peak RSS MB ours / dense", "params+grads+Adam MB"], rows)
    print(f"written {write_result('train', {'results': results})}")
    from plots import plot_result

    print(f"written {plot_result('train')}")


if __name__ == "__main__":
    main()
