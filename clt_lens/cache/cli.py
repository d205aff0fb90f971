"""``clt-lens cache``: generate (one job of a split run), merge, or inspect an activation cache.

    clt-lens cache CONFIG.yaml [--key value ...] [--job-index i --num-jobs n]
    clt-lens cache --merge DIR [--verify]
    clt-lens cache --inspect DIR

Config keys are the fields of ``clt_lens.cache.CacheConfig`` (e.g. ``--out_dir runs/cache
--n_tokens 2e6 --codec int8``); the YAML file is optional when overrides give ``out_dir``.
``out_dir`` and DIR may be local directories or fsspec URLs (``s3://bucket/cache``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from clt_lens.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file with CacheConfig keys (optional)")
    parser.add_argument("--job-index", type=int, default=0, help="this job's index (0-based)")
    parser.add_argument("--num-jobs", type=int, default=1, help="number of independent jobs")
    parser.add_argument("--merge", metavar="DIR", help="check all shards exist; write manifest")
    parser.add_argument("--verify", action="store_true", help="with --merge: recheck sha256")
    parser.add_argument("--inspect", metavar="DIR", help="print a summary of a cache")
    parser.epilog = "Other --key value pairs override CacheConfig fields."


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from clt_lens.cache import CacheConfig, generate_cache, inspect, merge_cache
    from clt_lens.config import load_config

    if args.inspect:
        print(inspect(args.inspect))
        return 0
    if args.merge:
        m = merge_cache(args.merge, verify=args.verify)
        print(f"merged {len(m.shards)} shards ({m.n_tokens:,} tokens) into "
              f"{args.merge}/manifest.json")
        print(inspect(args.merge))
        return 0
    config, extra = _split_config(args.config, list(extra))
    if config is None and not extra:
        raise ConfigError("give a config file and/or --key value overrides (at least --out_dir)")
    cfg = load_config(CacheConfig, config, extra)
    manifest = generate_cache(cfg, job_index=args.job_index, num_jobs=args.num_jobs)
    if manifest is not None:
        print(inspect(cfg.out_dir))
    return 0


def _split_config(config: str | None, extra: list[str]) -> tuple[str | None, list[str]]:
    """Undo argparse taking an override's value for the optional CONFIG positional.

    ``clt-lens cache --out_dir runs/c`` parses as config="runs/c" with extra ["--out_dir"]; a
    value that is no YAML file and follows a bare ``--key`` goes back to that key.
    """
    if config is None or Path(config).suffix in (".yaml", ".yml") or Path(config).is_file():
        return config, extra
    for i, tok in enumerate(extra):
        bare = tok.startswith("--") and "=" not in tok
        if bare and (i + 1 == len(extra) or extra[i + 1].startswith("--")):
            return None, [*extra[: i + 1], config, *extra[i + 1 :]]
    return config, extra


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m clt_lens.cache.cli``), same as ``clt-lens cache``."""
    parser = argparse.ArgumentParser(prog="clt-lens cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return run(args, extra)


if __name__ == "__main__":
    raise SystemExit(main())
