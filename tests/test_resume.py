"""Exact resume as a property: SIGKILL at random steps, resume, bit-identical final weights.

Every regime's run is killed twice at steps drawn from a seed (one in steps 2-5, one in 8-13),
resumed
from what each kill left, and its final weights, optimizer moments and logged metrics must
equal an uninterrupted run's bit for bit. The regimes cover every piece of state that changes a
later step: the sparse/dense decode choice (and a run that switches), TopK, BatchTopK (its
running threshold), per-layer transcoders, gradient accumulation, fp16 with a grad scaler,
dead-feature counters with the pre-activation loss, streaming from the model and reading a
cache, and feature sharding over 2 ranks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_procs import run_killed_at, run_to_end, set_model

BASE = [
    "--d_sae", "128", "--batch_size", "256", "--lr_warmup_steps", "2", "--sparsity_warmup_steps",
    "4", "--normalization_tokens", "512", "--eval_every", "1000", "--log_every", "1",
    "--stream_sequences_per_refill", "8", "--stream_model_batch_size", "8", "--progress", "false",
    "--checkpoint_every", "1", "--keep_checkpoints", "2", "--dead_window_tokens", "1024",
    "--heldout_tokens", "256",
    "--preact_coeff", "1e-3",
]  # fmt: skip
N_STEPS = 16

# regime -> (extra args, seed of the kill steps, data from a cache, feature ranks)
REGIMES = {
    # ~0.5% of features fire: every step after the first decodes sparsely
    "sparse": (["--jumprelu_init_threshold", "1.5", "--sparsity_coeff", "1e-3"], 1, False, 1),
    # ~40% fire: dense decoding throughout
    "dense": (["--sparsity_coeff", "1e-4"], 2, True, 1),
    # density falls through the sparse limit at step 6: dense first, then sparse
    "switching": (["--jumprelu_init_threshold", "0.3", "--sparsity_coeff", "10", "--lr", "3e-3"],
                  3, False, 1),
    "topk": (["--activation", "topk", "--k", "4"], 4, True, 1),
    "batchtopk_accum": (["--activation", "batchtopk", "--k", "4", "--grad_accum", "2"], 5, False,
                        1),
    "plt_fp16": (["--cross_layer", "false", "--autocast", "fp16"], 6, True, 1),
    "sharded_sparse": (["--jumprelu_init_threshold", "1.5", "--distributed", "feature"], 7, True,
                       2),
}


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    """Weights of the final checkpoint, and its optimizer state when written as tensors."""
    ckpt = run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("regime", list(REGIMES))
def test_sigkill_and_resume_is_bit_identical(regime: str, tmp_path: Path, embedded_model,
                                             request):
    extra, seed, from_cache, nproc = REGIMES[regime]
    set_model(embedded_model)
    if from_cache:
        extra = [*extra, "--cache_dir", str(request.getfixturevalue("small_cache"))]
    rng = random.Random(seed)
    kills = [rng.randrange(2, 6), rng.randrange(8, N_STEPS - 2)]

    def args(out: Path) -> list[str]:
        return [*BASE, *extra, "--n_steps", str(N_STEPS), "--out_dir", str(out)]

    ref, run = tmp_path / "ref", tmp_path / "run"
    run_to_end(args(ref), nproc=nproc, in_process=nproc == 1)
    left = [run_killed_at(args(run), kills[0], nproc=nproc)]
    left.append(run_killed_at(args(run), kills[1], resume=run, nproc=nproc))
    run_to_end(args(run), resume=run, nproc=nproc)

    a, b = _final_state(ref), _final_state(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (
            f"{regime}: {k} differs after kills at steps {left} "
            f"(max diff {(a[k].double() - b[k].double()).abs().max():.3g})"
        )
    ra, rb = _records(ref), _records(run)
    assert [r["step"] for r in rb] == list(range(1, N_STEPS + 1)), "metrics gap or repeat"
    for x, y in zip(ra, rb):
        for key in ("loss", "grad_norm", "l0_per_layer", "dead_frac_per_layer", "decode_mode"):
            assert x.get(key) == y.get(key), (regime, x["step"], key, x.get(key), y.get(key))
    modes = {r.get("decode_mode") for r in ra}
    expected = {"sparse": {"sparse"}, "dense": {"dense"}, "switching": {"sparse", "dense"}}
    if regime in expected:  # the regime really is what its name says
        assert expected[regime] <= modes, (regime, [r.get("decode_mode") for r in ra])
