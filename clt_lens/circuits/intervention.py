"""Feature interventions and steering on circuit-tracer's replacement model.

``intervene(rm, prompt, interventions)`` sets CLT features (ablate: 0, scale: x k, clamp: a
value) at chosen positions, or at every position, and reports what the model predicts before and
after: the top next-token probabilities, the change of chosen logits (e.g. an attribution
graph's outputs), the activations of watched features, and greedy continuations.

The mechanics are circuit-tracer's ``ReplacementModel.feature_intervention``: at every layer a
feature writes to, the MLP output gets ``(new value - current activation) x decoder vector``;
the rest of the MLP, including what the transcoder misses, keeps computing as usual. Settings:

- ``freeze=True`` (the attribution graph's setting): attention patterns and LayerNorm scales are
  held at their values on the un-intervened run of the same tokens. circuit-tracer freezes the
  patterns; the scales are frozen here by hooks on every ``hook_scale``.
- ``freeze=False``: patterns and scales are recomputed.
- ``direct_only=True``: MLP outputs are frozen too (circuit-tracer's ``constrained_layers`` over
  all layers), so only the intervened features' decoder writes change: the direct effects an
  attribution graph's edges measure.

``scale`` multiplies the activation the feature has on the un-intervened run of the same tokens.
A ``position`` of None means every token after BOS, generated tokens included (steering).

Continuations are greedy, one full forward pass of the tokens so far per step (no KV cache), each
step with its own un-intervened run for the frozen values and scale bases, so step 0 of the
continuation is exactly the reported next-token distribution.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Sequence
from typing import Any

import torch

from clt_lens.circuits.errors import CircuitsError

OPS = ("ablate", "scale", "clamp")
MAX_ABS_VALUE = 1e6
_INTERVENTION_KEYS = ("layer", "feature", "position", "op", "value")


@dataclasses.dataclass(frozen=True)
class Intervention:
    """Set feature ``feature`` of source layer ``layer`` at token ``position``.

    ``position``: an index into the prompt (BOS is 0 and cannot be intervened on; negative
    counts from the end), or None for every token after BOS, generated ones included.
    ``op``: ``"ablate"`` (0), ``"scale"`` (``value`` x the un-intervened activation) or
    ``"clamp"`` (``value``).
    """

    layer: int
    feature: int
    position: int | None = None
    op: str = "ablate"
    value: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intervention:
        if not isinstance(d, dict):
            raise CircuitsError(f"an intervention must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_INTERVENTION_KEYS))
        if unknown:
            raise CircuitsError(f"unknown intervention field(s) {unknown}; expected "
                                f"{list(_INTERVENTION_KEYS)}")
        missing = [k for k in ("layer", "feature") if k not in d]
        if missing:
            raise CircuitsError(f"intervention {d} lacks {missing}")
        return cls(**d)


@dataclasses.dataclass
class InterventionResult:
    """What ``intervene`` measured. ``to_dict()`` is the JSON ``clt-lens serve`` returns."""

    prompt_tokens: list[str]
    prompt_ids: list[int]
    interventions: list[dict[str, Any]]
    freeze: bool
    direct_only: bool
    top_before: list[dict[str, Any]]  # by probability before; each with before and after
    top_after: list[dict[str, Any]]  # by probability after
    logit_changes: list[dict[str, Any]]  # the requested logit tokens
    kl: float  # KL(before || after) of the next-token distribution, nats
    watched: list[dict[str, Any]]  # watched features: (pre-)activations before and after
    continuation_before: dict[str, Any]
    continuation_after: dict[str, Any]
    seconds: float
    logits_before: torch.Tensor = dataclasses.field(repr=False)  # [d_vocab], last position
    logits_after: torch.Tensor = dataclasses.field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.name.startswith("logits_")}


# -- checks -----------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _int_in(x: Any, lo: int, hi: int, what: str) -> int:
    if not _is_int(x) or not lo <= int(x) < hi:
        raise CircuitsError(f"{what} must be an integer in [{lo}, {hi}), got {x!r}")
    return int(x)


def _position(pos: Any, n_prompt: int, what: str) -> int:
    if not _is_int(pos):
        raise CircuitsError(f"{what} must be an integer token index (or None for every "
                            f"token), got {pos!r}")
    p = int(pos) + n_prompt if int(pos) < 0 else int(pos)
    if p == 0:
        raise CircuitsError(f"{what} is 0, the BOS token, which attribution graphs leave out; "
                            "intervene on positions 1 and up")
    if not 0 < p < n_prompt:
        raise CircuitsError(f"{what} {pos} is outside the prompt's {n_prompt} tokens "
                            f"(positions 1..{n_prompt - 1}, or -1..-{n_prompt - 1})")
    return p


def check_interventions(
    interventions: Sequence[Intervention | dict[str, Any]], *, n_layers: int, d_sae: int,
    n_prompt: int,
) -> list[Intervention]:
    """Validated interventions with positions made non-negative; CircuitsError names the
    first bad field."""
    if isinstance(interventions, Intervention | dict):
        interventions = [interventions]
    if not isinstance(interventions, Sequence) or isinstance(interventions, str):
        raise CircuitsError(f"interventions must be a list, got {type(interventions).__name__}")
    if not interventions:
        raise CircuitsError("no interventions given")
    out: list[Intervention] = []
    seen: dict[tuple[int, int], set[int | None]] = {}
    for k, item in enumerate(interventions):
        iv = item if isinstance(item, Intervention) else Intervention.from_dict(item)
        where = f"intervention {k}"
        layer = _int_in(iv.layer, 0, n_layers, f"{where}: layer")
        feature = _int_in(iv.feature, 0, d_sae, f"{where}: feature")
        pos = None if iv.position is None else _position(iv.position, n_prompt,
                                                         f"{where}: position")
        if iv.op not in OPS:
            raise CircuitsError(f"{where}: op must be one of {list(OPS)}, got {iv.op!r}")
        value = iv.value
        if iv.op == "ablate":
            if value not in (None, 0, 0.0):
                raise CircuitsError(f"{where}: ablate takes no value (it sets 0), got {value!r}")
            value = 0.0
        else:
            if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                    or not math.isfinite(value) or abs(value) > MAX_ABS_VALUE):
                raise CircuitsError(f"{where}: {iv.op} needs a finite number value with "
                                    f"|value| <= {MAX_ABS_VALUE:g}, got {value!r}")
            value = float(value)
        positions = seen.setdefault((layer, feature), set())
        if pos in positions or (positions and (pos is None or None in positions)):
            raise CircuitsError(f"{where}: layer {layer} feature {feature} is already set at "
                                f"{'every position' if None in positions else 'that position'}"
                                "; give each (layer, feature, position) once")
        positions.add(pos)
        out.append(Intervention(layer, feature, pos, iv.op, value))
    return out


def prompt_ids(model: Any, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """1-D token ids with a leading BOS, as attribution tokenizes (strings) or as given (ids)."""
    from clt_lens.circuits.attribution import tokenize_prompt

    if isinstance(prompt, str):
        if not prompt.strip():
            raise CircuitsError("prompt is empty")
        return tokenize_prompt(model, prompt)
    ids = torch.as_tensor(prompt).flatten() if not isinstance(prompt, torch.Tensor) \
        else prompt.flatten()
    if ids.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
        raise CircuitsError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.numel() < 2:
        raise CircuitsError("a prompt needs BOS plus at least one token")
    d_vocab, n_ctx = model.cfg.d_vocab, model.cfg.n_ctx
    if int(ids.min()) < 0 or int(ids.max()) >= d_vocab:
        raise CircuitsError(f"token ids must be in [0, {d_vocab})")
    if ids.numel() > n_ctx:
        raise CircuitsError(f"prompt is {ids.numel()} tokens but the model's context is "
                            f"n_ctx={n_ctx}")
    return ids.to(device=model.cfg.device, dtype=torch.long)


def _token_ids(model: Any, tokens: Sequence[int | str] | None) -> list[int]:
    if tokens is None:
        return []
    if isinstance(tokens, str | int):
        tokens = [tokens]
    out = []
    for t in tokens:
        if isinstance(t, str):
            ids = model.tokenizer.encode(t, add_special_tokens=False)
            if len(ids) != 1:
                raise CircuitsError(f"logit token {t!r} is {len(ids)} tokens for this "
                                    "tokenizer; give single tokens or token ids")
            out.append(int(ids[0]))
        else:
            out.append(_int_in(t, 0, model.cfg.d_vocab, "logit token id"))
    return out


def _check_watch(watch: Any, n_layers: int, d_sae: int, n_prompt: int) -> list[tuple[int, ...]]:
    if watch is None:
        return []
    out = []
    for k, w in enumerate(watch):
        if isinstance(w, dict):
            w = (w.get("layer"), w.get("feature"), w.get("position"))
        if not isinstance(w, Sequence) or len(w) != 3:
            raise CircuitsError(f"watch {k} must be (layer, feature, position), got {w!r}")
        out.append((_int_in(w[0], 0, n_layers, f"watch {k}: layer"),
                    _int_in(w[1], 0, d_sae, f"watch {k}: feature"),
                    _position(w[2], n_prompt, f"watch {k}: position")))
    return out


def _check_model(rm: Any) -> None:
    if not (hasattr(rm, "feature_intervention") and hasattr(rm, "transcoders")):
        raise CircuitsError(
            "intervene needs circuit-tracer's ReplacementModel (build it with "
            f"clt_lens.circuits.load_replacement_model), got {type(rm).__name__}")
    if getattr(rm, "backend", "transformerlens") != "transformerlens":
        raise CircuitsError("intervene supports circuit-tracer's TransformerLens backend only")


# -- runs -------------------------------------------------------------------------------------


def _scale_hook_names(rm: Any) -> list[str]:
    return [name for name in rm.hook_dict if name.endswith("hook_scale")]


def _capture_hooks(rm: Any, layers: Sequence[int], store: dict[int, torch.Tensor]) -> list:
    """Hooks keeping the transcoder input of ``layers`` (to report pre-activations)."""
    def keep(layer: int) -> Any:
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[layer] = x[0].detach().clone()
        return hook
    return [(f"blocks.{layer}.{rm.feature_input_hook}", keep(layer)) for layer in set(layers)]


@torch.no_grad()
def _clean_run(
    rm: Any, tokens: torch.Tensor, keep_scales: bool, capture: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Un-intervened logits [n, V], transcoder activations [L, n, F], LayerNorm scales and the
    transcoder inputs of the ``capture`` layers."""
    scales: dict[str, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}

    def save(x: torch.Tensor, hook: Any) -> None:
        scales[hook.name] = x.detach().clone()

    hooks = [(name, save) for name in _scale_hook_names(rm)] if keep_scales else []
    with rm.hooks(fwd_hooks=hooks + _capture_hooks(rm, capture, inputs)):
        logits, acts = rm.get_activations(tokens)
    return logits[0].clone(), acts.clone(), scales, inputs


