"""circuit-tracer transcoder-set export and the offline ReplacementModel.

The exported files are loaded with circuit-tracer's own loaders and must reproduce our CLT's
activations and reconstructions on real activations of the embedded model.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open
from test_circuits_common import model_on

from clt_lens.activations import collect_activations
from clt_lens.circuits import (
    CircuitsError,
    build_replacement_model,
    load_transcoders,
    write_circuit_tracer_set,
)
from clt_lens.circuits.synthetic import random_clt
from clt_lens.cli import main
from clt_lens.clt.loading import CheckpointError

VARIANTS = [  # (cross_layer, activation, skip, layout)
    (True, "jumprelu", False, "auto"),
    (True, "relu", False, "auto"),
    (False, "jumprelu", False, "auto"),
    (False, "relu", False, "auto"),
    (False, "jumprelu", True, "auto"),  # per-layer set with W_skip
    (False, "relu", False, "cross_layer"),  # a PLT written as a CLT (zero cross-layer blocks)
]


@pytest.fixture(scope="module")
def heldout_acts(embedded_model):
    """Real activations on tokens other than the calibration ones."""
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(1, embedded_model.cfg.d_vocab, (4, 40), generator=gen)
    tokens[:, 0] = embedded_model.tokenizer.bos_token_id
    text = embedded_model.to_tokens(
        "Now is the winter of our discontent made glorious summer by this sun of York"
    )
    x1, y1 = collect_activations(embedded_model, tokens)
    x2, y2 = collect_activations(embedded_model, text)
    return torch.cat([x1, x2]), torch.cat([y1, y2])


@pytest.mark.parametrize("cross_layer,activation,skip,layout", VARIANTS)
def test_export_loads_and_reconstructs(tmp_path, embedded_model, heldout_acts, cross_layer,
                                       activation, skip, layout, device):
    """Exported from a CLT on ``device``, loaded there by circuit-tracer, run there."""
    clt = random_clt(embedded_model, d_sae=128, activation=activation, cross_layer=cross_layer,
                     skip=skip, seed=1, fit_decoder=False).to(device)
    # the activation scaling really is folded: scales far from 1 on this model
    assert (clt.output_scale - 1).abs().min() > 0.1 or (clt.input_scale - 1).abs().min() > 0.1
    out = write_circuit_tracer_set(clt, tmp_path / "set", layout=layout, model_name="embedded")
    config = yaml.safe_load((out / "config.yaml").read_text())
    kind = "transcoder_set" if (layout == "auto" and not cross_layer) else "cross_layer_transcoder"
    assert config["model_kind"] == kind
    assert config["feature_input_hook"] == "ln2.hook_normalized"
    assert config["feature_output_hook"] == "hook_mlp_out"
    assert config["model_name"] == "embedded"
    names = sorted(p.name for p in out.iterdir())
    if kind == "cross_layer_transcoder":
        assert names == sorted(["config.yaml"] + [f"W_{k}_{i}.safetensors" for k in ("enc", "dec")
                                                  for i in range(4)])
        with safe_open(str(out / "W_dec_1.safetensors"), "pt") as f:
            assert f.get_slice("W_dec_1").get_shape() == [128, 3, 128]
    else:
        assert names == sorted(["config.yaml"] + [f"layer_{i}.safetensors" for i in range(4)])
        with safe_open(str(out / "layer_2.safetensors"), "pt") as f:
            assert ("W_skip" in f.keys()) == skip
            assert ("activation_function.threshold" in f.keys()) == (activation == "jumprelu")

    x = heldout_acts[0].to(device)
    ours_acts = clt.encode(x)
    ours = clt(x)
    assert (ours_acts > 0).float().mean() > 0.005  # features do fire on held-out text
    x_lnd = x.transpose(0, 1).contiguous()
    for how in ("hub", "direct"):
        if how == "hub":  # circuit-tracer's generic loader on the absolute folder
            tc, cfg = load_transcoders(out, device=device)
            assert cfg["scan"] == config["scan"]
        elif kind == "cross_layer_transcoder":
            from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

            tc = load_clt(str(out), feature_input_hook=config["feature_input_hook"],
                          device=torch.device(device), dtype=torch.float32)
        else:
            from circuit_tracer.transcoder import load_transcoder_set

            tc = load_transcoder_set({i: str(out / f"layer_{i}.safetensors") for i in range(4)},
                                     scan="s", feature_input_hook="ln2.hook_normalized",
                                     feature_output_hook="hook_mlp_out",
                                     device=torch.device(device))
        assert next(tc.parameters()).device.type == torch.device(device).type
        for layer in range(4):
            acts = tc.encode_layer(x[:, layer], layer)
            assert torch.allclose(acts, ours_acts[:, layer], rtol=0, atol=1e-5)
        rec = tc.compute_attribution_components(x_lnd, zero_positions=slice(0, 0))
        recon = rec["reconstruction"].transpose(0, 1)
        scale = ours.abs().max()
        assert (recon - ours).abs().max() <= 1e-5 * scale, how


def test_export_dtype_and_replace(tmp_path, embedded_model, device):
    clt = random_clt(embedded_model, d_sae=64, seed=2, fit_decoder=False).to(device)
    out = write_circuit_tracer_set(clt, tmp_path / "set", dtype=torch.bfloat16)
    with safe_open(str(out / "W_enc_0.safetensors"), "pt") as f:
        assert f.get_tensor("W_enc_0").dtype == torch.bfloat16
        assert f.get_tensor("threshold_0").shape == (64,)
    # an existing set is replaced atomically (no stray temp folders left behind)
    write_circuit_tracer_set(clt, tmp_path / "set")
    with safe_open(str(out / "W_enc_0.safetensors"), "pt") as f:
        assert f.get_tensor("W_enc_0").dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    # a folder that is not a transcoder set is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CircuitsError, match="refusing"):
        write_circuit_tracer_set(clt, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_export_rejects_what_circuit_tracer_cannot_load(tmp_path, embedded_model):
    from clt_lens.clt import CLTConfig, CrossLayerTranscoder

    topk = CrossLayerTranscoder(CLTConfig(d_in=128, d_sae=32, n_layers=4, activation="topk", k=4))
    with pytest.raises(CircuitsError, match="TopK"):
        write_circuit_tracer_set(topk, tmp_path / "a")
    skip_clt = CrossLayerTranscoder(CLTConfig(d_in=128, d_sae=32, n_layers=4, skip=True))
    with pytest.raises(CircuitsError, match="skip"):
        write_circuit_tracer_set(skip_clt, tmp_path / "b")
    clt = CrossLayerTranscoder(CLTConfig(d_in=128, d_sae=32, n_layers=4))
    with pytest.raises(CircuitsError, match="per_layer"):
        write_circuit_tracer_set(clt, tmp_path / "c", layout="per_layer")
    with pytest.raises(CircuitsError, match="layout"):
        write_circuit_tracer_set(clt, tmp_path / "d", layout="diagonal")
    with pytest.raises(CheckpointError, match="not a CLT checkpoint"):
        write_circuit_tracer_set(tmp_path, tmp_path / "e")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_export_cli(tmp_path, embedded_model, capsys):
    clt = random_clt(embedded_model, d_sae=32, cross_layer=False, seed=3, fit_decoder=False)
    clt.save_model(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "set")]) == 0
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["clt_lens"]["source"] == str((tmp_path / "ckpt").resolve())
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "set2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_replacement_model_matches_base_model(tmp_path, embedded_model, device):
    model = model_on(device, embedded_model)
    clt = random_clt(embedded_model, d_sae=64, seed=4, fit_decoder=False)
    tc, _ = load_transcoders(write_circuit_tracer_set(clt, tmp_path / "set"))  # on the CPU
    rm = build_replacement_model(model, tc)  # moves the transcoders to the model's device
    assert next(rm.transcoders.parameters()).device.type == torch.device(device).type
    tokens = model.to_tokens("All the world's a stage, and all the men and women")
    with torch.no_grad():
        logits = rm(tokens)
        assert logits.device.type == torch.device(device).type
        assert torch.equal(logits, model(tokens))
    assert rm.cfg.tokenizer_name and rm.tokenizer is model.tokenizer
    from transformers import AutoTokenizer  # what create_graph_files does, offline

    assert AutoTokenizer.from_pretrained(rm.cfg.tokenizer_name).vocab_size == 4096
    # the base model is untouched (its MLPs are not wrapped)
    assert not hasattr(model.blocks[0].mlp, "old_mlp")
    rm.reset_hooks(including_permanent=True)  # else its __del__ complains at interpreter exit

    small = random_clt(embedded_model, d_sae=32, seed=5, fit_decoder=False)
    small_tc, _ = load_transcoders(write_circuit_tracer_set(small, tmp_path / "s2"))
    small_tc.n_layers = 3  # what a 3-layer set would report
    with pytest.raises(CircuitsError, match=r"n_layers=3.*n_layers=4"):
        build_replacement_model(model, small_tc)
