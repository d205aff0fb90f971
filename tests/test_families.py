"""Beyond GPT-2: the whole path for every supported family, at tiny size.

For each of gpt2, llama, qwen2, qwen3, gemma2 and gpt_neox: a random 2-layer d_model=64 model
saved as a Hugging Face folder -> ``load_model`` -> training with hooks left on "auto" (streamed
from the embedded corpus) -> circuit-tracer set -> circuit-tracer's ReplacementModel, whose
reconstruction must equal our CLT's -> an attribution graph whose edges must agree with
interventions on a frozen forward pass. Plus: what the default hooks are in each block layout,
the ready configs, and clear errors for families that are not supported.
"""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
import yaml
from transformer_lens import HookedTransformer, HookedTransformerConfig

from clt_lens.activations import HookSpec, collect_activations
from clt_lens.cache import generate
from clt_lens.cache import writer as cache_writer
from clt_lens.cache.format import read_manifest
from clt_lens.circuits import (
    CircuitsError,
    attribute_prompt,
    build_replacement_model,
    load_transcoders,
    write_circuit_tracer_set,
)
from clt_lens.circuits.attribution import tokenize_prompt
from clt_lens.config import ConfigError, build_config, load_config
from clt_lens.models import (
    EMBEDDED_DIR,
    SUPPORTED,
    ModelLoadError,
    UnsupportedFamilyError,
    check_attribution_support,
    default_hooks,
    load_model,
    model_family,
    resolve_hooks,
)
from clt_lens.source_config import SourceConfig
from clt_lens.training import CLTTrainingRunner, TrainConfig
from clt_lens.training import trainer as trainer_module
from clt_lens.training.cli import CONFIG_DIR

CORPUS = EMBEDDED_DIR.parent / "corpus" / "heldout.txt.gz"
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "gemma2", "gpt_neox"]
PROMPT = "To be, or not to be, that is the question"
SHORT_PROMPT = "To be, or not to be"  # attribution cost grows with the active features
CTX = 32
DEFAULT = HookSpec("ln2.hook_normalized", "hook_mlp_out")

_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
_HF = {
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=64)),
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(_SIZE, num_key_value_heads=2)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(_SIZE, num_key_value_heads=2)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
              dict(_SIZE, num_key_value_heads=2, head_dim=16)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(_SIZE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=8)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(_SIZE, rotary_pct=0.5)),
}


def save_tiny_family(family: str, path: Path) -> Path:
    """A random 2-layer model of ``family`` with the embedded model's tokenizer (vocab 4096)."""
    cfg_cls, model_cls, size = _HF[family]
    # A larger init than the default 0.02 gives O(0.1-1) activations, so tolerances mean something.
    cfg = cfg_cls(vocab_size=4096, bos_token_id=0, eos_token_id=0, initializer_range=0.1, **size)
    torch.manual_seed(0)
    hf = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm weights and biases, so none can hide
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(EMBEDDED_DIR / name, path / name)
    return path


def small_train_config(model: str, out_dir: Path, **extra: Any) -> TrainConfig:
    kw: dict[str, Any] = dict(
        model=model, dataset="embedded", context_size=CTX, d_sae=32, n_steps=4, batch_size=128,
        normalization_tokens=256, heldout_tokens=128, eval_every=4, log_every=2,
        heldout_split="train",
        lr_warmup_steps=1, sparsity_warmup_steps=2, stream_sequences_per_refill=8,
        stream_model_batch_size=8, progress=False, out_dir=str(out_dir),
    )
    return build_config(TrainConfig, kw | extra)  # flat keys: the old spellings still work


