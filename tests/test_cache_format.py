"""Codecs (round trips within their error bounds) and shard framing (corruption is detected)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clt_lens.cache.format import (
    CODECS,
    FORMAT_VERSION,
    SHARD_MAGIC,
    CacheError,
    ShardView,
    encode_shard,
    make_codec,
    parse_header,
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


def roundtrip(codec_name: str, t: torch.Tensor, y: torch.Tensor | None = None,
              chunk_tokens: int | None = None, device: str = "cpu", **params):
    """Encode (x=t, y=-t unless given) where the activations are on ``device``, as generation
    does, and decode on ``device``, as a reader with ``decode_device`` does;
    -> (bytes, view, x, y) with x, y back on the CPU."""
    codec = make_codec(codec_name, **params)
    y = -t if y is None else y
    data = b"".join(encode_shard(t.to(device), y.to(device), codec, {"shard": 0},
                                 chunk_tokens=chunk_tokens))
    view = parse_shard(data, "mem")
    x, y = view.decode(*(torch.empty(view.shape, device=device) for _ in range(2)))
    assert x.device.type == y.device.type == torch.device(device).type
    return data, view, x.cpu(), y.cpu()


def fvu(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Independent reference: sum of squared errors / sum of squared deviations from the mean."""
    ref = ref.double()
    return float(((approx.double() - ref) ** 2).sum() / ((ref - ref.mean(0)) ** 2).sum())


@pytest.mark.parametrize("zstd_level", [0, 3])
def test_fp32_is_exact(zstd_level, device):
    t = activations()
    data, view, x, y = roundtrip("fp32", t, zstd_level=zstd_level, device=device)
    assert torch.equal(x, t) and torch.equal(y, -t)
    assert view.header["codec"] == {"name": "fp32", "zstd_level": zstd_level}
    if zstd_level == 0:
        assert len(data) > t.numel() * 8  # raw payload plus header


