"""Hook names and activation collection: one forward pass -> token-aligned ``(x_in, y_out)``.

A CLT reads every layer's MLP input and predicts every layer's MLP output. ``HookSpec`` names the
two hook points block-relatively, the way circuit-tracer's ``feature_input_hook`` /
``feature_output_hook`` do, and is stored with caches and checkpoints so later stages use the same
ones. Accepted names (TransformerLens 3.2.1 ``HookedTransformer``):

- ``ln2.hook_normalized`` (default input): the normalised residual that feeds the MLP. In a model
  whose LayerNorm weights are not folded this is *before* the LN's elementwise ``w``/``b``.
- ``hook_resid_mid``: the residual stream before ``ln2``.
- ``hook_mlp_in``: the same tensor as ``hook_resid_mid`` (TransformerLens only calls it when
  ``cfg.use_hook_mlp_in`` is on; collection switches it on for the pass and restores it).
- ``mlp.hook_in`` / ``mlp.hook_out``: circuit-tracer's ``ReplacementMLP`` names, i.e. exactly what
  the MLP module receives (after the LN affine) and returns. A plain ``HookedTransformer`` has no
  such hook points; they are then read with PyTorch hooks on ``blocks[l].mlp``.
- ``hook_mlp_out`` (default output): the MLP's contribution to the residual stream.
- any other block-relative hook whose activation is ``[batch, pos, d_model]``.

Collection only hooks the points it needs, copies them into preallocated buffers, and stops the
forward pass after the last block (no ``ln_final``/unembedding). Positions holding BOS (column 0,
when it equals the BOS id) and padding (``pad_token_id``) are dropped, so row ``n`` of ``x_in`` and
of ``y_out`` is the same token. Padding is assumed to be on the right: with causal attention pad
positions then cannot change the real tokens' activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from clt_lens.errors import CLTLensError, InputError

# circuit-tracer's ReplacementMLP hook names, emulated with module hooks on a plain model.
MODULE_HOOKS = ("mlp.hook_in", "mlp.hook_out")


class HookError(CLTLensError, ValueError):
    """A hook name does not exist in the model or does not carry [batch, pos, d_model]."""


@dataclass(frozen=True)
class HookSpec:
    """Block-relative hook names for the CLT input (read) and output (target) activations."""

    input_hook: str = "ln2.hook_normalized"
    output_hook: str = "hook_mlp_out"

    def __post_init__(self) -> None:
        for field, name in (("input_hook", self.input_hook), ("output_hook", self.output_hook)):
            if not isinstance(name, str) or not name or name.startswith("blocks."):
                raise HookError(
                    f"HookSpec.{field}={name!r}: give a block-relative name such as "
                    "'ln2.hook_normalized' or 'hook_mlp_out' (without 'blocks.{layer}.')"
                )

    def input_names(self, n_layers: int) -> list[str]:
        return [f"blocks.{layer}.{self.input_hook}" for layer in range(n_layers)]

    def output_names(self, n_layers: int) -> list[str]:
        return [f"blocks.{layer}.{self.output_hook}" for layer in range(n_layers)]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HookSpec:
        unknown = sorted(set(data) - {"input_hook", "output_hook"})
        if unknown:
            raise HookError(f"unknown HookSpec key(s) {unknown}; accepted: input_hook, output_hook")
        return cls(**data)


def valid_hook_names(model: Any) -> list[str]:
    """Block-relative hook names the model offers (from ``model.hook_dict``, block 0)."""
    names = {k[len("blocks.0.") :] for k in model.hook_dict if k.startswith("blocks.0.")}
    if _has_mlp(model):
        names.update(MODULE_HOOKS)
    return sorted(names)


def _has_mlp(model: Any) -> bool:
    return len(model.blocks) > 0 and hasattr(model.blocks[0], "mlp")


def validate_hooks(model: Any, hooks: HookSpec) -> None:
    """Raise ``HookError`` naming the hook and the valid names if ``hooks`` doesn't fit."""
    valid = valid_hook_names(model)
    for field, name in (("input_hook", hooks.input_hook), ("output_hook", hooks.output_hook)):
        if name not in valid:
            raise HookError(
                f"{field} {name!r} is not a hook of this model's blocks "
                f"(looked for 'blocks.0.{name}'); valid block-relative names: {valid}"
            )


def _bos_id(model: Any, bos_token_id: int | None) -> int | None:
    if bos_token_id is not None:
        return int(bos_token_id)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    # Packing falls back to EOS as the row separator when a tokenizer has no BOS (clt_lens.data).
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        bos = getattr(tok, "eos_token_id", None)
    return None if bos is None else int(bos)


