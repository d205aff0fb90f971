"""The model -> cache job: run a HookedTransformer over a token stream and write shards.

The plan is fixed by the config: the dataset's deterministic packed token stream is cut into
``n_shards`` shards of ``seqs_per_shard`` consecutive sequences (shard k = sequences
``[k * seqs_per_shard, (k + 1) * seqs_per_shard)``), so shard contents do not depend on how many
jobs write them or how often a job was restarted. Job i of n writes the shards k with
``k % n == i`` and records each one as it finishes (see ``writer``); re-running a job skips the
shards its records list whose checksums still match, and redoes the rest. When a job finishes it
tries the merge, which writes ``manifest.json`` once every shard exists.

``n_tokens`` counts activation tokens: each sequence gives ``context_size - 1`` of them, since
the BOS position is dropped (``context_size`` with ``exclude_bos: false``). If the dataset ends
early the cache holds what the stream had (a warning says so).

Why BOS is dropped by default: the BOS position's activations are the same in every sequence
(position 0 sees only itself), so they carry nothing about the text, and in real language
models they have outsized norms (attention sinks, massive activations). Kept, they would
dominate the MSE a CLT is trained on and the variances its normalisation and the codec's
error bound are computed from. ``exclude_bos: false`` keeps them (e.g. to study the sink).

``out_dir`` may be a local directory or an fsspec URL (``s3://bucket/cache``, ``gs://...``);
see ``storage``.
"""

from __future__ import annotations

import errno
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from clt_lens.activations import HookSpec, collect_activations, validate_hooks
from clt_lens.cache import writer
from clt_lens.cache.codecs import CODECS, DEFAULT_CODEC, make_codec
from clt_lens.cache.errors import CacheError
from clt_lens.cache.manifest import CacheManifest, ShardEntry, config_hash
from clt_lens.cache.shard import auto_chunk_tokens, encode_shard
from clt_lens.cache.storage import Store
from clt_lens.config import ConfigError, config_to_dict
from clt_lens.data import iter_token_batches
from clt_lens.models import AUTO_HOOK, load_model, model_family, model_id, resolve_hooks
from clt_lens.source_config import SOURCE_RENAMES, SourceConfig, flatten

# Keys that do not change shard contents: jobs may differ in them.
_RUNTIME_KEYS = ("out_dir", "device", "batch_size", "progress")


@dataclass
class CacheConfig:
    # where activations come from: model, dataset, split, context_size and hooks ("auto": the
    # model family's default, resolved before anything is written, so cache_config.json and
    # the manifest hold the real names)
    source: SourceConfig = field(default_factory=SourceConfig)
    n_tokens: int = 1_000_000  # activation tokens wanted in the cache
    shard_tokens: int = 16_384  # tokens per shard (rounded up to whole sequences)
    # tokens per independently readable chunk; default: ~1 MiB per layer slice (128..4096)
    chunk_tokens: int | None = None
    batch_size: int = 32  # sequences per forward pass
    # errbound: per-channel error-bounded quantisation (target_fvu); int8/fp16/bf16/fp32 plain
    codec: Literal["fp32", "fp16", "bf16", "int8", "errbound"] = DEFAULT_CODEC
    zstd_level: int = 3  # 0 = no zstd
    target_fvu: float = 1e-3  # errbound: quantisation FVU bound of every channel (or layer)
    allocation: Literal["channel", "layer"] = "channel"  # errbound: what the bound covers
    exclude_bos: bool = True  # drop BOS positions (see the module docstring for why)
    bos_token_id: int | None = None  # default: the tokenizer's BOS (else EOS) id
    pad_token_id: int | None = None  # positions holding it are dropped; default: none
    out_dir: str = ""  # the cache directory (local path or fsspec URL such as s3://b/c)
    seed: int = 0  # seeds the dataset's shuffle
    device: str = "cpu"  # where the model runs
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # model weights dtype
    progress: bool = True  # tqdm progress bar

    renamed_keys: ClassVar[dict[str, str]] = SOURCE_RENAMES

    def validate(self) -> None:
        if not self.out_dir:
            raise ConfigError("config key 'out_dir' is required (the cache directory to write)")
        self.source.validate()
        for key in ("n_tokens", "shard_tokens", "chunk_tokens", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"config key '{key}' must be positive, got {getattr(self, key)}")
        if self.codec not in CODECS:
            raise ConfigError(f"config key 'codec': {self.codec!r} is not one of {sorted(CODECS)}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(
                f"config key 'dtype': {self.dtype!r} is not one of float32, float16, bfloat16"
            )
        try:
            self.make_codec()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def make_codec(self) -> Any:
        params: dict[str, Any] = {"zstd_level": self.zstd_level}
        if self.codec == "errbound":
            params["target_fvu"] = self.target_fvu
            params["allocation"] = self.allocation
        return make_codec(self.codec, **params)

    @property
    def hooks(self) -> HookSpec:
        return self.source.hooks

    def flat_dict(self) -> dict[str, Any]:
        """The config as cache_config.json stores it: the source fields at the top level, as
        written before they became a section (so older caches' checks and hashes agree)."""
        return flatten(config_to_dict(self))

    def content_dict(self) -> dict[str, Any]:
        """The keys that determine the cache's bytes."""
        d = self.flat_dict()
        for k in _RUNTIME_KEYS:
            d.pop(k)
        return d


