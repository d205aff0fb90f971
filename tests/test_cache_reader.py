"""CacheReader: coverage, rank partitions, shuffling, exact resume, expected fields, corruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from clt_lens.activations import HookSpec, collect_activations
from clt_lens.cache import (
    CacheConfig,
    CacheError,
    CacheMismatchError,
    CacheReader,
    generate_cache,
    inspect,
)
from clt_lens.cache.format import FORMAT_VERSION, make_codec, read_manifest

CTX = 12


def tokens(n_seq: int = 120) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    t = torch.randint(1, 64, (n_seq, CTX), generator=g)
    t[:, 0] = 0
    return t


@pytest.fixture(scope="module")
def model():
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=CTX, d_head=4, n_heads=4, d_mlp=32, d_vocab=64,
        act_fn="gelu", normalization_type="LN", seed=3,
    )
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, model) -> Path:
    """fp32 cache of 1100 tokens in 10 shards (the last one shorter)."""
    out = tmp_path_factory.mktemp("cache")
    cfg = CacheConfig(out_dir=str(out), n_tokens=1100, shard_tokens=110, codec="fp32",
                      bos_token_id=0, progress=False)
    generate_cache(cfg, model=model,
                   token_source=lambda c, m, ctx, chunk: iter(tokens().split(7)))
    return out


@pytest.fixture(scope="module")
def all_rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    return collect_activations(model, tokens()[:100], HookSpec(), bos_token_id=0)


def rowset(x: torch.Tensor) -> list[tuple]:
    return sorted(tuple(r) for r in x.reshape(len(x), -1).tolist())


def read(reader: CacheReader, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for b in reader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_one_epoch_covers_cache_once_and_aligned(cache, all_rows):
    x_all, y_all = all_rows
    with CacheReader(cache, batch_size=64, loop=False, buffer_tokens=300, seed=1) as r:
        batches = read(r)
    assert [len(b[0]) for b in batches] == [64] * 17 + [1100 - 17 * 64]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert rowset(x) == rowset(x_all)
    # x and y stay token-aligned: each row pairs up with the same token's output
    key = {tuple(r): i for i, r in enumerate(x_all.reshape(len(x_all), -1).tolist())}
    idx = torch.tensor([key[tuple(r)] for r in x.reshape(len(x), -1).tolist()])
    assert torch.equal(y, y_all[idx])
    assert not torch.equal(x, x_all)  # shuffled


def test_no_shuffle_is_stream_order(cache, all_rows, device):
    with CacheReader(cache, batch_size=100, shuffle=False, loop=False, device=device) as r:
        batches = read(r)
    assert all(b[0].device.type == b[1].device.type == torch.device(device).type
               for b in batches)
    x = torch.cat([b[0] for b in batches]).cpu()
    assert torch.equal(x, all_rows[0])  # fp32 codes: exact on every device


def test_shuffle_depends_on_seed_and_epoch(cache):
    def first(seed, skip=0):
        with CacheReader(cache, batch_size=50, seed=seed, buffer_tokens=200) as r:
            return read(r, skip + 1)[-1][0]

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))
    # batch 22 starts in epoch 1 (1100 tokens per epoch): a different order than epoch 0
    assert not torch.equal(first(0, 22), first(0, 0))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_partitions_disjoint_and_cover(cache, all_rows, world_size):
    for epoch in (0, 1):
        readers = [CacheReader(cache, batch_size=32, rank=r, world_size=world_size, loop=False)
                   for r in range(world_size)]
        shard_sets = [set(r.shards_for_epoch(epoch)) for r in readers]
        assert sum(len(s) for s in shard_sets) == 10 and set().union(*shard_sets) == set(range(10))
        if epoch == 0:
            rows = []
            for r in readers:
                rows.extend(rowset(torch.cat([b[0] for b in read(r)])))
            assert sorted(rows) == rowset(all_rows[0])  # disjoint and complete
        for r in readers:
            r.close()


def test_partition_false_gives_every_rank_the_same_batches(cache):
    out = []
    for rank in range(2):
        with CacheReader(cache, batch_size=40, rank=rank, world_size=2, partition=False) as r:
            out.append(torch.cat([b[0] for b in read(r, 5)]))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("loop,skip", [(True, 3), (True, 40), (False, 10)])
def test_state_restore_resumes_exactly(cache, loop, skip, device):
    kw = dict(batch_size=48, buffer_tokens=250, seed=7, prefetch=3, loop=loop, device=device)
    r = CacheReader(cache, **kw)
    it = iter(r)
    for _ in range(skip):  # the worker has prefetched beyond this point
        next(it)
    state = json.loads(json.dumps(r.state_dict()))
    expected = [b[0] for b in read(r, 30)] if loop else [b[0] for b in it]
    r.close()
    r2 = CacheReader(cache, **kw)
    r2.load_state_dict(state)
    got = [b[0] for b in read(r2, len(expected))]
    r2.close()
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_restore_refuses_other_settings(cache):
    with CacheReader(cache, batch_size=10, seed=1) as r:
        state = r.state_dict()
    with CacheReader(cache, batch_size=10, seed=2) as r2, pytest.raises(CacheError, match="seed"):
        r2.load_state_dict(state)
    with CacheReader(cache, batch_size=20, seed=1) as r3:  # batch size may change
        r3.load_state_dict(state)


def test_loop_false_iterates_epoch_by_epoch(cache):
    with CacheReader(cache, batch_size=500, loop=False) as r:
        assert len(r) == 3
        first = [len(b[0]) for b in r]
        second = [len(b[0]) for b in r]
        assert first == second == [500, 500, 100]
        assert r.state_dict()["epoch"] == 2


def test_expected_fields(cache):
    m = read_manifest(cache)
    CacheReader(cache, batch_size=4, expected={"model_id": m.model_id, "n_layers": 2,
                                               "hooks": HookSpec().to_dict()}).close()
    with pytest.raises(CacheMismatchError, match="d_model is 16 in the cache, expected 128"):
        CacheReader(cache, batch_size=4, expected={"d_model": 128})
    with pytest.raises(CacheMismatchError, match="input_hook is 'ln2.hook_normalized'.*"
                                                 "expected 'hook_resid_mid'"):
        CacheReader(cache, batch_size=4, expected={"input_hook": "hook_resid_mid"})
    with pytest.raises(CacheMismatchError, match="model_id"):
        CacheReader(cache, batch_size=4, expected={"model_id": "gpt2@123"})
    with pytest.raises(CacheError, match="unknown expected field"):
        CacheReader(cache, batch_size=4, expected={"width": 3})


@pytest.fixture
def broken(cache, tmp_path) -> Path:
    dst = tmp_path / "c"
    shutil.copytree(cache, dst)
    return dst


def test_flipped_byte_detected_at_read(broken):
    shard = broken / read_manifest(broken).shards[4].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    r = CacheReader(broken, batch_size=100, shuffle=False)
    with pytest.raises(CacheError, match=f"shard {shard}: sha256"):
        read(r, 20)


def test_truncated_or_missing_shard_detected_up_front(broken):
    m = read_manifest(broken)
    shard = broken / m.shards[2].file
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CacheError, match=f"shard {shard}: .* bytes on disk"):
        CacheReader(broken, batch_size=4)
    shard.unlink()
    with pytest.raises(CacheError, match=f"shard {shard} listed in the manifest is missing"):
        CacheReader(broken, batch_size=4)


def test_manifest_problems(broken):
    path = broken / "manifest.json"
    d = json.loads(path.read_text())
    d["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(d))
    with pytest.raises(CacheError, match=f"{path}: format_version {FORMAT_VERSION + 1} is newer"):
        CacheReader(broken, batch_size=4)
    d["format_version"] = FORMAT_VERSION
    d["shards"][0]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(d))
    with pytest.raises(CacheError, match="not a plain file name"):
        CacheReader(broken, batch_size=4)
    path.write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        CacheReader(broken, batch_size=4)
    path.unlink()
    with pytest.raises(CacheError, match=f"cache manifest {path} is missing"):
        CacheReader(broken, batch_size=4)


def test_too_few_shards_for_ranks(cache):
    with pytest.raises(CacheError, match="fewer than world_size"):
        CacheReader(cache, batch_size=4, rank=0, world_size=11)


def test_inspect_summary(cache):
    text = inspect(cache)
    assert "1,100 in 10 shards" in text and "fp32" in text and "L=2 layers, d=16" in text


# ---- format 1, mixing, threads and decode device, memory, fsspec ------------------------------

DATA = Path(__file__).parent / "data"


def test_format1_cache_reads_as_before(tmp_path):
    """A cache written by the format-1 code (before chunks) decodes to what that code decoded
    and is visited in the same order, so a run resumed across the upgrade continues exactly."""
    from safetensors.torch import load_file

    ref = load_file(DATA / "cache_v1_decoded.safetensors")
    cache = tmp_path / "v1"
    shutil.copytree(DATA / "cache_v1", cache)
    with CacheReader(cache, batch_size=1000, shuffle=False, loop=False) as r:
        x, y = next(iter(r))
    assert torch.allclose(x, ref["x"], rtol=0, atol=1e-5)
    assert torch.allclose(y, ref["y"], rtol=0, atol=1e-5)
    with CacheReader(cache, batch_size=64, seed=3, buffer_tokens=150) as r:
        got = torch.cat([b[0] for b in read(r, 6)])
        assert r.state_dict()["epoch"] == 1 and r.state_dict()["offset"] == 84
    assert torch.allclose(got, ref["shuffled_x"], rtol=0, atol=1e-5)
    assert "format-1" in inspect(cache)


def tagged(n_shards: int, per_shard: int, L: int = 2, d: int = 16, seed: int = 0):
    """Activations whose x[:, 0, 0] is the index of the shard they will be written to."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_shards * per_shard, L, d, generator=g)
    x[:, 0, 0] = torch.arange(n_shards).repeat_interleave(per_shard).float()
    return x, x.flip(-1).contiguous()


