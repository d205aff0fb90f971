"""Training runs in forked child processes, killed with SIGKILL on cue.

A forked child inherits the test process's imports and the loaded embedded model, so a run
starts in well under a second instead of the ~10 s a fresh ``python -m clt_lens`` spends on
imports; that is what makes a resume *property* (many kills, many regimes) affordable in the
suite. Every child runs with one intra-op thread, so all runs of a comparison reduce in the
same order. A feature-sharded run forks one child per rank, joined over gloo.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_CTX = mp.get_context("fork")
_MODEL: Any = None  # set by the tests before forking; children reuse it for streaming


def set_model(model: Any) -> None:
    global _MODEL
    _MODEL = model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args: list[str], resume: str | None) -> None:
    from clt_lens.config import load_config
    from clt_lens.training import CLTTrainingRunner, TrainConfig

    cfg = load_config(TrainConfig, None, args)
    model = _MODEL if not cfg.cache_dir else None
    runner = CLTTrainingRunner(cfg, override_model=model, resume=resume)
    runner.run()
    runner.par.shutdown()


def _child(args: list[str], resume: str | None, env: dict[str, str], err: Path,
           wrap: Callable[[int], Any] | None) -> None:
    try:
        import torch

        torch.set_num_threads(1)
        os.environ.update(env)
        with wrap(int(env.get("RANK", "0"))) if wrap else contextlib.nullcontext():
            _train(args, resume)
    except BaseException:
        err.write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


class Run:
    """One training launch: one process, or ``nproc`` ranks joined over gloo.

    ``wrap(rank)``, if given, is a context manager entered around the training in each child
    (to watch or slow down what the real code does)."""

    def __init__(self, args: list[str], resume: str | Path | None = None, nproc: int = 1,
                 wrap: Callable[[int], Any] | None = None):
        self.out = Path(args[args.index("--out_dir") + 1])
        self.out.mkdir(parents=True, exist_ok=True)
        port = str(_free_port())
        self.procs = []
        self.errs = []
        for rank in range(nproc):
            env = {}
            if nproc > 1:
                env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port}  # fmt: skip
            err = self.out / f".child_error_{rank}.txt"
            err.unlink(missing_ok=True)
            p = _CTX.Process(target=_child, args=(args, None if resume is None else str(resume),
                                                   env, err, wrap))  # fmt: skip
            p.start()
            self.procs.append(p)
            self.errs.append(err)

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def error(self) -> str:
        return "\n".join(e.read_text() for e in self.errs if e.exists())

    def wait(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        for p in self.procs:
            p.join(max(1.0, deadline - time.time()))
        if self.alive():
            self.kill()
            raise AssertionError(f"training run in {self.out} timed out")
        codes = [p.exitcode for p in self.procs]
        assert codes == [0] * len(codes), f"exit codes {codes}:\n{self.error()[-4000:]}"

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.join()


def latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "LATEST"
    try:
        return int(latest.read_text().strip().split("_")[-1])
    except (FileNotFoundError, ValueError):
        return -1


def run_to_end(args: list[str], resume: str | Path | None = None, nproc: int = 1,
               in_process: bool = False, wrap: Callable[[int], Any] | None = None) -> None:
    """Train to the end. ``in_process`` runs in this process with one thread (as a child
    would), which also warms what later forks inherit (tokenized corpus, plotting imports)."""
    if not in_process:
        Run(args, resume, nproc, wrap).wait()
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(args, None if resume is None else str(resume))
    finally:
        torch.set_num_threads(threads)


def run_killed_at(args: list[str], kill_after: int, resume: str | Path | None = None,
                  nproc: int = 1, timeout: float = 600) -> int:
    """Start a run, SIGKILL it once its newest checkpoint is at step >= ``kill_after``; return
    the step of the checkpoint it left (the one a resume continues from)."""
    run = Run(args, resume, nproc)
    deadline = time.time() + timeout
    while latest_step(run.out) < kill_after:
        if not run.alive():
            run.wait()  # raises with the child's traceback if it failed
            raise AssertionError(f"the run finished before step {kill_after}: nothing to kill")
        assert time.time() < deadline, f"no checkpoint at step {kill_after} in {timeout} s"
        time.sleep(0.002)
    run.kill()
    return latest_step(run.out)


def final_weights(run: Path) -> dict[str, Any]:
    """The ``final/`` weights of a run (what consolidation wrote)."""
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "sae_weights.safetensors"))


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), (
            f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"
        )
