"""Writing shards atomically, per-job progress records, and the merge that writes the manifest.

Generation can be split over independent jobs (job i of n writes shards k with k % n == i).
Each job keeps a record ``jobs/job-{i}-of-{n}.json`` listing the shards it finished (file, token
count, byte size, sha256, per-layer quantisation FVU), rewritten atomically after every shard.
A shard file appears only complete (temp file + fsync + rename) and is listed only after it is
on disk, so a job killed at any point (SIGKILL, full disk) leaves every listed shard intact, and
the next run redoes just the rest. ``merge_cache`` gathers the records, checks that every shard
of the plan is present with the recorded size (and sha256 with ``verify=True``) and writes
``manifest.json`` atomically; readers refuse a directory without one.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clt_lens.activations import HookSpec
from clt_lens.cache.format import (
    SHARD_SUFFIX,
    CacheError,
    CacheManifest,
    ShardEntry,
    atomic_write_bytes,
    atomic_write_json,
    sha256_file,
    sha256_hex,
    write_manifest,
)

CONFIG_NAME = "cache_config.json"
JOBS_DIR = "jobs"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}{SHARD_SUFFIX}"


def job_record_path(out_dir: str | Path, job_index: int, num_jobs: int) -> Path:
    return Path(out_dir) / JOBS_DIR / f"job-{job_index}-of-{num_jobs}.json"


def write_shard(path: Path, chunks: list[bytes]) -> tuple[int, str]:
    """Write a shard atomically; return (byte size, sha256)."""
    atomic_write_bytes(path, chunks)
    data = b"".join(chunks)
    return len(data), sha256_hex(data)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CacheError(f"{what} {path} must hold a JSON object")
    return data


class JobRecord:
    """Progress of one generation job; saved atomically after every finished shard."""

    def __init__(self, out_dir: Path, job_index: int, num_jobs: int, *, config_hash: str,
                 model_id: str) -> None:
        self.path = job_record_path(out_dir, job_index, num_jobs)
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    jobs = Path(out_dir) / JOBS_DIR
    if not jobs.is_dir():
        return []
    return [read_json(p, "job record") for p in sorted(jobs.glob("job-*-of-*.json"))]


def verified_entry(out_dir: Path, entry: dict[str, Any]) -> bool:
    """Whether a recorded shard is on disk with the recorded size and sha256."""
    path = Path(out_dir) / entry["file"]
    try:
        if path.stat().st_size != entry["nbytes"]:
            return False
    except FileNotFoundError:
        return False
    return sha256_file(path) == entry["sha256"]


def merge_cache(out_dir: str | Path, *, verify: bool = False) -> CacheManifest:
    """Check that every shard of the plan is present and write ``manifest.json`` atomically.

    Shard sizes are always checked; ``verify=True`` also recomputes every sha256 (readers check
    them anyway when they read a shard). Raises ``CacheError`` naming missing or bad shards.
    """
    out = Path(out_dir)
    cfg_file = out / CONFIG_NAME
    if not cfg_file.is_file():
        raise CacheError(
            f"{out} is not a cache being generated: {cfg_file} is missing"
            + (" (the directory does not exist)" if not out.is_dir() else "")
        )
    saved = read_json(cfg_file, "cache config")
    plan, chash = saved["plan"], saved["config_hash"]
    records = [r for r in load_records(out) if r.get("config_hash") == chash]
    if not records:
        raise CacheError(f"{out}: no job records for this cache config in {out / JOBS_DIR}")
    model_ids = sorted({r["model_id"] for r in records})
    if len(model_ids) > 1:
        raise CacheError(f"{out}: job records disagree on the model: {model_ids}")
    n_shards = plan["n_shards"]
    ends = [r["stream_shards"] for r in records if r.get("stream_shards") is not None]
    if ends:
        n_shards = min([n_shards, *ends])
    entries: list[ShardEntry] = []
    missing, bad = [], []
    for k in range(n_shards):
        candidates = [r["shards"][str(k)] for r in records if str(k) in r["shards"]]
        if not candidates:
            missing.append(k)
            continue
        path = out / candidates[0]["file"]
        if not path.is_file():
            missing.append(k)
            continue
        size = path.stat().st_size
        ok = [c for c in candidates if c["nbytes"] == size]
        if ok and verify:
            digest = sha256_file(path)
            ok = [c for c in ok if c["sha256"] == digest]
        if not ok:
            bad.append(path.name)
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
            f"cannot merge {out}: " + "; ".join(parts)
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
    write_manifest(out, manifest)
    return manifest


__all__ = [
    "CONFIG_NAME", "JobRecord", "atomic_write_bytes", "job_record_path", "load_records",
    "merge_cache", "shard_name", "verified_entry", "write_shard",
]