TokenSource = Callable[[CacheConfig, Any, int, int], Iterable[Tensor]]
"""(cfg, model, context_size, chunk_sequences) -> LongTensor [n, context_size] batches, in the
deterministic order of the packed stream (any chunking; the generator re-cuts into shards)."""


def default_token_source(cfg: CacheConfig, model: Any, context_size: int, chunk: int
                         ) -> Iterable[Tensor]:
    return iter_token_batches(
        cfg.source.dataset, tokenizer=model.tokenizer, context_size=context_size,
        batch_size=chunk, split=cfg.source.split, seed=cfg.seed,
    )


def _load_model(cfg: CacheConfig) -> Any:
    dtype = getattr(torch, cfg.dtype)
    return load_model(cfg.source.model, device=cfg.device, dtype=dtype)


def _model_id(model: Any, name: str) -> str:
    del name  # model_id names the model itself
    return model_id(model)


def _shards_of_stream(tokens: Iterable[Tensor], plan: dict[str, Any]
                      ) -> Iterator[tuple[int, Tensor, bool]]:
    """Re-cut a stream of token batches into (shard index, sequences, complete) pieces."""
    spp, n_seqs, ctx = plan["seqs_per_shard"], plan["n_sequences"], plan["context_size"]
    pending: list[Tensor] = []
    have = 0
    k = 0
    for batch in tokens:
        if batch.ndim != 2 or batch.shape[1] != ctx:
            raise CacheError(
                f"token source yielded shape {tuple(batch.shape)}; expected [n, {ctx}]"
            )
        pending.append(batch)
        have += batch.shape[0]
        while k < plan["n_shards"]:
            size = min(spp, n_seqs - k * spp)
            if have < size:
                break
            allt = torch.cat(pending)
            yield k, allt[:size], True
            pending, have, k = [allt[size:]], have - size, k + 1
        if k >= plan["n_shards"]:
            return
    if have and k < plan["n_shards"]:
        yield k, torch.cat(pending), False


def plan_for(cfg: CacheConfig, model: Any) -> dict[str, Any]:
    ctx = cfg.source.context_size or int(model.cfg.n_ctx)
    if ctx > model.cfg.n_ctx:
        raise ConfigError(
            f"config key 'context_size': {ctx} exceeds the model's context ({model.cfg.n_ctx})"
        )
    per_seq = ctx - 1 if cfg.exclude_bos else ctx
    n_seqs = math.ceil(cfg.n_tokens / per_seq)
    seqs_per_shard = min(n_seqs, max(1, math.ceil(cfg.shard_tokens / per_seq)))
    return {
        "context_size": ctx,
        "n_layers": int(model.cfg.n_layers),
        "d_model": int(model.cfg.d_model),
        "n_sequences": n_seqs,
        "seqs_per_shard": seqs_per_shard,
        "n_shards": math.ceil(n_seqs / seqs_per_shard),
        "codec": cfg.make_codec().config(),
        "chunk_tokens": cfg.chunk_tokens or auto_chunk_tokens(int(model.cfg.n_layers),
                                                              int(model.cfg.d_model)),
    }


