"""``clt-lens autointerp FEATURES_DIR --model NAME [options] [--field value ...]``.

Explains and scores the features of a features directory through any OpenAI-compatible
chat-completions server (OpenAI, vLLM, Ollama): the key and URL come from --api-key /
--base-url or OPENAI_API_KEY / OPENAI_BASE_URL. Re-running continues where a stopped or
killed run left off.
"""

from __future__ import annotations

import argparse
import sys

from clt_lens.config import load_config, parse_overrides

# argparse option -> AutointerpConfig field (only the ones given on the command line win
# over --config).
_OPTIONS: list[tuple[str, dict]] = [
    ("--model", {"help": "LLM name as the server knows it (e.g. gpt-4o-mini, "
                         "meta-llama/Llama-3.1-8B-Instruct, llama3.1:8b)"}),
    ("--api-key", {"help": "API key (default: $OPENAI_API_KEY; not needed for a local server)"}),
    ("--base-url", {"help": "server URL, e.g. http://localhost:8000/v1 for vLLM, "
                            "http://localhost:11434/v1 for Ollama (default: $OPENAI_BASE_URL, "
                            "else OpenAI)"}),
    ("--layers", {"help": "comma-separated source layers (default: all)"}),
    ("--features", {"help": "comma-separated layer:index pairs, e.g. 0:12,3:7"}),
    ("--max-features", {"type": int, "help": "explain at most this many (live) features"}),
    ("--concurrency", {"type": int, "help": "requests in flight at once (default 4)"}),
    ("--max-requests", {"type": int, "help": "stop cleanly after this many requests"}),
    ("--max-tokens-budget", {"type": int, "help": "stop cleanly before using more tokens"}),
    ("--timeout", {"type": float, "help": "seconds per request (default 30)"}),
    ("--max-retries", {"type": int, "help": "retries on 429/5xx/timeouts (default 5)"}),
    ("--seed", {"type": int, "help": "seed for the choice of examples (default 0)"}),
    ("--scorers", {"help": "comma-separated from detection,fuzzing,simulation (default "
                           "detection,fuzzing); 'none' to only explain"}),
    ("--price-per-1k-input", {"type": float, "help": "USD per 1000 prompt tokens, for the cost"}),
    ("--price-per-1k-output", {"type": float, "help": "USD per 1000 completion tokens"}),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("features_dir", help="directory written by 'clt-lens features'")
    p.add_argument("--config", help="YAML file of AutointerpConfig fields")
    for flag, kw in _OPTIONS:
        p.add_argument(flag, default=None, **kw)
    p.add_argument("--retry-failed", action="store_true", default=None,
                   help="also redo features whose last record failed")
    p.add_argument("--quiet", action="store_true", help="no progress bar or printed summary")
    p.epilog = (
        "Other AutointerpConfig fields can be set with --field value (e.g. --temperature 0.2, "
        "--max_output_tokens 400, --retry_base_delay 2, --n_explain_top 12, "
        "--n_score_positive 10). Results: FEATURES_DIR/autointerp.jsonl and "
        "autointerp_summary.json."
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from clt_lens.autointerp.config import AutointerpConfig
    from clt_lens.autointerp.records import RunLocked
    from clt_lens.autointerp.runner import run_with_config

    given: dict = {}
    for flag, _ in _OPTIONS:
        key = flag[2:].replace("-", "_")
        value = getattr(args, key)
        if value is not None:
            given[key] = value
    if args.retry_failed:
        given["retry_failed"] = True
    if isinstance(given.get("scorers"), str) and given["scorers"].strip().lower() == "none":
        given["scorers"] = []
    given.update(parse_overrides(extra))
    cfg = load_config(AutointerpConfig, args.config, given)
    try:
        summary = run_with_config(args.features_dir, cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    except RunLocked as e:
        print(f"clt-lens autointerp: {e}", file=sys.stderr)
        return 1
    if summary["stopped"] in ("fatal_error", "unavailable"):
        return 1
    return 0
