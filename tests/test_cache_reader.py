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
from clt_lens.cache.format import FORMAT_VERSION, read_manifest

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


def test_no_shuffle_is_stream_order(cache, all_rows):
    with CacheReader(cache, batch_size=100, shuffle=False, loop=False) as r:
        x = torch.cat([b[0] for b in read(r)])
    assert torch.equal(x, all_rows[0])


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
def test_state_restore_resumes_exactly(cache, loop, skip):
    kw = dict(batch_size=48, buffer_tokens=250, seed=7, prefetch=3, loop=loop)
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
