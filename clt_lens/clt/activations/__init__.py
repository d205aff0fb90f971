"""Registry of the CLT's activation variants (``CLTConfig.activation`` -> variant object).

To add an activation: write ``clt_lens/clt/activations/<name>.py`` with an ``Activation``
subclass (see ``base.py`` for what it may override), then register it here: its class in
``_VARIANTS`` and its name in ``ActivationName`` (tests/test_clt_variants.py checks that the two
agree). See CONTRIBUTING.md, "How to add an activation function".
"""

from __future__ import annotations

from typing import Literal

from clt_lens.clt.activations.base import Activation
from clt_lens.clt.activations.batchtopk import BatchTopK
from clt_lens.clt.activations.jumprelu import JumpReLU
from clt_lens.clt.activations.relu import ReLU
from clt_lens.clt.activations.topk import TopK
from clt_lens.config import ConfigError

# The type of CLTConfig.activation; a Literal must be spelled out for type checkers.
ActivationName = Literal["jumprelu", "relu", "topk", "batchtopk"]

_VARIANTS: tuple[type[Activation], ...] = (JumpReLU, ReLU, TopK, BatchTopK)

REGISTRY: dict[str, Activation] = {cls.name: cls() for cls in _VARIANTS}
ACTIVATIONS: tuple[str, ...] = tuple(REGISTRY)


def get_activation(name: str) -> Activation:
    """The variant object registered as ``name``; ConfigError names the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"CLTConfig.activation must be one of {list(ACTIVATIONS)}, got {name!r}"
        ) from None


__all__ = [
    "ACTIVATIONS",
    "REGISTRY",
    "Activation",
    "ActivationName",
    "BatchTopK",
    "JumpReLU",
    "ReLU",
    "TopK",
    "get_activation",
]
