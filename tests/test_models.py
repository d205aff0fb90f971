"""load_model: the embedded model, local HF folders of each family vs transformers, errors, ids."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer

from clt_lens.data import load_tokens
from clt_lens.models import (
    EMBEDDED_DIR,
    EMBEDDED_MODELS,
    FAMILIES,
    ModelLoadError,
    load_model,
    model_family,
    model_id,
)

SHAKESPEARE = (
    "To be, or not to be,--that is the question:--\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune"
)


@pytest.fixture(scope="module")
def embedded() -> HookedTransformer:
    return load_model("embedded")


def _save_tiny_tokenizer(path, vocab_size: int = 300) -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SHAKESPEARE] * 20, trainer=trainer)
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(path)
    return fast


def _randomize_1d(model: torch.nn.Module) -> None:
    # Fresh HF models have unit norms and zero biases, which would hide a dropped or misplaced
    # norm/bias in the conversion.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tok = _save_tiny_tokenizer(path)
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=64, n_layer=2, n_head=4)
    ).eval()
    _randomize_1d(hf)
    hf.save_pretrained(path)
    return path, hf, tok


# ----------------------------------------------------------------------------------------------
# The embedded model


def test_embedded_shape_and_tokenizer(embedded):
    cfg = embedded.cfg
    shape = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab, cfg.n_ctx)
    assert shape == (4, 128, 4, 4096, 128)
    # Unfolded: LayerNorm keeps its weights (a folded model has LNPre and no ln1.w).
    assert cfg.normalization_type == "LN"
    assert "blocks.0.ln1.w" in embedded.state_dict()
    assert cfg.tokenizer_name == str(EMBEDDED_DIR)
    tok = embedded.tokenizer
    ids = tok.encode(SHAKESPEARE, add_special_tokens=False)
    assert tok.decode(ids) == SHAKESPEARE
    assert len(ids) < len(SHAKESPEARE) / 2.5  # a real BPE on this text, not bytes
    toks = embedded.to_tokens(SHAKESPEARE)
    assert toks[0, 0].item() == tok.bos_token_id == tok.eos_token_id == 0


def test_embedded_weights_are_unprocessed(embedded):
    raw = load_file(str(EMBEDDED_DIR / "model.safetensors"))
    # Centring writing weights or the unembed would change these; LN folding would move ln_f.
    torch.testing.assert_close(embedded.W_E, raw["transformer.wte.weight"], rtol=0, atol=0)
    torch.testing.assert_close(embedded.W_U, raw["transformer.wte.weight"].T, rtol=0, atol=0)
    torch.testing.assert_close(embedded.ln_final.w, raw["transformer.ln_f.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        embedded.blocks[2].mlp.W_out, raw["transformer.h.2.mlp.c_proj.weight"], rtol=0, atol=0
    )


def test_embedded_matches_transformers_and_beats_unigram(embedded):
    rows = load_tokens("embedded", tokenizer=embedded.tokenizer, context_size=128,
                       split="heldout", max_tokens=128 * 192, seed=0)
    hf = tf.AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, local_files_only=True).eval()
    with torch.no_grad():
        logits = embedded(rows)
        torch.testing.assert_close(logits[:8], hf(rows[:8]).logits, rtol=0, atol=1e-4)
    targets = rows[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)
    counts = torch.bincount(targets, minlength=4096).double()
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * p.log()).sum())
    assert unigram - ce.item() >= 1.5, (ce.item(), unigram)
    metrics = json.loads((EMBEDDED_DIR / "metrics.json").read_text())
    assert math.isclose(ce.item(), metrics["heldout_ce_nats"], abs_tol=0.2)
    assert metrics["gap_nats"] >= 1.5


def test_embedded_deep_is_deeper_better_and_small():
    deep_dir = EMBEDDED_MODELS["embedded-deep"]
    deep = load_model("embedded-deep")
    assert deep.cfg.n_layers == 8 and deep.cfg.d_model == 128
    assert deep.cfg.model_name == "embedded-deep" and deep.cfg.dtype == torch.float32
    # the same tokenizer and text as the default model, so their numbers compare token for token
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (deep_dir / f).read_bytes() == (EMBEDDED_DIR / f).read_bytes()
    # shipped in fp16 (upcast on load), small enough to ship
    raw = load_file(str(deep_dir / "model.safetensors"))
    assert {t.dtype for t in raw.values()} == {torch.float16}
    assert (deep_dir / "model.safetensors").stat().st_size < 6 * 2**20
    torch.testing.assert_close(deep.W_E, raw["transformer.wte.weight"].float(), rtol=0, atol=0)
    shallow = json.loads((EMBEDDED_DIR / "metrics.json").read_text())
    metrics = json.loads((deep_dir / "metrics.json").read_text())
    assert metrics["heldout_documents"] == shallow["heldout_documents"]
    # clearly lower (4.21 vs 4.39 nats as built): a stronger model, not only a deeper one
    assert metrics["heldout_ce_nats"] < shallow["heldout_ce_nats"] - 0.1
    rows = load_tokens("embedded", tokenizer=deep.tokenizer, context_size=128, split="heldout",
                       max_tokens=128 * 48, seed=0)
    with torch.no_grad():
        logits = deep(rows)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           rows[:, 1:].reshape(-1))
    assert math.isclose(ce.item(), metrics["heldout_ce_nats"], abs_tol=0.25)


def test_missing_bundled_model_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(EMBEDDED_MODELS, "embedded-deep", tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="bundled model 'embedded-deep' is missing.*"
                                             "build_embedded_model"):
        load_model("embedded-deep")


# ----------------------------------------------------------------------------------------------
# Local Hugging Face folders, checked against transformers' own forward


def test_local_gpt2_folder_matches_transformers(tiny_gpt2):
    path, hf, tok = tiny_gpt2
    model = load_model(str(path))
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 64
    assert model.cfg.tokenizer_name == str(path.resolve())
    assert model.tokenizer.decode(model.tokenizer.encode("the question")) == "the question"
    x = torch.randint(0, len(tok), (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4
    assert model_family(model) == "gpt2"
    half = load_model(str(path), dtype=torch.bfloat16)
    assert half.W_E.dtype == torch.bfloat16 and half.cfg.dtype == torch.bfloat16


_FAMILY_CASES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2, rope_theta=5e3)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
    ),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(rotary_pct=0.5)),
}


@pytest.mark.parametrize("family", sorted(_FAMILY_CASES))
def test_other_families_match_transformers(family, tmp_path):
    assert family in FAMILIES
    cfg_cls, model_cls, extra = _FAMILY_CASES[family]
    cfg = cfg_cls(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    hf = model_cls(cfg).eval()
    _randomize_1d(hf)
    hf.save_pretrained(tmp_path)  # no tokenizer: the model still runs on token ids
    model = load_model(tmp_path)
    assert model.tokenizer is None
    # 20 positions > Gemma-2's sliding window of 8, so local attention is exercised too.
    x = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4
    assert model_family(model) == family


# ----------------------------------------------------------------------------------------------
# Identity


def test_model_id_is_stable_and_tracks_weights(embedded, tiny_gpt2, tmp_path):
    mid = model_id(embedded)
    assert re.fullmatch(r"embedded@[0-9a-f]{12}", mid)
    assert model_id(load_model("embedded")) == mid
    embedded.set_use_hook_mlp_in(True)  # a hook switch is not a different model
    try:
        assert model_id(embedded) == mid
    finally:
        embedded.set_use_hook_mlp_in(False)

    path, hf, _ = tiny_gpt2
    first = model_id(load_model(path))
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.weight.mul_(2.0)
    copy = tmp_path / path.name
    hf.save_pretrained(copy)
    for f in path.glob("tokenizer*"):
        (copy / f.name).write_bytes(f.read_bytes())
    assert model_id(load_model(copy)) != first  # same name and config, other weights
    assert model_id(embedded.cfg).startswith("embedded@")  # a bare config: no weight digest


def test_model_family_inputs(embedded):
    assert model_family(embedded) == "gpt2"
    assert model_family(embedded.cfg) == "gpt2"
    assert model_family({"original_architecture": "LlamaForCausalLM"}) == "llama"
    assert model_family(tf.Qwen2Config()) == "qwen2"
    assert model_family({"original_architecture": "SomethingNew"}) == "unknown"


# ----------------------------------------------------------------------------------------------
# Official names (dispatch only: the hub is unreachable here) and bad input


def test_official_name_dispatches_to_transformer_lens(monkeypatch):
    calls = []

    def fake(name, **kwargs):
        calls.append((name, kwargs))
        return "model"

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", fake)
    assert load_model("gpt2", device="cpu", dtype=torch.float32) == "model"
    assert calls == [("gpt2", {"device": "cpu", "dtype": torch.float32})]
    load_model("pythia-70m")
    assert calls[-1][0] == "EleutherAI/pythia-70m"

    def offline(name, **kwargs):
        raise OSError("hub unreachable")

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", offline)
    with pytest.raises(ModelLoadError, match="could not fetch official model 'gpt2'"):
        load_model("gpt2")


def test_bad_inputs_raise_one_clear_error(tmp_path, tiny_gpt2):
    assert issubclass(ModelLoadError, ValueError)
    with pytest.raises(ModelLoadError, match=r"unknown model 'not-a-model'.*'embedded'"):
        load_model("not-a-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/folder")
    with pytest.raises(ModelLoadError, match="non-empty"):
        load_model("")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(empty)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(broken)

    bert = tmp_path / "bert"
    tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64).save_pretrained(bert)
    with pytest.raises(ModelLoadError, match=r"model_type 'bert'.*supported.*gpt2"):
        load_model(bert)

    path, _, _ = tiny_gpt2
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickled weights are not loaded"):
        load_model(no_weights)

    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(a_file)