def _circuit_tracer_interventions(
    ivs: list[Intervention], clean_acts: torch.Tensor, n: int
) -> list[tuple[Any, ...]]:
    """``(layer, position, feature, value)`` tuples for ``feature_intervention``."""
    out: list[tuple[Any, ...]] = []
    for iv in ivs:
        pos: Any = slice(1, n) if iv.position is None else iv.position
        if iv.op == "scale":
            value: Any = clean_acts[iv.layer, pos, iv.feature] * iv.value
        else:
            value = float(iv.value)
        out.append((iv.layer, pos, iv.feature, value))
    return out


@torch.no_grad()
def _intervened_run(
    rm: Any, tokens: torch.Tensor, ct_ivs: list[tuple[Any, ...]],
    scales: dict[str, torch.Tensor], freeze: bool, direct_only: bool, capture: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    def frozen(cached: torch.Tensor) -> Any:
        return lambda x, hook: cached

    inputs: dict[int, torch.Tensor] = {}
    hooks = [(name, frozen(v)) for name, v in scales.items()] if freeze else []
    constrained = range(rm.cfg.n_layers) if direct_only else None
    with rm.hooks(fwd_hooks=hooks + _capture_hooks(rm, capture, inputs)):
        logits, acts = rm.feature_intervention(
            tokens, ct_ivs, constrained_layers=constrained, freeze_attention=freeze)
    return logits[0], acts, inputs


@dataclasses.dataclass
class _Step:
    clean_logits: torch.Tensor  # [n, V]
    clean_acts: torch.Tensor  # [L, n, F]
    clean_inputs: dict[int, torch.Tensor]  # layer -> transcoder input [n, d]
    logits: torch.Tensor
    acts: torch.Tensor
    inputs: dict[int, torch.Tensor]


def _step(rm: Any, tokens: torch.Tensor, ivs: list[Intervention], freeze: bool,
          direct_only: bool, capture: Sequence[int] = (), report: bool = True) -> _Step:
    """The un-intervened run (frozen values, scale bases) and the intervened run of ``tokens``.

    With ``direct_only`` circuit-tracer freezes the scales itself (constrained over all layers).
    Without ``report`` (continuation steps) the un-intervened run is skipped when nothing needs
    it.
    """
    keep_scales = freeze and not direct_only
    if report or keep_scales or any(iv.op == "scale" for iv in ivs):
        clean_logits, clean_acts, scales, clean_inputs = _clean_run(
            rm, tokens, keep_scales, capture)
    else:
        clean_logits = clean_acts = torch.empty(0)
        scales, clean_inputs = {}, {}
    ct_ivs = _circuit_tracer_interventions(ivs, clean_acts, len(tokens))
    logits, acts, inputs = _intervened_run(rm, tokens, ct_ivs, scales, freeze, direct_only,
                                           capture)
    return _Step(clean_logits, clean_acts, clean_inputs, logits, acts, inputs)


def _continuation(rm: Any, ids: list[int]) -> dict[str, Any]:
    tok = rm.tokenizer
    return {"ids": ids, "tokens": [tok.decode([i]) for i in ids], "text": tok.decode(ids)}


def _greedy(next_logits: Any, tokens: torch.Tensor, first: torch.Tensor, n_new: int,
            eos: int | None) -> list[int]:
    ids: list[int] = []
    logits = first
    for k in range(n_new):
        nxt = int(logits.argmax())
        ids.append(nxt)
        if nxt == eos or k == n_new - 1:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([nxt])])
        logits = next_logits(tokens)
    return ids


