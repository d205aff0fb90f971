"""``clt-lens cache``: generate (one job of a split run), merge, or inspect an activation cache.

    clt-lens cache CONFIG.yaml [--key value ...] [--job-index i --num-jobs n]
    clt-lens cache --merge DIR [--verify]
    clt-lens cache --inspect DIR

Options are the fields of ``clt_lens.cache.CacheConfig`` (e.g. ``--out_dir runs/cache
--n_tokens 2e6 --codec int8 --source.model gpt2``; ``--help`` lists them all); the YAML file is
optional when the options give ``out_dir``.
``out_dir`` and DIR may be local directories or fsspec URLs (``s3://bucket/cache``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from clt_lens.cache.generate import CacheConfig
from clt_lens.cli_args import add_config_arguments, command_config, reject_unknown
from clt_lens.config import ConfigError

CONFIG = CacheConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("clt-lens cache [CONFIG.yaml] [--field value ...] [--job-index I --num-jobs N]"
                    "\n       clt-lens cache --merge DIR [--verify] | --inspect DIR")
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="YAML file with CacheConfig fields (optional); options override it")
    parser.add_argument("--job-index", type=int, default=0, help="this job's index (0-based)")
    parser.add_argument("--num-jobs", type=int, default=1, help="number of independent jobs")
    parser.add_argument("--merge", metavar="DIR", help="check all shards exist; write manifest")
    parser.add_argument("--verify", action="store_true", help="with --merge: recheck sha256")
    parser.add_argument("--inspect", metavar="DIR", help="print a summary of a cache")
    add_config_arguments(parser, CacheConfig)
    parser.epilog = ("Nested fields take dotted names (--source.model gpt2); the old flat "
                     "spellings (--model, --dataset) still work.")


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from clt_lens.cache import generate_cache, inspect, merge_cache

    reject_unknown([w for w in extra if w.startswith("-")], "cache")  # --merge/--inspect too
    if args.inspect:
        print(inspect(args.inspect))
        return 0
    if args.merge:
        m = merge_cache(args.merge, verify=args.verify)
        print(f"merged {len(m.shards)} shards ({m.n_tokens:,} tokens) into "
              f"{args.merge}/manifest.json")
        print(inspect(args.merge))
        return 0
    if args.config is None and not hasattr(args, "out_dir"):
        raise ConfigError("give a config file and/or --field value options (at least --out_dir)")
    cfg = command_config(CacheConfig, args, extra, "cache", config=args.config)
    manifest = generate_cache(cfg, job_index=args.job_index, num_jobs=args.num_jobs)
    if manifest is not None:
        print(inspect(cfg.out_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m clt_lens.cache.cli``), same as ``clt-lens cache``."""
    parser = argparse.ArgumentParser(prog="clt-lens cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return run(args, extra)


if __name__ == "__main__":
    raise SystemExit(main())