def _check_saved_config(store: Store, content: dict[str, Any], chash: str | None = None
                        ) -> None:
    """Refuse to mix configs in one directory (content keys; with ``chash`` also the plan)."""
    if not store.exists(writer.CONFIG_NAME):
        return
    saved = writer.read_json(store, writer.CONFIG_NAME, "cache config")
    old = saved.get("config", {})
    diffs = [f"{k}: {old.get(k)!r} -> {content.get(k)!r}" for k in sorted(set(old) | set(content))
             if k not in _RUNTIME_KEYS and old.get(k) != content.get(k)]
    if diffs:
        raise CacheError(
            f"{store} holds a cache generated with a different config ({'; '.join(diffs)}); "
            "use another out_dir or delete this one"
        )
    if chash is not None and saved.get("config_hash") != chash:
        raise CacheError(
            f"{store} was generated with the same config but a different plan "
            f"({saved.get('plan')} vs now); did the model {content['model']!r} change?"
        )


def generate_cache(
    cfg: CacheConfig,
    *,
    job_index: int = 0,
    num_jobs: int = 1,
    model: Any = None,
    token_source: TokenSource | None = None,
) -> CacheManifest | None:
    """Write this job's shards of the cache ``cfg`` describes; return the manifest if complete.

    ``model`` (a HookedTransformer) and ``token_source`` replace ``clt_lens.models.load_model``
    and ``clt_lens.data.iter_token_batches`` (tests, custom pipelines). The manifest is written
    (and returned) when this job finishes and every shard of the plan exists; otherwise None.
    """
    if not (isinstance(num_jobs, int) and num_jobs >= 1 and 0 <= job_index < num_jobs):
        raise ConfigError(f"need 0 <= job_index < num_jobs, got job {job_index} of {num_jobs}")
    cfg.validate()
    cfg, model = _resolve_auto_hooks(cfg, model)
    try:
        out = Store(cfg.out_dir)
    except ValueError as e:
        raise ConfigError(f"config key 'out_dir': {e}") from None
    content = cfg.content_dict()
    _check_saved_config(out, content)  # before loading the model
    if model is None:
        model = _load_model(cfg)
    validate_hooks(model, cfg.hooks)
    plan = plan_for(cfg, model)
    chash = config_hash({"config": content, "plan": plan})
    out.makedirs()
    _check_saved_config(out, content, chash)
    mid = _model_id(model, cfg.source.model)
    if not out.exists(writer.CONFIG_NAME):
        out.write_json(writer.CONFIG_NAME,
                       {"config": cfg.flat_dict(), "config_hash": chash, "plan": plan})

    owned = [k for k in range(plan["n_shards"]) if k % num_jobs == job_index]
    record = writer.JobRecord(out, job_index, num_jobs, config_hash=chash, model_id=mid)
    done = _resume(out, record, owned, chash)
    record.data["done"] = False
    record.save()
    todo = {k for k in owned if k not in done}

    codec = cfg.make_codec()
    spp, ctx = plan["seqs_per_shard"], plan["context_size"]
    per_seq = ctx - 1 if cfg.exclude_bos else ctx
    bar = _progress(cfg, len(todo) * spp * per_seq, job_index, num_jobs)
    written = raw = 0
    stream_shards = None
    try:
        if todo:
            source = (token_source or default_token_source)(cfg, model, ctx, spp)
            last = max(todo)
            seen = -1
            for k, toks, complete in _shards_of_stream(source, plan):
                seen = k
                if not complete:  # the stream ended inside this shard
                    stream_shards = k + 1
                if k in todo:
                    entry = _write_one(out, k, toks, model, cfg, codec, mid, spp,
                                       plan["chunk_tokens"])
                    record.add(k, entry)
                    written += entry.nbytes
                    raw += entry.n_tokens * plan["n_layers"] * plan["d_model"] * 4 * 2
                    bar.update(entry.n_tokens)
                    bar.set_postfix(MB=f"{written / 2**20:.1f}", ratio=f"{raw / written:.2f}x")
                if k >= last:
                    break
            if seen < 0:
                raise CacheError(f"dataset {cfg.source.dataset!r} (split {cfg.source.split!r}) "
                                 "yielded no "
                                 "token sequences")
            if seen < last and stream_shards is None:
                stream_shards = seen + 1
    finally:
        bar.close()
    if stream_shards is not None:
        record.data["stream_shards"] = stream_shards
        print(f"warning: dataset {cfg.source.dataset!r} ran out after {stream_shards} of "
              f"{plan['n_shards']} planned shards; the cache will be smaller than n_tokens",
              file=sys.stderr)
    record.data["done"] = True
    record.save()
    try:
        return writer.merge_cache(out)
    except CacheError as e:
        if num_jobs == 1:
            raise
        print(f"job {job_index} of {num_jobs} finished; not merged yet: {e}", file=sys.stderr)
        return None


