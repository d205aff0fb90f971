"""The one base class of every error clt_lens raises on purpose.

``CLTLensError`` marks an error about the user's input or environment (a config key, a file, a
shape, a hook, a missing dependency), with a message that names the problem. The ``clt-lens``
command prints such an error as one line and exits with status 2; anything else is a bug and
keeps its traceback. Subclasses that were ``ValueError``s (or ``RuntimeError``s) stay so, so
``except ValueError`` in user code still works.
"""

from __future__ import annotations


class CLTLensError(Exception):
    """An error about clt_lens's input or environment, with a message naming the problem."""


class InputError(CLTLensError, ValueError):
    """A value handed to clt_lens is wrong: a shape, a range, an option, a combination."""


class MissingFileError(CLTLensError, FileNotFoundError):
    """A file or folder clt_lens was pointed at does not exist."""
