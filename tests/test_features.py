"""The streaming statistics pass against the full activation matrix, and the features format."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections import Counter

import numpy as np
import pytest
import torch
from test_features_common import full_acts, heldout_tokens, model, model_on, random_clt

from clt_lens.config import ConfigError
from clt_lens.features import stats as stats_mod
from clt_lens.features.format import (
    FeaturesFormatError,
    iter_features,
    read_manifest,
    validate_feature,
    validate_features_dir,
)
from clt_lens.features.stats import compute_feature_stats, vocab_strings

N_SEQ = 24
TOP_K = 6
PER_Q = 3
N_Q = 4
WINDOW = 20


def _stats(tmp_path_factory, name, clt, *, batch_size, **kw):
    out = tmp_path_factory.mktemp(name)
    compute_feature_stats(
        clt, model=model(), tokens=heldout_tokens(N_SEQ), n_tokens=N_SEQ * 127,
        batch_size=batch_size, top_k=TOP_K, n_quantiles=N_Q, out_dir=out,
        examples_per_quantile=PER_Q, n_negative=4, window=WINDOW, progress=False, **kw,
    )
    return out


@pytest.fixture(scope="module")
def clt():
    return random_clt(64, frac=0.03)


@pytest.fixture(scope="module")
def reference(clt):
    return full_acts(clt, heldout_tokens(N_SEQ))  # [n_seq, T, L, F]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, clt):
    """Several batches, each cut into chunks of two sequences: many accumulator updates."""
    mp = pytest.MonkeyPatch()
    mp.setattr(stats_mod, "CHUNK_ELEMENTS", 2 * 127 * 4 * 64)
    try:
        return _stats(tmp_path_factory, "streamed", clt, batch_size=5)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def one_update(tmp_path_factory, clt):
    """All sequences in one update: the quantile reservoirs are then exact samples."""
    return _stats(tmp_path_factory, "one_update", clt, batch_size=N_SEQ)


def _records(out):
    manifest = read_manifest(out)
    return {(r["layer"], r["index"]): r
            for layer in manifest["layers"] for r in iter_features(out, layer)}


def _window_index(kept_tokens, w: int) -> dict:
    """Token-id tuple of every window of ``w`` tokens -> its (seq, start) places."""
    index: dict = {}
    for s, row in enumerate(kept_tokens.tolist()):
        for start in range(len(row) - w + 1):
            index.setdefault(tuple(row[start : start + w]), []).append((s, start))
    return index


def _find_window(ref_lf, windows: dict, ex, *, zero: bool = False):
    """(seq, start) of a window whose tokens and activations match the example, else None."""
    w = len(ex["token_ids"])
    for s, start in windows.get(tuple(ex["token_ids"]), []):
        acts = ref_lf[s, start : start + w].tolist()
        if acts == ex["acts"] and (not zero or max(acts) == 0):
            return s, start
    return None


def test_streamed_stats_match_the_full_activation_matrix(streamed, clt, reference):
    manifest = validate_features_dir(streamed)  # every record passes the schema check
    assert manifest["n_tokens"] == N_SEQ * 127 and manifest["layers"] == [0, 1, 2, 3]
    recs = _records(streamed)
    kept = _window_index(heldout_tokens(N_SEQ)[:, 1:], WINDOW)
    n_tok = N_SEQ * 127
    folded = clt.folded_weights()
    w_u = model().W_U.detach()
    vocab = vocab_strings(model().tokenizer, model().cfg.d_vocab)
    n_fired_total = 0
    for (layer, i), rec in recs.items():
        ref = reference[:, :, layer, i]  # [n_seq, T]
        nz = ref[ref > 0]
        n_fired_total += nz.numel()
        assert rec["n_fired"] == nz.numel()
        assert rec["frac_nonzero"] == nz.numel() / n_tok
        assert rec["max_act"] == (float(ref.max()) if nz.numel() else 0.0)
        if nz.numel():
            assert rec["mean_act"] == pytest.approx(float(nz.double().mean()), rel=1e-6)
        # top-k sequences by their maximum: exactly the reference's
        seq_max = ref.max(1).values
        expected = sorted(seq_max[seq_max > 0].tolist(), reverse=True)[:TOP_K]
        assert [ex["max_act"] for ex in rec["top_examples"]] == expected
        for ex in rec["top_examples"]:
            assert _find_window(ref, kept, ex) is not None, (layer, i)
        # histogram: the same counts as numpy's on the same edges
        if nz.numel():
            counts, _ = np.histogram(nz.double().numpy(), bins=np.array(rec["hist"]["edges"]))
            assert counts.tolist() == rec["hist"]["counts"]
            assert len(rec["hist"]["counts"]) > 64 // 2  # the maximum is in the upper half
        for qbin in rec["quantile_examples"]:
            for ex in qbin["examples"]:
                assert qbin["lo"] <= ex["max_act"] <= qbin["hi"]
                assert _find_window(ref, kept, ex) is not None
        if nz.numel():
            assert rec["quantile_examples"][0]["examples"], "the bin holding the maximum is empty"
            assert rec["quantile_examples"][0]["hi"] == rec["max_act"]
        for ex in rec["negative_examples"]:
            assert _find_window(ref, kept, ex, zero=True) is not None
        # weights: decoder norms per target layer and the direct logit effect of the total write
        norms = folded["W_dec"][layer][i].norm(dim=-1).tolist()
        assert rec["decoder_norms"] == pytest.approx(norms, rel=1e-6)
        logits = folded["W_dec"][layer][i].sum(0) @ w_u
        top = logits.topk(10)
        assert [t for t, _ in rec["top_logits"]] == [vocab[j] for j in top.indices.tolist()]
        assert [v for _, v in rec["top_logits"]] == pytest.approx(top.values.tolist(), rel=1e-5)
        bottom = logits.topk(10, largest=False)
        assert [v for _, v in rec["bottom_logits"]] == pytest.approx(bottom.values.tolist(),
                                                                    rel=1e-5)
    density = n_fired_total / (n_tok * len(recs))
    assert 0.01 < density < 0.06  # the random CLT really is sparse, and fires


def test_single_update_reservoirs_hold_min_of_count_and_capacity(one_update, reference):
    recs = _records(one_update)
    checked = 0
    for (layer, i), rec in recs.items():
        seq_max = reference[:, :, layer, i].max(1).values.tolist()
        for qbin in rec["quantile_examples"]:
            last = qbin is rec["quantile_examples"][0]
            in_bin = [v for v in seq_max if v > 0 and qbin["lo"] <= v
                      and (v < qbin["hi"] or (last and v == qbin["hi"]))]
            assert len(qbin["examples"]) == min(len(in_bin), PER_Q), (layer, i, qbin["name"])
            assert not Counter(ex["max_act"] for ex in qbin["examples"]) - Counter(in_bin)
            checked += len(in_bin) > 0
    assert checked > 100
    # the two runs see the same data: identical per-token statistics
    assert all(
        rec["n_fired"] == other["n_fired"] and rec["top_examples"] == other["top_examples"]
        for rec, other in zip(_records(one_update).values(), recs.values())
    )


def test_features_json_manifest(streamed, clt):
    m = read_manifest(streamed)
    assert m["d_sae"] == 64 and m["n_layers"] == 4 and m["top_k"] == TOP_K
    assert m["input_hook"] == clt.cfg.input_hook and m["output_hook"] == clt.cfg.output_hook
    assert m["sourceset"] == "clt" and m["split"] == "heldout"
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(m["tokenizer"])) == len(model().tokenizer)
    # an in-memory CLT is saved beside the statistics so the manifest names a real folder
    from clt_lens.clt.loading import load_clt

    reloaded = load_clt(m["checkpoint"])
    assert torch.equal(reloaded.W_enc, clt.W_enc)


def test_validator_rejects_broken_records(streamed):
    rec = next(r for r in iter_features(streamed, 1) if len(r["top_examples"]) >= 2)
    validate_feature(rec, n_layers=4, layer=1, d_sae=64)

    def broken(edit):
        r = copy.deepcopy(rec)
        edit(r)
        return r

    bad = [
        broken(lambda r: r["decoder_norms"].append(0.0)),  # L - l entries
        broken(lambda r: r["top_examples"].reverse()),  # sorted by max_act
        broken(lambda r: r["top_examples"][0]["acts"].pop()),  # acts length == tokens length
        broken(lambda r: r["top_examples"][0].update(max_pos=0)
               if r["top_examples"][0]["max_pos"] else r["top_examples"][0].update(max_pos=1)),
        broken(lambda r: r.update(max_act=r["max_act"] + 1)),
        broken(lambda r: r.pop("hist")),
        broken(lambda r: r.update(n_fired=r["n_fired"] + 1)),  # histogram total
        broken(lambda r: r["top_logits"].reverse()),
        broken(lambda r: r.update(frac_nonzero="0.1")),
    ]
    for k, r in enumerate(bad):
        with pytest.raises(FeaturesFormatError):
            validate_feature(r, n_layers=4, layer=1, d_sae=64)
            pytest.fail(f"mutation {k} passed validation")
    neg = copy.deepcopy(rec)
    if neg["negative_examples"]:
        neg["negative_examples"][0]["acts"][0] = 1.0
        neg["negative_examples"][0]["max_act"] = 1.0
        neg["negative_examples"][0]["max_pos"] = 0
        with pytest.raises(FeaturesFormatError):
            validate_feature(neg, n_layers=4, layer=1, d_sae=64)


def test_variants_plt_relu_topk_and_layer_subset(tmp_path, device):
    """On ``device`` (the CLT and model there, ``device`` asked for)."""
    plt = random_clt(32, activation="relu", cross_layer=False, seed=1)
    reference = full_acts(plt, heldout_tokens(5))  # on the CPU
    out = compute_feature_stats(
        plt.to(device), model=model_on(device), tokens=heldout_tokens(6), n_tokens=600,
        batch_size=4, top_k=3, n_quantiles=0, n_negative=0, layers=[3, 1],
        out_dir=tmp_path / "plt", progress=False, device=device,
    )
    m = validate_features_dir(out)
    assert m["layers"] == [1, 3] and m["n_tokens"] == 5 * 127
    assert not (out / "layer_00.jsonl").exists()
    rec = next(iter_features(out, 1))
    assert len(rec["decoder_norms"]) == 3 and rec["decoder_norms"][1:] == [0.0, 0.0]
    assert rec["quantile_examples"] == [] and rec["negative_examples"] == []
    # on a GPU a pre-activation within float rounding of 0 may fall on the other side
    slack = 0 if device == "cpu" else 2
    for r in iter_features(out, 3):
        assert abs(r["n_fired"] - int((reference[:, :, 3, r["index"]] > 0).sum())) <= slack

    topk = random_clt(32, activation="topk", seed=2)
    out = compute_feature_stats(
        topk.to(device), model=model_on(device), tokens=heldout_tokens(6), n_tokens=500,
        batch_size=3, top_k=3, n_quantiles=2, out_dir=tmp_path / "topk", progress=False,
    )
    validate_features_dir(out)
    total = sum(r["n_fired"] for layer in range(4) for r in iter_features(out, layer))
    assert total == 4 * 4 * read_manifest(out)["n_tokens"]  # k=4 per layer per token


def _no_forward(monkeypatch):
    import clt_lens.activations

    def boom(*a, **k):
        raise AssertionError("the model ran before the inputs were checked")

    monkeypatch.setattr(clt_lens.activations, "collect_activations", boom)


def test_bad_inputs_fail_before_the_pass(tmp_path, monkeypatch, clt):
    from clt_lens.activations import HookError
    from clt_lens.clt import CLTConfig, CrossLayerTranscoder

    _no_forward(monkeypatch)
    kw = dict(model=model(), tokens=heldout_tokens(4), out_dir=tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        compute_feature_stats(clt, layers=[7], **kw)
    with pytest.raises(ValueError, match="n_layers=3"):
        compute_feature_stats(CrossLayerTranscoder(CLTConfig(d_in=128, d_sae=8, n_layers=3)), **kw)
    with pytest.raises(ValueError, match="d_in=64"):
        compute_feature_stats(CrossLayerTranscoder(CLTConfig(d_in=64, d_sae=8, n_layers=4)), **kw)
    wrong_hook = CrossLayerTranscoder(CLTConfig(d_in=128, d_sae=8, n_layers=4))
    wrong_hook.cfg.metadata.hook_name = "hook_nowhere"
    with pytest.raises(HookError, match="hook_nowhere"):
        compute_feature_stats(wrong_hook, **kw)
    other = copy.deepcopy(clt)
    other.cfg.metadata.model_id = "gpt2@000000000000"
    with pytest.raises(ValueError, match="trained on model gpt2@"):
        compute_feature_stats(other, **kw)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        compute_feature_stats(tmp_path / "no_such_checkpoint", **kw)
    with pytest.raises(ConfigError, match="top_k"):
        compute_feature_stats(clt, top_k=0, **kw)
    with pytest.raises(ConfigError, match="unknown option"):
        compute_feature_stats(clt, windw=3, **kw)
    with pytest.raises(ConfigError, match="source.input_hook' is 'hook_resid_pre'"):
        compute_feature_stats(clt, input_hook="hook_resid_pre", **kw)
    assert not (tmp_path / "o" / "features.json").exists()


def test_source_defaults_to_the_training_dataset(tmp_path, clt):
    """Unset ``source.dataset`` is the one the run's train_config.json names (as in eval);
    a source field given as a keyword (context_size) reaches the pass."""
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "heldout.txt").write_text("Zebras graze quietly near the river bank.\n" * 60)
    (text / "train.txt").write_text("Other words entirely.\n" * 60)
    run = tmp_path / "run"
    clt.save_model(run / "final")
    (run / "train_config.json").write_text(json.dumps({"source": {"dataset": str(text)}}))
    out = compute_feature_stats(run / "final", model=model(), n_tokens=60, batch_size=2,
                                top_k=2, n_quantiles=0, n_negative=0, context_size=32,
                                out_dir=tmp_path / "f", progress=False)
    m = read_manifest(out)
    assert (m["dataset"], m["split"], m["context_size"]) == (str(text), "heldout", 32)
    assert m["config"]["dataset"] is None and m["config"]["context_size"] == 32  # flat keys
    seen = "".join(t for layer in range(4) for r in iter_features(out, layer)
                   for ex in r["top_examples"] for t in ex["tokens"])
    assert "Zeb" in seen and "Other" not in seen
    explicit = compute_feature_stats(run / "final", model=model(), dataset="embedded",
                                     n_tokens=60, batch_size=2, top_k=2, n_quantiles=0,
                                     n_negative=0, out_dir=tmp_path / "g", progress=False)
    assert read_manifest(explicit)["dataset"] == "embedded"


def test_cli_features_with_neuronpedia_output(tmp_path, monkeypatch, clt, device):
    import clt_lens.models
    from clt_lens.cli import main

    ckpt = tmp_path / "run" / "final"
    clt.save_model(ckpt)
    asked = []
    monkeypatch.setattr(clt_lens.models, "load_model",
                        lambda name, **kw: asked.append(kw.get("device")) or model_on(device))
    from clt_lens.vendor_js import DASHBOARD_SCRIPTS, find_js_dir

    dash = ["--dashboard", "2:1,3", "--dashboard_sequences", "4"] if importlib.util.find_spec(
        "sae_dashboard") and find_js_dir(DASHBOARD_SCRIPTS) else []
    code = main(["features", str(ckpt), "--tokens", "400", "--layers", "0,2", "--neuronpedia",
                 "--model-id", "tiny", "--top_k", "4", "--batch_size", "2", "--window", "16",
                 "--device", device, *dash])
    assert code == 0 and asked and set(asked) == {device}  # the model was asked for there
    out = tmp_path / "run" / "features"
    m = validate_features_dir(out)
    assert m["layers"] == [0, 2] and m["top_k"] == 4 and m["checkpoint"] == str(ckpt.resolve())
    rec = next(iter_features(out, 0))
    assert all(len(ex["acts"]) == 16 for ex in rec["top_examples"])
    assert (out / "neuronpedia" / "dashboards" / "2-clt" / "batch-0.json").is_file()
    if dash:
        page = (out / "dashboards" / "layer_02.html").read_text(encoding="utf-8")
        assert "DASHBOARD_DATA" in page and '<meta charset="utf-8">' in page
        assert "src=\"http" not in page and "src='http" not in page
    assert (out / "neuronpedia" / "exports" / "tiny" / "0-clt" / "features" /
            "batch-0.jsonl.gz").is_file()
    # bad input is reported without a traceback and before the pass
    assert main(["features", str(ckpt), "--layers", "9", "--out", str(tmp_path / "x")]) == 2
    assert main(["features", str(ckpt), "--dashboard", "0-3", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x" / "features.json").exists()
    json.loads((out / "features.json").read_text())
