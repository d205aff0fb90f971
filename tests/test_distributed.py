"""torchrun on CPU (gloo, 2 processes): feature sharding and DDP equal one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

COMMON = [
    "--d_sae",
    "64",
    "--batch_size",
    "128",
    "--lr_warmup_steps",
    "1",
    "--lr",
    "3e-3",
    "--sparsity_warmup_steps",
    "2",
    "--normalization_tokens",
    "512",
    "--eval_every",
    "1000",
    "--log_every",
    "1",
    "--stream_sequences_per_refill",
    "4",
    "--stream_model_batch_size",
    "4",
    "--progress",
    "false",
    "--sparsity_coeff",
    "1e-2",
    "--dead_window_tokens",
    "256",
    "--grad_clip",
    "0.05",  # small enough that clipping is active: its norm must be global
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def single(out: Path, n_steps: int, *extra: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "clt_lens",
        "train",
        *COMMON,
        "--n_steps",
        str(n_steps),
        "--out_dir",
        str(out),
        *extra,
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def torchrun(out: Path, n_steps: int, mode: str, *extra: str, nproc: int = 2) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        "-m",
        "clt_lens",
        "train",
        *COMMON,
        "--n_steps",
        str(n_steps),
        "--out_dir",
        str(out),
        "--distributed",
        mode,
        *extra,
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "sae_weights.safetensors"))


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), (
            f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"
        )


def test_feature_sharded_equals_single_and_resumes_in_one_process(tmp_path: Path):
    n = 6
    single(tmp_path / "single", n)
    torchrun(
        tmp_path / "feature", n, "feature", "--checkpoint_every", "3", "--keep_checkpoints", "5"
    )
    ref = final_weights(tmp_path / "single")
    assert_close(ref, final_weights(tmp_path / "feature"))
    # the sharded run's checkpoint loads in one process and resumes there (world size 2 -> 1)
    import sae_lens

    import clt_lens  # noqa: F401

    ck = tmp_path / "feature" / "checkpoints" / "step_00000003"
    sae = sae_lens.SAE.load_from_disk(str(ck))
    assert sae.cfg.d_sae == 64 and sae.W_enc.shape[-1] == 64
    single(tmp_path / "feature", n, "--resume", str(ck), "--checkpoint_every", "3")
    assert_close(ref, final_weights(tmp_path / "feature"))


def test_ddp_equals_single_with_the_same_global_batch(tmp_path: Path):
    n = 4
    single(tmp_path / "single", n)
    torchrun(tmp_path / "ddp", n, "ddp", "--data_parallel_reads", "slice")
    assert_close(final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp"))


def test_uneven_feature_split_is_refused(tmp_path: Path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        "-m",
        "clt_lens",
        "train",
        *COMMON,
        "--d_sae",
        "63",
        "--n_steps",
        "1",
        "--out_dir",
        str(tmp_path),
        "--distributed",
        "feature",
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode != 0
    assert "does not split evenly over 2 feature ranks" in r.stderr
