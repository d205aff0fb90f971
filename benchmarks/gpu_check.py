"""One prepared GPU check: the CUDA tests, the training step, the cache reader and the demo.

    python benchmarks/gpu_check.py               # one CUDA GPU: about 5-8 minutes
    python benchmarks/gpu_check.py --cpu-smoke   # no GPU: the same script on shrunk shapes

It prints one table and writes ``benchmarks/results/gpu_check.json`` (``gpu_check_cpu-smoke``
for the smoke run). Rows:

- **tests**: the suite's device-parametrised tests (``[cuda]`` ids) and the ``gpu``-marked
  ones, on the GPU;
- **matmul peak**: fp32 (TF32 off, as the step runs) and bf16 matmul FLOP/s measured now;
- **step**: the whole training step (forward, backward, clipping, fused Adam) at the demo
  shape and at a GPT-2-small shape (L=12, d=768, F=12,288 per layer, batch 4,096), sparse
  (``decode: auto``, ~1% of features active) and dense, fp32 and bf16 autocast: tokens/s,
  achieved TFLOP/s on the work needed (encoder + decoding of the active features), peak memory;
- **cache reader**: tokens/s of fp32 activations delivered to the GPU from a compressed cache,
  dequantised on the host or on the GPU;
- **demo**: ``clt-lens demo --device cuda`` end to end, wall time.

Each section runs in a child process, so one failure (or out-of-memory) is reported in its row
and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TEST_FILES = ["tests/test_clt.py", "tests/test_clt_sparse.py", "tests/test_trainer_options.py",
              "tests/test_cache_reader.py", "tests/test_circuits_export.py",
              "tests/test_circuits_attribution.py", "tests/test_features.py"]  # fmt: skip

FULL = {
    "device": "cuda",
    "shapes": {"demo": (4, 128, 1024, 1024), "gpt2-small": (12, 768, 12288, 4096)},
    "precisions": ("fp32", "bf16"),
    "steps": 6,
    "cache_tokens": 262_144,
    "demo_args": [],
    "tests_k": "cuda or gpu",
}
SMOKE = {
    "device": "cpu",
    "shapes": {"demo": (2, 64, 256, 256), "gpt2-small": (3, 64, 512, 256)},
    "precisions": ("fp32", "bf16"),
    "steps": 2,
    "cache_tokens": 8192,
    "demo_args": ["--cache-tokens", "8192", "--steps", "10", "--feature-tokens", "2048",
                  "--eval-tokens", "1024"],
    "tests_k": "cpu and (decoders_match or encoder_grad_gather)",
    "test_files": ["tests/test_clt_sparse.py"],
}


# ---- sections (each runs in its own process) ---------------------------------------------------
def section_matmul(cfg: dict) -> dict:
    import torch
    from common import matmul_peak

    torch.backends.cuda.matmul.allow_tf32 = False
    out = {"fp32_flops": matmul_peak(2048 if cfg["device"] == "cuda" else 512,
                                     device=cfg["device"])}  # fmt: skip
    if cfg["device"] == "cuda":
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        out["bf16_flops"] = 10 * 2 * n**3 / (time.perf_counter() - t)
    return out


def section_step(cfg: dict, shape: str, precision: str, mode: str) -> dict:
    import resource

    import torch
    from train import _setup, work_flops

    torch.backends.cuda.matmul.allow_tf32 = False
    L, d, F, B = cfg["shapes"][shape]
    device = cfg["device"]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, step = _setup(L, d, F, B, 0.01, device=device,
                     autocast="bf16" if precision == "bf16" else "none")  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(mode)
    times, l0s = [], []
    for _ in range(cfg["steps"]):
        sec, l0 = step(mode)
        times.append(sec)
        l0s.append(l0)
    sec = sorted(times)[len(times) // 2]
    l0 = sorted(l0s)[len(l0s) // 2]
    needed, dense = work_flops(L, d, F, B, l0)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"tokens_per_s": B / sec, "step_s": sec, "active_frac": l0 / F,
            "needed_tflops": needed / sec / 1e12, "work_tflops": (needed if mode == "auto"
                                                                  else dense) / sec / 1e12,
            "peak_mem_mb": peak_mb}  # fmt: skip


def section_reader(cfg: dict, on_device: bool) -> dict:
    import torch

    from clt_lens.cache import CacheConfig, CacheReader, generate_cache
    from clt_lens.models import load_model

    device = cfg["device"]
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model("embedded", device=device)
        generate_cache(CacheConfig(out_dir=tmp, n_tokens=cfg["cache_tokens"], progress=False,
                                   device=device), model=model)  # fmt: skip
        kw = {"decode_device": device if on_device else "cpu"}
        reader = CacheReader(tmp, batch_size=4096, device=device, loop=False, **kw)
        n, t = 0, time.perf_counter()
        for x, _y in reader:
            n += x.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        reader.close()
        per_token = 2 * x.shape[1] * x.shape[2] * 4
    return {"tokens_per_s": n / sec, "gb_per_s": n * per_token / sec / 1e9, "tokens": n}


def section_demo(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "clt_lens", "demo", "--device", cfg["device"],
                            "--out", tmp, *cfg["demo_args"]], capture_output=True, text=True)
        sec = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-1500:])
    return {"seconds": sec}


def section_tests(cfg: dict) -> dict:
    files = cfg.get("test_files", TEST_FILES)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                        cfg["tests_k"], *files], cwd=ROOT, capture_output=True, text=True)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    return {"exit": r.returncode, "summary": tail, "seconds": time.perf_counter() - t}


SECTIONS = {"matmul": section_matmul, "step": section_step, "reader": section_reader,
            "demo": section_demo, "tests": section_tests}  # fmt: skip


def _flops(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP/s" if x >= 1e11 else f"{x / 1e9:.1f} GFLOP/s"


def run_section(name: str, mode: str, *args) -> dict:
    spec = json.dumps({"name": name, "mode": mode, "args": args})
    t = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--section", spec], capture_output=True,
                       text=True, cwd=ROOT)  # fmt: skip
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300],
                "seconds": time.perf_counter() - t}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: shrunk shapes on the CPU")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out "
                    f"({', '.join(SECTIONS)})")  # fmt: skip
    ap.add_argument("--section", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        spec = json.loads(args.section)
        cfg = SMOKE if spec["mode"] == "cpu-smoke" else FULL
        print(json.dumps(SECTIONS[spec["name"]](cfg, *spec["args"])))
        return 0
    import torch
    from common import machine, print_table, write_result

    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to check the script on the CPU",
              file=sys.stderr)
        return 2
    cfg = SMOKE if args.cpu_smoke else FULL
    skip = {s for s in args.skip.split(",") if s}
    t0 = time.perf_counter()
    res: dict = {"mode": mode, "machine": machine(), "steps": {}, "reader": {}}
    rows: list[list[str]] = []
    if "tests" not in skip:
        res["tests"] = run_section("tests", mode)
        rows.append(["tests", cfg["tests_k"], res["tests"].get("summary",
                     res["tests"].get("error", ""))[:60], "", "", ""])  # fmt: skip
    res["matmul"] = run_section("matmul", mode)
    peak32 = res["matmul"].get("fp32_flops", 0)
    peak16 = res["matmul"].get("bf16_flops", peak32)
    rows.append(["matmul peak", "fp32 / bf16", f"{_flops(peak32)} / {_flops(peak16)}", "", "",
                 ""])  # fmt: skip
    if "step" not in skip:
        for shape in cfg["shapes"]:
            for precision in cfg["precisions"]:
                for step_mode in ("auto", "dense"):
                    key = f"{shape}/{precision}/{step_mode}"
                    r = run_section("step", mode, shape, precision, step_mode)
                    res["steps"][key] = r
                    peak = peak16 if precision == "bf16" else peak32
                    if "error" in r:
                        rows.append(["step", key, "", "", "", r["error"][:60]])
                        continue
                    rows.append(["step", key, f"{r['tokens_per_s']:,.0f} tok/s",
                                 f"{_flops(r['needed_tflops'] * 1e12)} on the work needed "
                                 f"({r['needed_tflops'] * 1e12 / max(peak, 1):.0%} of peak)",
                                 f"{r['peak_mem_mb']:,.0f} MB peak",
                                 f"{r['active_frac']:.2%} active"])  # fmt: skip
    if "reader" not in skip:
        for on_device in (False, True):
            key = "dequantise on " + ("device" if on_device else "host")
            r = run_section("reader", mode, on_device)
            res["reader"][key] = r
            rows.append(["cache reader", key, f"{r.get('tokens_per_s', 0):,.0f} tok/s",
                         f"{r.get('gb_per_s', 0):.2f} GB/s fp32", "",
                         r.get("error", "")[:60]])  # fmt: skip
    if "demo" not in skip:
        res["demo"] = run_section("demo", mode)
        rows.append(["demo", f"clt-lens demo --device {cfg['device']}",
                     f"{res['demo'].get('seconds', 0):.0f} s", "", "",
                     res["demo"].get("error", "")[:60]])  # fmt: skip
    res["seconds"] = time.perf_counter() - t0
    m = res["machine"]
    print(f"machine: {m['cuda'] or m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
          f"command: {m['command']}; {res['seconds'] / 60:.1f} min")
    print_table(["check", "what", "result", "throughput", "memory", "note"], rows)
    name = "gpu_check" if mode == "gpu" else "gpu_check_cpu-smoke"
    print(f"written {write_result(name, res)}")
    failed = any("error" in v for v in [res.get("tests", {}), res.get("demo", {}),
                                       *res["steps"].values(), *res["reader"].values()])
    return 1 if failed or res.get("tests", {}).get("exit", 0) != 0 else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