def test_batches_mix_many_shards(tmp_path):
    """Shards larger than the shuffle buffer: a window takes chunks of many shards, so each
    batch draws from many shards (not from the one or two that fit in the buffer)."""
    from clt_lens.cache import write_cache

    x, y = tagged(16, 512)
    write_cache(tmp_path / "c", x, y, codec="fp32", shard_tokens=512, chunk_tokens=64)
    with CacheReader(tmp_path / "c", batch_size=128, buffer_tokens=512, seed=2,
                     loop=False) as r:
        assert r.group_shards == 8
        assert all(len(w) == 8 for w in r.window_shards(0))  # 8 chunks of 8 shards each
        per_batch = [len(set(b[0][:, 0, 0].long().tolist())) for b in read(r)]
        assert len(per_batch) == 64 and min(per_batch) >= 7
        assert sum(per_batch) / len(per_batch) > 7.5
        rows = sorted(b for b in x[:, 0, 0].tolist())
    with CacheReader(tmp_path / "c", batch_size=8192, shuffle=False, loop=False) as r:
        assert sorted(next(iter(r))[0][:, 0, 0].tolist()) == rows  # still every token once


def same_batch(got: torch.Tensor, ref: torch.Tensor, exact: bool) -> bool:
    """``got`` equals the CPU-decoded ``ref``: exactly, or (dequantised on a GPU, which may
    fuse the decoder's multiply-adds) to float32 rounding, far below a quantisation step."""
    got = got.cpu()
    if exact:
        return torch.equal(got, ref)
    return bool(((got - ref).abs() <= 1e-5 * ref.abs().amax(0, keepdim=True) + 1e-6).all())


