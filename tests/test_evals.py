"""Evaluation: exact metrics on hand-built cases, splices, ablation, outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clt_lens.clt.loading import CheckpointError
from clt_lens.evals import EvalError, evaluate, markdown_table
from clt_lens.evals.metrics import LayerStats, ce_recovered, kl_div, token_ce


def test_layer_stats_hand_built():
    # 2 tokens, 1 layer, d=2, F=3
    y = torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]]])
    y_hat = torch.tensor([[[1.0, 3.0]], [[2.0, 6.0]]])
    acts = torch.tensor([[[0.0, 1.0, 2.0]], [[0.0, 0.0, 5.0]]])
    s = LayerStats(1, 3, 2)
    s.update(y, y_hat, acts)
    out = s.summary()
    # SSE = 1 + 1 = 2; SST = (1-2)^2+(3-2)^2 + (2-4)^2+(6-4)^2 = 2 + 8 = 10
    assert out["fvu"] == [pytest.approx(0.2)]
    assert out["explained_variance"] == [pytest.approx(0.8)]
    assert out["mse"] == [pytest.approx(2 / 4)]
    assert out["l0"] == [pytest.approx(1.5)]
    assert out["dead_fraction"] == [pytest.approx(1 / 3)]
    assert out["dense_fraction"] == [pytest.approx(2 / 3)]  # features 1 (50%) and 2 (100%)
    assert ce_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)


def test_ce_and_kl_reference():
    logits = torch.randn(2, 5, 7)
    toks = torch.randint(0, 7, (2, 5))
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7).double(),
                                            toks[:, 1:].reshape(-1), reduction="none")
    assert torch.allclose(token_ce(logits, toks).reshape(-1), ref)
    assert torch.allclose(kl_div(logits, logits), torch.zeros(2, 4, dtype=torch.float64))
    other = torch.randn(2, 5, 7)
    ref_kl = torch.nn.functional.kl_div(other[:, :-1].double().log_softmax(-1),
                                        logits[:, :-1].double().log_softmax(-1),
                                        log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_div(logits, other), ref_kl)


@pytest.fixture(scope="module")
def small_clt(embedded_model):
    from clt_lens.activations import collect_activations
    from clt_lens.clt import CLTConfig, CrossLayerTranscoder
    from clt_lens.data import load_tokens

    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(d_in=128, d_sae=64, n_layers=4, activation="relu"))
    toks = load_tokens("embedded", tokenizer=embedded_model.tokenizer, context_size=128,
                       split="train", max_tokens=4 * 128)
    x, y = collect_activations(embedded_model, toks)
    clt.estimate_normalization(x, y)
    return clt


def test_error_term_splice_reproduces_original_ce(embedded_model, small_clt):
    from clt_lens.clt.splice import run_with_clt
    from clt_lens.data import load_tokens

    toks = load_tokens("embedded", tokenizer=embedded_model.tokenizer, context_size=128,
                       split="heldout", max_tokens=2 * 128, shuffle=False)
    with torch.no_grad():
        orig = token_ce(embedded_model(toks), toks).mean()
        spliced = token_ce(run_with_clt(embedded_model, small_clt, toks, error_term=True),
                           toks).mean()
        plain = token_ce(run_with_clt(embedded_model, small_clt, toks), toks).mean()
    assert float(spliced) == pytest.approx(float(orig), abs=1e-5)
    assert abs(float(plain) - float(orig)) > 1e-3  # the untrained CLT does change the model


def test_evaluate_outputs_and_zero_ablation(tmp_path: Path, embedded_model, small_clt):
    import copy

    res = evaluate(small_clt, model=embedded_model, n_tokens=256, batch_size=2,
                   out_dir=tmp_path, progress=False)
    for name in ("eval.json", "eval.md", "eval_layers.png", "density.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["replacement"]["ce_original"] == pytest.approx(res["replacement"]["ce_original"])
    assert len(saved["per_layer"]["fvu"]) == 4 and len(saved["single_layer_splices"]) == 4
    table = markdown_table(res)
    assert "CE recovered" in table and table.count("\n| ") >= 10
    # zero ablation against a direct ablation: a copy of the model with MLP outputs zeroed
    from clt_lens.data import load_tokens

    toks = load_tokens("embedded", tokenizer=embedded_model.tokenizer, context_size=128,
                       split="heldout", max_tokens=2 * 128, shuffle=False)
    ablated = copy.deepcopy(embedded_model)
    with torch.no_grad():
        for block in ablated.blocks:
            block.mlp.W_out.zero_()
            block.mlp.b_out.zero_()
        direct = float(token_ce(ablated(toks), toks).mean())
    assert res["replacement"]["ce_zero_ablation"] == pytest.approx(direct, rel=1e-6)
    r = res["replacement"]
    assert r["ce_recovered"] == pytest.approx(
        (r["ce_zero_ablation"] - r["ce_replacement"]) / (r["ce_zero_ablation"] - r["ce_original"]))


def test_bad_inputs(embedded_model, small_clt, tmp_path: Path):
    from clt_lens.clt import CLTConfig, CrossLayerTranscoder

    other = CrossLayerTranscoder(CLTConfig(d_in=128, d_sae=16, n_layers=2))
    with pytest.raises(CheckpointError, match="n_layers=2"):
        evaluate(other, model=embedded_model, n_tokens=128, progress=False)
    with pytest.raises(EvalError, match="fewer than"):
        evaluate(small_clt, model=embedded_model, n_tokens=10**9, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty|no tokens|fewer"):
        evaluate(small_clt, model=embedded_model, dataset=str(empty), split="train",
                 n_tokens=128, progress=False)


def test_reconstruction_sums_combine_exactly_over_batches_and_ranks():
    """One home for the FVU/L0 sums (training steps, held-out checks and eval use it): split
    over batches, or packed and summed as ranks do, it gives the one-pass numbers."""
    from clt_lens.evals.running import ReconstructionSums

    g = torch.Generator().manual_seed(0)
    L, d, F = 3, 8, 16
    y = torch.randn(100, L, d, generator=g) * torch.tensor([1.0, 5.0, 0.1])[None, :, None] + 2.0
    y_hat = y + 0.3 * torch.randn(100, L, d, generator=g)
    acts = torch.relu(torch.randn(100, L, F, generator=g) - 1)
    whole = ReconstructionSums.zeros(L, d)
    whole.add_batch(y, y_hat, acts)
    sst = (y - y.mean(0)).double().pow(2).sum(dim=(0, 2))
    direct = (y_hat - y).double().pow(2).sum(dim=(0, 2)) / sst
    torch.testing.assert_close(whole.fvu(), direct)
    torch.testing.assert_close(whole.l0(), (acts != 0).double().sum(dim=(0, 2)) / 100)
    parts = [ReconstructionSums.zeros(L, d) for _ in range(2)]
    for i, (a, b, c) in enumerate(zip(y.split(30), y_hat.split(30), acts.split(30))):
        parts[i % 2].add_batch(a, b, c)
    total = ReconstructionSums.from_packed(parts[0].packed() + parts[1].packed(), L, d)
    torch.testing.assert_close(total.fvu(), whole.fvu())
    torch.testing.assert_close(total.l0(), whole.l0())
    torch.testing.assert_close(total.mse(), whole.mse())


def test_source_hooks_other_than_the_clts_are_refused_before_the_model_loads(
        tmp_path: Path, monkeypatch, capsys, embedded_model, small_clt):
    """eval and features read the CLT's own hooks; another hook in their ``source`` section
    is refused by name, before any model is loaded, through the API and the CLI alike."""
    import clt_lens.models
    from clt_lens.cli import main
    from clt_lens.config import ConfigError
    from clt_lens.source_config import CheckpointSourceConfig

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the hooks were checked")

    monkeypatch.setattr(clt_lens.models, "load_model", no_model)
    own = (small_clt.cfg.input_hook, small_clt.cfg.output_hook)
    assert own == ("ln2.hook_normalized", "hook_mlp_out")
    with pytest.raises(ConfigError, match="'hook_resid_pre'.*'ln2.hook_normalized'"):
        evaluate(small_clt, model="embedded", input_hook="hook_resid_pre", progress=False)
    spelled = CheckpointSourceConfig(input_hook=own[0], output_hook="auto")
    assert spelled.trained_hooks(*own).to_dict() == {"input_hook": own[0], "output_hook": own[1]}
    ckpt = tmp_path / "ckpt"
    small_clt.save_model(ckpt)
    capsys.readouterr()
    for argv, asked, trained in (
        (["eval", str(ckpt), "--source.input_hook", "hook_resid_pre"], "hook_resid_pre",
         "ln2.hook_normalized"),
        (["eval", str(ckpt), "--output_hook", "hook_resid_post"], "hook_resid_post",
         "hook_mlp_out"),  # the flat spelling
        (["features", str(ckpt), "--source.output_hook", "hook_resid_post", "--out_dir",
          str(tmp_path / "f")], "hook_resid_post", "hook_mlp_out"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "ConfigError" in err and "Traceback" not in err, err
        assert f"{asked!r}, but the CLT was trained on" in err and repr(trained) in err, err
    assert not (tmp_path / "f" / "features.json").exists() and not (ckpt / "eval").exists()


def test_source_context_size_and_explicit_own_hooks(embedded_model, small_clt):
    res = evaluate(small_clt, model=embedded_model, context_size=64, n_tokens=126, batch_size=2,
                   single_layer_splices=False, input_hook="ln2.hook_normalized",
                   output_hook="hook_mlp_out", progress=False)
    assert res["context_size"] == 64 and res["n_tokens_ce"] == 2 * 63
    assert (res["input_hook"], res["output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    with pytest.raises(EvalError, match="context_size 4096 exceeds"):
        evaluate(small_clt, model=embedded_model, context_size=4096, progress=False)
