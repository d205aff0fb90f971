"""The error every dataset problem raises."""

from __future__ import annotations

from clt_lens.errors import CLTLensError


class DataLoadError(CLTLensError, ValueError):
    """A dataset could not be turned into token sequences; the message says why and what works."""
