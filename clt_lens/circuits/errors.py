"""The error type of clt_lens.circuits (kept free of heavy imports so the viewer starts fast)."""

from clt_lens.errors import CLTLensError


class CircuitsError(CLTLensError, ValueError):
    """Bad input to export/attribution/viewer code; the message names the input."""
