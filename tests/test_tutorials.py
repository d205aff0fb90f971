"""The tutorials run end to end at their --small sizes and write what they promise.

Each tutorial is executed as a subprocess, exactly as a reader would run it. Tutorial 1's
CLT is reused by tutorials 3-5 (``--clt``) to keep the file fast (their fallback, training
a quick CLT, makes the same TrainConfig/CLTTrainingRunner calls as tutorial 1). Tutorial 5
is switched to small sizes by the environment variable rather than the flag.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clt_lens.training.config import saved_train_config

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def run_tutorial(script: str, out: Path, *args: str, small_flag: bool = True,
                 timeout: float = 600) -> str:
    """Run tutorials/<script> from a scratch cwd; return its stdout (fail with the tails)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OPENAI_API_KEY": "", "OPENAI_BASE_URL": "", "MPLBACKEND": "Agg"}
    env.pop("CLT_LENS_TUTORIAL_SMALL", None)
    cmd = [sys.executable, str(TUTORIALS / script), "--out", str(out), *args]
    if small_flag:
        cmd.insert(2, "--small")
    else:
        env["CLT_LENS_TUTORIAL_SMALL"] = "1"
    cwd = out.parent / f"cwd_{out.name}"
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (
        f"{script} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
        f"\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("tut") / "01"
    return out, run_tutorial("01_quickstart.py", out)


def test_01_quickstart(quickstart):
    out, stdout = quickstart
    final = out / "train" / "final"
    for f in ("cfg.json", "sae_weights.safetensors"):
        assert (final / f).is_file()
    assert (out / "train" / "training_curves.png").stat().st_size > 1000
    assert (out / "my_clt" / "sae_weights.safetensors").is_file()
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["n_layers"] == 4 and result["d_sae"] == 64
    assert all(math.isfinite(v) for v in result["per_layer"]["fvu"])
    # the printed table is the evaluation's, number for number
    r = result["replacement"]
    assert f"| CE original | {r['ce_original']:.4f} |" in stdout
    assert "encode identical after the round trip: True" in stdout


def test_02_your_own_model(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from clt_lens.data import read_embedded_documents
    from clt_lens.models import EMBEDDED_DIR

    model_dir = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=64, n_embd=32, n_layer=2,
                                    n_head=2, bos_token_id=0, eos_token_id=0))
    hf.save_pretrained(model_dir)  # safetensors by default
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(EMBEDDED_DIR / f, model_dir / f)
    text = tmp_path / "my_corpus.txt"
    text.write_text("\n\n".join(read_embedded_documents("heldout"))[:20_000], encoding="utf-8")

    out = tmp_path / "02"
    stdout = run_tutorial("02_your_own_model.py", out, "--model-dir", str(model_dir),
                          "--dataset", str(text))
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["n_layers"] == 2 and manifest["d_model"] == 32
    assert manifest["n_tokens"] >= 4096
    cfg = json.loads((out / "train" / "final" / "cfg.json").read_text())
    assert cfg["n_layers"] == 2 and cfg["d_in"] == 32 and cfg["d_sae"] == 64
    saved = json.loads((out / "train" / "train_config.json").read_text())
    assert saved["cache_dir"] == str(out / "cache") and saved["source"]["model"] == str(model_dir)
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["n_layers"] == 2 and result["dataset"] == str(text)
    # a single text file has no held-out split: the script says it evaluates on train text
    assert result["split"] == "train" and "no held-out split" in stdout


def test_03_attribution_and_viewer(quickstart, tmp_path):
    clt = quickstart[0] / "train" / "final"
    out = tmp_path / "03"
    stdout = run_tutorial("03_attribution_and_viewer.py", out, "--clt", str(clt))
    assert (out / "ct_set" / "config.yaml").is_file()
    assert (out / "ct_set" / "W_enc_3.safetensors").is_file()
    graphs = out / "graphs"
    meta = json.loads((graphs / "graph-metadata.json").read_text())
    slug = meta["graphs"][0]["slug"]
    graph = json.loads((graphs / f"{slug}.json").read_text())
    summary = json.loads((graphs / f"{slug}.summary.json").read_text())
    assert summary["n_feature_nodes"] <= 24  # the --small node cap
    assert 0.0 <= summary["replacement_score"] <= 1.0
    assert 0.0 <= summary["completeness_score"] <= 1.0
    assert f"replacement score  {summary['replacement_score']:.3f}" in stdout
    assert len(graph["nodes"]) == summary["n_nodes"] > 0
    # every feature node of the graph has a viewer page
    pages = Path(summary["viewer_features_dir"])
    feature_ids = {n["feature"] for n in graph["nodes"]
                   if n.get("feature_type") == "cross layer transcoder"}
    assert feature_ids and all((pages / f"{i}.json").is_file() for i in feature_ids)
    assert f"clt-lens serve {graphs}" in stdout
    # step 5: the strongest feature-to-feature edge, checked by a direct-effect ablation
    assert graph["metadata"]["clt_lens"]["transcoders"] == str((out / "ct_set").resolve())
    assert "edge check: confirmed" in stdout, stdout[-2000:]


