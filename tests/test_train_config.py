"""TrainConfig validation, schedules and the packaged configs."""

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest

from clt_lens.cli_args import iter_fields
from clt_lens.clt.config import CLTSpec
from clt_lens.config import ConfigError, build_config, load_config
from clt_lens.training.cli import CONFIG_DIR, resolve_config_path
from clt_lens.training.config import TrainConfig, saved_train_config
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
        (["--activation", "topk", "--k", "4096", "--d_sae", "1024"], r"clt.k must be in \[1,"),
        (["--activation", "gelu"], "'clt.activation': 'gelu' is not one of"),
        (["--clt.d_sae", "0"], "clt.d_sae must be a positive integer"),
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
    assert (cfg.clt.d_sae, cfg.lr, cfg.clt.cross_layer) == (64, 0.5, False)


def test_schedules():
    cfg = TrainConfig(n_steps=100, lr_warmup_steps=10, lr_decay="linear", lr_decay_start=0.5,
                      lr_end_factor=0.1, sparsity_warmup_steps=20, clt=CLTSpec(sparsity_coeff=2.0))
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 40) == 1.0
    assert lr_factor(cfg, 100) == pytest.approx(0.1)
    assert sparsity_coeff(cfg, 9) == pytest.approx(1.0)
    assert sparsity_coeff(cfg, 50) == 2.0


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_configs_validate(path: Path):
    cfg = load_config(TrainConfig, path)
    if cfg.source.model == "embedded":
        return
    model = cfg.source.model
    assert model in KNOWN, f"{path.name}: add {model} to the table of known shapes"
    n_layers, d_model = KNOWN[cfg.source.model]
    assert (cfg.extra["n_layers"], cfg.extra["d_model"]) == (n_layers, d_model)
    # feature sharding must split the features evenly over the usual 8 GPUs
    assert cfg.clt.d_sae % 8 == 0
    assert cfg.clt.d_sae >= 4 * d_model, "the public CLTs use 7-32x expansion per layer"
    assert cfg.batch_size >= 4096 and cfg.n_steps * cfg.batch_size >= 1e8
    assert cfg.device == "cuda"


def test_config_name_resolution():
    assert resolve_config_path("demo") == CONFIG_DIR / "demo.yaml"
    with pytest.raises(FileNotFoundError, match="packaged config"):
        resolve_config_path("no-such-config")


def test_sections_and_old_flat_spellings_agree(tmp_path: Path):
    """A nested YAML file, the old flat one and the old flat overrides give one config."""
    nested = tmp_path / "nested.yaml"
    nested.write_text("source:\n  model: embedded\n  context_size: 64\n"
                      "clt:\n  d_sae: 64\n  activation: topk\n  k: 8\n  tanh_scale: 2.0\n"
                      "lr: 0.01\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: embedded\ncontext_size: 64\nd_sae: 64\nactivation: topk\nk: 8\n"
                    "sparsity_c: 2.0\nlr: 0.01\n")
    a, b = load_config(TrainConfig, nested), load_config(TrainConfig, flat)
    assert a == b
    assert (a.source.context_size, a.clt.d_sae, a.clt.k, a.clt.tanh_scale) == (64, 64, 8, 2.0)
    # an old-spelling override still overrides the nested file's value
    c = load_config(TrainConfig, nested, ["--d_sae", "128", "--clt.k", "4"])
    assert (c.clt.d_sae, c.clt.k) == (128, 4)
    with pytest.raises(ConfigError, match="'d_sae' and 'clt.d_sae' both given"):
        build_config(TrainConfig, {"d_sae": 8, "clt": {"d_sae": 16}})


def test_clt_options_reach_the_built_clt():
    """Every CLTSpec field set in the training config arrives in the CLT's config (some used
    to be settable only on CLTConfig, and two training fields never reached it)."""
    from clt_lens.training.runner import build_clt
    from clt_lens.training.sources import SourceInfo

    spec = CLTSpec(d_sae=16, activation="batchtopk", k=4, auxk=7, topk_threshold_lr=0.5,
                   sparse_max_density=0.2, b_enc_init_rate=0.1, auxk_jumprelu=True,
                   tanh_scale=3.0, sparsity_coeff=0.7, decode="dense")
    info = SourceInfo(model_id="m", model_name="m", input_hook="ln2.hook_normalized",
                      output_hook="hook_mlp_out", n_layers=2, d_model=8, context_size=16,
                      dataset="d")
    got = build_clt(TrainConfig(clt=spec), info).cfg
    for f in dataclasses.fields(CLTSpec):
        assert getattr(got, f.name) == getattr(spec, f.name), f.name


def test_old_train_config_json_reads_as_sections():
    old = {"model": "embedded", "d_sae": 64, "sparsity_c": 2.0, "n_steps": 5, "extra": {"a": 1}}
    got = saved_train_config(old)
    assert got["source.model"] == "embedded" and got["clt.d_sae"] == 64
    assert got["clt.tanh_scale"] == 2.0 and got["n_steps"] == 5 and got["extra"] == {"a": 1}
    new = saved_train_config(dataclasses.asdict(load_config(TrainConfig, None, ["--d_sae", "64"])))
    assert new["clt.d_sae"] == 64 and set(got) <= set(new)


def test_help_lists_every_field():
    """`clt-lens train --help` names every TrainConfig field, nested ones dotted, with its
    type and default; `clt-lens cache --help` does the same for CacheConfig."""
    from clt_lens.cache.generate import CacheConfig
    from clt_lens.cli import main

    for command, cls in (("train", TrainConfig), ("cache", CacheConfig)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
            main([command, "--help"])
        text = buf.getvalue()
        names = [name for name, *_ in iter_fields(cls)]
        missing = [n for n in names if f"--{n}" not in text]
        assert not missing, f"{command} --help does not list {missing}"
        assert "[int; default 1024]" in text or command == "cache"
