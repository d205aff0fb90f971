"""The trainer end to end on the embedded model: outputs, determinism, errors (exact resume:
tests/test_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clt_lens.config import ConfigError, load_config
from clt_lens.training import CLTTrainingRunner, TrainConfig, TrainingDiverged

SMALL = [
    "--d_sae", "128", "--batch_size", "256", "--n_steps", "12", "--lr_warmup_steps", "2",
    "--sparsity_warmup_steps", "4", "--normalization_tokens", "1024", "--heldout_tokens", "512",
    "--eval_every", "6", "--log_every", "2", "--stream_sequences_per_refill", "8",
    "--stream_model_batch_size", "8", "--progress", "false", "--sparsity_coeff", "1e-3",
]


def small_cfg(tmp: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*SMALL, "--out_dir", str(tmp), *extra])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "sae_weights.safetensors"))


def test_end_to_end_outputs(tmp_path: Path, embedded_model):
    import sae_lens

    import clt_lens  # noqa: F401  (registers the architecture)

    cfg = small_cfg(tmp_path, "--checkpoint_every", "6")
    clt = CLTTrainingRunner(cfg, override_model=embedded_model).run()
    final = tmp_path / "final"
    loaded = sae_lens.SAE.load_from_disk(str(final))
    assert type(loaded).__name__ == "CrossLayerTranscoder"
    for k, v in clt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k].cpu(), v.cpu()), k
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    held = [r for r in recs if r["kind"] == "heldout"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in held] == [6, 12]
    assert len(train[-1]["l0_per_layer"]) == 4 and len(train[-1]["dead_frac_per_layer"]) == 4
    assert train[-1]["mse"] < train[0]["mse"], "training must reduce the reconstruction error"
    assert 0 < held[-1]["ev"] <= 1
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000012"]


def test_determinism(tmp_path: Path, embedded_model):
    a = CLTTrainingRunner(small_cfg(tmp_path / "a", "--n_steps", "5", "--eval_every", "100"),
                override_model=embedded_model).run()
    b = CLTTrainingRunner(small_cfg(tmp_path / "b", "--n_steps", "5", "--eval_every", "100"),
                override_model=embedded_model).run()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_incompatible_resume_refused_before_training(tmp_path: Path, embedded_model):
    CLTTrainingRunner(small_cfg(tmp_path, "--n_steps", "2", "--eval_every", "100"),
            override_model=embedded_model).run()
    with pytest.raises(ConfigError, match="d_sae: checkpoint=128 config=256"):
        CLTTrainingRunner(small_cfg(tmp_path, "--d_sae", "256"), override_model=embedded_model,
                          resume=tmp_path)


class _NaNAfter:
    """Wraps a source and poisons the batch at a given call."""

    def __init__(self, inner, bad_call: int):
        self.inner, self.bad_call, self.calls = inner, bad_call, 0
        self.info = inner.info

    def next(self):
        x, y = self.inner.next()
        self.calls += 1
        if self.calls == self.bad_call:
            x = x.clone()
            x[0, 0, 0] = float("nan")
        return x, y

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)

    def close(self):
        self.inner.close()


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, embedded_model):
    from clt_lens.training.sources import make_source

    cfg = small_cfg(tmp_path, "--checkpoint_every", "3", "--eval_every", "100")
    # 4 reads for the normalisation sample (1024 tokens), then one per step: the 5th step's
    # batch is read 9th
    src = _NaNAfter(make_source(cfg, cfg.batch_size, model=embedded_model), bad_call=9)
    with pytest.raises(TrainingDiverged, match=r"step 5.*step_00000003"):
        CLTTrainingRunner(cfg, override_model=embedded_model, override_source=src).run()
    import sae_lens

    import clt_lens  # noqa: F401

    ck = tmp_path / "checkpoints" / "step_00000003"
    sae = sae_lens.SAE.load_from_disk(str(ck))
    assert all(torch.isfinite(v).all() for v in sae.state_dict().values())
