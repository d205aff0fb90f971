"""Run every benchmark in this folder, one after another (what ``make bench`` runs).

    python benchmarks/run_all.py                 # every benchmark at its default size
    python benchmarks/run_all.py --only train,cache
    python benchmarks/run_all.py --quick         # small sizes: checks the scripts run

Each script prints its own table (with the machine and the command) and writes its JSON and
PNGs under benchmarks/results/. A failing script does not stop the others; the exit status is
non-zero if any failed. Run on a quiet machine: the timings of one script are compared within
that script's run, but a busy machine still blurs them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script -> arguments for --quick (None: the script has no reduced mode and is skipped by it)
BENCHMARKS: dict[str, list[str] | None] = {
    "train.py": ["--quick"],
    "clt_decode.py": ["--reps", "1", "--no-sweep"],
    "cache.py": ["--tokens", "8192", "--shard-tokens", "4096"],
    "cache_fidelity.py": ["--tokens", "16384", "--steps", "20"],
    "features.py": ["--tokens", "10000", "--repeats", "1"],
    "attribution.py": ["--caps", "50", "--prompts", "1"],
    "distributed.py": ["--quick"],
    "clt_vs_plt.py": ["--steps", "20", "--d-sae", "128", "--batch-size", "256", "--prompts", "2",
                      "--ablate", "4", "--eval-tokens", "1024", "--density-tokens", "4096",
                      "--out", "runs/bench_quick/clt_vs_plt", "--name", "clt_vs_plt_quick"],
    "dead_features.py": ["--steps", "10", "--variants", "demo,b_enc_init", "--cache-tokens",
                         "16384", "--eval-tokens", "1024", "--density-tokens", "4096",
                         "--out", "runs/bench_quick/dead_features", "--name",
                         "dead_features_quick"],
    "gpu_check.py": ["--cpu-smoke"],  # without a GPU, the default run exits 2 and says why
}
NOT_BENCHMARKS = {"common.py", "plots.py", "run_all.py"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated script names (e.g. train,cache)")
    ap.add_argument("--quick", action="store_true", help="reduced sizes, to check the scripts")
    args = ap.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        wanted = [n if n.endswith(".py") else f"{n}.py" for n in args.only.split(",")]
        unknown = [n for n in wanted if n not in BENCHMARKS]
        if unknown:
            ap.error(f"unknown benchmarks {unknown}; choose from {names}")
        names = wanted
    results = []
    for name in names:
        extra = BENCHMARKS[name] if args.quick else []
        if extra is None:
            results.append((name, "skipped (no quick mode)", 0.0))
            continue
        cmd = [sys.executable, str(HERE / name), *extra]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        code = subprocess.run(cmd).returncode
        results.append((name, "ok" if code == 0 else f"FAILED (exit {code})",
                        time.perf_counter() - t))  # fmt: skip
    print("\n| benchmark | result | minutes |\n|---|---|---:|")
    for name, status, sec in results:
        print(f"| {name} | {status} | {sec / 60:.1f} |")
    return 0 if all(s in ("ok",) or s.startswith("skipped") for _, s, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
