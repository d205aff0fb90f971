"""Codecs (round trips within their error bounds) and shard framing (corruption is detected)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clt_lens.cache.format import (
    CODECS,
    FORMAT_VERSION,
    SHARD_MAGIC,
    CacheError,
    encode_shard,
    make_codec,
    parse_shard,
    read_shard_file,
    sha256_hex,
)


def activations(n=3000, layers=3, d=48, seed=0) -> torch.Tensor:
    """Channels with very different scales and offsets, heavy tails and a dead channel."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(1, layers, d, generator=g))
    t = torch.randn(n, layers, d, generator=g).pow(3) * scale + torch.randn(1, layers, d,
                                                                             generator=g)
    t[:, 1, 5] = 2.5  # constant channel
    t[7, 2, 3] = 400.0  # outlier: forces wide integer codes
    return t


def roundtrip(codec_name: str, t: torch.Tensor, y: torch.Tensor | None = None, **params):
    """Encode (x=t, y=-t unless given), decode; -> (bytes, view, x, y)."""
    codec = make_codec(codec_name, **params)
    data = b"".join(encode_shard(t, -t if y is None else y, codec, {"shard": 0}))
    view = parse_shard(data, "mem")
    x, y = view.decode()
    return data, view, x, y


def fvu(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Independent reference: sum of squared errors / sum of squared deviations from the mean."""
    ref = ref.double()
    return float(((approx.double() - ref) ** 2).sum() / ((ref - ref.mean(0)) ** 2).sum())


@pytest.mark.parametrize("zstd_level", [0, 3])
def test_fp32_is_exact(zstd_level):
    t = activations()
    data, view, x, y = roundtrip("fp32", t, zstd_level=zstd_level)
    assert torch.equal(x, t) and torch.equal(y, -t)
    assert view.header["codec"] == {"name": "fp32", "zstd_level": zstd_level}
    if zstd_level == 0:
        assert len(data) > t.numel() * 8  # raw payload plus header


@pytest.mark.parametrize("name,rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_relative_error(name, rel):
    t = activations()
    _, _, x, y = roundtrip(name, t)
    assert torch.all((x - t).abs() <= rel * t.abs() + 1e-7)
    assert torch.equal(y, -x)


def test_fp16_refuses_out_of_range():
    t = activations()
    t[0, 0, 0] = 1e6
    with pytest.raises(CacheError, match="fp16.*65504"):
        roundtrip("fp16", t)


def test_int8_error_within_half_step_per_layer_channel():
    t = activations()
    _, view, x, _ = roundtrip("int8", t)
    step = t.abs().amax(0) / 127  # [L, d]: absmax over the shard per (layer, channel)
    err = (x - t).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    assert view.array("x/scales").shape == (3, 48)


@pytest.mark.parametrize("allocation,predict", [("layer", False), ("channel", False),
                                                ("layer", True)])
@pytest.mark.parametrize("target", [1e-2, 1e-3, 1e-4])
def test_errbound_meets_target_fvu_on_every_layer(allocation, predict, target):
    t = activations(n=2000)
    t2 = activations(n=2000, seed=1)
    _, view, x, y = roundtrip("errbound", t, t2, target_fvu=target, allocation=allocation,
                              predict=predict)
    for layer in range(3):
        got = fvu(t[:, layer], x[:, layer])
        assert got <= target
        assert got > target / 4  # the budget is used, not wasted on precision
        assert got == pytest.approx(view.header["tensors"]["x"]["fvu"][layer], rel=1e-4)
        assert fvu(t2[:, layer], y[:, layer]) <= target
    if target <= 1e-3:
        assert 16 in view.header["tensors"]["x"]["bits"]  # the outlier needs 16-bit codes
    assert torch.all(x[:, 1, 5] == 2.5)  # constant channel exact


def test_errbound_prediction_uses_correlated_layers():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(4000, 1, 64, generator=g)
    t = base + 0.3 * torch.randn(4000, 3, 64, generator=g)  # layers share most of their signal
    plain, _, xp, _ = roundtrip("errbound", t, predict=False)
    pred, view, x, _ = roundtrip("errbound", t, predict=True)
    assert len(pred) < 0.85 * len(plain)
    coef = view.array("x/coef")  # [L, sources, d]: x_l from x_{l-1} and y_{l-1}
    assert coef.shape == (3, 2, 64) and float(abs(coef[0]).max()) == 0
    # y = -x here: predicted from the decoded x of the same layer, it costs almost nothing
    ysize = sum(b["nbytes"] for b in view.header["blobs"] if b["name"].startswith("y/"))
    assert ysize < 0.2 * len(pred)
    assert float(view.array("y/coef")[:, 0].mean()) == pytest.approx(-1, abs=0.01)
    for layer in range(3):
        assert fvu(t[:, layer], x[:, layer]) <= 1e-3


def test_errbound_beats_int8_size_on_gaussian_data():
    t = torch.randn(4000, 2, 64, generator=torch.Generator().manual_seed(3))
    e, *_ = roundtrip("errbound", t, target_fvu=1e-3)
    i, *_ = roundtrip("int8", t)
    assert len(e) < len(i)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encoding_is_deterministic(name):
    t = activations(n=500)
    a = b"".join(encode_shard(t, t, make_codec(name)))
    b = b"".join(encode_shard(t.clone(), t.clone(), make_codec(name)))
    assert a == b


def test_empty_shard_roundtrip():
    t = torch.zeros(0, 2, 8)
    for name in CODECS:
        _, view, x, _ = roundtrip(name, t)
        assert x.shape == (0, 2, 8)


def test_bad_codec_parameters():
    with pytest.raises(CacheError, match="unknown codec 'int4'"):
        make_codec("int4")
    with pytest.raises(CacheError, match="target_fvu"):
        make_codec("errbound", target_fvu=2)
    with pytest.raises(CacheError, match="zstd_level"):
        make_codec("int8", zstd_level=40)
    with pytest.raises(CacheError, match="bad parameters"):
        make_codec("fp32", target_fvu=1e-3)


@pytest.fixture
def shard_file(tmp_path):
    t = activations(n=400)
    data = b"".join(encode_shard(t, t, make_codec("errbound")))
    path = tmp_path / "shard-00000.clts"
    path.write_bytes(data)
    return path, len(data), sha256_hex(data)


def test_truncated_shard_named(shard_file):
    path, n, digest = shard_file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=f"{path}.*manifest says {n}"):
        read_shard_file(path, nbytes=n, sha256=digest)
    with pytest.raises(CacheError, match=f"{path}.*truncated"):
        read_shard_file(path)  # framing alone catches it too


def test_flipped_byte_named(shard_file):
    path, n, digest = shard_file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"shard {path}: sha256"):
        read_shard_file(path, nbytes=n, sha256=digest)
    # Without the checksum the zstd frame or dequantisation may still fail loudly; it never
    # passes silently when the checksum is given, which the reader always does.


def test_newer_shard_version_refused(shard_file):
    path, _, _ = shard_file
    data = path.read_bytes()
    hlen = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16 : 16 + hlen])
    header["format_version"] = FORMAT_VERSION + 1
    h = json.dumps(header).encode()
    path.write_bytes(SHARD_MAGIC + len(h).to_bytes(8, "little") + h + data[16 + hlen :])
    with pytest.raises(CacheError, match=f"{path}.*newer"):
        read_shard_file(path)


def test_not_a_shard(tmp_path):
    p = tmp_path / "x.clts"
    p.write_bytes(b"hello world, not a shard at all")
    with pytest.raises(CacheError, match="bad magic"):
        read_shard_file(p)
    with pytest.raises(CacheError, match="missing"):
        read_shard_file(tmp_path / "nope.clts")


def test_byteplanes_roundtrip():
    from clt_lens.cache.format import from_byteplanes, to_byteplanes

    a = np.arange(-1000, 1000, dtype=np.int32).reshape(40, 50)
    assert np.array_equal(from_byteplanes(to_byteplanes(a), a.dtype, a.shape), a)
