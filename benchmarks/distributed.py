"""Feature sharding: each rank's peak memory (RSS of the whole process), 1 vs 2 vs 4 ranks.

    python benchmarks/distributed.py            # L=12 d=768 F=5376: 4.5 GB of weights + Adam
    python benchmarks/distributed.py --quick    # a small shape, to check the script runs

Every rank runs the real Trainer under ``torchrun`` (gloo on CPU) on synthetic activations:

1. **memory**: a run that initialises, takes 2 steps, writes a checkpoint and its final/
   folder, then a second run that resumes from that checkpoint and takes one more step. Each
   rank records the peak RSS of its whole process in every phase (``/proc/self/status``
   VmHWM, reset between phases through ``/proc/self/clear_refs``). The fixed overhead is the
   RSS of a process that has imported torch and clt_lens and built nothing.
2. **memory cap**: the same run in one process and on 2 ranks with every process's data
   segment capped (``resource.setrlimit(RLIMIT_DATA)``) below what one process needs.
3. **communication**: bytes and seconds per step that the feature group exchanges (partial
   reconstructions, and the global top-k of TopK / BatchTopK), at the demo-like shape.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GB = 2**30


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def child(spec: dict) -> None:
    if spec.get("cap_gb"):
        cap = int(spec["cap_gb"] * GB)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    import torch

    from clt_lens.training import CLTSpec, CLTTrainingRunner, TrainConfig
    from clt_lens.training.sources import SyntheticSource
    from clt_lens.training.trainer import Trainer

    out = Path(spec["out"])
    phases: dict[str, float] = {}

    class MeasuredTrainer(Trainer):
        def save_checkpoint(self):
            phases["steps"] = max(phases.get("steps", 0), _status("VmHWM") / GB)
            _reset_peak()
            path = super().save_checkpoint()
            phases["checkpoint"] = _status("VmHWM") / GB
            _reset_peak()
            return path

        def _write_final(self):
            _reset_peak()
            super()._write_final()
            phases["final"] = _status("VmHWM") / GB

    class Measured(CLTTrainingRunner):
        trainer_cls = MeasuredTrainer

        def _setup_model(self):
            phases["imports+setup"] = _status("VmHWM") / GB
            _reset_peak()
            super()._setup_model()
            phases["init" if self._resume is None else "resume"] = _status("VmHWM") / GB
            _reset_peak()

    L, d, F, B = spec["L"], spec["d"], spec["F"], spec["batch"]
    clt = CLTSpec(d_sae=F, activation=spec.get("activation", "jumprelu"), k=spec.get("k", 32),
                  sparsity_coeff=0.1, jumprelu_init_threshold=0.5)
    cfg = TrainConfig(clt=clt, batch_size=B, n_steps=spec["steps"], eval_every=10**9,
                      log_every=1, normalization_tokens=B, progress=False, out_dir=str(out),
                      distributed="feature" if spec["world"] > 1 else "none",
                      checkpoint_every=2, keep_checkpoints=1, heldout_tokens=B)  # fmt: skip
    src = SyntheticSource(B, L, d)
    resume = out if spec.get("resume") else None
    t = time.perf_counter()
    try:
        runner = Measured(cfg, override_source=src, override_heldout=src.next(), resume=resume)
        runner.run()
        tr = runner.trainer
    except (MemoryError, RuntimeError) as e:  # the capped run: record how it failed
        rank = int(os.environ.get("RANK", "0"))
        (out / f"rank{rank}_{spec['tag']}.json").write_text(json.dumps(
            {"rank": rank, "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}))
        raise SystemExit(3) from None
    comm = getattr(tr.par.comm, "stats", {})
    rec = {"rank": tr.par.rank, "world": tr.par.world_size, "ok": True, "phases_gb": phases,
           "peak_gb": max(phases.values()), "seconds": time.perf_counter() - t,
           "param_gb": sum(p.numel() * p.element_size() for p in tr.clt.parameters()) / GB,
           "adam_gb": sum(v.numel() * v.element_size() for st in tr.opt.state.values()
                          for v in st.values() if torch.is_tensor(v)) / GB,
           "comm": comm, "steps": spec["steps"] - (2 if resume else 0)}  # fmt: skip
    (out / f"rank{tr.par.rank}_{spec['tag']}.json").write_text(json.dumps(rec))
    tr.par.shutdown()


def launch(spec: dict, world: int, threads: int) -> int:
    env = {**os.environ, "CLT_BENCH_CHILD": json.dumps({**spec, "world": world}),
           "OMP_NUM_THREADS": str(threads)}  # fmt: skip
    if world == 1:
        cmd = [sys.executable, __file__]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", __file__]
    return subprocess.run(cmd, env=env, capture_output=True, text=True).returncode


def read(out: Path, tag: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"rank*_{tag}.json"))]


def overhead_gb() -> float:
    code = ("import torch, clt_lens.training;"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    kb = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(kb.stdout.strip()) * 1024 / GB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shape (L=4 d=128 F=1024)")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--tmp", default=None, help="where checkpoints go (several GB)")
    args = ap.parse_args()
    if os.environ.get("CLT_BENCH_CHILD"):  # torchrun would misparse our flags: they come by env
        child(json.loads(os.environ["CLT_BENCH_CHILD"]))
        return
    from common import machine, print_table, write_result

    shape = (dict(L=4, d=128, F=1024, batch=256) if args.quick
             else dict(L=12, d=768, F=5376, batch=64))  # fmt: skip
    worlds = [int(w) for w in args.worlds.split(",")]
    cores = os.cpu_count() or 2
    m = machine()
    result: dict = {"shape": shape, "machine": m, "memory": {}, "cap": {}, "comm": {}}
    base = Path(tempfile.mkdtemp(prefix="clt-bench-dist-", dir=args.tmp))
    try:
        result["overhead_gb"] = overhead_gb()
        rows = []
        for world in worlds:
            out = base / f"w{world}"
            out.mkdir()
            spec = {**shape, "out": str(out), "steps": 2, "tag": "train"}
            assert launch(spec, world, max(1, cores // world)) == 0, f"world {world} failed"
            spec.update(steps=3, resume=True, tag="resume")
            assert launch(spec, world, max(1, cores // world)) == 0, f"resume {world} failed"
            train, res = read(out, "train"), read(out, "resume")
            result["memory"][world] = {"train": train, "resume": res}
            for t, r in zip(train, res):
                ph, rp = t["phases_gb"], r["phases_gb"]
                after = max(rp.get(k, 0) for k in ("steps", "checkpoint", "final"))
                rows.append([world, t["rank"], f"{t['param_gb'] + t['adam_gb']:.2f}",
                             *(f"{ph.get(k, 0):.2f}" for k in ("init", "steps", "checkpoint",
                                                             "final")),
                             f"{rp['resume']:.2f}", f"{after:.2f}",
                             f"{max(t['peak_gb'], r['peak_gb']):.2f}"])  # fmt: skip
            shutil.rmtree(out)
        one = max(max(t["peak_gb"], r["peak_gb"]) for t, r in zip(
            result["memory"][worlds[0]]["train"], result["memory"][worlds[0]]["resume"]))
        print(f"machine: {m['cores']} cores, torch {m['torch']}; command: {m['command']}")
        print(f"shape: L={shape['L']} d={shape['d']} F={shape['F']} per layer, batch "
              f"{shape['batch']}; fixed overhead (torch + clt_lens imported): "
              f"{result['overhead_gb']:.2f} GB")
        print_table(["world", "rank", "weights+Adam GB", "init", "steps", "checkpoint",
                     "final/", "resume (read)", "resumed: step+ckpt+final/", "peak RSS GB"],
                    rows)  # fmt: skip
        for world in worlds[1:]:
            peaks = [max(t["peak_gb"], r["peak_gb"]) for t, r in zip(
                result["memory"][world]["train"], result["memory"][world]["resume"])]
            bound = one / world + result["overhead_gb"]
            print(f"world {world}: max peak {max(peaks):.2f} GB vs 1/{world} of one process + "
                  f"overhead = {one / world:.2f} + {result['overhead_gb']:.2f} = {bound:.2f} GB")
        # a memory cap one process cannot train under and two ranks fit in
        if 2 in worlds and not args.quick:
            peaks2 = [max(t["peak_gb"], r["peak_gb"]) for t, r in zip(
                result["memory"][2]["train"], result["memory"][2]["resume"])]
            cap = round((max(peaks2) + one) / 2 + 1.0, 1)  # + VmData beyond RSS (~1.1 GB)
            for world in (1, 2):
                out = base / f"cap{world}"
                out.mkdir()
                spec = {**shape, "out": str(out), "steps": 2, "tag": "cap", "cap_gb": cap}
                code = launch(spec, world, max(1, cores // world))
                recs = read(out, "cap")
                result["cap"][world] = {"cap_gb": cap, "exit": code, "ranks": recs}
                ok = code == 0 and all(r.get("ok") for r in recs)
                why = "" if ok else "; ".join(r.get("error", "") for r in recs)[:160]
                print(f"data segment capped at {cap} GB per process, world {world}: "
                      f"{'trains' if ok else 'FAILS'} {why}")
                shutil.rmtree(out)
        # communication per step at a demo-like shape: JumpReLU vs TopK vs BatchTopK
        comm_rows = []
        for act in ("jumprelu", "topk", "batchtopk"):
            out = base / f"comm_{act}"
            out.mkdir()
            spec = dict(L=4, d=128, F=1024, batch=1024, out=str(out), steps=6, tag="comm",
                        activation=act, k=16)
            assert launch(spec, 2, max(1, cores // 2)) == 0, f"comm run {act} failed"
            rec = read(out, "comm")[0]
            result["comm"][act] = rec["comm"]
            for op, st in sorted(rec["comm"].items()):
                comm_rows.append([act, op, f"{st['bytes'] / rec['steps'] / 2**20:.2f}",
                                  f"{st['seconds'] / rec['steps'] * 1e3:.1f}"])
            shutil.rmtree(out)
        print("feature group traffic per step and rank, 2 ranks, L=4 d=128 F=1024 B=1024 k=16:")
        print_table(["activation", "collective", "MB sent per step", "ms per step"], comm_rows)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"written {write_result('distributed', result)}")


if __name__ == "__main__":
    main()