def test_threads_and_decode_device_do_not_change_batches(tmp_path, device):
    """Decoding on several threads, or dequantising on the device (codes in, float32 window
    there), gives the batches of a one-thread CPU decode, on the device asked for: batches
    decoded on the CPU and sent to a GPU, decoded on a GPU and kept there, or decoded on a GPU
    and brought back."""
    from clt_lens.cache import write_cache
    from clt_lens.cache.lm_stats import inject_lm_outliers

    x, y = tagged(6, 700, L=3, d=32)
    x, y = inject_lm_outliers(x, y, n_massive=2)
    write_cache(tmp_path / "c", x, y, shard_tokens=700, chunk_tokens=128)
    kws = [{"decode_threads": 1}, {"decode_threads": 3},
           {"decode_threads": 2, "decode_device": device}]
    if device != "cpu":
        kws += [{"device": device}, {"device": device, "decode_device": "cpu"},
                {"decode_device": device}]
    outs = []
    for kw in kws:
        with CacheReader(tmp_path / "c", batch_size=300, buffer_tokens=1000, seed=4,
                         **kw) as r:
            batches = [b for b in read(r, 20)]
            stats = r.stats()
        out_dev = torch.device(kw.get("device", "cpu")).type
        assert all(b[0].device.type == b[1].device.type == out_dev for b in batches)
        on_gpu = torch.device(kw.get("decode_device", kw.get("device", "cpu"))).type != "cpu"
        outs.append((batches, on_gpu))
        assert stats["tokens_decoded"] >= 6000 and stats["bytes_read"] > 0
        assert (stats["bytes_to_device"] > 0) == on_gpu
    ref = outs[0][0]
    for other, on_gpu in outs[1:]:
        assert len(other) == len(ref)
        assert all(same_batch(a[0], b[0], not on_gpu) and same_batch(a[1], b[1], not on_gpu)
                   for b, a in zip(ref, other))


