"""Writing shards atomically, per-job progress records, and the merge that writes the manifest.

Generation can be split over independent jobs (job i of n writes shards k with k % n == i).
Each job keeps a record ``jobs/job-{i}-of-{n}.json`` listing the shards it finished (their
manifest entries: token count, byte size, sha256, header checksum, quantisation FVU),
rewritten atomically after every shard. A shard file appears only complete (see
``storage.Store.write_atomic``) and is listed only after it is written, so a job killed at any
point (SIGKILL, full disk) leaves every listed shard intact, and the next run redoes just the
rest. ``merge_cache`` gathers the records, checks that every shard of the plan is present with
the recorded size (and sha256 with ``verify=True``) and writes ``manifest.json`` atomically;
readers refuse a directory without one.

``write_cache`` writes activations already in memory as a cache (no model, no jobs).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from clt_lens.activations import HookSpec
from clt_lens.cache.codecs import Codec, make_codec
from clt_lens.cache.errors import CacheError
from clt_lens.cache.manifest import CacheManifest, ShardEntry, shard_entry, write_manifest
from clt_lens.cache.shard import SHARD_SUFFIX, encode_shard
from clt_lens.cache.storage import Store, as_store

CONFIG_NAME = "cache_config.json"
JOBS_DIR = "jobs"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}{SHARD_SUFFIX}"


def job_record_name(job_index: int, num_jobs: int) -> str:
    return f"{JOBS_DIR}/job-{job_index}-of-{num_jobs}.json"


def write_shard(store: Store, name: str, parts: list[bytes], *, seq_start: int = 0,
                seq_end: int = 0) -> ShardEntry:
    """Write a shard atomically; return its manifest entry."""
    store.write_atomic(name, parts)
    return shard_entry(name, parts, seq_start=seq_start, seq_end=seq_end)


def read_json(store: Store, name: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(store.read(name))
    except FileNotFoundError:
        raise CacheError(f"{what} {store.path(name)} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{what} {store.path(name)} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CacheError(f"{what} {store.path(name)} must hold a JSON object")
    return data


class JobRecord:
    """Progress of one generation job; saved atomically after every finished shard."""

    def __init__(self, store: Store, job_index: int, num_jobs: int, *, config_hash: str,
                 model_id: str) -> None:
        self.store = store
        self.name = job_record_name(job_index, num_jobs)
        self.data: dict[str, Any] = {
            "job_index": job_index, "num_jobs": num_jobs, "config_hash": config_hash,
            "model_id": model_id, "shards": {}, "stream_shards": None, "done": False,
        }

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        return self.data["shards"]

    def add(self, index: int, entry: ShardEntry) -> None:
        self.shards[str(index)] = asdict(entry)
        self.save()

    def save(self) -> None:
        self.store.makedirs(JOBS_DIR)
        self.store.write_json(self.name, self.data)


def load_records(store: Store) -> list[dict[str, Any]]:
    names = sorted(n for n in store.sizes(JOBS_DIR)
                   if n.startswith("job-") and n.endswith(".json") and "-of-" in n)
    return [read_json(store, f"{JOBS_DIR}/{n}", "job record") for n in names]


def verified_entry(store: Store, entry: dict[str, Any], sizes: dict[str, int] | None = None
                   ) -> bool:
    """Whether a recorded shard is there with the recorded size and sha256."""
    try:
        size = sizes[entry["file"]] if sizes is not None else store.size(entry["file"])
    except (FileNotFoundError, KeyError):
        return False
    if size != entry["nbytes"]:
        return False
    return store.sha256(entry["file"]) == entry["sha256"]


def merge_cache(out_dir: str | Path | Store, *, verify: bool = False) -> CacheManifest:
    """Check that every shard of the plan is present and write ``manifest.json`` atomically.

    Shard sizes are always checked; ``verify=True`` also recomputes every sha256 (readers check
    the header and every chunk they read anyway). Raises ``CacheError`` naming missing or bad
    shards.
    """
    store = as_store(out_dir)
    if not store.exists(CONFIG_NAME):
        raise CacheError(
            f"{store} is not a cache being generated: {store.path(CONFIG_NAME)} is missing"
            + (" (the directory does not exist)" if not store.is_dir() else "")
        )
    saved = read_json(store, CONFIG_NAME, "cache config")
    plan, chash = saved["plan"], saved["config_hash"]
    records = [r for r in load_records(store) if r.get("config_hash") == chash]
    if not records:
        raise CacheError(f"{store}: no job records for this cache config in "
                         f"{store.path(JOBS_DIR)}")
    model_ids = sorted({r["model_id"] for r in records})
    if len(model_ids) > 1:
        raise CacheError(f"{store}: job records disagree on the model: {model_ids}")
    n_shards = plan["n_shards"]
    ends = [r["stream_shards"] for r in records if r.get("stream_shards") is not None]
    if ends:
        n_shards = min([n_shards, *ends])
    sizes = store.sizes()
    entries: list[ShardEntry] = []
    missing, bad = [], []
    for k in range(n_shards):
        candidates = [r["shards"][str(k)] for r in records if str(k) in r["shards"]]
        if not candidates or candidates[0]["file"] not in sizes:
            missing.append(k)
            continue
        name = candidates[0]["file"]
        ok = [c for c in candidates if c["nbytes"] == sizes[name]]
        if ok and verify:
            digest = store.sha256(name)
            ok = [c for c in ok if c["sha256"] == digest]
        if not ok:
            bad.append(name)
            continue
        entries.append(ShardEntry(**ok[0]))
    if missing or bad:
        parts = []
        if missing:
            shown = ", ".join(shard_name(k) for k in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            parts.append(f"{len(missing)} of {n_shards} shards not finished ({shown}{more})")
        if bad:
            parts.append(f"shards not matching their job records: {bad[:10]}")
        raise CacheError(
            f"cannot merge {store}: " + "; ".join(parts)
            + ". Run the missing generation jobs (re-running a job resumes it), then merge again."
        )
    cfg = saved["config"]
    manifest = CacheManifest(
        model_id=model_ids[0],
        model_name=cfg["model"],
        hooks=HookSpec(cfg["input_hook"], cfg["output_hook"]),
        n_layers=plan["n_layers"],
        d_model=plan["d_model"],
        context_size=plan["context_size"],
        dataset=cfg["dataset"],
        split=cfg["split"],
        seed=cfg["seed"],
        codec=plan["codec"],
        shards=entries,
        config_hash=chash,
        config=cfg,
    )
    write_manifest(store, manifest)
    return manifest


def write_cache(
    out_dir: str | Path | Store,
    x: Tensor,
    y: Tensor,
    *,
    codec: Codec | str = "errbound",
    shard_tokens: int = 16_384,
    chunk_tokens: int | None = None,
    hooks: HookSpec | None = None,
    model_id: str = "arrays",
    model_name: str = "arrays",
    context_size: int = 0,
    dataset: str = "arrays",
    split: str = "train",
) -> CacheManifest:
    """Write token-aligned activations ``x``, ``y`` ``[N, L, d]`` as a cache, in token order.

    For activations collected some other way (and for tests and benchmarks); the result reads
    like a generated cache. The directory must not hold a cache already.
    """
    store = as_store(out_dir)
    if store.exists("manifest.json"):
        raise CacheError(f"{store} already holds a cache; write to another directory")
    if x.shape != y.shape or x.ndim != 3:
        raise CacheError(f"x and y must both be [N, L, d]; got {tuple(x.shape)}, {tuple(y.shape)}")
    if shard_tokens <= 0:
        raise CacheError(f"shard_tokens must be positive, got {shard_tokens}")
    codec = make_codec(codec) if isinstance(codec, str) else codec
    store.makedirs()
    entries = []
    n = x.shape[0]
    for k, lo in enumerate(range(0, n, shard_tokens)):
        hi = min(n, lo + shard_tokens)
        parts = encode_shard(x[lo:hi], y[lo:hi], codec, {"shard": k, "token_start": lo},
                             chunk_tokens=chunk_tokens)
        entries.append(write_shard(store, shard_name(k), parts, seq_start=lo, seq_end=hi))
    manifest = CacheManifest(
        model_id=model_id, model_name=model_name, hooks=hooks or HookSpec(),
        n_layers=int(x.shape[1]), d_model=int(x.shape[2]), context_size=context_size,
        dataset=dataset, split=split, seed=0, codec=codec.config(), shards=entries,
        config_hash=f"arrays-{entries[0].sha256[:8] if entries else 'empty'}-{n}",
    )
    write_manifest(store, manifest)
    return manifest


__all__ = [
    "CONFIG_NAME", "JobRecord", "job_record_name", "load_records", "merge_cache", "shard_name",
    "verified_entry", "write_cache", "write_shard",
]
