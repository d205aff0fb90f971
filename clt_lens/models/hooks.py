"""Default CLT hooks per family: ``default_hooks`` / ``resolve_hooks`` turn a hook setting of
``"auto"`` into the family's names; ``check_attribution_support`` says whether circuit-tracer
attribution through a model is verified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformer_lens import HookedTransformerConfig

from clt_lens.activations import HookSpec
from clt_lens.models.errors import UnsupportedFamilyError
from clt_lens.models.families import SUPPORTED
from clt_lens.models.identity import cfg_of, model_family

AUTO_HOOK = "auto"  # a TrainConfig/CacheConfig hook set to this takes the family default


def _family_key(model_or_family: Any) -> str:
    if isinstance(model_or_family, str) and model_or_family in SUPPORTED:
        return model_or_family
    return model_family(model_or_family)


def _custom_cfg(model_or_cfg: Any) -> HookedTransformerConfig | None:
    """The config of a HookedTransformer built straight from a config (no original_architecture:
    TransformerLens's standard block), else None."""
    cfg = cfg_of(model_or_cfg)
    if isinstance(cfg, HookedTransformerConfig) and cfg.original_architecture is None:
        return cfg
    return None


def _block_problem(cfg: HookedTransformerConfig) -> str | None:
    """Why the standard hooks do not fit a custom model's blocks, or None if they do."""
    if cfg.attn_only:
        return "has no MLPs (attn_only=True), so there is nothing for a CLT to replace"
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        return (f"has normalization_type={cfg.normalization_type!r}, so there is no "
                "ln2.hook_normalized to read")
    return None


def _unsupported(family: str, what: str) -> UnsupportedFamilyError:
    return UnsupportedFamilyError(
        f"model family {family!r} {what}; supported families: {sorted(SUPPORTED)}. A model of "
        "another family can still be trained on with explicit input_hook and output_hook "
        "(block-relative TransformerLens names such as 'ln2.hook_normalized', 'hook_mlp_out')"
    )


def default_hooks(model_or_family: Any) -> HookSpec:
    """The CLT hooks for a family key, a model, its config, or a ``load_model`` name/path.

    Raises ``UnsupportedFamilyError`` (naming the family and the supported ones) for a family
    without verified defaults. A HookedTransformer built from a bare config (TransformerLens's
    standard pre-norm block) gets the standard hooks if it has MLPs and a norm before them.
    """
    family = _family_key(model_or_family)
    if family in SUPPORTED:
        return SUPPORTED[family].hooks
    custom = _custom_cfg(model_or_family) if family == "unknown" else None
    if custom is None:
        if family == "unknown" and isinstance(model_or_family, str | Path):
            family = f"unknown (model {str(model_or_family)!r})"
        raise _unsupported(family, "has no verified default CLT hooks")
    problem = _block_problem(custom)
    if problem is not None:
        raise _unsupported(f"custom ({custom.model_name})", problem)
    return HookSpec()


def resolve_hooks(
    model_or_name: Any, input_hook: str = AUTO_HOOK, output_hook: str = AUTO_HOOK
) -> HookSpec:
    """``HookSpec(input_hook, output_hook)`` with each ``"auto"`` replaced by the family default
    (``default_hooks``); explicit names are kept as given and not checked against the family."""
    if input_hook != AUTO_HOOK and output_hook != AUTO_HOOK:
        return HookSpec(input_hook, output_hook)
    auto = default_hooks(model_or_name)
    return HookSpec(
        auto.input_hook if input_hook == AUTO_HOOK else input_hook,
        auto.output_hook if output_hook == AUTO_HOOK else output_hook,
    )


def check_attribution_support(model: Any) -> str:
    """The family of ``model`` if circuit-tracer attribution through it is verified; otherwise
    ``UnsupportedFamilyError`` naming the family and the supported ones."""
    family = model_family(model)
    if family in SUPPORTED and SUPPORTED[family].attribution:
        return family
    custom = _custom_cfg(model) if family == "unknown" else None
    if custom is not None and _block_problem(custom) is None:
        return "custom"
    cfg = cfg_of(model)
    name = getattr(cfg, "model_name", None) or str(model)
    verified = sorted(f for f, s in SUPPORTED.items() if s.attribution)
    raise UnsupportedFamilyError(
        f"model {name!r} is of family {family!r}: circuit-tracer attribution is verified only "
        f"for the families {verified} (and HookedTransformers built from a standard config)"
    )