# The child imports the cache subpackage alone (the package's __init__ loads SAELens, seconds
# of start-up that say nothing about the reader).
RSS_CHILD = """
import json, sys, threading, time, types, torch
pkg = types.ModuleType("clt_lens")
pkg.__path__ = [sys.argv[2]]
sys.modules["clt_lens"] = pkg
from clt_lens.cache import CacheReader
torch.zeros(1) + 1
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key))
try:  # Linux: reset the peak (VmHWM) to the current resident set
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    sampled = None
except OSError:  # else sample the resident set
    sampled = [0]
    def sample():
        while sampled is not None and sampled[0] >= 0:
            sampled[0] = max(sampled[0], status_kb("VmRSS:"))
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
before = status_kb("VmRSS:")
with CacheReader(sys.argv[1], batch_size=512, buffer_tokens=int(sys.argv[3]), loop=False,
                 decode_threads=2) as r:
    n = sum(len(b[0]) for b in r)
peak = status_kb("VmHWM:") if sampled is None else max(sampled[0], status_kb("VmRSS:"))
print(json.dumps({"tokens": n, "before_kb": before, "peak_kb": peak}))
"""


def test_resident_memory_bounded_by_the_buffer(tmp_path):
    """Reading a cache 48x larger than the shuffle buffer, of shards 8x larger: the process's
    peak RSS (measured in a child) grows by a small multiple of the buffer, not with the cache
    or the shards."""
    import subprocess
    import sys

    from clt_lens.cache.format import CacheManifest, encode_shard, write_manifest
    from clt_lens.cache.storage import Store
    from clt_lens.cache.writer import shard_name, write_shard

    n, L, d = 16384, 4, 128  # shards of 64 MiB decoded, 8x the window
    x = torch.randn(n, L, d, generator=torch.Generator().manual_seed(0))
    parts = encode_shard(x, x.flip(-1), make_codec("int8"), chunk_tokens=1024)
    store = Store(tmp_path / "big")
    store.makedirs()
    entries = [write_shard(store, shard_name(k), parts) for k in range(6)]  # 98k tokens
    write_manifest(store, CacheManifest(
        model_id="m", model_name="m", hooks=HookSpec(), n_layers=L, d_model=d, context_size=0,
        dataset="d", split="train", seed=0, codec=make_codec("int8").config(), shards=entries,
        config_hash="rss"))
    decoded_mb = 6 * n * L * d * 4 * 2 / 2**20  # 384 MiB of float32 x and y
    window_mb = 2048 * L * d * 4 * 2 / 2**20  # 8 MiB
    import clt_lens

    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "big"),
                        clt_lens.__path__[0], "2048"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == 6 * n
    # peak resident set while reading minus the resident set before the reader existed: two
    # windows (16 MiB) plus thread and allocator slack (seen: 57-100 MiB); a reader that held
    # a whole shard per window went to ~180 MiB, one that held the cache to ~830 MiB
    growth_mb = (out["peak_kb"] - out["before_kb"]) / 1024
    assert growth_mb < 16 * window_mb, (growth_mb, decoded_mb)


def test_fsspec_memory_and_local_urls(tmp_path, model):
    """A cache generated to and read from fsspec URLs (memory://, file://) is byte-identical
    to a local one, and a corrupted chunk in the object store is caught by its checksum."""
    import fsspec

    from clt_lens.cache import Store, merge_cache

    cfg = dict(n_tokens=330, shard_tokens=110, codec="errbound", chunk_tokens=32,
               bos_token_id=0, progress=False)
    src = lambda c, m, ctx, chunk: iter(tokens(40).split(7))  # noqa: E731
    local = tmp_path / "local"
    generate_cache(CacheConfig(out_dir=str(local), **cfg), model=model, token_source=src)
    ref = read_manifest(local)
    for url in ("memory://clt-test/cache", f"file://{tmp_path}/viafsspec"):
        m = generate_cache(CacheConfig(out_dir=url, **cfg), model=model, token_source=src)
        assert [s.sha256 for s in m.shards] == [s.sha256 for s in ref.shards]
        assert merge_cache(url, verify=True).n_tokens == ref.n_tokens
        assert "330 in 3 shards" in inspect(url)
        with CacheReader(url, batch_size=100, seed=1) as r, \
                CacheReader(local, batch_size=100, seed=1) as r_local:
            for (a, b), (c, d) in zip(read(r, 5), read(r_local, 5)):
                assert torch.equal(a, c) and torch.equal(b, d)
    fs = fsspec.filesystem("memory")
    path = "/clt-test/cache/" + ref.shards[1].file
    data = bytearray(fs.cat_file(path))
    data[-10] ^= 0x01  # inside the last chunk
    fs.pipe_file(path, bytes(data))
    with pytest.raises(CacheError, match="shard memory://clt-test/cache/shard-00001.clts: sha256 "
                                         "of chunk"):
        with CacheReader("memory://clt-test/cache", batch_size=400, shuffle=False) as r:
            read(r, 1)
    fs.rm("/clt-test", recursive=True)
    assert Store("memory://clt-test/none").sizes() == {}
