"""The training loop: one code path for one process, data parallel and feature sharded runs.

:class:`Trainer` runs the loop it is handed by :class:`~clt_lens.training.runner.
CLTTrainingRunner` (which builds the CLT, the source, the held-out set and the resume state):
steps, logging, held-out evaluation, checkpoints (every rank writes its own slice) and the
final SAELens folder.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clt_lens.clt.grad_squares import GradSquares, recording
from clt_lens.clt.storage import (
    OPTIMIZER_STEM,
    WEIGHTS_STEM,
    feature_dim,
    file_name,
    save_tensors,
    write_shard_index,
)
from clt_lens.errors import CLTLensError
from clt_lens.evals.running import ReconstructionSums
from clt_lens.training import checkpoint as ckpt_io
from clt_lens.training import rng
from clt_lens.training.config import TrainConfig
from clt_lens.training.consolidate import consolidate
from clt_lens.training.metrics import PLOT_FILE, MetricsLog, plot_training_curves
from clt_lens.training.parallel import Parallel
from clt_lens.training.schedules import lr_factor, sparsity_coeff
from clt_lens.training.sources import SourceInfo


class TrainingDiverged(CLTLensError, RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


def make_adam(params: list[torch.nn.Parameter], cfg: TrainConfig, device_type: str):
    """Adam as configured; the fused kernel where torch has one (one pass over the weights)."""
    fused = cfg.adam_fused and device_type in ("cpu", "cuda")
    return torch.optim.Adam(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None
    )


def _sq_norm(
    tensors: list[torch.Tensor], device: str, squares: GradSquares | None = None
) -> torch.Tensor:
    """Sum of squares of all entries, in fp32 (one fused pass per dtype group); a gradient
    whose sum of squares the backward recorded in ``squares`` is not read again."""
    total = torch.zeros((), device=device)
    rest = []
    for t in tensors:
        known = None if squares is None else squares.sum_of_squares(t)
        if known is None:
            rest.append(t)
        else:
            total = total + known.to(device)
    if rest:
        norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in rest])
        total = total + torch.stack(norms).pow(2).sum()
    return total


@dataclass
class TrainState:
    """What the loop carries from step to step besides the weights and Adam's state."""

    since_fired: torch.Tensor  # [L, F of this rank]: tokens since each feature last fired
    step: int = 0
    tokens: int = 0
    l0_target_hit: bool = False
    last_checkpoint: Path | None = None


