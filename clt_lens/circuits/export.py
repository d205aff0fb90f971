"""Write a CLT as a circuit-tracer 0.5.0 transcoder set (the on-disk format its loaders read).

Two layouts (circuit-tracer 0.5.0's loaders):

- ``cross_layer``: ``config.yaml`` + per source layer i ``W_enc_{i}.safetensors`` (``W_enc_{i}``
  [F, d], ``b_enc_{i}`` [F], ``b_dec_{i}`` [d], ``threshold_{i}`` [F] for JumpReLU) and
  ``W_dec_{i}.safetensors`` (``W_dec_{i}`` [F, L-i, d]). Read by ``load_clt``.
- ``per_layer``: ``config.yaml`` + ``layer_{i}.safetensors`` (``W_enc`` [F, d], ``W_dec`` [F, d],
  ``b_enc``, ``b_dec``, ``activation_function.threshold``, ``W_skip`` [d, d] applied as
  ``x @ W_skip.T``). Read by ``load_transcoder_set``.

circuit-tracer encodes the raw hook activation (no normalisation, no b_dec subtraction), so the
weights written are those of ``clt.folded_weights()``: activation scaling folded in, thresholds of
the rule ``a = pre * (pre > theta)``. They are computed one source layer at a time, from the CLT
object or straight from a checkpoint's files (a SAELens folder or a feature-sharded checkpoint),
so writing a set from disk holds about one layer's decoder in memory, never the model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors.torch import save_file

from clt_lens.circuits.errors import CircuitsError
from clt_lens.circuits.loading import CONFIG_YAML, load_clt, read_clt_config, resolve_checkpoint_dir
from clt_lens.clt.activations import get_activation
from clt_lens.clt.storage import WEIGHTS_STEM, TensorReader

Layout = Literal["auto", "cross_layer", "per_layer"]
LAYOUTS = ("auto", "cross_layer", "per_layer")


def default_scan(clt: Any, model_name: str | None = None, source: str | Path | None = None) -> str:
    """A readable identifier for the transcoders of a graph (circuit-tracer's ``scan``)."""
    cfg = getattr(clt, "cfg", clt)
    name = model_name or cfg.metadata.model_name or "model"
    kind = "clt" if cfg.cross_layer else "plt"
    tail = Path(source).name if source is not None else f"{kind}-{cfg.d_sae}"
    return _clean_scan(f"clt-lens/{name}/{tail}")


def _clean_scan(scan: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@/+-]", "_", scan)


def resolve_layout(clt: Any, layout: Layout = "auto") -> Literal["cross_layer", "per_layer"]:
    """The file layout ``clt`` (a CLT or its config) is written in; raises for what
    circuit-tracer cannot load."""
    if layout not in LAYOUTS:
        raise CircuitsError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    cfg = getattr(clt, "cfg", clt)
    act = get_activation(cfg.activation)
    if act.circuit_tracer_activation is None:
        hint = (
            " Convert it first with clt_lens.clt.convert_topk_to_jumprelu(clt, x_sample)"
            if act.converts_to_jumprelu else ""
        )
        raise CircuitsError(
            f"a {act.label} CLT cannot be exported: circuit-tracer 0.5.0 "
            f"runs only ReLU and JumpReLU transcoders.{hint}"
        )
    resolved = layout
    if layout == "auto":
        resolved = "cross_layer" if cfg.cross_layer else "per_layer"
    if resolved == "per_layer" and cfg.cross_layer:
        raise CircuitsError(
            "layout 'per_layer' needs a per-layer transcoder (cfg.cross_layer=False): a per-layer "
            "set cannot hold the cross-layer decoders of this CLT"
        )
    if resolved == "cross_layer" and cfg.skip:
        raise CircuitsError(
            "this CLT has a skip connection, which circuit-tracer 0.5.0's CLT loader never reads "
            "(W_skip is not loaded from disk); only a per-layer transcoder (cross_layer=False) "
            "with a skip can be exported, as layout 'per_layer'"
        )
    return resolved  # type: ignore[return-value]


class _Weights:
    """Raw-space weights of one source layer at a time, from a CLT object or a checkpoint."""

    def __init__(self, src: Any) -> None:
        if isinstance(src, TensorReader):
            self.whole, self.layer = src.read, src.read_index
        else:
            tensors = {**dict(src.named_parameters()), **dict(src.named_buffers())}
            self.whole = lambda n: tensors[n].detach()
            self.layer = lambda n, i: tensors[n][i].detach()
        self.s_in, self.s_out = self.whole("input_scale"), self.whole("output_scale")

    def source_layer(self, cfg: Any, i: int) -> dict[str, torch.Tensor | None]:
        s_in, s_out = self.s_in, self.s_out
        w_dec = self.whole(f"W_dec.{i}")  # [F, n_targets, d]
        targets = torch.arange(i, i + w_dec.shape[1], device=s_out.device)
        threshold = get_activation(cfg.activation).export_threshold(self, cfg, i)
        return {
            "W_enc": self.layer("W_enc", i) * s_in[i],  # [d, F]
            "b_enc": self.layer("b_enc", i),
            "threshold": threshold,
            "W_dec": w_dec / s_out[targets][None, :, None],
            "b_dec": self.layer("b_dec", i) / s_out[i],
            "W_skip": self.layer("W_skip", i) * (s_in[i] / s_out[i]) if cfg.skip else None,
        }


def _iter_files(
    weights: _Weights, cfg: Any, resolved: str, dtype: torch.dtype
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(file name, tensors) of the set, one source layer at a time."""
    n_layers, n_feat, d = cfg.n_layers, cfg.d_sae, cfg.d_in

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype).contiguous()

    for i in range(n_layers):
        w = weights.source_layer(cfg, i)
        w_dec = w["W_dec"]  # [F, n_targets, d]
        if resolved == "cross_layer":
            if w_dec.shape[1] != n_layers - i:  # a PLT written as a CLT: zero off-diagonal blocks
                full = torch.zeros(n_feat, n_layers - i, d, dtype=w_dec.dtype)
                full[:, 0] = w_dec[:, 0].cpu()
                w_dec = full
            enc = {
                f"W_enc_{i}": prep(w["W_enc"].T),
                f"b_enc_{i}": prep(w["b_enc"]),
                f"b_dec_{i}": prep(w["b_dec"]),
            }
            if w["threshold"] is not None:
                enc[f"threshold_{i}"] = prep(w["threshold"])
            yield f"W_enc_{i}.safetensors", enc
            yield f"W_dec_{i}.safetensors", {f"W_dec_{i}": prep(w_dec)}
        else:
            layer = {
                "W_enc": prep(w["W_enc"].T),
                "W_dec": prep(w_dec[:, 0]),
                "b_enc": prep(w["b_enc"]),
                "b_dec": prep(w["b_dec"]),
            }
            if w["threshold"] is not None:
                layer["activation_function.threshold"] = prep(w["threshold"])
            if w["W_skip"] is not None:
                # ours: y += x @ W_skip[i]; circuit-tracer's per-layer skip: x @ W_skip.T
                layer["W_skip"] = prep(w["W_skip"].T)
            yield f"layer_{i}.safetensors", layer


def circuit_tracer_tensors(
    clt: Any, layout: Layout = "auto", dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> tensors of the circuit-tracer set for ``clt`` (CPU, contiguous, ``dtype``)."""
    resolved = resolve_layout(clt, layout)
    return dict(_iter_files(_Weights(clt), clt.cfg, resolved, dtype))


def write_circuit_tracer_set(
    clt_or_checkpoint_dir: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    model_name: str | None = None,
    layout: Layout = "auto",
    scan: str | None = None,
) -> Path:
    """Write ``clt_or_checkpoint_dir`` as a circuit-tracer transcoder set in ``out_dir``.

    ``layout`` "auto" writes a cross-layer CLT as ``cross_layer_transcoder`` and a per-layer CLT
    (``cfg.cross_layer=False``) as ``transcoder_set``; "cross_layer" also accepts a per-layer
    CLT (its decoders padded with zero blocks). The folder is built beside ``out_dir`` and renamed
    into place; an existing ``out_dir`` is replaced only if it is a transcoder set itself.
    Returns the absolute path of ``out_dir``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CircuitsError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    out = Path(out_dir).expanduser().resolve()
    replaceable = out.is_dir() and (not any(out.iterdir()) or (out / CONFIG_YAML).is_file())
    if out.exists() and not replaceable:
        raise CircuitsError(
            f"out_dir {str(out)!r} exists and is not an (empty folder or a) circuit-tracer set; "
            "refusing to replace it"
        )
    source = clt_or_checkpoint_dir if isinstance(clt_or_checkpoint_dir, str | Path) else None
    if source is not None:  # read layer by layer from the files: no whole CLT in memory
        from clt_lens.clt import CLTConfig

        cfg = CLTConfig.from_dict({**read_clt_config(source), "device": "cpu"})
        reader = TensorReader(resolve_checkpoint_dir(source), WEIGHTS_STEM)
        weights = _Weights(reader)
    else:
        clt, reader = load_clt(clt_or_checkpoint_dir), None
        cfg, weights = clt.cfg, _Weights(clt)
    resolved = resolve_layout(cfg, layout)
    model_name = model_name or cfg.metadata.model_name
    config: dict[str, Any] = {
        "model_kind": "cross_layer_transcoder" if resolved == "cross_layer" else "transcoder_set",
        "feature_input_hook": cfg.input_hook,
        "feature_output_hook": cfg.output_hook,
        "scan": _clean_scan(scan) if scan else default_scan(cfg, model_name, source),
        "clt_lens": {
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_in,
            "d_transcoder": cfg.d_sae,
            "activation": get_activation(cfg.activation).circuit_tracer_activation,
            "source_activation": cfg.activation,
            "cross_layer": cfg.cross_layer,
            "skip": cfg.skip,
            "dtype": str(dtype).removeprefix("torch."),
            "source": str(Path(source).expanduser().resolve()) if source is not None else None,
        },
    }
    if model_name:
        config["model_name"] = model_name

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a set is meant to be shared
        for name, tensors in _iter_files(weights, cfg, resolved, dtype):
            save_file(tensors, str(tmp / name))
        with open(tmp / CONFIG_YAML, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if reader is not None:
            reader.close()
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