@dataclass
class FamilyRun:
    family: str
    folder: Path
    model: HookedTransformer
    clt: Any
    run_dir: Path
    set_dir: Path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """A 40 kB slice of the embedded corpus: packing it is quick, unlike the whole corpus."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    with gzip.open(CORPUS, "rt") as f:
        path.write_text(f.read(40_000))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_file):
    """family -> FamilyRun, built on first use: folder, model, a 4-step training, the set."""
    built: dict[str, FamilyRun] = {}

    def get(family: str) -> FamilyRun:
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            folder = save_tiny_family(family, root / "model")
            model = load_model(folder)
            cfg = small_train_config(str(folder), root / "run", dataset=str(text_file))
            src = cfg.source
            assert (src.input_hook, src.output_hook) == ("auto", "auto")  # the default
            with pytest.MonkeyPatch.context() as mp:  # the training plots cost seconds each
                mp.setattr(trainer_module, "plot_training_curves", lambda *a, **k: None)
                clt = CLTTrainingRunner(cfg, override_model=model).run().eval()
            set_dir = write_circuit_tracer_set(root / "run", root / "set")
            built[family] = FamilyRun(family, folder, model, clt, root / "run", set_dir)
        return built[family]

    return get


def tokens_of(model: HookedTransformer) -> torch.Tensor:
    return tokenize_prompt(model, PROMPT)[None]


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return (a - b).abs().max().item() <= rel * scale


# ----------------------------------------------------------------------------------------------
# Default hooks: chosen per family, and recorded everywhere downstream


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_hooks_are_resolved_and_recorded(runs, family):
    run = runs(family)
    assert model_family(run.folder) == family  # from config.json, before loading anything
    assert model_family(run.model) == family
    assert default_hooks(run.model) == default_hooks(family) == SUPPORTED[family].hooks == DEFAULT
    saved = json.loads((run.run_dir / "train_config.json").read_text())["source"]
    assert (saved["input_hook"], saved["output_hook"]) == (DEFAULT.input_hook, DEFAULT.output_hook)
    meta = json.loads((run.run_dir / "final" / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"]) == (DEFAULT.input_hook, DEFAULT.output_hook)
    ct = yaml.safe_load((run.set_dir / "config.yaml").read_text())
    assert (ct["feature_input_hook"], ct["feature_output_hook"]) == (
        DEFAULT.input_hook, DEFAULT.output_hook)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_hooks_are_mlp_input_and_residual_contribution(runs, family):
    """The input hook is ln2's normalised residual (the MLP reads it times ln2's affine), and
    the output hook is exactly what the MLP adds to the residual stream, in every layout."""
    model = runs(family).model
    toks = tokens_of(model)
    x, y = collect_activations(model, toks, DEFAULT, exclude_bos=False)
    mlp_in, mlp_out = collect_activations(model, toks, HookSpec("mlp.hook_in", "mlp.hook_out"),
                                          exclude_bos=False)
    _, cache = model.run_with_cache(toks)
    parallel = model.cfg.parallel_attn_mlp
    assert parallel == (family == "gpt_neox")
    for layer in range(model.cfg.n_layers):
        block = model.blocks[layer]
        affine = x[:, layer] * block.ln2.w + (block.ln2.b if hasattr(block.ln2, "b") else 0)
        assert close(mlp_in[:, layer], affine)
        post = cache[f"blocks.{layer}.hook_resid_post"][0]
        if parallel:  # attention and MLP both read resid_pre and add to resid_post
            added = (post - cache[f"blocks.{layer}.hook_resid_pre"][0]
                     - cache[f"blocks.{layer}.hook_attn_out"][0])
        else:
            added = post - cache[f"blocks.{layer}.hook_resid_mid"][0]
        assert close(y[:, layer], added, rel=1e-4)
        if family == "gemma2":
            # hook_mlp_out is after the post-MLP norm; the MLP module's own output is not
            assert close(y[:, layer], block.ln2_post(mlp_out[:, layer][None])[0])
            assert not close(y[:, layer], mlp_out[:, layer], rel=1e-2)
        else:
            assert close(y[:, layer], mlp_out[:, layer])


# ----------------------------------------------------------------------------------------------
# circuit-tracer: the same reconstruction, and graphs whose edges are real direct effects


@pytest.mark.parametrize("family", FAMILIES)
def test_circuit_tracer_reconstructs_like_our_clt(runs, family):
    run = runs(family)
    model, clt = run.model, run.clt
    transcoders, _ = load_transcoders(run.set_dir)
    rm = build_replacement_model(model, transcoders)  # checks its logits equal the model's
    toks = tokens_of(model)
    try:
        # circuit-tracer's own pre-attribution pass: its hooks, its encoder, its decoder
        ctx = rm.setup_attribution(toks[0])
        _, rm_cache = rm.run_with_cache(toks, names_filter=lambda n: n.endswith(DEFAULT.input_hook))
    finally:
        rm.reset_hooks(including_permanent=True)
    x, y = collect_activations(model, toks, DEFAULT, exclude_bos=False)  # [pos, L, d]
    with torch.no_grad():
        ours = clt(x)
        acts = clt.encode(x)
    for layer in range(model.cfg.n_layers):
        assert close(rm_cache[f"blocks.{layer}.{DEFAULT.input_hook}"][0], x[:, layer])
    # circuit-tracer's error node = true output - its reconstruction; BOS (position 0) is zeroed
    theirs = y.transpose(0, 1)[:, 1:] - ctx.error_vectors[:, 1:]
    assert ours.abs().max() > 0.01 * y.abs().max()
    assert close(theirs, ours.transpose(0, 1)[:, 1:])
    their_acts = ctx.activation_matrix.to_dense()[:, 1:]  # [L, pos, F]
    our_acts = acts.transpose(0, 1)[:, 1:]
    assert torch.equal(their_acts != 0, our_acts != 0)
    assert close(their_acts, our_acts)
    assert int((our_acts != 0).sum()) > 10


def frozen_preacts(model: HookedTransformer, tokens: torch.Tensor, w: dict, frozen: dict,
                   source: tuple[int, int, int] | None = None, delta: float = 0.0
                   ) -> torch.Tensor:
    """Encoder pre-activations [L, pos, F] with attention patterns and every norm's scale frozen
    to ``frozen`` (the local replacement model circuit-tracer linearises), after adding ``delta``
    times the decoder of feature ``source = (layer, pos, feature)`` to the outputs it writes."""
    n_layers = model.cfg.n_layers
    pre: dict[int, torch.Tensor] = {}

    def freeze(act, hook):
        return frozen[hook.name]

    def read(act, hook, layer):
        pre[layer] = act[0] @ w["W_enc"][layer] + w["b_enc"][layer]

    def write(act, hook, layer):
        if source is None or layer < source[0]:
            return act
        s_layer, pos, feat = source
        act = act.clone()
        act[0, pos] += delta * w["W_dec"][s_layer][feat, layer - s_layer]
        return act

    hooks = [(name, freeze) for name in frozen]
    for layer in range(n_layers):
        hooks.append((f"blocks.{layer}.{DEFAULT.input_hook}",
                      lambda a, hook, layer=layer: read(a, hook, layer)))
        hooks.append((f"blocks.{layer}.{DEFAULT.output_hook}",
                      lambda a, hook, layer=layer: write(a, hook, layer)))
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=n_layers)
    return torch.stack([pre[layer] for layer in range(n_layers)])


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_graph_edges_are_direct_effects(runs, family, tmp_path):
    from circuit_tracer.graph import Graph

    run = runs(family)
    model = run.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = attribute_prompt(run.set_dir, SHORT_PROMPT, model=model, max_n_logits=5,
                               max_feature_nodes=None, batch_size=64, out_dir=tmp_path, slug=family)
    assert res.json_path.is_file() and res.n_feature_nodes > 0 and res.n_edges > 0
    graph = Graph.from_pt(str(res.graph_path))
    w = {k: v for k, v in run.clt.folded_weights().items() if v is not None}
    toks = graph.input_tokens[None]
    _, frozen = model.run_with_cache(
        toks, names_filter=lambda n: n.endswith(("hook_pattern", "hook_scale")))
    frozen = dict(frozen.items())
    pre0 = frozen_preacts(model, toks, w, frozen)
    selected = graph.active_features[graph.selected_features].tolist()
    acts = graph.activation_values[graph.selected_features]
    recorded = torch.tensor([pre0[layer, pos, f].item() for layer, pos, f in selected])
    assert torch.allclose(recorded, acts, rtol=1e-4, atol=1e-5)

    n = len(selected)
    edges = graph.adjacency_matrix[:n, :n]  # [target, source]
    scale = edges.abs().max().item()
    assert scale > 0
    cross = torch.tensor([[selected[t][1] != selected[s][1] for s in range(n)] for t in range(n)])
    assert cross.any()
    if family == "gpt_neox":
        # parallel blocks: an MLP never reads its own layer's attention, so in 2 layers no
        # feature reaches a feature at another position
        assert edges[cross].abs().max().item() == 0
    else:
        assert edges[cross].abs().max().item() > 1e-3 * scale
    order = edges.abs().flatten().argsort(descending=True).tolist()
    pairs = [divmod(k, n) for k in order[:4]]
    pairs += [p for p in (divmod(k, n) for k in order[:300]) if cross[p]][:2]
    for t, s in pairs:
        if edges[t, s] == 0:
            continue
        pre1 = frozen_preacts(model, toks, w, frozen, tuple(selected[s]), -acts[s].item())
        t_layer, t_pos, t_feat = selected[t]
        measured = (pre1 - pre0)[t_layer, t_pos, t_feat].item()
        assert measured == pytest.approx(-edges[t, s].item(), rel=1e-3, abs=1e-4 * scale), (t, s)


# ----------------------------------------------------------------------------------------------
# "auto" in caches and resumed runs


def test_auto_hooks_in_cache_and_resume(runs, text_file, tmp_path, monkeypatch):
    run = runs("gemma2")
    out = tmp_path / "cache"
    cfg = load_config(generate.CacheConfig, None, {
        "model": str(run.folder), "dataset": "embedded", "context_size": CTX, "n_tokens": 124,
        "shard_tokens": 62, "codec": "fp32", "out_dir": str(out), "progress": False})
    assert (cfg.source.input_hook, cfg.source.output_hook) == ("auto", "auto")
    manifest = generate.generate_cache(cfg, model=run.model)
    assert manifest.hooks == DEFAULT
    assert read_manifest(out).hooks == DEFAULT
    saved = json.loads((out / cache_writer.CONFIG_NAME).read_text())["config"]
    assert (saved["input_hook"], saved["output_hook"]) == (DEFAULT.input_hook, DEFAULT.output_hook)
    assert generate.generate_cache(cfg, model=run.model).hooks == DEFAULT  # same config: reused

    # a run saved with resolved names resumes from a config that still says "auto"
    monkeypatch.setattr(trainer_module, "plot_training_curves", lambda *a, **k: None)
    more = small_train_config(str(run.folder), run.run_dir, n_steps=5, dataset=str(text_file))
    CLTTrainingRunner(more, override_model=run.model, resume=run.run_dir).run()
    saved = json.loads((run.run_dir / "train_config.json").read_text())
    assert (saved["n_steps"], saved["source"]["input_hook"], saved["source"]["output_hook"]) == (
        5, DEFAULT.input_hook, DEFAULT.output_hook)
    other = small_train_config(str(run.folder), run.run_dir, n_steps=6, dataset=str(text_file),
                               input_hook="hook_resid_mid")
    with pytest.raises(ConfigError, match="incompatible config.*input_hook"):
        CLTTrainingRunner(other, override_model=run.model, resume=run.run_dir)


# ----------------------------------------------------------------------------------------------
# The ready configs and hub names


_CONFIG_FAMILY = {
    "embedded": "gpt2", "gpt2": "gpt2", "pythia-160m": "gpt_neox", "gemma-2-2b": "gemma2",
    "meta-llama/Llama-3.2-1B": "llama",
}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_ready_configs_use_official_names_and_family_hooks(path, monkeypatch):
    cfg = load_config(TrainConfig, path)
    family = model_family(cfg.source.model)
    assert family == _CONFIG_FAMILY[cfg.source.model]
    hooks = resolve_hooks(cfg.source.model, cfg.source.input_hook, cfg.source.output_hook)
    assert hooks == default_hooks(family)
    if cfg.source.model == "embedded":
        return
    calls = []
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing",
                        lambda name, **kw: calls.append(name) or "loaded")
    # TransformerLens's official loader, unprocessed
    assert load_model(cfg.source.model) == "loaded"
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

    assert calls[0] in OFFICIAL_MODEL_NAMES


# ----------------------------------------------------------------------------------------------
# Families that are not supported: one clear error, before any heavy work


def _tl_model(**cfg: Any) -> HookedTransformer:
    base = dict(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_mlp=64, d_vocab=64,
                act_fn="gelu", normalization_type="LN", seed=0)
    return HookedTransformer(HookedTransformerConfig(**(base | cfg))).eval()


def test_unsupported_families_get_a_clear_error(tmp_path, runs):
    supported = r"[Ss]upported.*'gemma2', 'gpt2', 'gpt_neox', 'llama', 'qwen2', 'qwen3'"
    # a local folder TransformerLens has no converter for here
    mistral_dir = tmp_path / "mistral"
    tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1).save_pretrained(mistral_dir)
    with pytest.raises(ModelLoadError, match=r"model_type 'mistral'.*supported.*gpt_neox"):
        load_model(mistral_dir)
    assert model_family(mistral_dir) == "mistral"
    with pytest.raises(UnsupportedFamilyError, match=rf"'mistral'.*{supported}"):
        default_hooks(mistral_dir)
    # caches with "auto" hooks fail on the name, before the model is loaded
    cache_cfg = generate.CacheConfig(source=SourceConfig(model=str(mistral_dir)),
                                     out_dir=str(tmp_path / "c"), progress=False)
    with pytest.raises(UnsupportedFamilyError, match="'mistral'"):
        generate.generate_cache(cache_cfg)
    assert not (tmp_path / "c").exists()
    # hub names: refused by name, without touching the network or loading anything
    with pytest.raises(UnsupportedFamilyError, match=rf"BERT encoder.*{supported}"):
        load_model("bert-base-cased")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HookedTransformer, "from_pretrained_no_processing",
                   lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(UnsupportedFamilyError, match=rf"'mistral'.*{supported}"):
            CLTTrainingRunner(small_train_config("mistral-7b", tmp_path / "m7"))

    # a HookedTransformer of a family nobody verified (here: declared Mistral)
    other = _tl_model(original_architecture="MistralForCausalLM")
    assert model_family(other) == "mistral"
    with pytest.raises(UnsupportedFamilyError, match=rf"'mistral'.*{supported}"):
        default_hooks(other)
    with pytest.raises(UnsupportedFamilyError, match="'mistral'"):
        CLTTrainingRunner(small_train_config("custom", tmp_path / "t"), override_model=other)
    # explicit hooks are the user's call: collection works
    assert resolve_hooks(other, "ln2.hook_normalized", "hook_mlp_out") == DEFAULT
    x, _ = collect_activations(other, torch.randint(0, 64, (1, 8)), DEFAULT)
    assert x.shape == (8, 2, 32)
    # but attribution refuses it, naming the family (checked before the heavy work)
    with pytest.raises(UnsupportedFamilyError, match=r"'mistral'.*verified only"):
        check_attribution_support(other)
    transcoders, _ = load_transcoders(runs("gpt2").set_dir)
    with pytest.raises(CircuitsError, match=r"family 'mistral'.*verified only.*gpt_neox"):
        build_replacement_model(other, transcoders)

    # a plain TransformerLens config gets the standard hooks ... unless it has no MLPs
    assert default_hooks(_tl_model()) == DEFAULT
    assert check_attribution_support(_tl_model()) == "custom"
    with pytest.raises(UnsupportedFamilyError, match="no MLPs"):
        default_hooks(_tl_model(attn_only=True))