class Trainer:
    """The loop over a CLT (or this rank's slice of it), its optimizer, data and state, all
    built by :class:`~clt_lens.training.runner.CLTTrainingRunner`."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        parallel: Parallel,
        device: str,
        source: Any,
        info: SourceInfo,
        heldout: tuple[torch.Tensor, torch.Tensor] | None,
        log: MetricsLog,
        clt: Any,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        state: TrainState,
        slice_reads: bool,
        rank_batch: int,
    ) -> None:
        self.cfg, self.par, self.device = cfg, parallel, device
        self.source, self.info, self.heldout, self.log = source, info, heldout, log
        self.clt, self.opt, self.scaler, self.state = clt, optimizer, scaler, state
        self.slice_reads, self.rank_batch = slice_reads, rank_batch
        self.params = [p for p in clt.parameters() if p.requires_grad]
        self.run_dir = Path(cfg.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # fused Adam scales the gradients itself (the grad scaler's path), so the clipping
        # coefficient rides along instead of costing a pass over every gradient
        self._clip_in_adam = bool(optimizer.defaults.get("fused")) and cfg.autocast != "fp16"
        self._last_plot = time.monotonic()

    # the loop's counters live in ``state`` (the runner restores them on resume)
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def tokens(self) -> int:
        return self.state.tokens

    @tokens.setter
    def tokens(self, value: int) -> None:
        self.state.tokens = value

    @property
    def since_fired(self) -> torch.Tensor:
        return self.state.since_fired

    @since_fired.setter
    def since_fired(self, value: torch.Tensor) -> None:
        self.state.since_fired = value

    @property
    def last_checkpoint(self) -> Path | None:
        return self.state.last_checkpoint

    @last_checkpoint.setter
    def last_checkpoint(self, value: Path | None) -> None:
        self.state.last_checkpoint = value

    @property
    def l0_target_hit(self) -> bool:
        return self.state.l0_target_hit

    @l0_target_hit.setter
    def l0_target_hit(self, value: bool) -> None:
        self.state.l0_target_hit = value

    def _autocast(self):
        if self.cfg.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.autocast == "bf16" else torch.float16
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.source.next()
        if self.slice_reads:
            lo = self.par.data_rank * self.rank_batch
            x, y = x[lo : lo + self.rank_batch], y[lo : lo + self.rank_batch]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _clip(self, squares: GradSquares | None = None) -> torch.Tensor:
        """Global gradient norm over all shards (replicated parameters counted once)."""
        sharded, replicated = [], []
        for name, p in self.clt.named_parameters():
            if p.grad is not None:
                (sharded if feature_dim(name) is not None else replicated).append(p.grad.detach())
        sharded_sq = self.par.sum_features(_sq_norm(sharded, self.device, squares))
        total = (sharded_sq + _sq_norm(replicated, self.device, squares)).sqrt()
        if self.cfg.grad_clip > 0:
            coef = (self.cfg.grad_clip / (total + 1e-6)).clamp(max=1.0)
            if self._clip_in_adam:  # the fused kernel divides by grad_scale: no extra pass
                self.opt.grad_scale = coef.reciprocal()
            else:
                torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], coef)
        return total

    def train(self):
        """Run the loop to ``cfg.n_steps`` (or the L0 target); returns the trained CLT."""
        cfg = self.cfg
        if self.par.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        bar = tqdm(
            total=cfg.n_steps,
            initial=self.step,
            disable=not (cfg.progress and self.par.is_main),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        t0, t_tokens = time.perf_counter(), self.tokens
        try:
            while self.step < cfg.n_steps:
                rec = self._train_step()
                self.step += 1
                self.tokens += cfg.batch_size
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.n_steps:
                    rec["tokens_per_s"] = (self.tokens - t_tokens) / max(
                        time.perf_counter() - t0, 1e-9
                    )
                    self.log.log(rec)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4g}",
                        l0=f"{rec['l0']:.1f}",
                        ev=f"{rec['ev']:.3f}",
                        refresh=False,
                    )
                if self.heldout is not None and (
                    self.step % cfg.eval_every == 0 or self.step == cfg.n_steps
                ):
                    self.log.log(self.evaluate_heldout())
                hit = self._l0_target_reached(rec)
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or hit:
                    self.save_checkpoint()
                if hit and cfg.l0_target_action == "stop":
                    break
            if self.last_checkpoint is None or self.last_checkpoint.name != self._ckpt_name():
                self.save_checkpoint()
            self._write_final()
        finally:
            bar.close()
            self.log.close()
            self.source.close()
        return self.clt
    def _l0_target_reached(self, rec: dict[str, Any]) -> bool:
        cfg = self.cfg
        if cfg.l0_target is None or self.l0_target_hit:
            return False
        if self.step < cfg.sparsity_warmup_steps:
            return False
        if rec["l0"] <= cfg.l0_target:
            self.l0_target_hit = True
            if self.par.is_main:
                tqdm.write(
                    f"L0 target {cfg.l0_target} reached at step {self.step} "
                    f"(L0 {rec['l0']:.2f}); action: {cfg.l0_target_action}"
                )
            return True
        return False

    def _train_step(self) -> dict[str, Any]:
        cfg, par = self.cfg, self.par
        L = self.info.n_layers
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(cfg, self.step)
        coeff = sparsity_coeff(cfg, self.step)
        dead = self.since_fired >= cfg.dead_window_tokens
        self.opt.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        d = self.info.d_model
        sums = ReconstructionSums.zeros(L, d, self.device)
        fired = torch.zeros(self.since_fired.shape, dtype=torch.bool, device=self.device)
        # the decoder's backward records its gradients' sums of squares for the clipping norm
        with recording() as squares:
            for _ in range(cfg.grad_accum):
                x, y = self._next_batch()
                with self._autocast():
                    out = self.clt.training_forward(
                        x,
                        y,
                        sparsity_coeff=coeff,
                        preact_coeff=cfg.clt.preact_coeff,
                        auxk_coeff=cfg.clt.auxk_coeff,
                        dead_mask=dead,
                        comm=par.comm,
                    )
                loss = out.loss / cfg.grad_accum
                if not torch.isfinite(out.loss):
                    last = self.last_checkpoint or "none written yet"
                    raise TrainingDiverged(
                        f"loss is {float(out.loss.detach())} at step {self.step + 1}; stopping. "
                        f"Last good checkpoint: {last}"
                    )
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
                for k, v in out.losses.items():
                    terms[k] = terms.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                # explained variance from sums, so ranks and micro-batches combine exactly
                with torch.no_grad():
                    target = self.clt.normalize_outputs(y)
                B = x.shape[0]  # mse_per_layer / l0_per_layer are means over the batch's tokens
                sums.add(target, out.mse_per_layer.double() * B, out.l0_per_layer.double() * B)
                fired |= out.fired
            par.average_grads(self.params)
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            grad_norm = self._clip(squares)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        post = getattr(self.clt, "post_optimizer_step", None)
        if post is not None:
            post()
        # feature health: OR of "fired" over the data group; tokens counted globally
        fired_any = par.max_data(fired.to(torch.uint8)).bool()
        self.since_fired += cfg.batch_size
        self.since_fired[fired_any] = 0
        # global metrics
        stats = sums.packed()
        par.sum_data(stats)
        sums = ReconstructionSums.from_packed(stats, L, d)
        sums.active = par.sum_features(sums.active)  # each feature rank counts its own slice
        ev, l0 = sums.explained_variance().tolist(), sums.l0().tolist()
        term_t = torch.tensor(
            [terms.get(k, 0.0) for k in ("mse", "sparsity", "preact", "auxk")],
            device=self.device,
            dtype=torch.float64,
        )
        # mse and aux-k come from the summed reconstruction, identical across a feature group;
        # the sparsity and pre-activation penalties are per shard
        term_t[1:3] = par.sum_features(term_t[1:3].clone())
        term_t = par.sum_data(term_t) / par.data_size
        mse, sp, pre, aux = term_t.tolist()
        dead_frac = (self.since_fired >= cfg.dead_window_tokens).double().sum(-1)
        dead_frac = (par.sum_features(dead_frac) / cfg.clt.d_sae).tolist()
        return {
            "kind": "train",
            "step": self.step + 1,
            "tokens": self.tokens + cfg.batch_size,
            "loss": mse + sp + pre + aux,
            "mse": mse,
            "sparsity": sp,
            "preact": pre,
            "auxk": aux,
            "lr": cfg.lr * lr_factor(cfg, self.step),
            "sparsity_coeff": coeff,
            "grad_norm": float(grad_norm),
            "ev": sum(ev) / L,
            "ev_per_layer": ev,
            "l0": sum(l0) / L,
            "l0_per_layer": l0,
            "dead_frac_per_layer": dead_frac,
            "decode_mode": out.decode_mode,
        }

    @torch.no_grad()
    def evaluate_heldout(self) -> dict[str, Any]:
        """Explained variance and L0 per layer on the held-out activations."""
        x_all, y_all = self.heldout
        L = self.info.n_layers
        was_training = self.clt.training
        self.clt.eval()
        sums = ReconstructionSums.zeros(L, self.info.d_model, self.device)
        for x, y in zip(x_all.split(2048), y_all.split(2048)):
            x, y = x.to(self.device), y.to(self.device)
            acts = self.clt.encode(x)
            # normalised space (EV is per-layer scale invariant); the partial decode is summed
            # over feature shards like in training
            partial = self.clt.decode_partial(
                acts.transpose(0, 1).contiguous(), self.par.reduce_partials
            )
            y_hat = self.clt.finish_decode(partial, self.clt.normalize_inputs(x))
            sums.add_batch(self.clt.normalize_outputs(y), y_hat, acts)
        sums.active = self.par.sum_features(sums.active)
        ev, l0 = sums.explained_variance().tolist(), sums.l0().tolist()
        if was_training:
            self.clt.train()
        return {
            "kind": "heldout",
            "step": self.step,
            "tokens": self.tokens,
            "ev": sum(ev) / L,
            "ev_per_layer": ev,
            "l0": sum(l0) / L,
            "l0_per_layer": l0,
        }

    # ---- checkpoints -----------------------------------------------------------------------

    def _own_reads(self) -> bool:
        """Whether data ranks read different parts of the data (each has its own position)."""
        return self.par.data_size > 1 and not self.slice_reads

    def _data_state(self) -> dict[str, Any]:
        """The source position to checkpoint (collective: every rank calls it)."""
        own = self.source.state_dict()
        if not self._own_reads():
            return own  # one reader, or every rank reads the same global batch
        states = self.par.gather_objects(own)
        fsize = self.par.feature_size
        ranks = [states[d * fsize] for d in range(self.par.data_size)]
        return {"kind": ckpt_io.PER_DATA_RANK, "data_size": self.par.data_size, "ranks": ranks}

    def _ckpt_name(self) -> str:
        return f"step_{self.step:08d}"

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's Adam state by parameter name, and its feature-health counters."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.clt.named_parameters():
            for key, val in self.opt.state.get(p, {}).items():
                if torch.is_tensor(val):
                    out[f"{name}.{key}"] = val.detach()
        out["since_fired"] = self.since_fired
        return out

    def _full_cfg_dict(self) -> dict[str, Any]:
        d = self.clt.cfg.to_dict()
        d["d_sae"] = self.cfg.clt.d_sae  # the slice's config with the whole feature count
        return d

    def save_checkpoint(self) -> Path:
        """Every rank writes its own slice into a staging directory; rank 0 commits it.

        Collective: every rank calls it. Data ranks of one feature slice hold the same
        tensors, so only data rank 0 writes them; replicated tensors go to feature shard 0.
        """
        cfg, par = self.cfg, self.par
        name = self._ckpt_name()
        data_state = self._data_state()  # collective with per-rank data positions
        if par.is_main:
            ckpt_io.begin(self.ckpt_root, name)
        par.barrier()
        tmp = ckpt_io.staging_dir(self.ckpt_root, name)
        k, n_shards = par.feature_rank, par.feature_size
        if par.data_rank == 0:
            weights = {n: t.detach() for n, t in self.clt.state_dict().items()
                       if k == 0 or feature_dim(n) is not None}  # fmt: skip
            save_tensors(tmp / file_name(WEIGHTS_STEM, k, n_shards), weights)
            opt = {n: t for n, t in self._optimizer_tensors().items()
                   if k == 0 or feature_dim(n) is not None}  # fmt: skip
            save_tensors(tmp / file_name(OPTIMIZER_STEM, k, n_shards), opt)
        ckpt_io.write_json(ckpt_io.rank_file(tmp, par.rank),
                           {"rank": par.rank, "rng": rng.capture(),
                            "density_hint": self.clt._density_hint})  # fmt: skip
        if par.is_main:
            ckpt_io.write_json(tmp / "cfg.json", self._full_cfg_dict())
            ckpt_io.write_json(tmp / ckpt_io.CONFIG_FILE, asdict(cfg))
            ckpt_io.write_json(tmp / ckpt_io.DATA_STATE_FILE, data_state)
            ckpt_io.write_json(tmp / ckpt_io.STATE_FILE, {
                "step": self.step,
                "tokens": self.tokens,
                "l0_target_hit": self.l0_target_hit,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "world": {"data_size": par.data_size, "feature_size": par.feature_size},
            })  # fmt: skip
            if n_shards > 1:
                write_shard_index(tmp, n_shards, cfg.clt.d_sae)
        par.barrier()  # every rank's files are written and fsynced
        path = self.ckpt_root / name
        if par.is_main:
            ckpt_io.commit(self.ckpt_root, name, keep=cfg.keep_checkpoints)
            if time.monotonic() - self._last_plot > 60:
                plot_training_curves(self.log.path, self.run_dir / PLOT_FILE)
                self._last_plot = time.monotonic()
        par.barrier()
        self.last_checkpoint = path
        return path

    def _write_final(self) -> None:
        """``final/``: the last checkpoint as a plain SAELens folder (streamed from the shards
        of a feature-sharded run, one chunk in memory at a time)."""
        if not self.par.is_main:
            return
        final = self.run_dir / "final"
        consolidate(self.last_checkpoint, final)
        plot_training_curves(self.log.path, self.run_dir / PLOT_FILE)
