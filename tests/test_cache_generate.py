"""Cache generation: content, split jobs + merge, resume after SIGKILL / full disk, the command."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from clt_lens.activations import HookSpec, collect_activations
from clt_lens.cache import (
    CacheConfig,
    CacheError,
    CacheReader,
    Store,
    generate_cache,
    merge_cache,
)
from clt_lens.cache import writer as cache_writer
from clt_lens.cache.format import read_manifest, read_shard_file
from clt_lens.config import build_config

BOS = 0
CTX = 16


def tiny_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=CTX, d_head=8, n_heads=4, d_mlp=64, d_vocab=64,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    return HookedTransformer(cfg).eval()


def all_tokens(seed: int = 0, n_seq: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 64, (n_seq, CTX), generator=g)
    t[:, 0] = BOS
    return t


def make_source(delay: float = 0.0, n_seq: int = 400):
    """Deterministic token stream, chunked by 5 (independent of the shard size on purpose)."""

    def source(cfg, model, ctx, chunk):
        for piece in all_tokens(cfg.seed, n_seq).split(5):
            if delay:
                time.sleep(delay)
            yield piece

    return source


def config(out_dir: Path, **kw) -> CacheConfig:
    base = dict(out_dir=str(out_dir), n_tokens=1500, shard_tokens=200, batch_size=8,
                bos_token_id=BOS, progress=False)
    base.update(kw)
    return build_config(CacheConfig, base)  # flat source keys (model=...) are the old spelling


def checksums(out_dir: Path) -> list[tuple[str, str, int]]:
    return [(s.file, s.sha256, s.n_tokens) for s in read_manifest(out_dir).shards]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("ref")
    generate_cache(config(out), model=model, token_source=make_source())
    return out


def test_content_equals_direct_collection(tmp_path, model):
    generate_cache(config(tmp_path, codec="fp32"), model=model, token_source=make_source())
    m = read_manifest(tmp_path)
    # 1500 tokens at 15 per sequence = 100 sequences; 14 sequences (>= 200 tokens) per shard.
    assert len(m.shards) == 8 and m.n_tokens == 1500
    assert [s.seq_start for s in m.shards] == list(range(0, 100, 14))[:8]
    xs, ys = zip(*(read_shard_file(tmp_path / s.file, sha256=s.sha256).decode()
                   for s in m.shards))
    x_ref, y_ref = collect_activations(model, all_tokens()[:100], HookSpec(), bos_token_id=BOS)
    assert torch.equal(torch.cat(xs), x_ref) and torch.equal(torch.cat(ys), y_ref)
    assert m.hooks == HookSpec() and (m.n_layers, m.d_model, m.context_size) == (2, 32, CTX)
    assert m.codec == {"name": "fp32", "zstd_level": 3}
    assert not list(tmp_path.rglob("*.tmp"))


def test_default_codec_error_bound(reference):
    m = read_manifest(reference)
    assert m.codec["name"] == "errbound" and m.codec["allocation"] == "channel"
    assert max(m.max_fvu("x") + m.max_fvu("y")) <= 1e-3
    chan = m.max_channel_fvu("x") + m.max_channel_fvu("y")
    assert max(v for v, _ in chan) <= 1e-3 and m.worst_channel()["fvu"] == max(v for v, _ in chan)
    stated = json.loads((reference / "manifest.json").read_text())
    assert stated["error_bound"]["quantity"] == "channel_fvu"
    assert stated["error_bound"]["max"] == 1e-3
    assert stated["worst_channel"]["fvu"] <= 1e-3
    # the bound holds on what a reader gets: every channel of every layer, measured here
    x_ref, y_ref = collect_activations(tiny_model(), all_tokens()[:100], HookSpec(),
                                       bos_token_id=BOS)
    with CacheReader(reference, batch_size=1500, shuffle=False, loop=False) as r:
        x, y = next(iter(r))
    for got, ref in ((x, x_ref), (y, y_ref)):
        err = (got - ref).double().pow(2).sum(0)
        dev = (ref - ref.mean(0)).double().pow(2).sum(0)
        assert float((err / dev).max()) <= 1e-3


def test_split_jobs_then_merge_equal_single_job(tmp_path, model, reference):
    for i in (2, 0):
        assert generate_cache(config(tmp_path), job_index=i, num_jobs=3, model=model,
                              token_source=make_source()) is None
    with pytest.raises(CacheError, match="not finished.*shard-00001"):
        merge_cache(tmp_path)
    with pytest.raises(CacheError, match="manifest.*missing.*--merge"):
        CacheReader(tmp_path, batch_size=4)
    manifest = generate_cache(config(tmp_path), job_index=1, num_jobs=3, model=model,
                              token_source=make_source())
    assert manifest is not None  # the last job to finish merges
    assert checksums(tmp_path) == checksums(reference)
    merge_cache(tmp_path, verify=True)  # the explicit merge agrees
    assert checksums(tmp_path) == checksums(reference)


def test_resume_after_full_disk(tmp_path, model, reference, monkeypatch):
    real = cache_writer.write_shard
    calls = {"n": 0}

    def flaky(store, name, parts, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # dies half way through writing the third shard
            with open(store.path(name) + ".123.tmp", "wb") as f:
                f.write(b"".join(parts)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(store, name, parts, **kw)

    monkeypatch.setattr(cache_writer, "write_shard", flaky)
    with pytest.raises(OSError, match="shard-00002.clts.*disk full.*resume") as e:
        generate_cache(config(tmp_path), model=model, token_source=make_source())
    assert e.value.errno == errno.ENOSPC
    # Consistent: the two finished shards are recorded and verify; no manifest claims more.
    record = json.loads((tmp_path / "jobs" / "job-0-of-1.json").read_text())
    assert sorted(record["shards"]) == ["0", "1"]
    store = Store(tmp_path)
    assert all(cache_writer.verified_entry(store, e) for e in record["shards"].values())
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(CacheError, match="6 of 8 shards not finished"):
        merge_cache(tmp_path)

    monkeypatch.setattr(cache_writer, "write_shard", real)
    written = []
    monkeypatch.setattr(cache_writer, "write_shard",
                        lambda st, name, parts, **kw: (written.append(name),
                                                       real(st, name, parts, **kw))[1])
    generate_cache(config(tmp_path), model=model, token_source=make_source())
    assert written[0] == "shard-00002.clts" and len(written) == 6  # only the rest was redone
    assert not list(tmp_path.glob("*.tmp"))
    assert checksums(tmp_path) == checksums(reference)


def test_resume_with_other_config_refused(tmp_path, model):
    generate_cache(config(tmp_path, n_tokens=300), model=model, token_source=make_source())
    with pytest.raises(CacheError, match="different config.*codec: 'errbound' -> 'int8'"):
        generate_cache(config(tmp_path, n_tokens=300, codec="int8"), model=model,
                       token_source=make_source())
    # batch_size and device do not change the bytes: allowed
    generate_cache(config(tmp_path, n_tokens=300, batch_size=3), model=model,
                   token_source=make_source())


def test_short_dataset_gives_smaller_cache(tmp_path, model, capsys):
    m = generate_cache(config(tmp_path), model=model, token_source=make_source(n_seq=50))
    assert m.n_tokens == 50 * 15 and len(m.shards) == 4
    assert "ran out" in capsys.readouterr().err


def test_bad_inputs_named(tmp_path, model):
    from clt_lens.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="out_dir"):
        load_config(CacheConfig, None, {})
    with pytest.raises(ConfigError, match="codec"):
        load_config(CacheConfig, None, ["--out_dir", str(tmp_path), "--codec", "int4"])
    with pytest.raises(ValueError, match="hook_mlp_output"):
        generate_cache(config(tmp_path, output_hook="hook_mlp_output"), model=model,
                       token_source=make_source())
    with pytest.raises(ConfigError, match="job_index"):
        generate_cache(config(tmp_path), job_index=3, num_jobs=2, model=model)
    with pytest.raises(CacheError, match="not a cache being generated"):
        merge_cache(tmp_path / "nothing")


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_cache_generate import config, make_source, tiny_model
from clt_lens.cache import generate_cache
generate_cache(config({out!r}), model=tiny_model(), token_source=make_source(delay={delay}))
"""


