"""`clt-lens demo` end to end at tiny sizes: every stage runs and the outputs exist."""

import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_whole_path(tmp_path: Path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "clt_lens", "demo", "--out", str(out), "--cache-tokens", "16384",
         "--steps", "30", "--feature-tokens", "4096", "--eval-tokens", "1024"],
        capture_output=True, text=True, env={"OMP_NUM_THREADS": "2", **_env()},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CE recovered" in r.stdout and "| layer | MSE | FVU |" in r.stdout  # the eval table
    assert "clt-lens serve" in r.stdout and "Neuronpedia export" in r.stdout
    for rel in ("index.html", "train/final/cfg.json", "train/training_curves.png", "eval/eval.json",
                "features/features.json", "circuit_tracer/config.yaml"):
        assert (out / rel).exists(), rel
    assert list((out / "graphs").glob("*.json")), "no graph JSON"
    assert list((out / "features" / "neuronpedia" / "exports").rglob("batch-0.jsonl.gz"))
    index = (out / "index.html").read_text()
    assert "training_curves.png" in index and "eval_layers.png" in index
    # the viewer's instructions, linked from the index
    assert 'href="viewer_help.html"' in index
    assert "Intervene" in (out / "viewer_help.html").read_text()


def _env():
    import os

    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    return env
