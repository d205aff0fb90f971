"""Trainer options on synthetic activations: accumulation, autocast, L0 target, clipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clt_lens.clt import cpu_kernels
from clt_lens.clt.grad_squares import GradSquares
from clt_lens.config import build_config
from clt_lens.training import CLTTrainingRunner, TrainConfig
from clt_lens.training.sources import SyntheticSource
from clt_lens.training.trainer import Trainer


def toy_source(batch: int, L: int = 2, d: int = 16) -> SyntheticSource:
    return SyntheticSource(batch, L, d, context_size=16)


def cfg(tmp: Path, **kw) -> TrainConfig:
    base = dict(d_sae=32, batch_size=64, n_steps=4, eval_every=2, heldout_tokens=64,
                normalization_tokens=64, progress=False, out_dir=str(tmp), sparsity_coeff=0.01,
                lr_warmup_steps=1, sparsity_warmup_steps=1, log_every=1)
    base.update(kw)
    return build_config(TrainConfig, base)  # flat keys: the old spellings still work


def run(c: TrainConfig, micro: int) -> torch.nn.Module:
    src = toy_source(micro)
    return CLTTrainingRunner(c, override_source=src, override_heldout=toy_source(64).next()).run()


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path):
    # 2 micro-batches of 32 read the same tokens as 1 batch of 64 (rows 0-31, 32-63 of the
    # generator's draws differ, so build the big batch from two micro draws)
    class Pairs(SyntheticSource):
        def next(self):
            a, b = super().next(), super().next()
            return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])

    big = CLTTrainingRunner(cfg(tmp_path / "a", dead_window_tokens=10**9),
                            override_source=Pairs(32, 2, 16, context_size=16),
                            override_heldout=toy_source(64).next()).run()
    acc = CLTTrainingRunner(cfg(tmp_path / "b", grad_accum=2, dead_window_tokens=10**9),
                            override_source=toy_source(32),
                            override_heldout=toy_source(64).next()).run()
    for (k, v), w in zip(big.state_dict().items(), acc.state_dict().values()):
        assert torch.allclose(v, w, atol=1e-5, rtol=1e-4), k


def test_bf16_autocast_trains(tmp_path: Path):
    clt = run(cfg(tmp_path, autocast="bf16"), 64)
    assert all(torch.isfinite(p).all() for p in clt.parameters())
    assert next(clt.parameters()).dtype == torch.float32  # fp32 master weights


def test_fp16_autocast_trains_with_a_grad_scaler_that_checkpoints(tmp_path: Path):
    clt = run(cfg(tmp_path, autocast="fp16", checkpoint_every=2), 64)
    assert all(torch.isfinite(p).all() for p in clt.parameters())
    assert next(clt.parameters()).dtype == torch.float32
    state = json.loads((tmp_path / "checkpoints" / "step_00000004" / "training_state.json")
                       .read_text())
    assert state["scaler"]["scale"] > 0


def test_fused_and_plain_adam_agree(tmp_path: Path, device: str):
    """The whole trainer on each device: fused and plain Adam reach the same weights."""
    fused = run(cfg(tmp_path / "fused", adam_fused=True, device=device), 64)
    plain = run(cfg(tmp_path / "plain", adam_fused=False, device=device), 64)
    assert next(fused.parameters()).device.type == device
    for (k, v), w in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(v, w, atol=1e-5, rtol=1e-4), k


def test_l0_target_stops_the_run(tmp_path: Path):
    run(cfg(tmp_path, n_steps=50, l0_target=10_000.0, l0_target_action="stop"), 64)
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in recs if r["kind"] == "train")
    assert last < 50, "an easily reached L0 target must stop the run early"
    assert (tmp_path / "final" / "cfg.json").is_file()


def test_gradient_clipping_bounds_the_update(tmp_path: Path):
    c = cfg(tmp_path, grad_clip=1e-3, n_steps=2)
    run(c, 64)
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 1e-3 for r in recs if r["kind"] == "train")  # norm before clip


class _Built(Trainer):
    def train(self):  # hand the built trainer back instead of looping
        return self


@pytest.mark.parametrize(
    "kw, records_used",
    [({}, True),
     ({"grad_accum": 2}, False),  # the second micro-batch sums into the recorded gradients
     ({"activation": "topk", "k": 4}, False)],  # aux-k decodes dead features: W_dec twice
    ids=["one-batch", "accumulated", "topk-auxk"],
)  # fmt: skip
def test_clipping_norm_is_the_norm_of_the_gradients_adam_gets(tmp_path: Path, kw, records_used,
                                                              monkeypatch):  # fmt: skip
    """The sparse CPU step takes the decoder gradients' squares from the kernel's records
    where they still describe the gradients; the norm it logs and clips with must be that of
    the gradients as they are when Adam reads them."""
    if cpu_kernels.library() is None:
        pytest.skip("the CPU kernels did not build")
    used = []
    real = GradSquares.sum_of_squares

    def spy(self, grad):
        got = real(self, grad)
        used.append(got is not None)
        return got

    monkeypatch.setattr(GradSquares, "sum_of_squares", spy)
    micro = 64 // kw.get("grad_accum", 1)
    c = cfg(tmp_path, decode="sparse", adam_fused=False, grad_clip=1e9, **kw)
    runner = CLTTrainingRunner(c, override_source=toy_source(micro),
                               override_heldout=toy_source(64).next())  # fmt: skip
    runner.trainer_cls = _Built
    trainer = runner.run()
    for _ in range(2):
        used.clear()
        trainer.since_fired[:, :8] = c.dead_window_tokens  # a quarter of the features dead
        rec = trainer._train_step()
        trainer.step += 1
        trainer.tokens += c.batch_size
        grads = [p.grad.double() for p in trainer.params if p.grad is not None]
        want = float(torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt())
        assert rec["grad_norm"] == pytest.approx(want, rel=1e-5)
    assert sum(used) == (len(trainer.clt.W_dec) if records_used else 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is for CUDA")
def test_bf16_autocast_on_cuda_keeps_fp32_master_weights_and_tracks_fp32(tmp_path: Path):
    full = run(cfg(tmp_path / "fp32", device="cuda"), 64)
    half = run(cfg(tmp_path / "bf16", device="cuda", autocast="bf16"), 64)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    for (k, v), w in zip(full.state_dict().items(), half.state_dict().values()):
        assert torch.allclose(v, w, atol=2e-2, rtol=5e-2), k  # bf16 matmuls: ~3 digits


@pytest.mark.parametrize("bad", [{"grad_accum": 3}, {"autocast": "int8"}])
def test_bad_options(tmp_path: Path, bad):
    from clt_lens.config import ConfigError

    with pytest.raises(ConfigError):
        cfg(tmp_path, **bad).validate()


def _as_written_before_sections(d: dict) -> dict:
    """A train_config.json as runs wrote it before the source/clt sections existed."""
    flat = {k: v for k, v in d.items() if k not in ("source", "clt")}
    flat.update(d["source"])
    flat.update({("sparsity_c" if k == "tanh_scale" else k): v for k, v in d["clt"].items()
                 if k not in ("auxk", "topk_threshold_lr", "sparse_max_density")})
    return flat


def test_runs_written_before_the_config_sections_resume(tmp_path: Path):
    """Checkpoints whose train_config.json has the old flat keys still resume, and the resume
    check still compares their structural keys (under the new dotted names)."""
    run_dir = tmp_path / "run"
    c = cfg(run_dir, checkpoint_every=2, keep_checkpoints=5)
    CLTTrainingRunner(c, override_source=toy_source(64),
                      override_heldout=toy_source(64).next()).run()
    files = sorted(run_dir.rglob("train_config.json"))
    assert len(files) >= 2
    for f in files:
        f.write_text(json.dumps(_as_written_before_sections(json.loads(f.read_text()))))
    ckpt = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.is_dir())[0]
    more = cfg(run_dir, n_steps=6, checkpoint_every=2, keep_checkpoints=5)
    CLTTrainingRunner(more, override_source=toy_source(64), resume=ckpt,
                      override_heldout=toy_source(64).next()).run()
    assert json.loads((run_dir / "train_config.json").read_text())["clt"]["d_sae"] == 32
    other = cfg(tmp_path / "other", d_sae=48, n_steps=6)
    with pytest.raises(ValueError, match="clt.d_sae: checkpoint=32 config=48"):
        CLTTrainingRunner(other, override_source=toy_source(64), resume=ckpt)