def _row(tok: Any, i: int, lp_b: torch.Tensor, lp_a: torch.Tensor, lo_b: torch.Tensor,
         lo_a: torch.Tensor) -> dict[str, Any]:
    return {"token": tok.decode([i]), "id": i,
            "prob_before": float(lp_b[i].exp()), "prob_after": float(lp_a[i].exp()),
            "logit_before": float(lo_b[i]), "logit_after": float(lo_a[i]),
            "delta_logit": float(lo_a[i] - lo_b[i])}


@torch.no_grad()
def intervene(
    replacement_model: Any,
    prompt: str | Sequence[int] | torch.Tensor,
    interventions: Sequence[Intervention | dict[str, Any]],
    *,
    freeze: bool = True,
    direct_only: bool = False,
    max_new_tokens: int = 0,
    top_k: int = 10,
    logit_tokens: Sequence[int | str] | None = None,
    watch: Sequence[Any] | None = None,
) -> InterventionResult:
    """Run ``interventions`` on ``prompt`` through circuit-tracer's ``replacement_model`` (see
    the module docstring for what each setting freezes).

    ``prompt``: text (BOS is prepended, as for attribution) or token ids starting with BOS.
    ``max_new_tokens``: length of the greedy continuations before and after (0: none).
    ``logit_tokens``: tokens (single-token strings or ids) whose logit change is reported, e.g.
    an attribution graph's output nodes. ``watch``: ``(layer, feature, position)`` features
    whose activation and pre-activation before and after are reported (e.g. the target of an
    edge: with ``direct_only``, ablating the source moves the target's pre-activation by minus
    the edge weight).
    """
    t0 = time.perf_counter()
    _check_model(replacement_model)
    rm = replacement_model
    for name, flag in (("freeze", freeze), ("direct_only", direct_only)):
        if not isinstance(flag, bool):
            raise CircuitsError(f"{name} must be true or false, got {flag!r}")
    if direct_only and not freeze:
        raise CircuitsError("direct_only freezes attention, norms and MLPs: it needs freeze=True")
    tokens = prompt_ids(rm, prompt)
    n_prompt = len(tokens)
    n_layers, d_sae = rm.cfg.n_layers, int(rm.transcoders.d_transcoder)
    ivs = check_interventions(interventions, n_layers=n_layers, d_sae=d_sae, n_prompt=n_prompt)
    room = rm.cfg.n_ctx - n_prompt
    if not _is_int(max_new_tokens) or not 0 <= max_new_tokens <= room:
        raise CircuitsError(f"max_new_tokens must be an integer in [0, {room}] (n_ctx "
                            f"{rm.cfg.n_ctx} minus the prompt's {n_prompt} tokens), got "
                            f"{max_new_tokens!r}")
    top_k = _int_in(top_k, 1, rm.cfg.d_vocab + 1, "top_k")
    logit_ids = _token_ids(rm, logit_tokens)
    watched = _check_watch(watch, n_layers, d_sae, n_prompt)

    st = _step(rm, tokens, ivs, freeze, direct_only, capture=[w[0] for w in watched])
    lo_b, lo_a = st.clean_logits[-1].float(), st.logits[-1].float()
    lp_b, lp_a = lo_b.double().log_softmax(-1), lo_a.double().log_softmax(-1)
    tok = rm.tokenizer
    top_before = [_row(tok, int(i), lp_b, lp_a, lo_b, lo_a) for i in lp_b.topk(top_k).indices]
    top_after = [_row(tok, int(i), lp_b, lp_a, lo_b, lo_a) for i in lp_a.topk(top_k).indices]
    logit_changes = [_row(tok, i, lp_b, lp_a, lo_b, lo_a) for i in logit_ids]
    kl = float((lp_b.exp() * (lp_b - lp_a)).sum())

    resolved = []
    for iv in ivs:
        pos = slice(1, n_prompt) if iv.position is None else iv.position
        before = st.clean_acts[iv.layer, pos, iv.feature]
        resolved.append({
            "layer": iv.layer, "feature": iv.feature,
            "position": "all" if iv.position is None else iv.position,
            "token": "" if iv.position is None else tok.decode([int(tokens[iv.position])]),
            "op": iv.op, "value": iv.value,
            # over every position: the largest activation, where the feature shows most
            "activation_before": float(before.max() if before.dim() else before),
        })

    def pre(inputs: dict[int, torch.Tensor], layer: int, f: int, p: int) -> float:
        x = inputs[layer][p]
        return float(rm.transcoders.encode_layer(x, layer, apply_activation_function=False)[f])

    watched_rows = [{"layer": layer, "feature": f, "position": p,
                     "token": tok.decode([int(tokens[p])]),
                     "before": float(st.clean_acts[layer, p, f]),
                     "after": float(st.acts[layer, p, f]),
                     "pre_before": pre(st.clean_inputs, layer, f, p),
                     "pre_after": pre(st.inputs, layer, f, p)}
                    for layer, f, p in watched]

    eos = getattr(tok, "eos_token_id", None)

    def plain_next(t: torch.Tensor) -> torch.Tensor:
        return rm(t)[0, -1]

    def intervened_next(t: torch.Tensor) -> torch.Tensor:
        return _step(rm, t, ivs, freeze, direct_only, report=False).logits[-1]

    cont_b = _greedy(plain_next, tokens, lo_b, max_new_tokens, eos)
    cont_a = _greedy(intervened_next, tokens, lo_a, max_new_tokens, eos)
    return InterventionResult(
        prompt_tokens=[tok.decode([int(i)]) for i in tokens],
        prompt_ids=[int(i) for i in tokens],
        interventions=resolved,
        freeze=freeze,
        direct_only=direct_only,
        top_before=top_before,
        top_after=top_after,
        logit_changes=logit_changes,
        kl=kl,
        watched=watched_rows,
        continuation_before=_continuation(rm, cont_b),
        continuation_after=_continuation(rm, cont_a),
        seconds=time.perf_counter() - t0,
        logits_before=lo_b.cpu(),
        logits_after=lo_a.cpu(),
    )
