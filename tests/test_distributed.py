"""The real ``torchrun`` launcher on CPU (gloo, 2 processes): a feature-sharded run, and a DDP
run whose rank dies. Most distributed properties are tested with forked ranks, which start
without re-importing everything (tests/test_sharding.py, tests/test_resume.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_procs import assert_close, final_weights, run_to_end

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


def train_cmd(out: Path, n_steps: int, mode: str | None, *extra: str, nproc: int = 2) -> list[str]:
    """``clt_lens train`` in one process (mode None) or under torchrun with ``--distributed``."""
    head = [sys.executable, "-m", "clt_lens"]
    if mode is not None:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "clt_lens"]
    cmd = [*head, "train", *COMMON, "--n_steps", str(n_steps), "--out_dir", str(out), *extra]
    return cmd + (["--distributed", mode] if mode is not None else [])


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def single(out: Path, n_steps: int, *extra: str) -> None:
    run_ok(train_cmd(out, n_steps, None, *extra))


def torchrun(out: Path, n_steps: int, mode: str, *extra: str, nproc: int = 2) -> None:
    run_ok(train_cmd(out, n_steps, mode, *extra, nproc=nproc))


def assert_same_metrics(a: Path, b: Path) -> None:
    """Logged clipping norm, L0, EV and dead fractions are global, so equal to one process's."""
    import json

    def train_records(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "train"]

    ra, rb = train_records(a), train_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb):
        for key in ("loss", "grad_norm", "ev_per_layer", "l0_per_layer", "dead_frac_per_layer"):
            assert torch.allclose(torch.tensor(x[key], dtype=torch.float64),
                                  torch.tensor(y[key], dtype=torch.float64),
                                  rtol=1e-5, atol=1e-6), (x["step"], key, x[key], y[key])


def test_torchrun_feature_sharded_run_is_consolidated_and_exports(tmp_path: Path):
    """The real launcher: 2 feature ranks under torchrun equal one process; the run's final/ is
    consolidated from the shards, and ``clt-lens consolidate`` / ``export`` take a sharded
    checkpoint straight from the run directory."""
    n = 4
    single(tmp_path / "single", n)
    run = tmp_path / "feature"
    torchrun(run, n, "feature", "--checkpoint_every", "2")
    assert_close(final_weights(tmp_path / "single"), final_weights(run))
    assert_same_metrics(tmp_path / "single", run)
    ck = run / "checkpoints" / "step_00000004"
    assert (ck / "shards.json").is_file() and not (ck / "sae_weights.safetensors").exists()
    out = tmp_path / "consolidated"
    run_ok([sys.executable, "-m", "clt_lens", "consolidate", str(run), "--out", str(out)])
    assert_close(final_weights(run), load_file(str(out / "sae_weights.safetensors")), tol=0)
    r = run_ok([sys.executable, "-m", "clt_lens", "export", str(ck), str(tmp_path / "ct")])
    assert (tmp_path / "ct" / "W_dec_0.safetensors").is_file(), r.stdout


# ---- the activation cache as the source: per-rank shard reads, a 2-D grid, a dead rank --------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "cache"
    cmd = [sys.executable, "-m", "clt_lens", "cache", "--out_dir", str(out), "--n_tokens",
           "8192", "--shard_tokens", "1024", "--context_size", "64", "--progress", "false"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _worker_pid(launcher: int, rank: int) -> int | None:
    """PID of the torchrun worker with RANK=rank started (directly or not) by ``launcher``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() not in env or b"TORCHELASTIC_RUN_ID" not in b" ".join(env):
                continue
            pid = int(proc.name)
            while pid > 1:  # is it a descendant of the launcher? (ppid: field 4 of stat)
                stat = (Path("/proc") / str(pid) / "stat").read_text()
                pid = int(stat.rsplit(")", 1)[1].split()[1])
                if pid == launcher:
                    return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def test_ddp_shard_reads_resume_exactly_after_a_rank_dies(tmp_path: Path, cache_dir: Path):
    """Each DDP rank reads its own cache shards; killing one rank under torchrun fails the whole
    run with torchrun's error, the last checkpoint stays whole, and resuming from it on the same
    layout ends where an uninterrupted run ends (reference and resume run as forked ranks)."""
    import sae_lens

    import clt_lens  # noqa: F401
    from clt_lens.config import ConfigError, load_config
    from clt_lens.training import CLTTrainingRunner, TrainConfig

    n = 12
    src = ["--cache_dir", str(cache_dir), "--data_parallel_reads", "shards"]

    def flags(out: Path, *extra: str) -> list[str]:
        return [*COMMON, "--n_steps", str(n), "--out_dir", str(out), "--distributed", "ddp",
                *src, *extra]  # fmt: skip

    run_to_end(flags(tmp_path / "ref"), nproc=2)
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run, n, "ddp", *src, "--checkpoint_every", "2"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = run / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_00000004":
            break
        time.sleep(0.01)
    victim = _worker_pid(proc.pid, 1)
    assert proc.poll() is None and victim is not None, "the run ended before a rank was killed"
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "ChildFailedError" in err and "SIGKILL" in err, err[-3000:]
    # the checkpoint LATEST names is complete: it loads in one process and resumes exactly
    ck = run / "checkpoints" / latest.read_text().strip()
    assert ck.name < f"step_{n:08d}"
    sae = sae_lens.SAE.load_from_disk(str(ck))
    assert sae.cfg.d_sae == 64
    run_to_end(flags(run, "--checkpoint_every", "2"), resume=run, nproc=2)
    assert_close(final_weights(tmp_path / "ref"), final_weights(run), tol=1e-6)
    # one process cannot take over two ranks' separate data positions: refused, named
    cfg = load_config(TrainConfig, None, [*COMMON, "--out_dir", str(tmp_path / "one"), *src])
    with pytest.raises(ConfigError, match="2 data-parallel ranks each reading its own part"):
        CLTTrainingRunner(cfg, resume=run)