def test_04_autointerp(quickstart, tmp_path):
    clt = quickstart[0] / "train" / "final"
    out = tmp_path / "04"
    stdout = run_tutorial("04_autointerp.py", out, "--clt", str(clt))
    features = out / "features"
    records = [json.loads(line) for line in
               (features / "autointerp.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 4  # --small: max_features 4, all on the middle layer, via the stub
    assert {r["layer"] for r in ok} == {2}
    # the stub explains a feature by its most often marked token
    assert all(re.fullmatch(r'the word ".+"', r["explanation"]) for r in ok)
    assert "using the local stub server" in stdout
    summary = json.loads((features / "autointerp_summary.json").read_text())
    assert summary["features"]["ok"] == 4
    assert list((features / "neuronpedia" / "exports").rglob("explanations/*.jsonl.gz"))
    pages = list((out / "viewer" / "features").rglob("*.json"))
    explained = [json.loads(p.read_text()) for p in pages if p.name != "index.json"]
    assert len(explained) == 4 and all(p["explanation"] for p in explained)


def test_05_saelens_interop(quickstart, tmp_path):
    clt = quickstart[0] / "train"  # a run directory works too
    out = tmp_path / "05"
    # small sizes from CLT_LENS_TUTORIAL_SMALL=1
    stdout = run_tutorial("05_saelens_interop.py", out, "--clt", str(clt), small_flag=False)
    assert f"using the CLT in {clt / 'final'}" in stdout
    tc_cfg = json.loads((out / "layer_1_transcoder" / "cfg.json").read_text())
    assert tc_cfg["architecture"] == "jumprelu_transcoder"
    assert tc_cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert tc_cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert "equals clt.encode(x)[:, 1]" in stdout
    import importlib.util

    from clt_lens.vendor_js import DASHBOARD_SCRIPTS, find_js_dir

    if importlib.util.find_spec("sae_dashboard") is None:
        assert "skipped: sae-dashboard is not installed" in stdout
    elif find_js_dir(DASHBOARD_SCRIPTS) is None:
        assert "skipped:" in stdout and "clt-lens serve --install-js" in stdout
    else:
        html = (out / "dashboard_layer_1.html").read_text(encoding="utf-8")
        assert "DASHBOARD_DATA" in html and '<meta charset="utf-8">' in html


def test_06_clt_vs_plt(tmp_path):
    out = tmp_path / "06"
    stdout = run_tutorial("06_clt_vs_plt.py", out)
    assert "embedded-deep: 8 layers" in stdout
    for kind in ("clt", "plt"):
        cfg = json.loads((out / kind / "train_config.json").read_text())
        assert cfg["clt"]["cross_layer"] == (kind == "clt")
        assert cfg["source"]["model"] == "embedded-deep"
        result = json.loads((out / f"eval_{kind}" / "eval.json").read_text())
        assert result["n_layers"] == 8 and "feature_density" in result
        assert result["training_window"]["step"] == cfg["n_steps"]
    clt_cfg, plt_cfg = (saved_train_config(json.loads((out / k / "train_config.json").read_text()))
                        for k in ("clt", "plt"))
    # one recipe: only the architecture and the coefficient that matches L0 differ
    diff = {k for k in clt_cfg if clt_cfg[k] != plt_cfg[k]}
    assert diff == {"clt.cross_layer", "clt.sparsity_coeff", "out_dir"}
    graphs = json.loads((out / "graphs.json").read_text())
    for kind in ("clt", "plt"):
        rows = graphs[kind]["prompts"]
        assert len(rows) == 2 and all(0 <= r["replacement"] <= 1 for r in rows)
        assert all(r["path_length"]["mean"] >= 1 for r in rows)
    assert [r["prompt"] for r in graphs["clt"]["prompts"]] == \
        [r["prompt"] for r in graphs["plt"]["prompts"]]
    assert (out / "clt_vs_plt.png").stat().st_size > 1000
    assert re.search(r"CLT replacement score higher on \d of 2 prompts", stdout)