@pytest.mark.parametrize("name,rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_relative_error(name, rel, device):
    t = activations()
    _, _, x, y = roundtrip(name, t, device=device)
    assert torch.all((x - t).abs() <= rel * t.abs() + 1e-7)
    assert torch.equal(y, -x)


def test_fp16_refuses_out_of_range(device):
    t = activations()
    t[0, 0, 0] = 1e6
    with pytest.raises(CacheError, match="fp16.*65504"):
        roundtrip("fp16", t, device=device)


def test_int8_error_within_half_step_per_layer_channel(device):
    t = activations()
    _, view, x, _ = roundtrip("int8", t, device=device)
    step = t.abs().amax(0) / 127  # [L, d]: absmax over the shard per (layer, channel)
    err = (x - t).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    assert view.array("x/scales").shape == (3, 48)


def channel_fvu(ref: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Independent reference, per channel of a [N, d] block (0 for exact constant channels)."""
    ref = ref.double()
    err = ((approx.double() - ref) ** 2).sum(0)
    dev = ((ref - ref.mean(0)) ** 2).sum(0)
    zero_var = torch.where(err > 0, math.inf, 0.0).double()
    return torch.where(dev > 0, err / dev.clamp_min(1e-300), zero_var)


@pytest.mark.parametrize("allocation,predict", [("layer", False), ("layer", True),
                                                ("channel", False), ("channel", True)])
@pytest.mark.parametrize("target", [1e-2, 1e-3, 1e-4])
def test_errbound_meets_target_fvu(allocation, predict, target, device):
    t = activations(n=2000)
    t2 = activations(n=2000, seed=1)
    _, view, x, y = roundtrip("errbound", t, t2, target_fvu=target, allocation=allocation,
                              predict=predict, chunk_tokens=512, device=device)
    meta = view.header["tensors"]["x"]
    for layer in range(3):
        got = fvu(t[:, layer], x[:, layer])
        chan = channel_fvu(t[:, layer], x[:, layer])
        assert got <= target and fvu(t2[:, layer], y[:, layer]) <= target
        assert got == pytest.approx(meta["fvu"][layer], rel=1e-4)
        assert float(chan.max()) == pytest.approx(meta["chan_fvu_max"][layer], rel=1e-4)
        assert int(chan.argmax()) == meta["chan_fvu_argmax"][layer]
        if allocation == "channel":
            assert float(chan.max()) <= target
            assert float(chan[chan > 0].median()) > target / 4  # each channel uses its budget
        else:
            assert got > target / 4  # the budget is used, not wasted on precision
    if target == 1e-3:  # the 400.0 outlier is beyond int8 codes: stored as an escape
        assert meta["escapes"][2] >= 1 and meta["bits"][2] == 8
    assert torch.all(x[:, 1, 5] == 2.5)  # constant channel exact


def test_tight_target_uses_wide_codes(device):
    t = activations(n=1000)
    _, view, x, _ = roundtrip("errbound", t, target_fvu=1e-7, predict=False, device=device)
    assert 16 in view.header["tensors"]["x"]["bits"]  # too many escapes: zigzag 16-bit codes
    for layer in range(3):
        assert float(channel_fvu(t[:, layer], x[:, layer]).max()) <= 1e-7


@pytest.fixture(scope="module")
def lm_like(embedded_model):
    """Real embedded-model activations with massive channels, heavy tails (no BOS rows)."""
    from clt_lens.cache.lm_stats import lm_like_activations

    x, y, _ = lm_like_activations(2048, model=embedded_model)
    return x, y


def test_channel_bound_holds_next_to_massive_channels(lm_like, device):
    """The default bounds every channel: with channels 30-300x the others, the layer bound
    leaves the ordinary channels quantised to noise; the channel bound does not, at >= 3x
    smaller than fp16."""
    from clt_lens.cache.lm_stats import massive_channels

    x, y = lm_like
    n, n_layers, d = x.shape
    big = massive_channels(d)
    assert float(x[:, 0, big].std(0).min()) > 20 * float(x[:, 0].std(0).median())
    data, view, xd, yd = roundtrip("errbound", x, y, device=device)  # the default codec
    assert view.header["codec"]["allocation"] == "channel"
    for layer in range(n_layers):
        for ref, got in ((x, xd), (y, yd)):
            assert float(channel_fvu(ref[:, layer], got[:, layer]).max()) <= 1e-3
    assert x.numel() * 2 * 2 / len(data) >= 3.0  # vs fp16
    _, _, xl, _ = roundtrip("errbound", x, y, allocation="layer", device=device)
    ordinary = [c for c in range(d) if c not in big]
    worst = max(float(channel_fvu(x[:, layer], xl[:, layer])[ordinary].median())
                for layer in range(n_layers))
    assert worst > 1e-2  # what the issue saw: the layer bound holds, ordinary channels do not
    assert max(view.header["tensors"]["x"]["fvu"]) <= 1e-3


def assert_same_decode(got: torch.Tensor, ref: torch.Tensor, device: str) -> None:
    """``got`` lies on ``device`` and equals the CPU decode ``ref``: exactly on the CPU, to
    float32 rounding elsewhere (a GPU may fuse the decoder's multiply-adds), far below a
    quantisation step."""
    assert got.device.type == torch.device(device).type
    got = got.cpu()
    if torch.device(device).type == "cpu":
        assert torch.equal(got, ref)
    else:
        tol = 1e-5 * ref.abs().amax(0, keepdim=True) + 1e-6  # per (layer, channel)
        assert bool(((got - ref).abs() <= tol).all()), float((got - ref).abs().max())


@pytest.mark.parametrize("codec", ["errbound", "int8", "bf16"])
def test_chunk_decodes_alone_and_is_checked(codec, device):
    """A chunk decodes alone, on the CPU or (codes and parameters moved there) on a GPU, to
    what the CPU decodes from the whole shard."""
    t = activations(n=1000)
    data = b"".join(encode_shard(t, -t, make_codec(codec), chunk_tokens=128))
    whole = parse_shard(data, "mem")
    x, y = whole.decode()
    assert whole.n_chunks == 8 and whole.chunk_info(7)["n_tokens"] == 1000 - 7 * 128
    header, hn = parse_header(data[:4096 * 4], "mem")  # a header-only view, as a reader has
    view = ShardView(header, None, "mem", hn)
    info = view.chunk_info(3)
    region = bytearray(data[hn + info["offset"] : hn + info["offset"] + info["nbytes"]])
    p = view.params_info()
    dec = view.decoder(device, data[hn + p["offset"] : hn + p["offset"] + p["nbytes"]])
    ox, oy = (torch.empty(128, 3, 48, device=device) for _ in range(2))
    view.decode_chunk_into(dec, view.chunk(3, region), ox, oy)
    assert_same_decode(ox, x[384:512], device)
    assert_same_decode(oy, y[384:512], device)
    region[len(region) // 2] ^= 0x01
    with pytest.raises(CacheError, match="sha256 of chunk 3"):
        view.chunk(3, region)


def test_errbound_beats_int8_size_on_gaussian_data():
    t = torch.randn(4000, 2, 64, generator=torch.Generator().manual_seed(3))
    e, *_ = roundtrip("errbound", t, target_fvu=1e-3)
    i, *_ = roundtrip("int8", t)
    assert len(e) < len(i)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encoding_is_deterministic(name, device):
    t = activations(n=500).to(device)
    a = b"".join(encode_shard(t, t, make_codec(name)))
    b = b"".join(encode_shard(t.clone(), t.clone(), make_codec(name)))
    assert a == b


def test_empty_shard_roundtrip(device):
    t = torch.zeros(0, 2, 8)
    for name in CODECS:
        _, view, x, _ = roundtrip(name, t, device=device)
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
