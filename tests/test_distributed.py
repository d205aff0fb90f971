"""torchrun on CPU (gloo, 2 processes): feature sharding and DDP equal one process."""

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


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "sae_weights.safetensors"))


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), (
            f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"
        )


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


def test_feature_sharded_equals_single_and_resumes_in_one_process(tmp_path: Path):
    n = 6
    single(tmp_path / "single", n)
    torchrun(
        tmp_path / "feature", n, "feature", "--checkpoint_every", "3", "--keep_checkpoints", "5"
    )
    ref = final_weights(tmp_path / "single")
    assert_close(ref, final_weights(tmp_path / "feature"))
    assert_same_metrics(tmp_path / "single", tmp_path / "feature")
    # the sharded run's checkpoint loads in one process and resumes there (world size 2 -> 1)
    import sae_lens

    import clt_lens  # noqa: F401

    ck = tmp_path / "feature" / "checkpoints" / "step_00000003"
    sae = sae_lens.SAE.load_from_disk(str(ck))
    assert sae.cfg.d_sae == 64 and sae.W_enc.shape[-1] == 64
    # ... and exports to a circuit-tracer set that encodes like it
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    from clt_lens.circuits.export import write_circuit_tracer_set

    ct = write_circuit_tracer_set(ck, tmp_path / "circuit_tracer")
    tc = load_clt(str(ct), feature_input_hook="ln2.hook_normalized", device=torch.device("cpu"),
                  dtype=torch.float32)
    x = torch.randn(16, sae.n_layers, sae.cfg.d_in)
    ours = sae.encode(x)
    for layer in range(sae.n_layers):
        assert torch.allclose(tc.encode_layer(x[:, layer], layer), ours[:, layer], atol=1e-5)
    single(tmp_path / "feature", n, "--resume", str(ck), "--checkpoint_every", "3")
    assert_close(ref, final_weights(tmp_path / "feature"))


def test_ddp_equals_single_with_the_same_global_batch(tmp_path: Path):
    n = 4
    single(tmp_path / "single", n)
    torchrun(tmp_path / "ddp", n, "ddp", "--data_parallel_reads", "slice")
    assert_close(final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp"))
    assert_same_metrics(tmp_path / "single", tmp_path / "ddp")


def test_uneven_feature_split_is_refused(tmp_path: Path):
    cmd = train_cmd(tmp_path, 1, "feature", "--d_sae", "63")
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode != 0
    assert "does not split evenly over 2 feature ranks" in r.stderr


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


def test_2d_grid_equals_single(tmp_path: Path, cache_dir: Path):
    """2 data groups x 2 feature groups (4 processes) = one process with the same batch."""
    src = ["--cache_dir", str(cache_dir)]
    run_ok(train_cmd(tmp_path / "single", 4, None, *src))
    run_ok(train_cmd(tmp_path / "grid", 4, "2d", *src, "--feature_parallel_size", "2",
                     "--data_parallel_reads", "slice", nproc=4))
    assert_close(final_weights(tmp_path / "single"), final_weights(tmp_path / "grid"))
    assert_same_metrics(tmp_path / "single", tmp_path / "grid")


def test_ddp_shard_reads_resume_exactly_after_a_rank_dies(tmp_path: Path, cache_dir: Path):
    """Each DDP rank reads its own cache shards; killing one rank fails the whole run with
    torchrun's error, the last checkpoint stays whole, and resuming from it on the same layout
    ends where an uninterrupted run ends."""
    import sae_lens

    import clt_lens  # noqa: F401

    n = 24
    src = ["--cache_dir", str(cache_dir), "--data_parallel_reads", "shards"]
    run_ok(train_cmd(tmp_path / "ref", n, "ddp", *src))
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
    run_ok(train_cmd(run, n, "ddp", *src, "--checkpoint_every", "2", "--resume", str(run)))
    assert_close(final_weights(tmp_path / "ref"), final_weights(run), tol=1e-6)
    # one process cannot take over two ranks' separate data positions: refused, named
    r = subprocess.run(train_cmd(tmp_path / "one", n, None, *src, "--resume", str(run)),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode != 0
    assert "2 data-parallel ranks each reading its own part" in r.stderr, r.stderr[-2000:]
