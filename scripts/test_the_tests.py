"""Break each headline guarantee on purpose and check that a test fails (a mutation check).

    python scripts/test_the_tests.py               # every break (about 20-30 minutes)
    python scripts/test_the_tests.py --only resume_hint,sharded_topk
    python scripts/test_the_tests.py --list

Each break is one exact text replacement in one file of a scratch copy of the working tree
(nothing here is modified). The named tests then run on that copy; a break is *caught* when
they fail. CONTRIBUTING.md lists the breaks and the tests that catch them; keep both in step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache",
                                "*.egg-info")  # fmt: skip


@dataclass
class Break:
    guarantee: str
    file: str
    old: str
    new: str
    tests: list[str]
    more: tuple[tuple[str, str], ...] = ()  # further (old, new) replacements in the same file


BREAKS: dict[str, Break] = {
    "resume_hint": Break(
        "exact resume: the sparse/dense decode hint is restored",
        "clt_lens/training/runner.py",
        'self.clt._density_hint = rank_state.get("density_hint")',
        "self.clt._density_hint = None",
        ["tests/test_resume.py::test_sigkill_and_resume_is_bit_identical[sparse]"],
    ),
    "resume_feature_health": Break(
        "exact resume: dead-feature counters are restored",
        "clt_lens/training/runner.py",
        "self.state.since_fired.copy_(since.to(self.device))",
        "pass",
        ["tests/test_resume.py::test_sigkill_and_resume_is_bit_identical[topk]"],  # aux-k reads it
    ),
    "resume_scaler": Break(
        "exact resume: the fp16 grad scaler is restored",
        "clt_lens/training/runner.py",
        'if self.scaler is not None and st.get("scaler"):',
        "if False:",
        ["tests/test_resume.py::test_sigkill_and_resume_is_bit_identical[plt_fp16]"],
    ),
    "resume_topk_threshold": Break(
        "exact resume: BatchTopK's running threshold is restored with the weights",
        "clt_lens/training/runner.py",
        "        for name, t in dest.items():\n            got = self._read_slice(",
        "        for name, t in dest.items():\n            if name == 'topk_threshold':\n"
        "                continue\n            got = self._read_slice(",
        ["tests/test_resume.py::test_sigkill_and_resume_is_bit_identical[batchtopk_accum]"],
    ),
    "sharded_topk": Break(
        "sharded = one process: TopK's global top-k across feature shards",
        "clt_lens/clt/comm.py",
        "    every = comm.gather(top.contiguous())  # [R, ..., k]",
        "    every = top.unsqueeze(0)  # local top-k only",
        ["tests/test_sharding.py::test_sharded_equals_one_process[topk]"],
    ),
    "sharded_penalty_log": Break(
        "sharded = one process: logged penalties are summed over feature shards",
        "clt_lens/training/trainer.py",
        "term_t[1:3] = par.sum_features(term_t[1:3].clone())",
        "term_t[1:3] = term_t[1:3].clone()",
        ["tests/test_sharding.py::test_sharded_equals_one_process[jumprelu_sparse]"],
    ),
    "sharded_whole_axis": Break(
        "no rank ever holds the whole CLT",
        "clt_lens/training/trainer.py",
        "        data_state = self._data_state()  # collective with per-rank data positions",
        "        data_state = self._data_state()  # collective with per-rank data positions\n"
        "        self.par.comm.gather(self.clt.W_enc.detach())",
        ["tests/test_sharding.py::test_no_rank_ever_holds_the_whole_feature_axis"],
    ),
    "checkpoint_atomic": Break(
        "a rank killed mid-checkpoint leaves the previous checkpoint whole",
        "clt_lens/training/trainer.py",
        "        par.barrier()  # every rank's files are written and fsynced",
        "        pass",
        ["tests/test_sharding.py::test_rank_killed_while_writing_a_checkpoint"],
    ),
    "circuit_tracer_fold": Break(
        "circuit-tracer sets reconstruct as our CLT does",
        "clt_lens/circuits/export.py",
        '"W_enc": self.layer("W_enc", i) * s_in[i],  # [d, F]',
        '"W_enc": self.layer("W_enc", i),  # [d, F]',
        ["tests/test_circuits_export.py"],
    ),
    "faithfulness": Break(
        "attribution edges agree with interventions",
        "clt_lens/circuits/export.py",
        '"W_dec": w_dec / s_out[targets][None, :, None],',
        '"W_dec": w_dec,',
        ["tests/test_circuits_attribution.py::test_edges_agree_with_interventions"],
    ),
    "cache_checksum": Break(
        "a corrupt cache shard is named, never read silently",
        "clt_lens/cache/format.py",
        "if want is not None and sha256_hex(mv) != want:",
        "if False:",
        ["tests/test_cache_format.py::test_flipped_byte_named"],
        more=(("if got != sha256:", "if False:"),),  # both the chunk's and the file's check
    ),
    "cache_channel_bound": Break(
        "the default codec bounds every channel's error, next to massive channels",
        "clt_lens/cache/codecs.py",
        'if self.allocation == "channel":\n                    k = self._channel_steps',
        'if False:\n                    k = self._channel_steps',
        ["tests/test_cache_format.py::test_channel_bound_holds_next_to_massive_channels"],
        more=(('if self.allocation == "channel":\n                        over = chan',
               'if False:\n                        over = chan'),),
    ),
    "autointerp_resume": Break(
        "a resumed autointerp run sends nothing for features already explained",
        "clt_lens/autointerp/runner.py",
        "return sel.includes(layer, index) and (layer, index) not in finished",
        "return sel.includes(layer, index)",
        ["tests/test_autointerp_resume.py::"
         "test_sigkill_then_resume_sends_nothing_for_finished_features"],
    ),
    "sparse_dlda_order": Break(
        "sparse decode: dL/da computed feature-major goes back to the support's order",
        "clt_lens/clt/sparse.py",
        "torch.empty_like(grad_values_t).index_copy_(0, perm, grad_values_t)",
        "grad_values_t",
        ["tests/test_clt_sparse.py"],
    ),
    "cpu_kernel_norm_grad": Break(
        "C decode kernel: the decoder norms' gradient is folded into dL/dW_dec",
        "clt_lens/clt/cpu_kernels.c",
        "gw[k] = s * wr[k];",
        "gw[k] = 0 * wr[k];",
        ["tests/test_cpu_kernels.py"],
    ),
    "cpu_kernel_tail": Break(
        "C decode kernel: rows whose length is not a multiple of the vector width",
        "clt_lens/clt/cpu_kernels.c",
        "for (; k < n; k++) s += a[k] * b[k];",
        "for (; k + 1 < n; k++) s += a[k] * b[k];",
        ["tests/test_cpu_kernels.py"],
    ),
    "cpu_kernel_four_tokens": Break(
        "C decode kernel: dL/dW_dec from four tokens per pass over the row",
        "clt_lens/clt/cpu_kernels.c",
        "(v2 * g2[k] + v3 * g3[k])",
        "(v2 * g2[k])",
        ["tests/test_cpu_kernels.py"],
    ),
    "cpu_kernel_fused_pass": Break(
        "C decode kernel: dL/da and dL/dW_dec from one pass over four tokens' gradient rows",
        "clt_lens/clt/cpu_kernels.c",
        "a3[j] += wk * x3;",
        "a3[j] += wk * x2;",
        ["tests/test_cpu_kernels.py"],
        more=(("gw[k + j] += ((v0 * x0 + v1 * x1) + (v2 * x2 + v3 * x3));",
               "gw[k + j] += ((v0 * x0 + v1 * x1) + (v2 * x2));"),),
    ),
    "cpu_kernel_token_split": Break(
        "C decode kernel: the forward's threads cover every token",
        "clt_lens/clt/cpu_kernels.c",
        "n_tokens * (k + 1) / n_threads",
        "(n_tokens * (k + 1) - 1) / n_threads",
        ["tests/test_cpu_kernels.py"],
    ),
    "cpu_kernel_encoder_tail": Break(
        "C encoder-gradient kernel: every entry of a feature, past its groups of four",
        "clt_lens/clt/cpu_kernels.c",
        "a[k] += v * xr[k];",
        "a[k] += 0 * xr[k];",
        ["tests/test_cpu_kernels.py"],
    ),
    "cpu_kernel_encoder_block": Break(
        "C encoder-gradient kernel: whole blocks of features written to dW_enc's columns",
        "clt_lens/clt/cpu_kernels.c",
        "_mm256_stream_ps(o + j, _mm256_load_ps(tmp + j));",
        "_mm256_stream_ps(o + j, _mm256_load_ps(tmp));",
        ["tests/test_cpu_kernels.py"],
    ),
    "cpu_kernel_support_word": Break(
        "C support kernel: every position of a row's last, partial 32-bit word",
        "clt_lens/clt/cpu_kernels.c",
        "const int64_t nf = f0 + 32 < F ? 32 : F - f0;",
        "const int64_t nf = f0 + 32 < F ? 32 : F - f0 - 1;",
        ["tests/test_cpu_kernels.py"],
    ),
    "cpu_kernel_grad_squares": Break(
        "C decode kernel: each dL/dW_dec row's sum of squares, for the clipping norm",
        "clt_lens/clt/cpu_kernels.c",
        "A->grad_sumsq[f] = dot_##SFX(gw, gw, n);",
        "A->grad_sumsq[f] = dot_##SFX(gw, gw, n - 1);",
        ["tests/test_cpu_kernels.py",
         "tests/test_trainer_options.py::test_clipping_norm_is_the_norm_of_the_gradients_adam_gets"],
    ),
    "grad_squares_version": Break(
        "clipping norm: a gradient changed after the backward recorded it is read again",
        "clt_lens/clt/grad_squares.py",
        "return tuple(grad.shape), grad.stride(), grad.dtype, grad._version",
        "return tuple(grad.shape), grad.stride(), grad.dtype, 0",
        ["tests/test_trainer_options.py::test_clipping_norm_is_the_norm_of_the_gradients_adam_gets"],
    ),
    "mse_backward": Break(
        "training loss: the reconstruction error's one-pass gradient",
        "clt_lens/clt/losses.py",
        "return err * (grad * (2.0 / err.shape[0])).to(err.dtype).unsqueeze(-1)",
        "return err * (grad * (2.0 / (err.shape[0] + 1))).to(err.dtype).unsqueeze(-1)",
        ["tests/test_clt.py::test_reconstruction_gradient_matches_autograd_of_the_reference"],
    ),
    "host_memory": Break(
        "CPU training keeps its freed buffers instead of page-faulting them back every step",
        "clt_lens/training/host_memory.py",
        "ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1",
        "ok = True",
        ["tests/test_host_memory.py"],
        more=(("ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok", "ok = True"),),
    ),
    "ci_skips": Break(
        "under CI nothing is skipped",
        "tests/ci_rules.py",
        "    if report.skipped and under_ci()",
        "    if False and report.skipped and under_ci()",
        ["tests/test_ci_rules.py"],
    ),
}


def run_break(name: str, b: Break) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"ttt-{name}-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE)
        target = copy / b.file
        text = target.read_text()
        for old, new in ((b.old, b.new), *b.more):
            if text.count(old) != 1:
                return False, 0.0, f"the text to break occurs {text.count(old)} times in {b.file}"
            text = text.replace(old, new)
        target.write_text(text)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        env.pop("CI", None)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            *b.tests], cwd=copy, env=env, capture_output=True, text=True)
        tail = (r.stdout.strip().splitlines() or [""])[-1]
        return r.returncode != 0, time.perf_counter() - t, tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated break names")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BREAKS)
    if args.list:
        for n in names:
            print(f"{n}: {BREAKS[n].guarantee} ({BREAKS[n].file}) -> {' '.join(BREAKS[n].tests)}")
        return 0
    rows, missed = [], []
    for n in names:
        caught, sec, tail = run_break(n, BREAKS[n])
        rows.append((n, "caught" if caught else "MISSED", f"{sec:.0f} s", tail))
        print(f"{n}: {'caught' if caught else 'MISSED'} in {sec:.0f} s ({tail})", flush=True)
        if not caught:
            missed.append(n)
    print("\n| break | guarantee | result |\n|---|---|---|")
    for n, status, _, _ in rows:
        print(f"| {n} | {BREAKS[n].guarantee} | {status} |")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
