"""``make bench`` runs every benchmark script: a new script must be listed in run_all.py."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_bench_runs_every_benchmark():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - run_all.NOT_BENCHMARKS
    assert scripts == set(run_all.BENCHMARKS), "benchmarks/run_all.py must list every script"
    target = re.search(r"^bench:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert target and "benchmarks/run_all.py" in target.group(1)