def _child(out: Path, delay: float) -> subprocess.Popen:
    code = CHILD.format(tests=str(Path(__file__).parent), out=str(out), delay=delay)
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_checksums(tmp_path, reference):
    record = tmp_path / "jobs" / "job-0-of-1.json"
    proc = _child(tmp_path, delay=0.15)
    deadline = time.time() + 120
    while time.time() < deadline:
        if record.exists() and json.loads(record.read_text())["shards"]:
            break
        if proc.poll() is not None:
            pytest.fail(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(record.read_text())["shards"]
    assert 1 <= len(done) < 8 and not (tmp_path / "manifest.json").exists()
    # Leftovers a crash can leave: a half-written temp file, and a shard renamed into place but
    # not yet recorded (here: garbage). Both must be redone.
    (tmp_path / "shard-00006.clts.tmp").write_bytes(b"partial")
    (tmp_path / "shard-00007.clts").write_bytes(b"garbage")
    proc = _child(tmp_path, delay=0.0)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert checksums(tmp_path) == checksums(reference)
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_inspect_and_merge(reference, capsys):
    from clt_lens.cache.cli import main

    assert main(["--inspect", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "L=2 layers, d=32" in out and "1,500 in 8 shards" in out and "errbound" in out
    worst = read_manifest(reference).worst_channel()
    assert "channel_fvu <= 0.001" in out
    assert (f"worst       channel {worst['channel']} of {worst['tensor']} layer "
            f"{worst['layer']}: FVU {worst['fvu']:.3e}") in out
    assert main(["--merge", str(reference), "--verify"]) == 0
    assert "merged 8 shards" in capsys.readouterr().out
    from clt_lens.cli import main as clt_lens_main  # the `clt-lens cache` wiring

    assert clt_lens_main(["cache", "--inspect", str(reference)]) == 0
    assert "1,500 in 8 shards" in capsys.readouterr().out
    assert clt_lens_main(["cache", "--inspect", str(reference / "nope")]) == 2
    assert "manifest" in capsys.readouterr().err


def test_embedded_model_end_to_end(tmp_path):
    """Integration with clt_lens.models / clt_lens.data on the embedded model."""
    from clt_lens import data, models
    from clt_lens.cache.cli import main

    out = tmp_path / "cache"
    assert main(["--out_dir", str(out), "--n_tokens", "2000", "--shard_tokens", "1000",
                 "--context_size", "64", "--progress", "false"]) == 0
    m = read_manifest(out)
    model = models.load_model("embedded")
    assert m.model_id == models.model_id(model)
    assert m.n_tokens == 2016 and m.n_layers == model.cfg.n_layers
    toks = next(data.iter_token_batches("embedded", tokenizer=model.tokenizer, context_size=64,
                                        batch_size=32))
    assert bool((toks[:, 0] == model.tokenizer.bos_token_id).all())
    x_ref, y_ref = collect_activations(model, toks)  # BOS id taken from the tokenizer
    assert x_ref.shape[0] == 2016
    with CacheReader(out, batch_size=2016, shuffle=False, loop=False,
                     expected={"model_id": m.model_id, "n_layers": 4}) as r:
        x, y = next(iter(r))
    for got, ref in ((x, x_ref), (y, y_ref)):
        for layer in range(4):
            err = (got[:, layer] - ref[:, layer]).pow(2).sum()
            assert err / (ref[:, layer] - ref[:, layer].mean(0)).pow(2).sum() <= 1e-3