def _resolve_auto_hooks(cfg: CacheConfig, model: Any) -> tuple[CacheConfig, Any]:
    """Replace "auto" hooks by the family defaults: from the model name when it tells the family
    (no loading), else from the loaded model."""
    src = cfg.source
    if AUTO_HOOK not in (src.input_hook, src.output_hook):
        return cfg, model
    if model is None and model_family(src.model) == "unknown":
        model = _load_model(cfg)
    hooks = resolve_hooks(model if model is not None else src.model,
                          src.input_hook, src.output_hook)
    src = replace(src, input_hook=hooks.input_hook, output_hook=hooks.output_hook)
    return replace(cfg, source=src), model


def _resume(store: Store, record: writer.JobRecord, owned: list[int], chash: str) -> set[int]:
    """Adopt finished shards (from any job's record for this config) whose checksum matches."""
    sizes = store.sizes()
    mine = {writer.shard_name(k) for k in owned}
    for name in sizes:  # a temp file is a shard whose write was interrupted: redo it
        if name.endswith(".tmp") and name.split(".clts", 1)[0] + ".clts" in mine:
            store.remove(name)
    done: set[int] = set()
    known: dict[str, list[dict[str, Any]]] = {}
    for r in writer.load_records(store):
        if r.get("config_hash") != chash:
            continue
        if r.get("job_index") == record.data["job_index"] and \
                r.get("num_jobs") == record.data["num_jobs"]:
            record.data["stream_shards"] = r.get("stream_shards")
        for key, entry in r["shards"].items():
            known.setdefault(key, []).append(entry)
    for k in owned:
        for entry in known.get(str(k), []):
            if writer.verified_entry(store, entry, sizes):
                record.shards[str(k)] = entry
                done.add(k)
                break
    return done


def _write_one(store: Store, k: int, toks: Tensor, model: Any, cfg: CacheConfig, codec: Any,
               mid: str, spp: int, chunk_tokens: int) -> ShardEntry:
    xs, ys = [], []
    for chunk in toks.split(cfg.batch_size):
        x, y = collect_activations(
            model, chunk, cfg.hooks, exclude_bos=cfg.exclude_bos, pad_token_id=cfg.pad_token_id,
            bos_token_id=cfg.bos_token_id,
        )
        xs.append(x.cpu())
        ys.append(y.cpu())
    x, y = torch.cat(xs), torch.cat(ys)
    info = {"shard": k, "seq_start": k * spp, "seq_end": k * spp + toks.shape[0],
            "model_id": mid, "hooks": cfg.hooks.to_dict()}
    parts = encode_shard(x, y, codec, info, chunk_tokens=chunk_tokens)
    name = writer.shard_name(k)
    try:
        return writer.write_shard(store, name, parts, seq_start=info["seq_start"],
                                  seq_end=info["seq_end"])
    except OSError as e:
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise OSError(
            e.errno, f"writing shard {store.path(name)} failed{hint}: {e.strerror or e}. "
            "Finished shards are kept; re-run the same command to resume."
        ) from e


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(cfg: CacheConfig, total: int, job_index: int, num_jobs: int) -> Any:
    if not cfg.progress:
        return _NoBar()
    from tqdm.auto import tqdm

    desc = "cache" if num_jobs == 1 else f"cache job {job_index}/{num_jobs}"
    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, mininterval=1.0)

