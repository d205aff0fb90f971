"""``clt-lens serve``: the viewer's command (its config and options); the server is in
:mod:`clt_lens.serve`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from clt_lens.circuits.errors import CircuitsError
from clt_lens.cli_args import add_config_arguments, add_positionals, command_config
from clt_lens.serve import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    check_data_dir,
    find_viewer_js,
    install_viewer_js,
    serve,
)


@dataclass
class ServeConfig:
    graphs_dir: str | None = None  # folder of graphs written by 'clt-lens attribute'
    port: int = DEFAULT_PORT  # port to listen on
    host: str = DEFAULT_HOST  # interface to bind (127.0.0.1: this machine only)
    # folder with the viewer's scripts for offline use (d3, dagre, pako); default:
    # $CLT_LENS_VIEWER_JS or ~/.cache/clt_lens/viewer-js
    js_dir: str | None = None
    read_only: bool = False  # disable interventions (the page only shows graphs)
    # transcoders for interventions (CLT checkpoint or circuit-tracer set); default: what each
    # graph's metadata names
    clt: str | None = None
    # model for interventions (load_model name or folder); default: what each graph's
    # metadata names
    model: str | None = None
    device: str = "cpu"  # device for interventions
    verbose: bool = False  # log every request

    renamed_keys: ClassVar[dict[str, str]] = {"dir": "graphs_dir"}


CONFIG = ServeConfig
POSITIONALS = ("graphs_dir",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("clt-lens serve [CONFIG.yaml] GRAPHS_DIR [--field value ...]\n"
                    "       clt-lens serve --install-js [GRAPHS_DIR]")
    add_positionals(parser, *POSITIONALS)
    parser.add_argument("--install-js", action="store_true",
                        help="fetch the viewer's scripts, and the ones feature dashboards inline, "
                        "from the npm registry first (pinned versions, sha256-checked; needs npm) "
                        "into js_dir")  # fmt: skip
    add_config_arguments(parser, ServeConfig)


def load(args: argparse.Namespace, extra: list[str]) -> ServeConfig:
    return command_config(ServeConfig, args, extra, "serve", POSITIONALS)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = load(args, extra)
    if args.install_js:
        where = install_viewer_js(cfg.js_dir)
        print(f"viewer and dashboard scripts installed in {where}")
        if cfg.graphs_dir is None:
            return 0
    if cfg.graphs_dir is None:
        raise CircuitsError("give the graph folder: clt-lens serve GRAPHS_DIR")
    d = check_data_dir(cfg.graphs_dir)
    js = find_viewer_js(cfg.js_dir)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {cfg.host} serves {d} to other machines"
              + ("" if cfg.read_only else ", and lets them run interventions (--read-only "
                 "turns those off)"), file=sys.stderr)
    if js is None:
        print("note: no local viewer scripts (d3, dagre, pako): the page loads them from CDNs. "
              "Offline, run 'clt-lens serve --install-js' once.", file=sys.stderr)
    if cfg.clt is not None and not Path(cfg.clt).expanduser().exists():
        raise CircuitsError(f"--clt {cfg.clt!r} does not exist")
    url_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    print(f"serving {d} at http://{url_host}:{cfg.port}/  (Ctrl-C stops)")
    print("interventions: off (--read-only)" if cfg.read_only else
          "interventions: on (the transcoders and model a graph names load on its first run; "
          "--read-only turns them off)", flush=True)
    try:
        serve(d, host=cfg.host, port=cfg.port, js_dir=cfg.js_dir, background=False,
              verbose=cfg.verbose, read_only=cfg.read_only, clt=cfg.clt, model=cfg.model,
              device=cfg.device)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise CircuitsError(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from e
    return 0
