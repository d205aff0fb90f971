"""Errors raised while loading a model or choosing its CLT hooks."""

from __future__ import annotations

from clt_lens.errors import CLTLensError


class ModelLoadError(CLTLensError, ValueError):
    """The model could not be loaded; the message names the input and what is accepted."""


class UnsupportedFamilyError(ModelLoadError):
    """The model's family has no verified default hooks, or circuit-tracer cannot attribute
    through it; the message names the family and the supported ones."""
