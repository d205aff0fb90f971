"""The training runner: builds everything a run needs, then hands it to the Trainer's loop.

SAELens's split of labour: :class:`CLTTrainingRunner` resolves the config against the
activation source, checks a resume before any work, collects the held-out set, builds this
rank's slice of the CLT (born sharded: initialised from per-feature-block random streams, or
read slice by slice from a checkpoint) with its optimizer and training state;
:class:`~clt_lens.training.trainer.Trainer` runs the loop it is handed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens.saes.sae import SAEMetadata

from clt_lens.clt import CLTConfig, CrossLayerTranscoder
from clt_lens.clt.init import init_clt_
from clt_lens.clt.storage import feature_dim
from clt_lens.config import ConfigError
from clt_lens.data import DataLoadError
from clt_lens.models import AUTO_HOOK, load_model, model_family, model_id, resolve_hooks
from clt_lens.training import checkpoint as ckpt_io
from clt_lens.training import rng
from clt_lens.training.config import STRUCTURAL_KEYS, TrainConfig, dotted, saved_train_config
from clt_lens.training.host_memory import retain_freed_memory
from clt_lens.training.metrics import MetricsLog
from clt_lens.training.parallel import Parallel
from clt_lens.training.sources import SourceInfo, make_source
from clt_lens.training.trainer import Trainer, TrainState, make_adam


def build_clt(cfg: TrainConfig, info: SourceInfo, d_sae: int | None = None, device: str = "cpu"):
    """A fresh CrossLayerTranscoder for the activations described by ``info``."""
    spec = asdict(cfg.clt)
    spec["d_sae"] = d_sae or cfg.clt.d_sae
    clt_cfg = CLTConfig(
        **spec,
        d_in=info.d_model,
        n_layers=info.n_layers,
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
    src = cfg.source
    if AUTO_HOOK in (src.input_hook, src.output_hook) and model_family(src.model) != "unknown":
        resolve_hooks(src.model, src.input_hook, src.output_hook)


class CLTTrainingRunner:
    """Train a CLT: ``CLTTrainingRunner(cfg).run()`` (SAELens's LanguageModelSAETrainingRunner).

    The runner builds what a run needs: the process grid, the activation source (a cache, or
    the model streamed), the held-out set, this rank's slice of the CLT (initialised, or read
    from the checkpoint being resumed) with its optimizer and training state; then it hands
    them to :class:`~clt_lens.training.trainer.Trainer`, which runs the loop. Everything cheap
    is checked in the constructor, before any expensive work.

    ``override_model`` / ``override_source`` / ``override_heldout`` replace what the config
    names (a notebook's model object; any object with ``next()``, ``state_dict()``,
    ``load_state_dict()``, ``close()`` and ``info``; held-out ``(x, y)`` activations); the run
    is then not reproducible from the config alone. ``run()`` returns the trained CLT: the whole
    CLT in one process or under DDP, this rank's slice under feature sharding (``cfg.clt.d_sae`` =
    F / ranks; the whole CLT is written to ``out_dir/final``).
    """

    trainer_cls: type[Trainer] = Trainer  # the loop (a subclass may instrument it)

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        override_model: Any = None,
        override_source: Any = None,
        override_heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
        resume: str | Path | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        model, source, heldout = override_model, override_source, override_heldout
        cfg.validate()
        self.cfg = cfg
        self.par = parallel or Parallel.from_env(
            cfg.distributed, cfg.feature_parallel_size, cfg.device
        )
        self.device = self.par.device_for(cfg.device)
        if cfg.retain_host_memory and torch.device(self.device).type == "cpu":
            retain_freed_memory()
        self.run_dir = Path(cfg.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self._model = model
        self.resume_from: Path | None = None
        self._resume: ckpt_io.Checkpoint | None = None
        if resume is not None:  # check compatibility before any expensive work
            self._resume = ckpt_io.Checkpoint(resume)
            self.resume_from = self._resume.path
            self._check_resume_config(self._resume.train_config)
        if cfg.clt.d_sae % self.par.feature_size:
            raise ConfigError(
                f"clt.d_sae={cfg.clt.d_sae} does not split evenly over {self.par.feature_size} "
                f"feature ranks; choose a multiple of {self.par.feature_size}"
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
        self.trainer: Trainer | None = None

    def run(self):
        """Build the CLT, its optimizer and state, then train; returns the trained CLT."""
        cfg = self.cfg
        if self.heldout is None and cfg.eval_every and cfg.heldout_tokens:
            self.heldout = self._collect_heldout()  # first: a bad split fails before training
        self.log = MetricsLog(
            self.run_dir,
            use_wandb=cfg.wandb,
            wandb_project=cfg.wandb_project,
            wandb_config=asdict(self.cfg),
            enabled=self.par.is_main,
        )
        self._setup_model()
        self.trainer = self.trainer_cls(
            self.cfg, parallel=self.par, device=self.device, source=self.source, info=self.info,
            heldout=self.heldout, log=self.log, clt=self.clt, optimizer=self.opt,
            scaler=self.scaler, state=self.state, slice_reads=self.slice_reads,
            rank_batch=self.rank_batch,
        )  # fmt: skip
        return self.trainer.train()

    # ---- setup helpers -----------------------------------------------------------------
    def _get_model_if_streaming(self):
        if self.cfg.cache_dir or self._model is not None:
            return self._model
        self._model = load_model(self.cfg.source.model, device=self.device)
        return self._model

    def _resolve_auto_hooks(self) -> None:
        """Replace hooks set to "auto" by the ones the source resolved (the family default when
        streaming, the cache's own hooks when reading one), so checkpoints record real names."""
        src = self.cfg.source
        if AUTO_HOOK not in (src.input_hook, src.output_hook):
            return
        src = replace(
            src,
            input_hook=self.info.input_hook if src.input_hook == AUTO_HOOK else src.input_hook,
            output_hook=self.info.output_hook if src.output_hook == AUTO_HOOK else src.output_hook,
        )
        self.cfg = replace(self.cfg, source=src)

    def _check_resume_config(self, saved: dict[str, Any]) -> None:
        # a hook still "auto" (the source has not resolved it yet) is compared on the second call
        saved, here = saved_train_config(saved), dotted(asdict(self.cfg))
        pending = {f"source.{k}" for k in ("input_hook", "output_hook")
                   if getattr(self.cfg.source, k) == AUTO_HOOK}  # fmt: skip
        diffs = [
            k
            for k in STRUCTURAL_KEYS
            if k in saved and k not in pending and saved[k] != here[k]
        ]
        if diffs:
            detail = ", ".join(f"{k}: checkpoint={saved[k]!r} config={here[k]!r}" for k in diffs)
            raise ConfigError(
                f"cannot resume from {self.resume_from}: incompatible config ({detail})"
            )

    def _check_source(self) -> None:
        info = self.info
        src = self.cfg.source
        if (info.input_hook, info.output_hook) != (src.input_hook, src.output_hook):
            raise ConfigError(
                f"activation source uses hooks ({info.input_hook}, {info.output_hook}) but the "
                f"config asks for ({src.input_hook}, {src.output_hook})"
            )

    def _check_data_layout(self, data_state: dict[str, Any]) -> None:
        """Refuse a resume whose data positions cannot mean the same batches here.

        Feature layouts always convert (weights and optimizer state are saved whole); a data
        position converts when both runs read one global stream (one data rank, or
        data_parallel_reads=slice), and otherwise only to the same number of data ranks.
        """
        saved = (data_state["data_size"] if data_state.get("kind") == ckpt_io.PER_DATA_RANK
                 else None)  # fmt: skip
        own_reads = self.par.data_size > 1 and not self.slice_reads
        here = self.par.data_size if own_reads else None
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

    def _collect_heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.heldout_cache_dir:
            src = make_source(
                replace(cfg, cache_dir=cfg.heldout_cache_dir),
                min(cfg.heldout_tokens, 4096),
                partition=False,
            )
        else:
            model = self._model or load_model(cfg.source.model, device=self.device)
            self._model = model
            if model_id(model) != self.info.model_id:
                raise ConfigError(
                    f"the activation source was made with model {self.info.model_id}, but "
                    f"config model {cfg.source.model!r} is {model_id(model)}"
                )
            src = make_source(
                replace(cfg, cache_dir=None),
                min(cfg.heldout_tokens, 4096),
                model=model,
                partition=False,
            )
            src.split = cfg.heldout_split
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


    def _setup_model(self) -> None:
        """This rank's slice of the CLT, its optimizer and state: fresh, or read from the
        checkpoint being resumed. Nothing with the whole feature axis is ever built."""
        cfg, par = self.cfg, self.par
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        d_sae = cfg.clt.d_sae
        self.features = par.shard_slice(d_sae)
        clt = build_clt(cfg, self.info, d_sae=d_sae // par.feature_size, device=self.device)
        if self._resume is not None:
            with self._resume.weights() as reader:
                self._read_tensors(clt.state_dict(), reader, "weights")
        else:
            init_clt_(clt, seed=cfg.seed, feature_start=self.features.start,
                      total_features=d_sae)  # fmt: skip
            x, y = self._normalization_sample()
            clt.estimate_normalization(x.to(self.device), y.to(self.device))
        self.clt = clt
        self.clt.train()
        self.params = [p for p in self.clt.parameters() if p.requires_grad]
        self.opt = make_adam(self.params, cfg, torch.device(self.device).type)
        L, F = self.info.n_layers, self.clt.cfg.d_sae
        self.state = TrainState(since_fired=torch.zeros(L, F, dtype=torch.long, device=self.device))
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
        self.state.since_fired.copy_(since.to(self.device))
        st = ck.state
        self.state.step, self.state.tokens = int(st["step"]), int(st["tokens"])
        self.state.l0_target_hit = bool(st.get("l0_target_hit", False))
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        same = ck.world == {"data_size": par.data_size, "feature_size": par.feature_size}
        rank_state = ck.rank_state(par.rank, same)
        rng.restore(rank_state["rng"])
        self.clt._density_hint = rank_state.get("density_hint")
        data_state = ck.data_state
        if data_state.get("kind") == ckpt_io.PER_DATA_RANK:
            data_state = data_state["ranks"][par.data_rank]
        self.source.load_state_dict(data_state)
        self.state.last_checkpoint = ck.path
        self.log.truncate_after(self.state.step)

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

