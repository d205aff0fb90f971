"""Errors raised by the activation cache."""

from __future__ import annotations

from clt_lens.errors import CLTLensError


class CacheError(CLTLensError, ValueError):
    """A cache (or one of its files) is missing, corrupt, too new, or not the one expected."""


class CacheMismatchError(CacheError):
    """The cache was built for another model / hooks / shape than the caller expects."""
