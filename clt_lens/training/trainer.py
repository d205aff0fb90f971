"""The training loop: one code path for one process, data parallel and feature sharded runs."""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from clt_lens.clt.init import init_clt_
from clt_lens.clt.storage import (
    OPTIMIZER_STEM,
    WEIGHTS_STEM,
    feature_dim,
    file_name,
    save_tensors,
    write_shard_index,
)
from clt_lens.config import ConfigError
from clt_lens.errors import CLTLensError
from clt_lens.training import checkpoint as ckpt_io
from clt_lens.training import rng
from clt_lens.training.config import STRUCTURAL_KEYS, TrainConfig
from clt_lens.training.consolidate import consolidate
from clt_lens.training.metrics import PLOT_FILE, MetricsLog, plot_training_curves
from clt_lens.training.parallel import Parallel
from clt_lens.training.schedules import lr_factor, sparsity_coeff
from clt_lens.training.sources import SourceInfo, make_source


class TrainingDiverged(CLTLensError, RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


def build_clt(cfg: TrainConfig, info: SourceInfo, d_sae: int | None = None, device: str = "cpu"):
    """A fresh CrossLayerTranscoder for the activations described by ``info``."""
    from sae_lens.saes.sae import SAEMetadata

    from clt_lens.clt import CLTConfig, CrossLayerTranscoder

    clt_cfg = CLTConfig(
        d_in=info.d_model,
        d_sae=d_sae or cfg.d_sae,
        n_layers=info.n_layers,
        activation=cfg.activation,
        k=cfg.k,
        cross_layer=cfg.cross_layer,
        skip=cfg.skip,
        jumprelu_init_threshold=cfg.jumprelu_init_threshold,
        jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        jumprelu_ste_to_input=cfg.jumprelu_ste_to_input,
        sparsity_penalty=cfg.sparsity_penalty,
        sparsity_coeff=cfg.sparsity_coeff,
        tanh_scale=cfg.sparsity_c,
        preact_coeff=cfg.preact_coeff,
        auxk_coeff=cfg.auxk_coeff,
        decode=cfg.decode,
        device=device,
        dtype="float32",
        metadata=SAEMetadata(
            model_name=info.model_name,
            model_id=info.model_id,
            hook_name=info.input_hook,
            hook_name_out=info.output_hook,
            context_size=info.context_size,
            dataset_path=info.dataset,
            prepend_bos=True,
        ),
    )
    return CrossLayerTranscoder(clt_cfg)


def _check_auto_hooks_by_name(cfg: TrainConfig) -> None:
    """Fail on "auto" hooks for a family without defaults before its model is loaded, when the
    name tells the family (a local folder's config.json, a known hub name)."""
    from clt_lens.models import AUTO_HOOK, model_family, resolve_hooks

    if AUTO_HOOK in (cfg.input_hook, cfg.output_hook) and model_family(cfg.model) != "unknown":
        resolve_hooks(cfg.model, cfg.input_hook, cfg.output_hook)


# data_state.json of a run whose data ranks read different data: one position per data rank
PER_DATA_RANK = "per_data_rank"


def make_adam(params: list[torch.nn.Parameter], cfg: TrainConfig, device_type: str):
    """Adam as configured; the fused kernel where torch has one (one pass over the weights)."""
    fused = cfg.adam_fused and device_type in ("cpu", "cuda")
    return torch.optim.Adam(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None
    )


def _sq_norm(tensors: list[torch.Tensor], device: str) -> torch.Tensor:
    """Sum of squares of all entries, in fp32 (one fused pass per dtype group)."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.stack(norms).pow(2).sum()


class Trainer:
    """Trains a CLT. ``Trainer(cfg).train()`` returns the trained CLT: the whole CLT in one
    process or under DDP; under feature sharding this rank's slice (``cfg.d_sae`` = F / ranks),
    while the whole CLT is written to ``out_dir/final``.

    ``source`` / ``heldout`` may be injected (tests, notebooks); otherwise they are built
    from the config (a cache directory, or the model streamed on the fly).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: Any = None,
        source: Any = None,
        heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
        resume: str | Path | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.par = parallel or Parallel.from_env(
            cfg.distributed, cfg.feature_parallel_size, cfg.device
        )
        self.device = self.par.device_for(cfg.device)
        self.run_dir = Path(cfg.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self._model = model
        self.resume_from: Path | None = None
        self._resume: ckpt_io.Checkpoint | None = None
        if resume is not None:  # check compatibility before any expensive work
            self._resume = ckpt_io.Checkpoint(resume)
            self.resume_from = self._resume.path
            self._check_resume_config(self._resume.train_config)
        if cfg.d_sae % self.par.feature_size:
            raise ConfigError(
                f"d_sae={cfg.d_sae} does not split evenly over {self.par.feature_size} feature "
                f"ranks; choose a multiple of {self.par.feature_size}"
            )
        if cfg.micro_batch_size % self.par.data_size:
            raise ConfigError(
                f"batch_size/grad_accum={cfg.micro_batch_size} does not split evenly over "
                f"{self.par.data_size} data-parallel ranks"
            )
        self.rank_batch = cfg.micro_batch_size // self.par.data_size
        self._injected_source = source is not None
        if source is None and model is None and not cfg.cache_dir:
            _check_auto_hooks_by_name(cfg)
        self.slice_reads = cfg.data_parallel_reads == "slice" and self.par.data_size > 1
        if self._resume is not None:
            self._check_data_layout(self._resume.data_state)
        if source is None:
            if self.slice_reads:  # every rank reads the global batch and keeps its slice
                source = make_source(
                    cfg, cfg.micro_batch_size, model=self._get_model_if_streaming(), partition=False
                )
            else:
                source = make_source(
                    cfg,
                    self.rank_batch,
                    model=self._get_model_if_streaming(),
                    rank=self.par.data_rank,
                    world_size=self.par.data_size,
                )
        self.source = source
        self.info: SourceInfo = self.source.info
        self._resolve_auto_hooks()
        self._check_source()
        if self._resume is not None:  # the hook keys, now that "auto" is resolved
            self._check_resume_config(self._resume.train_config)
        self.heldout = heldout
        self.log = MetricsLog(
            self.run_dir,
            use_wandb=cfg.wandb,
            wandb_project=cfg.wandb_project,
            wandb_config=asdict(self.cfg),
            enabled=self.par.is_main,
        )

    # ---- setup helpers -----------------------------------------------------------------
    def _get_model_if_streaming(self):
        if self.cfg.cache_dir or self._model is not None:
            return self._model
        from clt_lens.models import load_model

        self._model = load_model(self.cfg.model, device=self.device)
        return self._model

    def _resolve_auto_hooks(self) -> None:
        """Replace hooks set to "auto" by the ones the source resolved (the family default when
        streaming, the cache's own hooks when reading one), so checkpoints record real names."""
        from clt_lens.models import AUTO_HOOK

        cfg = self.cfg
        if AUTO_HOOK not in (cfg.input_hook, cfg.output_hook):
            return
        self.cfg = replace(
            cfg,
            input_hook=self.info.input_hook if cfg.input_hook == AUTO_HOOK else cfg.input_hook,
            output_hook=self.info.output_hook if cfg.output_hook == AUTO_HOOK else cfg.output_hook,
        )

    def _check_resume_config(self, saved: dict[str, Any]) -> None:
        from clt_lens.models import AUTO_HOOK

        # a hook still "auto" (the source has not resolved it yet) is compared on the second call
        pending = {k for k in ("input_hook", "output_hook") if getattr(self.cfg, k) == AUTO_HOOK}
        diffs = [
            k
            for k in STRUCTURAL_KEYS
            if k in saved and k not in pending and saved[k] != getattr(self.cfg, k)
        ]
        if diffs:
            detail = ", ".join(
                f"{k}: checkpoint={saved[k]!r} config={getattr(self.cfg, k)!r}" for k in diffs
            )
            raise ConfigError(
                f"cannot resume from {self.resume_from}: incompatible config ({detail})"
            )

    def _check_source(self) -> None:
        info = self.info
        if (info.input_hook, info.output_hook) != (self.cfg.input_hook, self.cfg.output_hook):
            raise ConfigError(
                f"activation source uses hooks ({info.input_hook}, {info.output_hook}) but the "
                f"config asks for ({self.cfg.input_hook}, {self.cfg.output_hook})"
            )

    def _collect_heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.heldout_cache_dir:
            src = make_source(
                replace(cfg, cache_dir=cfg.heldout_cache_dir),
                min(cfg.heldout_tokens, 4096),
                partition=False,
            )
        else:
            from clt_lens.models import load_model, model_id

            model = self._model or load_model(cfg.model, device=self.device)
            self._model = model
            if model_id(model) != self.info.model_id:
                raise ConfigError(
                    f"the activation source was made with model {self.info.model_id}, but "
                    f"config model {cfg.model!r} is {model_id(model)}"
                )
            src = make_source(
                replace(cfg, cache_dir=None),
                min(cfg.heldout_tokens, 4096),
                model=model,
                partition=False,
            )
            src.split = cfg.heldout_split
        from clt_lens.data import DataLoadError

        xs, ys, n = [], [], 0
        try:
            while n < cfg.heldout_tokens:
                x, y = src.next()
                xs.append(x)
                ys.append(y)
                n += x.shape[0]
        except DataLoadError as e:
            raise ConfigError(
                f"held-out check: {e}. Set heldout_split to a split the dataset has, or "
                "heldout_cache_dir to a cache of held-out activations"
            ) from None
        src.close()
        return torch.cat(xs)[: cfg.heldout_tokens], torch.cat(ys)[: cfg.heldout_tokens]

    def _normalization_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations for the scale estimate: the same on every rank and world size."""
        cfg = self.cfg
        if self._injected_source:  # read ahead, then rewind the caller's source
            src, saved = self.source, self.source.state_dict()
        else:
            batch = min(cfg.normalization_tokens, 4096)
            src, saved = make_source(cfg, batch, model=self._model, partition=False), None
        xs, ys, n = [], [], 0
        while n < cfg.normalization_tokens:
            x, y = src.next()
            xs.append(x)
            ys.append(y)
            n += x.shape[0]
        if saved is not None:
            src.load_state_dict(saved)
        else:
            src.close()
        return torch.cat(xs), torch.cat(ys)

    # ---- the loop -------------------------------------------------------------------------
    def _setup_model(self) -> None:
        """This rank's slice of the CLT, its optimizer and state: fresh, or read from the
        checkpoint being resumed. Nothing with the whole feature axis is ever built."""
        cfg, par = self.cfg, self.par
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.features = par.shard_slice(cfg.d_sae)
        clt = build_clt(cfg, self.info, d_sae=cfg.d_sae // par.feature_size, device=self.device)
        if self._resume is not None:
            with self._resume.weights() as reader:
                self._read_tensors(clt.state_dict(), reader, "weights")
        else:
            init_clt_(clt, seed=cfg.seed, feature_start=self.features.start,
                      total_features=cfg.d_sae)  # fmt: skip
            x, y = self._normalization_sample()
            clt.estimate_normalization(x.to(self.device), y.to(self.device))
        self.clt = clt
        self.clt.train()
        self.params = [p for p in self.clt.parameters() if p.requires_grad]
        self.opt = make_adam(self.params, cfg, torch.device(self.device).type)
        # fused Adam scales the gradients itself (the grad scaler's path), so the clipping
        # coefficient rides along instead of costing a pass over every gradient
        self._clip_in_adam = bool(self.opt.defaults.get("fused")) and cfg.autocast != "fp16"
        L, F = self.info.n_layers, self.clt.cfg.d_sae
        self.since_fired = torch.zeros(L, F, dtype=torch.long, device=self.device)
        self.step = 0
        self.tokens = 0
        self.last_checkpoint: Path | None = None
        self.l0_target_hit = False
        self._last_plot = time.monotonic()
        self.scaler = None
        if cfg.autocast == "fp16":
            self.scaler = torch.amp.GradScaler(torch.device(self.device).type)
        if self._resume is not None:
            self._resume_training_state(self._resume)

    def _read_tensors(self, dest: dict[str, torch.Tensor], reader: Any, what: str) -> None:
        """Copy this rank's slice of every tensor of ``dest`` from a checkpoint reader."""
        for name, t in dest.items():
            got = self._read_slice(reader, name, t, what)
            if got is not t:
                with torch.no_grad():
                    t.copy_(got)

    def _read_slice(self, reader: Any, name: str, like: torch.Tensor, what: str) -> torch.Tensor:
        """This rank's slice of tensor ``name`` with ``like``'s shape, read straight into
        ``like`` when it is a contiguous CPU tensor (no second copy of the slice in memory)."""
        fd = feature_dim(name)
        features = self.features if fd is not None else None
        want = list(reader.shape(name))
        if fd is not None:
            want[fd] = self.features.stop - self.features.start
        if tuple(want) != tuple(like.shape):
            raise ckpt_io.CheckpointError(
                f"checkpoint {self.resume_from}: {what} tensor {name!r} has shape "
                f"{tuple(want)} for this rank's slice, expected {tuple(like.shape)}"
            )
        direct = (like.device.type == "cpu" and like.is_contiguous()
                  and reader.dtype(name) == like.dtype)  # fmt: skip
        return reader.read(name, features, out=like.detach() if direct else None)

    def _resume_training_state(self, ck: ckpt_io.Checkpoint) -> None:
        par = self.par
        with ck.optimizer() as opt:
            state = self._read_adam_state(opt)
            since = opt.read("since_fired", self.features)
        saved = self.opt.state_dict()
        saved["state"] = state
        self.opt.load_state_dict(saved)  # applies torch's device/dtype rules for "step"
        self.since_fired.copy_(since.to(self.device))
        st = ck.state
        self.step, self.tokens = int(st["step"]), int(st["tokens"])
        self.l0_target_hit = bool(st.get("l0_target_hit", False))
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        same = ck.world == {"data_size": par.data_size, "feature_size": par.feature_size}
        rank_state = ck.rank_state(par.rank, same)
        rng.restore(rank_state["rng"])
        self.clt._density_hint = rank_state.get("density_hint")
        data_state = ck.data_state
        if data_state.get("kind") == PER_DATA_RANK:
            data_state = data_state["ranks"][par.data_rank]
        self.source.load_state_dict(data_state)
        self.last_checkpoint = ck.path
        self.log.truncate_after(self.step)

    def _read_adam_state(self, opt: Any) -> dict[int, dict[str, torch.Tensor]]:
        """Adam's state for this rank's parameters, by position in the optimizer."""
        index = {id(p): i for i, p in enumerate(self.params)}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, p in self.clt.named_parameters():
            if id(p) not in index or f"{name}.exp_avg" not in opt:
                continue
            entry = {"step": opt.read(f"{name}.step")}
            for key in ("exp_avg", "exp_avg_sq"):
                # the param's own layout: the fused Adam kernel walks state and param together
                buf = torch.empty_like(p, memory_format=torch.contiguous_format)
                got = self._read_slice(opt, f"{name}.{key}", buf, "Adam state")
                entry[key] = got if got is buf else buf.copy_(got)
            state[index[id(p)]] = entry
        return state

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

    def _clip(self) -> torch.Tensor:
        """Global gradient norm over all shards (replicated parameters counted once)."""
        sharded, replicated = [], []
        for name, p in self.clt.named_parameters():
            if p.grad is not None:
                (sharded if feature_dim(name) is not None else replicated).append(p.grad.detach())
        sharded_sq = self.par.sum_features(_sq_norm(sharded, self.device))
        total = (sharded_sq + _sq_norm(replicated, self.device)).sqrt()
        if self.cfg.grad_clip > 0:
            coef = (self.cfg.grad_clip / (total + 1e-6)).clamp(max=1.0)
            if self._clip_in_adam:  # the fused kernel divides by grad_scale: no extra pass
                self.opt.grad_scale = coef.reciprocal()
            else:
                torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], coef)
        return total

    def train(self):
        cfg = self.cfg
        if self.heldout is None and cfg.eval_every and cfg.heldout_tokens:
            self.heldout = self._collect_heldout()  # first: a bad split fails before training
        self._setup_model()
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
        sse = torch.zeros(L, device=self.device, dtype=torch.float64)
        y_sum = torch.zeros(L, d, device=self.device, dtype=torch.float64)
        y_sq = torch.zeros(L, device=self.device, dtype=torch.float64)
        l0_sum = torch.zeros(L, device=self.device, dtype=torch.float64)
        fired = torch.zeros(self.since_fired.shape, dtype=torch.bool, device=self.device)
        n_tok = 0
        for _ in range(cfg.grad_accum):
            x, y = self._next_batch()
            with self._autocast():
                out = self.clt.training_forward(
                    x,
                    y,
                    sparsity_coeff=coeff,
                    preact_coeff=cfg.preact_coeff,
                    auxk_coeff=cfg.auxk_coeff,
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
                target = self.clt.normalize_outputs(y).double()
            sse += out.mse_per_layer.double() * x.shape[0]  # mse: mean over tokens of sum over d
            y_sum += target.sum(0)
            y_sq += target.pow(2).sum(dim=(0, 2))
            l0_sum += out.l0_per_layer.detach().double() * x.shape[0]
            fired |= out.fired
            n_tok += x.shape[0]
        par.average_grads(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        grad_norm = self._clip()
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
        stats = torch.cat(
            [
                sse,
                y_sum.flatten(),
                y_sq,
                l0_sum,
                torch.tensor([float(n_tok)], device=self.device, dtype=torch.float64),
            ]
        )
        par.sum_data(stats)
        sse, y_sum, y_sq, l0_sum, n = (
            stats[:L],
            stats[L : L + L * d].view(L, d),
            stats[L + L * d : 2 * L + L * d],
            stats[2 * L + L * d : 3 * L + L * d],
            stats[-1],
        )
        l0_sum = par.sum_features(l0_sum)  # each feature rank counts its own slice
        sst = y_sq - y_sum.pow(2).sum(-1) / n
        ev = (1 - sse / sst.clamp_min(1e-12)).tolist()
        l0 = (l0_sum / n).tolist()
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
        dead_frac = (par.sum_features(dead_frac) / cfg.d_sae).tolist()
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
        sse = torch.zeros(L, dtype=torch.float64, device=self.device)
        y_sum = torch.zeros(L, self.info.d_model, dtype=torch.float64, device=self.device)
        y_sq = torch.zeros(L, dtype=torch.float64, device=self.device)
        l0_sum = torch.zeros(L, dtype=torch.float64, device=self.device)
        for x, y in zip(x_all.split(2048), y_all.split(2048)):
            x, y = x.to(self.device), y.to(self.device)
            acts = self.clt.encode(x)
            # normalised space (EV is per-layer scale invariant); the partial decode is summed
            # over feature shards like in training
            partial = self.clt.decode_partial(
                acts.transpose(0, 1).contiguous(), self.par.reduce_partials
            )
            y_hat = self.clt.finish_decode(partial, self.clt.normalize_inputs(x)).double()
            y = self.clt.normalize_outputs(y).double()
            sse += (y_hat - y).pow(2).sum(dim=(0, 2))
            y_sum += y.sum(0)
            y_sq += y.pow(2).sum(dim=(0, 2))
            l0_sum += (acts != 0).sum(dim=(0, 2)).double()
        l0_sum = self.par.sum_features(l0_sum)
        n = x_all.shape[0]
        ev = (1 - sse / (y_sq - y_sum.pow(2).sum(-1) / n).clamp_min(1e-12)).tolist()
        l0 = (l0_sum / n).tolist()
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
        return {"kind": PER_DATA_RANK, "data_size": self.par.data_size, "ranks": ranks}

    def _check_data_layout(self, data_state: dict[str, Any]) -> None:
        """Refuse a resume whose data positions cannot mean the same batches here.

        Feature layouts always convert (weights and optimizer state are saved whole); a data
        position converts when both runs read one global stream (one data rank, or
        data_parallel_reads=slice), and otherwise only to the same number of data ranks.
        """
        saved = data_state["data_size"] if data_state.get("kind") == PER_DATA_RANK else None
        here = self.par.data_size if self._own_reads() else None
        if saved == here:
            return

        def describe(n: int | None) -> str:
            if n is None:
                return "one global data stream (one data rank, or data_parallel_reads=slice)"
            return f"{n} data-parallel ranks each reading its own part (data_parallel_reads=shards)"

        raise ConfigError(
            f"cannot resume {self.resume_from} exactly: it was written by {describe(saved)}, "
            f"this run has {describe(here)}; resume with the same data layout"
            + (" or with data_parallel_reads=slice" if saved is None else "")
        )

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
        d["d_sae"] = self.cfg.d_sae  # the slice's config with the whole feature count
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
                write_shard_index(tmp, n_shards, cfg.d_sae)
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


def train(cfg: TrainConfig, **kwargs: Any):
    """Train a CLT; see :class:`Trainer`. Returns the trained CLT."""
    return Trainer(cfg, **kwargs).train()
