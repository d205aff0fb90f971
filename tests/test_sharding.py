"""Feature sharding that really shards (ranks forked from this process, joined over gloo).

What is checked: no rank ever creates a tensor with the whole feature axis, from init through
steps, checkpoints and a resume (a dispatch-mode watch over every torch op); each rank's
checkpoint shard holds exactly its slice; sharded training equals one process to 1e-5 on the
sparse decode path and with TopK and BatchTopK (global top-k across shards, with aux-k); the
2-D grid; resumes across world sizes; a rank killed while writing a checkpoint leaves the
previous one whole; consolidation and circuit-tracer export stream; errors name the problem.
``tests/test_distributed.py`` launches the same trainer through the real ``torchrun``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from train_procs import Run, assert_close, final_weights, latest_step, run_killed_at, run_to_end

pytestmark = pytest.mark.distributed

F = 96  # features per layer; no other size of these runs is 96 (what the watch relies on)
COMMON = [
    "--batch_size", "256", "--lr_warmup_steps", "1", "--lr", "3e-3", "--sparsity_warmup_steps",
    "2", "--normalization_tokens", "512", "--eval_every", "2", "--heldout_tokens", "256",
    "--log_every", "1", "--progress", "false", "--sparsity_coeff", "1e-2",
    "--dead_window_tokens", "512", "--grad_clip", "0.05", "--preact_coeff", "1e-3",
]  # fmt: skip


def args(out: Path, n: int, cache: Path, *extra: str, d_sae: int = F) -> list[str]:
    return [*COMMON, "--d_sae", str(d_sae), "--n_steps", str(n), "--cache_dir", str(cache),
            "--out_dir", str(out), *extra]  # fmt: skip


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_same_metrics(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb):
        for key in ("loss", "grad_norm", "ev_per_layer", "l0_per_layer", "dead_frac_per_layer",
                    "auxk"):  # fmt: skip
            assert torch.allclose(torch.tensor(x[key], dtype=torch.float64),
                                  torch.tensor(y[key], dtype=torch.float64),
                                  rtol=1e-5, atol=1e-6), (x["step"], key, x[key], y[key])


class _FeatureAxisWatch(TorchDispatchMode):
    """Records every torch op output that holds all ``n`` features: a dimension of ``n``, or
    the ``ranks`` slices of ``n // ranks`` stacked by a gather (``[ranks, ..., n // ranks]``).

    Consolidation (rank 0 writing ``final/``) is allowed a layer at a time and is excluded."""

    def __init__(self, n: int, log: Path, ranks: int) -> None:
        super().__init__()
        self.n, self.log, self.ranks, self.seen = n, log, ranks, []

    def _whole(self, shape: tuple[int, ...]) -> bool:
        if self.n in shape:
            return True
        r = self.ranks
        return r > 1 and len(shape) >= 2 and shape[0] == r and self.n // r in shape[1:]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and self._whole(tuple(t.shape)):
                names = {f.function for f in inspect.stack()[1:40]}
                if "consolidate" not in names:
                    self.seen.append(f"{func}: {tuple(t.shape)}")
        return out

    def __exit__(self, *exc):
        self.log.write_text(json.dumps(self.seen[:20]))
        return super().__exit__(*exc)


def watch(out: Path, ranks: int = 1):
    return lambda rank: _FeatureAxisWatch(F, out / f"watch_rank{rank}.json", ranks)


def watched(out: Path, nproc: int) -> list[str]:
    return [s for r in range(nproc) for s in json.loads((out / f"watch_rank{r}.json").read_text())]


def test_no_rank_ever_holds_the_whole_feature_axis(tmp_path: Path, small_cache: Path):
    """Init, steps, held-out evals, checkpoints and a resume on 2 feature ranks create no tensor
    with all F features; each checkpoint shard holds exactly its rank's slice."""
    run = tmp_path / "run"
    run_to_end(args(run, 2, small_cache, "--checkpoint_every", "2", "--distributed", "feature"),
               nproc=2, wrap=watch(run, 2))  # fmt: skip
    assert watched(run, 2) == []
    ck = run / "checkpoints" / "step_00000002"
    assert json.loads((ck / "shards.json").read_text())["feature_shards"] == 2
    for k in range(2):
        with safe_open(str(ck / f"sae_weights.f{k:03d}-of-002.safetensors"), "pt") as f:
            assert f.get_slice("W_enc").get_shape() == [4, 128, F // 2]
            assert f.get_slice("W_dec.1").get_shape() == [F // 2, 3, 128]
            assert f.get_slice("log_threshold").get_shape() == [4, F // 2]
            assert ("b_dec" in f.keys()) == (k == 0)  # replicated: written once
        with safe_open(str(ck / f"optimizer.f{k:03d}-of-002.safetensors"), "pt") as f:
            assert f.get_slice("W_enc.exp_avg_sq").get_shape() == [4, 128, F // 2]
            assert f.get_slice("since_fired").get_shape() == [4, F // 2]
    run_to_end(args(run, 4, small_cache, "--checkpoint_every", "2", "--distributed", "feature"),
               resume=run, nproc=2, wrap=watch(run, 2))  # fmt: skip
    assert watched(run, 2) == []
    # the watch does see the whole axis where it exists: one process holds all F features
    one = tmp_path / "one"
    run_to_end(args(one, 1, small_cache), wrap=watch(one))
    assert any(f"{F}" in s for s in watched(one, 1))


SPARSE = ["--jumprelu_init_threshold", "1.5", "--batch_size", "768"]


@pytest.mark.parametrize("variant", [
    SPARSE,
    ["--activation", "topk", "--k", "4"],
    ["--activation", "batchtopk", "--k", "4"],
], ids=["jumprelu_sparse", "topk", "batchtopk"])  # fmt: skip
def test_sharded_equals_one_process(tmp_path: Path, small_cache: Path, variant: list[str]):
    """2 feature ranks = one process: weights, loss, grad norm, L0, EV, dead fractions and the
    aux-k loss (dead features exist from step 2), on the sparse decode path where it applies."""
    n = 5
    run_to_end(args(tmp_path / "one", n, small_cache, *variant))
    run_to_end(args(tmp_path / "two", n, small_cache, *variant, "--distributed", "feature"),
               nproc=2)  # fmt: skip
    assert_close(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    assert_same_metrics(tmp_path / "one", tmp_path / "two")
    modes = [r["decode_mode"] for r in records(tmp_path / "two")]
    if variant is SPARSE:  # each slice (768 x 4 x 48 >= 2^17 activations) decodes sparsely
        assert modes[1:] == ["sparse"] * (n - 1), modes
    else:
        assert any(r["auxk"] > 0 for r in records(tmp_path / "two")), "aux-k never ran"


def test_2d_grid_ddp_and_resume_across_world_sizes(tmp_path: Path, small_cache: Path):
    """2 data x 2 feature ranks (4 processes) and DDP over 2 ranks = one process; a 2-rank
    checkpoint resumes in one process, and a one-process checkpoint on 2 feature ranks, both
    ending where one process ends."""
    n = 6
    ref = tmp_path / "ref"
    run_to_end(args(ref, n, small_cache))
    grid = tmp_path / "grid"
    run_to_end(args(grid, n, small_cache, "--distributed", "2d", "--feature_parallel_size", "2",
                    "--data_parallel_reads", "slice"), nproc=4)  # fmt: skip
    assert_close(final_weights(ref), final_weights(grid))
    assert_same_metrics(ref, grid)
    ddp = tmp_path / "ddp"  # 2 data ranks reading the global batch, each keeping its half
    run_to_end(args(ddp, n, small_cache, "--distributed", "ddp", "--data_parallel_reads",
                    "slice"), nproc=2)  # fmt: skip
    assert_close(final_weights(ref), final_weights(ddp))
    every = ("--checkpoint_every", "2")
    two_to_one = tmp_path / "two_to_one"
    run_killed_at(args(two_to_one, n, small_cache, *every, "--distributed", "feature"), 2,
                  nproc=2)  # fmt: skip
    run_to_end(args(two_to_one, n, small_cache, *every), resume=two_to_one)
    assert_close(final_weights(ref), final_weights(two_to_one))
    one_to_two = tmp_path / "one_to_two"
    run_killed_at(args(one_to_two, n, small_cache, *every), 2)
    run_to_end(args(one_to_two, n, small_cache, *every, "--distributed", "feature"),
               resume=one_to_two, nproc=2)  # fmt: skip
    assert_close(final_weights(ref), final_weights(one_to_two))


@contextlib.contextmanager
def _stall_second_checkpoint(rank: int):
    """In rank 1: after writing its shard of checkpoint step 4, signal and hang (to be killed)."""
    import clt_lens.training.trainer as trainer_mod

    real = trainer_mod.save_tensors

    def slow(path, tensors):
        out = real(path, tensors)
        if rank == 1 and ".step_00000004.tmp" in str(path):
            (Path(path).parents[2] / "rank1_in_checkpoint").touch()
            time.sleep(600)
        return out

    trainer_mod.save_tensors = slow
    try:
        yield
    finally:
        trainer_mod.save_tensors = real


def test_rank_killed_while_writing_a_checkpoint(tmp_path: Path, small_cache: Path):
    """SIGKILL rank 1 inside its checkpoint write: LATEST still names the previous checkpoint,
    which consolidates, loads with SAELens and resumes to the uninterrupted run's weights."""
    import sae_lens

    import clt_lens  # noqa: F401

    n = 6
    a = args(tmp_path / "run", n, small_cache, "--checkpoint_every", "2", "--distributed",
             "feature")  # fmt: skip
    run = Run(a, nproc=2, wrap=_stall_second_checkpoint)
    marker = tmp_path / "run" / "rank1_in_checkpoint"
    deadline = time.time() + 300
    ckpts = tmp_path / "run" / "checkpoints"
    # rank 1 hangs after its weights shard; wait until rank 0 has written all of its files
    # (shards.json comes last) and give it time to commit, which it must not do alone
    rank0_done = (ckpts / ".step_00000004.tmp" / "shards.json", ckpts / "step_00000004")
    while not (marker.exists() and any(p.exists() for p in rank0_done)):
        assert run.alive() and time.time() < deadline, run.error()[-3000:]
        time.sleep(0.01)
    time.sleep(1.0)
    os.kill(run.procs[1].pid, signal.SIGKILL)
    run.kill()  # rank 0 waits at the barrier forever; torchrun would stop it the same way
    assert latest_step(tmp_path / "run") == 2
    assert (ckpts / ".step_00000004.tmp").is_dir()  # the half-written one, never committed
    from clt_lens.training.consolidate import consolidate

    sae = sae_lens.SAE.load_from_disk(str(consolidate(ckpts / "step_00000002", tmp_path / "c")))
    assert sae.cfg.d_sae == F and sae.W_enc.shape == (4, 128, F)
    run_to_end(a, resume=tmp_path / "run", nproc=2)
    assert not (ckpts / ".step_00000004.tmp").exists()
    run_to_end(args(tmp_path / "ref", n, small_cache, "--distributed", "feature"), nproc=2)
    a_w, b_w = final_weights(tmp_path / "ref"), final_weights(tmp_path / "run")
    for k in a_w:
        assert torch.equal(a_w[k], b_w[k]), k


def test_consolidate_and_export_stream_from_shards(tmp_path: Path, small_cache: Path,
                                                   monkeypatch):
    """A 2-shard checkpoint becomes a SAELens folder and a circuit-tracer set that encode like
    the one-process load, reading at most one layer of any tensor at a time."""
    import sae_lens
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    from clt_lens.circuits.export import write_circuit_tracer_set
    from clt_lens.circuits.loading import load_clt as load_ours
    from clt_lens.clt.storage import TensorReader
    from clt_lens.training.consolidate import consolidate

    run = tmp_path / "run"
    run_to_end(args(run, 2, small_cache, "--distributed", "feature"), nproc=2)
    ck = run / "checkpoints" / "step_00000002"
    largest: list[int] = []
    real_chunks, real_index = TensorReader.chunks, TensorReader.read_index

    def chunks(self, name, rows=1):
        for c in real_chunks(self, name, rows):
            largest.append(c.numel())
            yield c

    def read_index(self, name, i):
        t = real_index(self, name, i)
        largest.append(t.numel())
        return t

    monkeypatch.setattr(TensorReader, "chunks", chunks)
    monkeypatch.setattr(TensorReader, "read_index", read_index)
    out = consolidate(ck, tmp_path / "consolidated", chunk_bytes=4 * 128 * 3 * 16)
    one_layer_decoder = F * 4 * 128  # W_dec.0 [F, L, d]
    assert max(largest) <= one_layer_decoder
    clt = sae_lens.SAE.load_from_disk(str(out))
    assert torch.equal(clt.W_enc, final_weights(run)["W_enc"])
    largest.clear()
    ct = write_circuit_tracer_set(ck, tmp_path / "ct")  # straight from the shards
    assert 0 < max(largest) <= one_layer_decoder
    assert load_ours(ck).W_enc.shape == (4, 128, F)  # one-process load of a sharded checkpoint
    tc = load_clt(str(ct), feature_input_hook="ln2.hook_normalized", device=torch.device("cpu"),
                  dtype=torch.float32)  # fmt: skip
    x = torch.randn(16, 4, 128)
    ours = clt.encode(x)
    for layer in range(4):
        assert torch.allclose(tc.encode_layer(x[:, layer], layer), ours[:, layer], atol=1e-5)


def test_errors_name_the_problem(tmp_path: Path, small_cache: Path, embedded_model):
    from clt_lens.config import ConfigError
    from clt_lens.config import load_config as load
    from clt_lens.training import CLTTrainingRunner, TrainConfig
    from clt_lens.training.checkpoint import CheckpointError

    # a distributed config without a process group: trains as one process, and says so
    with pytest.warns(UserWarning, match="no process group: training as ONE process.*torchrun"):
        CLTTrainingRunner(load(TrainConfig, None, args(tmp_path / "w", 1, small_cache,
                                                       "--distributed", "feature")))
    # an uneven split is refused before any work, naming both numbers
    run = Run(args(tmp_path / "uneven", 1, small_cache, "--distributed", "feature", d_sae=63),
              nproc=2)  # fmt: skip
    with pytest.raises(AssertionError, match="d_sae=63 does not split evenly over 2 feature"):
        run.wait()
    # a missing shard names the file
    good = tmp_path / "good"
    run_to_end(args(good, 2, small_cache, "--distributed", "feature"), nproc=2)
    ck = good / "checkpoints" / "step_00000002"
    (ck / "optimizer.f001-of-002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks optimizer.f001-of-002.safetensors"):
        # refused in the constructor, before any work
        CLTTrainingRunner(load(TrainConfig, None, args(good, 4, small_cache)), resume=good)
    assert issubclass(CheckpointError, ConfigError)  # the CLI prints it as one line