def token_mask(
    tokens: Tensor,
    *,
    exclude_bos: bool = True,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Tensor:
    """Bool ``[b, pos]``: True where a position is kept (not a leading BOS, not padding)."""
    keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if exclude_bos and bos_token_id is not None:
        keep[:, 0] = tokens[:, 0] != bos_token_id
    if pad_token_id is not None:
        keep &= tokens != pad_token_id
    return keep


class _Capture:
    """Hook functions that copy one layer's activation into a slot of a preallocated buffer."""

    def __init__(self, buf: Tensor, layer: int, hook_name: str) -> None:
        self.buf, self.layer, self.hook_name = buf, layer, hook_name

    def store(self, act: Tensor) -> None:
        want = (self.buf.shape[0], self.buf.shape[1], self.buf.shape[3])
        if act.shape != want:
            raise HookError(
                f"hook {self.hook_name!r} carries shape {tuple(act.shape)}; collection needs "
                f"[batch, pos, d_model] = {list(want)}"
            )
        self.buf[:, :, self.layer].copy_(act.detach())

    # TransformerLens hook signature
    def tl_hook(self, act: Tensor, hook: Any) -> None:
        self.store(act)

    # torch module hooks: forward_pre_hook(module, args) / forward_hook(module, args, out)
    def pre_hook(self, module: Any, args: tuple) -> None:
        self.store(args[0])

    def post_hook(self, module: Any, args: tuple, out: Tensor) -> None:
        self.store(out)


@contextlib.contextmanager
def _installed(model: Any, captures: list[tuple[str, int, _Capture]]) -> Iterator[None]:
    """Attach the capture hooks (and switch on ``hook_mlp_in`` if needed) for one pass."""
    handles = []
    tl_hooks: list[tuple[str, Callable]] = []
    old_mlp_in = getattr(model.cfg, "use_hook_mlp_in", None)
    try:
        for name, layer, cap in captures:
            full = f"blocks.{layer}.{name}"
            if full in model.hook_dict:
                tl_hooks.append((full, cap.tl_hook))
                if name == "hook_mlp_in":
                    model.cfg.use_hook_mlp_in = True
            elif name == "mlp.hook_in":
                handles.append(model.blocks[layer].mlp.register_forward_pre_hook(cap.pre_hook))
            elif name == "mlp.hook_out":
                handles.append(model.blocks[layer].mlp.register_forward_hook(cap.post_hook))
            else:  # validate_hooks ran before; a model edited in between could still get here
                raise HookError(f"hook {full!r} not found in the model")
        with model.hooks(fwd_hooks=tl_hooks):
            yield
    finally:
        for h in handles:
            h.remove()
        if old_mlp_in is not None:
            model.cfg.use_hook_mlp_in = old_mlp_in


@torch.no_grad()
def collect_activations(
    model: Any,
    tokens: Tensor,
    hooks: HookSpec = HookSpec(),  # noqa: B008 - frozen dataclass, safe as a default
    *,
    exclude_bos: bool = True,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` on ``tokens [b, pos]``; return float32 ``x_in [N, L, d]``, ``y_out [N, L, d]``.

    ``N`` counts the kept positions in row-major order (row 0's tokens, then row 1's ...). The BOS
    id defaults to the tokenizer's BOS id (its EOS id if it has no BOS); with no tokenizer and no
    ``bos_token_id`` no position is treated as BOS. Outputs live on the model's device.
    """
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise InputError(f"tokens must be an integer tensor, got {tokens.dtype}")
    validate_hooks(model, hooks)
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    b, p = tokens.shape
    x_buf = torch.empty(b, p, n_layers, d, dtype=torch.float32, device=device)
    y_buf = torch.empty_like(x_buf)
    captures = []
    for layer in range(n_layers):
        for name, buf in ((hooks.input_hook, x_buf), (hooks.output_hook, y_buf)):
            captures.append((name, layer, _Capture(buf, layer, f"blocks.{layer}.{name}")))
    with _installed(model, captures):
        # stop_at_layer = n_layers runs every block and skips ln_final + unembedding.
        model(tokens, stop_at_layer=n_layers)
    keep = token_mask(
        tokens, exclude_bos=exclude_bos, bos_token_id=_bos_id(model, bos_token_id),
        pad_token_id=pad_token_id,
    )
    if bool(keep.all()):
        return x_buf.reshape(b * p, n_layers, d), y_buf.reshape(b * p, n_layers, d)
    return x_buf[keep], y_buf[keep]


def stream_activations(
    model: Any,
    token_batches: Iterable[Tensor],
    hooks: HookSpec = HookSpec(),  # noqa: B008
    *,
    batch_tokens: int | None = None,
    exclude_bos: bool = True,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` for each token batch, or re-cut into batches of ``batch_tokens`` tokens.

    With ``batch_tokens`` every yielded batch has exactly that many tokens except possibly the
    last (leftovers are carried into the next forward pass's tokens, order preserved).
    """
    if batch_tokens is not None and batch_tokens <= 0:
        raise InputError(f"batch_tokens must be positive, got {batch_tokens}")
    carry_x: list[Tensor] = []
    carry_y: list[Tensor] = []
    carried = 0
    for toks in token_batches:
        x, y = collect_activations(
            model, toks, hooks, exclude_bos=exclude_bos, pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
        )
        if batch_tokens is None:
            yield x, y
            continue
        carry_x.append(x)
        carry_y.append(y)
        carried += x.shape[0]
        if carried < batch_tokens:
            continue
        xs, ys = torch.cat(carry_x), torch.cat(carry_y)
        n_full = xs.shape[0] // batch_tokens * batch_tokens
        for lo in range(0, n_full, batch_tokens):
            yield xs[lo : lo + batch_tokens], ys[lo : lo + batch_tokens]
        carry_x, carry_y = [xs[n_full:]], [ys[n_full:]]
        carried = xs.shape[0] - n_full
    if batch_tokens is not None and carried:
        yield torch.cat(carry_x), torch.cat(carry_y)
