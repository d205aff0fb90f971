"""TrainConfig validation, schedules and the packaged configs."""

from pathlib import Path

import pytest

from clt_lens.config import ConfigError, load_config
from clt_lens.training.cli import CONFIG_DIR, resolve_config_path
from clt_lens.training.config import TrainConfig
from clt_lens.training.schedules import lr_factor, sparsity_coeff

# Known shapes of the hub models the ready configs target (from the models' published configs).
KNOWN = {
    "gpt2": (12, 768),
    "pythia-160m": (12, 768),
    "gemma-2-2b": (26, 2304),
    "meta-llama/Llama-3.2-1B": (16, 2048),
}


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(TrainConfig, None, ["--learning_rate", "1e-3"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--batch_size", "1000", "--grad_accum", "3"], "divisible by grad_accum"),
        (["--activation", "topk", "--k", "4096", "--d_sae", "1024"], "exceeds d_sae"),
        (["--activation", "gelu"], "activation 'gelu'"),
        (["--d_sae", "0"], "d_sae must be positive"),
        (["--sparsity_penalty", "l2"], "sparsity_penalty"),
        (["--n_steps", "ten"], "expected an integer"),
    ],
)
def test_inconsistent_configs_rejected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, overrides)


def test_overrides_apply_to_yaml(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("d_sae: 64\nlr: 0.01\n")
    cfg = load_config(TrainConfig, p, ["--lr=0.5", "--cross_layer", "false"])
    assert (cfg.d_sae, cfg.lr, cfg.cross_layer) == (64, 0.5, False)


def test_schedules():
    cfg = TrainConfig(n_steps=100, lr_warmup_steps=10, lr_decay="linear", lr_decay_start=0.5,
                      lr_end_factor=0.1, sparsity_warmup_steps=20, sparsity_coeff=2.0)
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 40) == 1.0
    assert lr_factor(cfg, 100) == pytest.approx(0.1)
    assert sparsity_coeff(cfg, 9) == pytest.approx(1.0)
    assert sparsity_coeff(cfg, 50) == 2.0


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_configs_validate(path: Path):
    cfg = load_config(TrainConfig, path)
    if cfg.model == "embedded":
        return
    assert cfg.model in KNOWN, f"{path.name}: add {cfg.model} to the table of known shapes"
    n_layers, d_model = KNOWN[cfg.model]
    assert (cfg.extra["n_layers"], cfg.extra["d_model"]) == (n_layers, d_model)
    # feature sharding must split the features evenly over the usual 8 GPUs
    assert cfg.d_sae % 8 == 0
    assert cfg.d_sae >= 4 * d_model, "the public CLTs use 7-32x expansion per layer"
    assert cfg.batch_size >= 4096 and cfg.n_steps * cfg.batch_size >= 1e8
    assert cfg.device == "cuda"


def test_config_name_resolution():
    assert resolve_config_path("demo") == CONFIG_DIR / "demo.yaml"
    with pytest.raises(FileNotFoundError, match="packaged config"):
        resolve_config_path("no-such-config")
