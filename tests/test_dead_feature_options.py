"""Options against dead features: b_enc initialised from data, aux-k for JumpReLU."""

from __future__ import annotations

import pytest
import torch

from clt_lens.clt import CLTConfig, CLTSpec, CrossLayerTranscoder
from clt_lens.clt.init import init_clt_
from clt_lens.config import ConfigError
from clt_lens.training.config import TrainConfig

L, D, F, B = 2, 16, 64, 2000


def make(activation: str = "jumprelu", d_sae: int = F, **kw) -> CrossLayerTranscoder:
    clt = CrossLayerTranscoder(CLTConfig(d_in=D, d_sae=d_sae, n_layers=L, activation=activation,
                                         **kw))
    return init_clt_(clt, seed=0, total_features=F)


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g) * torch.tensor([1.0, 3.0]).view(1, L, 1)
    return x, torch.randn(B, L, D, generator=g)


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_b_enc_from_data_sets_each_features_firing_rate(activation):
    x, y = data()
    clt = make(activation, b_enc_init_rate=0.05)
    clt.estimate_normalization(x, y)
    with torch.no_grad():
        fired = (clt.encode(x) > 0).double().mean(0)  # [L, F]
    # the (1 - rate) order statistic sits exactly at the threshold: floor(rate * B) tokens fire
    assert torch.equal(fired, torch.full((L, F), 100 / B, dtype=torch.float64))
    # on other tokens of the same distribution, close to the rate
    with torch.no_grad():
        other = (clt.encode(data(1)[0]) > 0).double().mean()
    assert abs(float(other) - 0.05) < 0.01


def test_b_enc_from_data_is_off_by_default_and_slices_agree():
    x, y = data()
    plain = make()
    plain.estimate_normalization(x, y)
    assert not plain.b_enc.any()
    full = make(b_enc_init_rate=0.1)
    full.estimate_normalization(x, y)
    half = CrossLayerTranscoder(CLTConfig(d_in=D, d_sae=F // 2, n_layers=L, b_enc_init_rate=0.1))
    init_clt_(half, seed=0, feature_start=F // 2, total_features=F)
    half.estimate_normalization(x, y)
    # a feature-sharded rank gets the same biases as the same features of one process
    assert torch.allclose(half.b_enc, full.b_enc[:, F // 2:])


def test_b_enc_init_rate_is_validated():
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match="b_enc_init_rate"):
            CLTConfig(d_in=D, d_sae=F, n_layers=L, b_enc_init_rate=bad)
        with pytest.raises(ConfigError, match="b_enc_init_rate"):
            TrainConfig(clt=CLTSpec(b_enc_init_rate=bad)).validate()
    TrainConfig(clt=CLTSpec(b_enc_init_rate=0.05, auxk_jumprelu=True)).validate()


def test_auxk_reaches_dead_jumprelu_features_only_when_asked():
    x, y = data()
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[:, :8] = True
    grads = {}
    for flag in (False, True):
        clt = make(auxk_jumprelu=flag, preact_coeff=0.0)
        clt.estimate_normalization(x, y)
        with torch.no_grad():  # the dead features never fire on these tokens
            clt.log_threshold[:, :8] = 5.0
        out = clt.training_forward(x[:256], y[:256], dead_mask=dead)
        out.loss.backward()
        grads[flag] = (float(out.losses["auxk"]), clt.W_enc.grad[:, :, :8].abs().sum().item())
    assert grads[False] == (0.0, 0.0)
    assert grads[True][0] > 0 and grads[True][1] > 0
